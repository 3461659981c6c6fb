"""Values that land in a job script must stay one word there.

NeMo-Run writes some executor fields into the sbatch script unquoted (the job name and log
paths it derives from the account, for one), so a value such as `acct;touch pwned` would run
a second command on the cluster. Every field that reaches a script is checked against a
conservative character set before anything is written or submitted.
"""

import re

from distill_llm.errors import ConfigError

# Letters, digits and the punctuation of paths, images, times, hosts and lists; no spaces,
# quotes, `;`, `&`, `|`, `$`, backticks, redirections or newlines.
SAFE = re.compile(r"[A-Za-z0-9_.,:/@%+=~-]*")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# (field, what it is) of the executors' string fields that reach a script or a command line
SCRIPT_FIELDS = (
    ("account", "Slurm account"),
    ("partition", "Slurm partition"),
    ("time", "time limit"),
    ("job_name_prefix", "job name prefix"),
    ("container_image", "container image"),
    ("job_dir", "job directory"),
    ("qos", "Slurm QoS"),
    ("constraint", "Slurm constraint"),
    ("reservation", "Slurm reservation"),
    ("shm_size", "shared-memory size"),
)
LIST_FIELDS = (("container_mounts", "container mount"), ("volumes", "volume"))


def check_value(value, where: str) -> None:
    """Refuse a value with characters a shell would treat specially (one line, with the fix)."""
    text = str(value)
    if not SAFE.fullmatch(text):
        bad = sorted({c for c in text if not SAFE.fullmatch(c)})
        raise ConfigError(
            f"{where} {text!r} contains {''.join(bad)!r}, which would reach the job script "
            "unquoted; use only letters, digits and _ . , : / @ % + = ~ -"
        )


def check_executor(executor, prefix: str = "run.executor") -> None:
    """Check every script-bound field of a NeMo-Run executor (or its run.Config), its tunnel's
    job directory and host, and its environment variables' names and values."""
    if executor is None:
        return
    for name, what in SCRIPT_FIELDS:
        value = getattr(executor, name, None)
        if value:
            check_value(value, f"{prefix}.{name} ({what})")
    for name, what in LIST_FIELDS:
        for item in getattr(executor, name, None) or []:
            check_value(item, f"{prefix}.{name} ({what})")
    for key, value in (getattr(executor, "env_vars", None) or {}).items():
        if not ENV_NAME.fullmatch(str(key)):
            raise ConfigError(
                f"{prefix}.env_vars: {key!r} is not an environment variable name; use "
                "letters, digits and _ (not starting with a digit)"
            )
        check_value(value, f"{prefix}.env_vars.{key}")
    tunnel = getattr(executor, "tunnel", None)
    for name in ("job_dir", "host", "user"):
        value = getattr(tunnel, name, None) if tunnel is not None else None
        if value:
            check_value(value, f"{prefix}.tunnel.{name}")
