"""Bring up a real single-machine Slurm cluster (two nodes, slurmdbd accounting) for the tests.

`ensure_cluster()` installs what is missing (Debian packages, as root), writes
/etc/slurm/slurm.conf and /etc/slurm/slurmdbd.conf, and starts munged, MariaDB, slurmdbd,
slurmctld and two slurmd daemons (nodes n1 and n2 on this host). Daemon state, databases and
logs live under a state directory. It is idempotent: healthy daemons are reused, and the Slurm
daemons are restarted only when a config file changed. `stop_cluster()` stops it again.

Standard library only. Run `python3 tests/slurm_cluster.py` to start the cluster and submit a
smoke test (one job that must end COMPLETED, one that must end FAILED), or
`python3 tests/slurm_cluster.py --stop` to stop every daemon.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

PARTITION = "debug"
CLUSTER = "distill"
ACCOUNT = "distill_llm"
NODES = ("n1", "n2")
DEFAULT_STATE_DIR = Path("/tmp/distill_llm_slurm")
SLURM_ETC = Path("/etc/slurm")

_NODE_PORTS = (17001, 17002)
_CTLD_PORT = 6817
_DBD_PORT = 6819
_DB_PORT = 13306
_DB_USER = _DB_PASS = "slurm"
_DB_NAME = "slurm_acct_db"
_MUNGE_LOG = Path("/var/log/munge/munged.log")
_MUNGE_KEY = Path("/etc/munge/munge.key")
_SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# executable -> Debian package that provides it
_REQUIRED = {
    "munged": "munge",
    "slurmctld": "slurmctld",
    "slurmd": "slurmd",
    "sbatch": "slurm-client",
    "slurmdbd": "slurmdbd",
    "mariadbd": "mariadb-server",
    "mariadb-install-db": "mariadb-server",
    "mariadb": "mariadb-client",
}
_APT_PACKAGES = ("slurm-wlm", "slurmdbd", "mariadb-server", "munge")
_DAEMONS = {"munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd"}
_LIVE_STATES = {"idle", "mixed", "allocated", "completing"}


def _fail(step: str, why: str, log: Path | None = None, lines: int = 25) -> RuntimeError:
    """A RuntimeError: one line naming the step, then the tail of `log` if there is one."""
    why = " ".join(why.split())[-400:] or "no output"
    msg = f"slurm cluster: step '{step}' failed: {why}"
    if log is not None:
        try:
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            msg += f"\n--- last {len(tail)} lines of {log} ---\n" + "\n".join(tail)
        except OSError as exc:
            msg += f"\n(no log at {log}: {exc.strerror})"
    return RuntimeError(msg)


def _run(
    cmd: list[str],
    step: str,
    log: Path | None = None,
    check: bool = True,
    timeout: float = 60,
    input: str | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Run `cmd` capturing text output; on failure (if `check`) raise `_fail(step, ...)`."""
    env = {**os.environ, "PATH": _SBIN_PATH + ":" + os.environ.get("PATH", ""), **(env or {})}
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, input=input, env=env
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        if not check:
            return subprocess.CompletedProcess(cmd, -1, "", str(exc))
        raise _fail(step, f"{' '.join(cmd)}: {exc}", log) from None
    if check and proc.returncode != 0:
        why = f"`{' '.join(cmd)}` exited {proc.returncode}: {proc.stderr or proc.stdout}"
        raise _fail(step, why, log)
    return proc


def _ok(cmd: list[str], timeout: float = 20) -> bool:
    """True if `cmd` exits 0."""
    return _run(cmd, "probe", check=False, timeout=timeout).returncode == 0


def _wait(
    step: str,
    probe: Callable[[], bool],
    deadline: float,
    log: Path | None,
    died: Callable[[], bool] | None = None,
) -> None:
    """Poll `probe` until true; raise `_fail(step, ...)` at `deadline` or, after a 5 s grace,
    as soon as `died()` says the daemon we wait for has exited."""
    start = time.monotonic()
    while not probe():
        if died is not None and time.monotonic() - start > 5 and died():
            raise _fail(step, "the daemon exited", log)
        if time.monotonic() > deadline:
            raise _fail(step, "timed out waiting", log)
        time.sleep(1)


def _which(name: str) -> str | None:
    return shutil.which(name, path=_SBIN_PATH)


