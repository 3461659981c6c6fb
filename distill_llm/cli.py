"""The `nemo distill_llm ...` command line (NeMo-Run's CLI) and job launching with a checked
outcome.

    nemo distill_llm distill    --factory tiny [key=value ...] [--dryrun] [--to-yaml F] [--yes]
    nemo distill_llm pretrain   --factory tiny_teacher --yes
    nemo distill_llm preprocess input=corpus.jsonl output_prefix=data/c tokenizer=tok --yes
    ... run.executor=local run.executor.devices=2      (torchrun on this machine)
    ... run.executor=slurm run.executor.nodes=2 ...    (sbatch; see distill_llm.executors)

Without `run.executor` the task runs in this process. NeMo-Run's own `run.run` returns None
when a job fails; here a failed job prints the tail of its log and the command exits 1.

This is the only engine module that imports `distill_llm.recipes` and `distill_llm.executors`
(to register their factories).
"""

import sys
from pathlib import Path

import nemo_run as run
from nemo_run.cli.api import RunContext

# Registering the factories is importing them.
from distill_llm import api, executors  # noqa: F401
from distill_llm import preprocess as preprocess_mod
from distill_llm.recipes import (  # noqa: F401
    data,
    llama31_8b_to_llama32_1b,
    models,
    qwen25_7b_to_qwen25_1p5b,
    tiny,
    tiny_teacher,
    training,
)

NAMESPACE = "distill_llm"
LOG_TAIL_LINES = 40


class JobFailed(RuntimeError):
    """A launched job ended in a state other than SUCCEEDED."""


def _log_tail(exp_dir: str, lines: int = LOG_TAIL_LINES) -> str:
    """The last `lines` lines of the newest log file of an experiment."""
    logs = [
        p
        for p in Path(exp_dir).rglob("*")
        if p.is_file() and (p.suffix in (".out", ".err", ".log") or p.name.startswith("log"))
    ]
    if not logs:
        return f"(no log files under {exp_dir})"
    newest = max(logs, key=lambda p: p.stat().st_mtime)
    text = newest.read_text(errors="replace").splitlines()[-lines:]
    return f"--- last {len(text)} lines of {newest} ---\n" + "\n".join(text)


def launch(task, executor=None, name: str = "distill_llm", detach: bool = False) -> str:
    """Run `task` (a run.Partial) on `executor`, wait, and return the final state's name.

    Raises JobFailed, with the failing task's log tail in the message, unless the job
    succeeded. With no executor the task runs in this process (errors raise directly). With
    `detach`, returns after submission ("SUBMITTED").
    """
    if executor is None:
        run.run(task, direct=True)
        return "SUCCEEDED"
    with run.Experiment(name, executor=executor, log_level="WARN") as exp:
        exp.add(task, name=name, tail_logs=not detach)
        exp.run(detach=detach)
    # the experiment waits for its jobs when its `with` block closes
    if detach:
        return "SUBMITTED"
    job = exp.jobs[0]
    state = getattr(job.state, "name", str(job.state))
    if state != "SUCCEEDED":
        raise JobFailed(
            f"job {name} ended {state} (experiment {exp._exp_dir})\n{_log_tail(exp._exp_dir)}"
        )
    return state


class CheckedRunContext(RunContext):
    """NeMo-Run's run context, launching through `launch` so failures exit non-zero."""

    def _execute_task(self, fn, task_args):
        if any([self.to_yaml, self.to_toml, self.to_json]):
            return super()._execute_task(fn, task_args)
        task = self.parse_fn(fn, task_args)
        run.dryrun_fn(task, executor=self.executor)
        if self.dryrun:
            print(f"Dry run for {self.name}: nothing submitted.")
            return None
        if not self._should_continue(self.skip_confirmation):
            print("Exiting...")
            return None
        executor = None if self.direct else self.executor
        try:
            state = launch(task, executor, name=self.name, detach=self.detach)
        except JobFailed as err:
            print(str(err), file=sys.stderr)
            sys.exit(1)  # SystemExit: NeMo-Run's CLI wrapper would swallow typer.Exit
        print(f"{self.name}: {state}")
        return None


def _register(fn, help_text: str):
    if not hasattr(fn, "cli_entrypoint"):
        run.cli.entrypoint(namespace=NAMESPACE, help=help_text, run_ctx_cls=CheckedRunContext)(fn)
    return fn


distill = _register(api.distill, "Distil a student from a frozen teacher checkpoint.")
pretrain = _register(api.pretrain, "Train a GPT on its own LM loss (teachers, baselines).")
preprocess = _register(preprocess_mod.preprocess, "Tokenize text into a .bin/.idx dataset.")