def _pid(pidfile: Path) -> int | None:
    """The pid in `pidfile` if that process is alive and is one of our daemons, else None."""
    try:
        pid = int(pidfile.read_text().split()[0])
        exe = os.path.basename(os.readlink(f"/proc/{pid}/exe")).split("-")[0]  # slurmd-wlm
    except (OSError, ValueError, IndexError):
        return None
    return pid if exe in _DAEMONS else None


def _pid_alive(pidfile: Path) -> bool:
    """True if `pidfile` names a live daemon of ours."""
    return _pid(pidfile) is not None


def _kill(pidfile: Path, timeout: float = 30) -> None:
    """SIGTERM the daemon in `pidfile`, SIGKILL it after `timeout` s, remove the file."""
    pid = _pid(pidfile)
    try:
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and _pid(pidfile) == pid:
                time.sleep(0.2)
            if _pid(pidfile) == pid:
                os.kill(pid, signal.SIGKILL)
    except OSError:
        pass
    pidfile.unlink(missing_ok=True)


def _write_if_changed(path: Path, text: str, mode: int) -> bool:
    """Write `text` to `path` (mode `mode`, owner root) unless identical; True if written."""
    changed = not path.exists() or path.read_text() != text
    if changed:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    os.chmod(path, mode)
    return changed


def _install() -> None:
    """apt-get install the Slurm, slurmdbd, MariaDB and munge packages if any are missing."""
    missing = sorted({pkg for exe, pkg in _REQUIRED.items() if not _which(exe)})
    if not missing:
        return
    # Keep package scripts from starting daemons (there is no systemd; we start them ourselves).
    policy = Path("/usr/sbin/policy-rc.d")
    own_policy = not policy.exists()
    if own_policy:
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    apt = ["apt-get", "-y", "-q", "-o", "Dpkg::Options::=--force-confold"]
    install = apt + ["install", "--no-install-recommends", *_APT_PACKAGES]
    env = {"DEBIAN_FRONTEND": "noninteractive"}
    try:
        if _run(install, "install", check=False, timeout=900, env=env).returncode != 0:
            _run(apt + ["update"], "apt-get update", timeout=600, env=env)
            _run(install, "install", timeout=900, env=env)
    finally:
        if own_policy:
            policy.unlink(missing_ok=True)
    still = sorted(exe for exe in _REQUIRED if not _which(exe))
    if still:
        raise _fail("install", f"executables still missing after apt-get install: {still}")


def _configs(state: Path) -> tuple[str, str]:
    """The text of slurm.conf and slurmdbd.conf."""
    host = socket.gethostname().split(".")[0]
    cpus = os.cpu_count() or 1
    mem_kb = int(Path("/proc/meminfo").read_text().split()[1])  # MemTotal
    mem_mb = max(512, mem_kb // 1024 // len(NODES) // 512 * 512)
    nodes = f"n[1-{len(NODES)}]"
    ports = f"[{_NODE_PORTS[0]}-{_NODE_PORTS[-1]}]"
    slurm_conf = f"""\
# Written by tests/slurm_cluster.py: a two-node test cluster on one host.
ClusterName={CLUSTER}
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={_CTLD_PORT}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={state}/slurmctld
SlurmdSpoolDir={state}/slurmd-%n
SlurmctldPidFile={state}/slurmctld.pid
SlurmdPidFile={state}/slurmd-%n.pid
SlurmctldLogFile={state}/slurmctld.log
SlurmdLogFile={state}/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
MailProg=/bin/true
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort={_DBD_PORT}
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
JobCompType=jobcomp/none
InactiveLimit=0
KillWait=5
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=60
NodeName={nodes} NodeHostname={host} NodeAddr=127.0.0.1 Port={ports} CPUs={cpus} \
RealMemory={mem_mb} State=UNKNOWN
PartitionName={PARTITION} Nodes={nodes} Default=YES MaxTime=UNLIMITED State=UP OverSubscribe=YES
"""
    dbd_conf = f"""\
# Written by tests/slurm_cluster.py.
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort={_DBD_PORT}
SlurmUser=root
PidFile={state}/slurmdbd.pid
LogFile={state}/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={_DB_PORT}
StorageUser={_DB_USER}
StoragePass={_DB_PASS}
StorageLoc={_DB_NAME}
"""
    return slurm_conf, dbd_conf


def _munge_ok() -> bool:
    cred = _run(["munge", "-n"], "munge", check=False, timeout=10)
    if cred.returncode != 0:
        return False
    return _run(["unmunge"], "munge", check=False, timeout=10, input=cred.stdout).returncode == 0


def _start_munge(deadline: float) -> None:
    """Start munged as the munge user unless a credential round trip already works."""
    if _munge_ok():
        return
    if not _MUNGE_KEY.exists():
        _run(["mungekey", "--create", f"--keyfile={_MUNGE_KEY}"], "munge key")
    for path, mode in (
        (Path("/run/munge"), 0o755),
        (_MUNGE_LOG.parent, 0o700),
        (Path("/var/lib/munge"), 0o700),
        (_MUNGE_KEY.parent, 0o700),
    ):
        path.mkdir(parents=True, exist_ok=True)
        shutil.chown(path, "munge", "munge")
        path.chmod(mode)
    shutil.chown(_MUNGE_KEY, "munge", "munge")
    _MUNGE_KEY.chmod(0o400)
    _run(["runuser", "-u", "munge", "--", "munged", "--force"], "start munged", _MUNGE_LOG)
    _wait("munge credential round trip", _munge_ok, deadline, _MUNGE_LOG)


def _sql(state: Path, sql: str, step: str) -> subprocess.CompletedProcess:
    sock = state / "mariadb" / "mysqld.sock"
    cmd = ["mariadb", "--no-defaults", f"--socket={sock}", "-uroot", "-e", sql]
    return _run(cmd, step, state / "mariadb" / "mariadb.log", timeout=30)


def _start_mariadb(state: Path, deadline: float) -> None:
    """Start a private MariaDB (datadir under `state`, TCP 127.0.0.1) and grant the slurm user."""
    base = state / "mariadb"
    data, log, sock = base / "data", base / "mariadb.log", base / "mysqld.sock"
    ping = ["mariadb", "--no-defaults", f"--socket={sock}", "-uroot", "-e", "SELECT 1"]
    if not _ok(ping):
        if not (data / "mysql").is_dir():
            shutil.rmtree(data, ignore_errors=True)
            data.mkdir(parents=True)
            init = [
                "mariadb-install-db",
                "--no-defaults",
                "--user=root",
                f"--datadir={data}",
                "--auth-root-authentication-method=socket",
                "--skip-test-db",
            ]
            _run(init, "mariadb-install-db", log, timeout=300)
        _kill(base / "mariadb.pid")
        sock.unlink(missing_ok=True)
        mariadbd = [
            "setsid",
            "-f",
            _which("mariadbd") or "mariadbd",
            "--no-defaults",
            "--user=root",
            f"--datadir={data}",
            f"--socket={sock}",
            f"--pid-file={base / 'mariadb.pid'}",
            f"--log-error={log}",
            "--bind-address=127.0.0.1",
            f"--port={_DB_PORT}",
            "--skip-name-resolve",
            "--performance-schema=OFF",
            "--innodb-buffer-pool-size=128M",
            "--innodb-lock-wait-timeout=900",
        ]
        log_size = log.stat().st_size if log.exists() else 0

        def aborted() -> bool:
            try:
                with open(log, "rb") as f:
                    f.seek(log_size)
                    return b"[ERROR] Aborting" in f.read()
            except OSError:
                return False

        # setsid -f: detach from us; stdio to /dev/null (mariadbd logs to --log-error).
        null = subprocess.DEVNULL
        subprocess.run(mariadbd, stdin=null, stdout=null, stderr=null, check=False, timeout=30)
        _wait("mariadbd answers", lambda: _ok(ping), deadline, log, aborted)
    grants = "".join(
        f"CREATE USER IF NOT EXISTS '{_DB_USER}'@'{h}' IDENTIFIED BY '{_DB_PASS}';"
        f"GRANT ALL ON {_DB_NAME}.* TO '{_DB_USER}'@'{h}';"
        for h in ("127.0.0.1", "localhost")
    )
    _sql(state, grants, "mariadb grant slurm user")


def _sacctmgr_list(*what: str) -> list[str]:
    """`sacctmgr list <what...>` output words (empty if sacctmgr fails)."""
    out = _run(["sacctmgr", "-n", "-P", "list", *what], "sacctmgr", check=False)
    return out.stdout.split() if out.returncode == 0 else []


def _start_slurmdbd(state: Path, restart: bool, deadline: float) -> None:
    """Start slurmdbd, wait until sacctmgr answers, register the cluster, account and root."""
    log, pid = state / "slurmdbd.log", state / "slurmdbd.pid"
    answers = lambda: _ok(["sacctmgr", "-n", "-P", "list", "cluster"])  # noqa: E731
    if restart or not _pid_alive(pid) or not answers():
        _kill(pid)
        _run(["slurmdbd"], "start slurmdbd", log)
        _wait("slurmdbd answers sacctmgr", answers, deadline, log, lambda: not _pid_alive(pid))
    if CLUSTER not in _sacctmgr_list("cluster", "format=cluster"):
        _run(["sacctmgr", "-i", "add", "cluster", CLUSTER], "sacctmgr add cluster", log)
    if ACCOUNT not in _sacctmgr_list("account", "format=account"):
        cmd = [
            "sacctmgr",
            "-i",
            "add",
            "account",
            ACCOUNT,
            f"cluster={CLUSTER}",
            "description=distill_llm tests",
            "organization=distill_llm",
        ]
        _run(cmd, "sacctmgr add account", log)
    if "root" not in _sacctmgr_list("assoc", f"account={ACCOUNT}", "format=user"):
        cmd = [
            "sacctmgr",
            "-i",
            "add",
            "user",
            "root",
            f"account={ACCOUNT}",
            f"cluster={CLUSTER}",
            f"defaultaccount={ACCOUNT}",
        ]
        _run(cmd, "sacctmgr add user", log)


def _node_states() -> dict[str, str]:
    out = _run(["sinfo", "-h", "-N", "-p", PARTITION, "-o", "%N %T"], "sinfo", check=False)
    return dict(line.split(None, 1) for line in out.stdout.splitlines() if " " in line)


def _start_slurm(state: Path, restart: bool, deadline: float) -> None:
    """Start slurmctld and one slurmd per node; wait for the nodes to be idle, sacct to answer."""
    ctld_log, ctld_pid = state / "slurmctld.log", state / "slurmctld.pid"
    ctld_up = lambda: "is UP" in _run(["scontrol", "ping"], "ping", check=False).stdout  # noqa: E731
    if restart:
        for node in NODES:
            _kill(state / f"slurmd-{node}.pid")
        _kill(ctld_pid)
    (state / "slurmctld").mkdir(exist_ok=True)
    if not _pid_alive(ctld_pid) or not ctld_up():
        _kill(ctld_pid)
        _run(["slurmctld"], "start slurmctld", ctld_log)
        gone = lambda: not _pid_alive(ctld_pid)  # noqa: E731
        _wait("slurmctld answers scontrol ping", ctld_up, deadline, ctld_log, gone)
    for node in NODES:
        (state / f"slurmd-{node}").mkdir(exist_ok=True)
        if not _pid_alive(state / f"slurmd-{node}.pid"):
            _run(["slurmd", "-N", node], f"start slurmd {node}", state / f"slurmd-{node}.log")
    resumed = False

    def nodes_live() -> bool:
        nonlocal resumed
        states = _node_states()
        if not resumed and any(s.startswith(("down", "drain")) for s in states.values()):
            resumed = True  # e.g. left down by a previous run's state; bring them back once
            _run(
                ["scontrol", "update", f"NodeName={','.join(NODES)}", "State=RESUME"],
                "resume nodes",
                ctld_log,
                check=False,
            )
        return all(states.get(n) in _LIVE_STATES for n in NODES)

    _wait(f"nodes {','.join(NODES)} idle in sinfo", nodes_live, deadline, ctld_log)
    sacct = ["sacct", "-n", "-X", "-P", "-S", "now-1hours", "-o", "JobID"]
    _wait("sacct answers", lambda: _ok(sacct), deadline, state / "slurmdbd.log")


def _previous_state_dir() -> Path | None:
    """The state dir that the current /etc/slurm/slurm.conf was written for, if any."""
    try:
        text = (SLURM_ETC / "slurm.conf").read_text()
    except OSError:
        return None
    match = re.search(r"^StateSaveLocation=(.+)/slurmctld$", text, re.MULTILINE)
    return Path(match.group(1)) if match else None


def ensure_cluster(state_dir: str | Path | None = None, timeout: float = 180) -> dict:
    """Install, configure and start the two-node Slurm cluster with slurmdbd accounting.

    Reuses daemons that are already running and healthy. Returns
    ``{"partition", "nodes", "accounting", "account", "cluster", "log_dir"}``; raises
    RuntimeError (first line names the failing step, then a log tail) on any failure.
    """
    if os.geteuid() != 0:
        raise _fail("preflight", "ensure_cluster must run as root (it installs and starts daemons)")
    state = Path(state_dir or DEFAULT_STATE_DIR).resolve()
    state.mkdir(parents=True, exist_ok=True)
    with open(state / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one setup at a time (e.g. pytest-xdist workers)
        _install()
        deadline = time.monotonic() + timeout
        slurm_conf, dbd_conf = _configs(state)
        previous = _previous_state_dir()
        if previous is not None and previous != state:
            stop_cluster(previous, munge=False)  # its MariaDB and Slurm ports are ours now
        dbd_changed = _write_if_changed(SLURM_ETC / "slurmdbd.conf", dbd_conf, 0o600)
        conf_changed = _write_if_changed(SLURM_ETC / "slurm.conf", slurm_conf, 0o644)
        _start_munge(deadline)
        _start_mariadb(state, deadline)
        _start_slurmdbd(state, dbd_changed, deadline)
        _start_slurm(state, conf_changed, deadline)
    return {
        "partition": PARTITION,
        "nodes": len(NODES),
        "accounting": "slurmdbd",
        "account": ACCOUNT,
        "cluster": CLUSTER,
        "log_dir": str(state),
    }


def stop_cluster(state_dir: str | Path | None = None, munge: bool = True) -> None:
    """Stop slurmd, slurmctld, slurmdbd, MariaDB and (if `munge`) munged; keep all state."""
    state = Path(state_dir or DEFAULT_STATE_DIR).resolve()
    for node in NODES:
        _kill(state / f"slurmd-{node}.pid")
    _kill(state / "slurmctld.pid")
    _kill(state / "slurmdbd.pid")
    _kill(state / "mariadb" / "mariadb.pid", timeout=60)
    if munge:
        _kill(Path("/run/munge/munged.pid"))


def _job_state(job_id: str) -> str:
    cmd = ["sacct", "--parsable2", "-n", "-X", "-j", job_id, "-o", "State"]
    out = _run(cmd, f"sacct job {job_id}", check=False)
    return out.stdout.strip().split(" ")[0] if out.returncode == 0 else ""


def smoke_test(timeout: float = 120) -> dict[str, str]:
    """Submit `srun hostname` on 2 nodes and `exit 3`; check sacct says COMPLETED and FAILED.

    Returns {job_id: final State}. Raises RuntimeError if a state is not as expected.
    """
    jobs = {}
    for wrap, want in (("srun hostname", "COMPLETED"), ("exit 3", "FAILED")):
        cmd = ["sbatch", "--parsable", "-N2", f"-p{PARTITION}", "-o", "/dev/null", "--wrap", wrap]
        job_id = _run(cmd, "sbatch smoke job").stdout.strip().split(";")[0]
        jobs[job_id] = want
    deadline = time.monotonic() + timeout
    done = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}
    states: dict[str, str] = {}
    for job_id, want in jobs.items():
        _wait(f"job {job_id} finishes", lambda j=job_id: _job_state(j) in done, deadline, None)
        states[job_id] = _job_state(job_id)
        if states[job_id] != want:
            raise _fail("smoke test", f"job {job_id} ended {states[job_id]}, expected {want}")
    return states


if __name__ == "__main__":
    if sys.argv[1:] == ["--stop"]:
        stop_cluster()
        print("stopped")
        sys.exit(0)
    t0 = time.monotonic()
    info = ensure_cluster()
    print(f"cluster up in {time.monotonic() - t0:.1f}s: {info}")
    states = smoke_test()
    for job in states:
        print(_run(["sacct", "--parsable2", "-j", job], "sacct").stdout.rstrip())
    print(f"smoke test passed: {states}")
