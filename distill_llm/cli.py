"""The `nemo distill_llm ...` command line (NeMo-Run's CLI) and job launching with a checked
outcome.

    nemo distill_llm distill    --factory tiny [key=value ...] [--dryrun] [--to-yaml F] [--yes]
    nemo distill_llm pretrain   --factory tiny_teacher --yes
    nemo distill_llm preprocess input=corpus.jsonl output_prefix=data/c tokenizer=tok --yes
    nemo distill_llm prune      teacher=ckpt output_dir=pruned target=4B --yes
    ... run.executor=local run.executor.ntasks_per_node=2      (torchrun on this machine)
    ... run.executor=slurm run.executor.nodes=2 ...    (sbatch; see distill_llm.executors)

Without `run.executor` the task runs in this process. NeMo-Run's own `run.run` returns None
when a job fails; here a failed job prints the tail of its log and the command exits 1.

This is the only engine module that imports `distill_llm.recipes` and `distill_llm.executors`
(to register their factories).
"""

import inspect
import re
import sys
import time
from pathlib import Path

import fiddle as fdl
import nemo_run as run
from nemo_run.cli.api import RunContext

# Registering the factories is importing them.
from distill_llm import api, checks, executors  # noqa: F401
from distill_llm.data import preprocess as preprocess_mod
from distill_llm.data.datasets import DataConfig
from distill_llm.engine.parallel import ParallelConfig, world_size_from_env
from distill_llm.engine.training import OptimConfig, TrainConfig
from distill_llm.errors import ConfigError
from distill_llm.executors.safety import check_executor, check_value
from distill_llm.formats.hf import io as hf
from distill_llm.formats.nemo import io as nemo_io
from distill_llm.kd.config import KDConfig
from distill_llm.recipes import (  # noqa: F401
    RECIPES,
    data,
    llama31_8b_prune_distill_4b,
    llama31_8b_to_llama32_1b,
    mixtral_8x7b_to_mistral_7b,
    models,
    nemo_to_nemo,
    qwen3_30b_a3b_to_qwen3_4b,
    qwen25_7b_to_qwen25_1p5b,
    tiny,
    tiny_cache,
    tiny_moe,
    tiny_prune,
    tiny_teacher,
    training,
)

NAMESPACE = "distill_llm"
LOG_TAIL_LINES = 40


class JobFailed(RuntimeError):
    """A launched job ended in a state other than SUCCEEDED."""


def _log_tail(exp_dir: str, lines: int = LOG_TAIL_LINES) -> str:
    """The exceptions found in an experiment's logs, then the last `lines` lines of its main
    log (torchrun's combined log, or Slurm's .out)."""

    logs = [
        p
        for p in Path(exp_dir).rglob("*")
        if p.is_file() and (p.suffix in (".out", ".err", ".log") or p.name.startswith("log"))
    ]
    if not logs:
        return f"(no log files under {exp_dir})"
    causes: list[str] = []
    for log in logs:
        for line in log.read_text(errors="replace").splitlines():
            found = re.search(r"\b[\w.]*(Error|Exception): .*", line)
            if found and found.group(0) not in causes:
                causes.append(found.group(0))
    main = max(
        logs, key=lambda p: (p.name == "combined.log" or p.suffix == ".out", p.stat().st_mtime)
    )
    tail = main.read_text(errors="replace").splitlines()[-lines:]
    cause = "".join(f"cause: {c}\n" for c in causes[:3])
    return f"{cause}--- last {len(tail)} lines of {main} ---\n" + "\n".join(tail)


def launch(task, executor=None, name: str = "distill_llm", detach: bool = False) -> str:
    """Run `task` (a run.Partial) on `executor`, wait, and return the final state's name.

    Raises JobFailed, with the failing task's log tail in the message, unless the job
    succeeded. With no executor the task runs in this process (errors raise directly). With
    `detach`, returns after submission ("SUBMITTED").
    """
    if executor is None:
        run.run(task, direct=True)
        return "SUCCEEDED"
    return launch_chain([(name, task)], executor, name, detach)


def in_turn(stages: list) -> list:
    """Call `stages` one after another in this process and return their results. Given as a
    list of run.Partial, which NeMo-Run builds into callables before the task starts, they make
    one task that pays the start-up of a launch (torchrun, imports, process group: about 15 s
    on 2 CPU cores) once instead of once per stage."""
    return [stage() for stage in stages]


def one_task(name: str, stages: list) -> tuple:
    """The (name, run.Partial) stages as a single (name, task) for `launch_chain`: `in_turn`."""
    return name, run.Partial(in_turn, stages=[stage for _, stage in stages])


def launch_chain(tasks, executor, name: str, detach: bool = False, poll_s: float = 5.0) -> str:
    """Run the (name, run.Partial[, executor]) `tasks` as one NeMo-Run experiment (a task's own
    executor, else `executor`), one after the other, and
    return "SUCCEEDED" ("SUBMITTED" with `detach`). Raises JobFailed naming the first task that
    did not succeed, with the experiment's log tail.

    Locally NeMo-Run starts each task when the one before has ended. On Slurm all are submitted
    at once, each held by an afterok dependency on the one before; a cluster without
    `kill_invalid_depend` would keep the rest pending forever after a failure, so this follows
    the jobs itself (every `poll_s` seconds) and cancels the rest when one fails."""
    chained = len(tasks) > 1 and isinstance(executor, run.SlurmExecutor)
    with run.Experiment(name, executor=executor, log_level="WARN") as exp:
        for task_name, task, *own in tasks:  # (name, task) or (name, task, its own executor)
            exp.add(task, executor=own[0] if own else None, name=task_name,
                    tail_logs=not (detach or chained))  # fmt: skip
        exp.run(sequential=True, detach=detach or chained)
        if chained and not detach:
            _follow_chain(exp, poll_s)
    # the experiment waits for its jobs when its `with` block closes
    if detach:
        return "SUBMITTED"
    for job in exp.jobs:
        state = getattr(job.state, "name", str(job.state))
        if state != "SUCCEEDED":
            raise JobFailed(
                f"job {job.id} ended {state} (experiment {exp._exp_dir})\n{_log_tail(exp._exp_dir)}"
            )
    return "SUCCEEDED"


def _follow_chain(exp, poll_s: float, unknown_limit: int = 24) -> None:
    """Wait for `exp`'s jobs in order; when one ends other than SUCCEEDED, cancel the ones after
    it (pending on its afterok) and raise JobFailed. A status Slurm cannot report for
    `unknown_limit` polls in a row (no accounting once a job has left the queue) counts as
    failed."""
    from torchx.specs import AppState, is_terminal

    for i, job in enumerate(exp.jobs):
        unknown, last = 0, None
        while True:
            state = job.status(exp._runner)
            if state != last:
                print(f"[{time.strftime('%H:%M:%S')}] job {job.id}: {state.name}", flush=True)
                last = state
            unknown = unknown + 1 if state == AppState.UNKNOWN else 0
            if is_terminal(state) or unknown >= unknown_limit:
                break
            time.sleep(poll_s)
        job.state = state
        if state != AppState.SUCCEEDED:
            rest = [later.id for later in exp.jobs[i + 1 :]]
            for later in rest:
                exp.cancel(later)
            cancelled = f"; cancelled {', '.join(rest)}" if rest else ""
            raise JobFailed(
                f"job {job.id} ended {state.name}{cancelled} (experiment {exp._exp_dir})\n"
                f"{_log_tail(exp._exp_dir)}"
            )


def _world_size(executor) -> int:
    """Processes the executor will start (for a task run in this process: WORLD_SIZE, as set
    when the CLI itself runs under torchrun, else 1)."""
    if executor is None:
        return world_size_from_env()
    per_node = getattr(executor, "torchrun_nproc_per_node", None) or getattr(
        executor, "ntasks_per_node", 1
    )
    return int(getattr(executor, "nodes", 1) or 1) * int(per_node or 1)


def _defaults(fn) -> dict:
    """The default of every argument of entry point `fn` that has one."""
    params = inspect.signature(fn).parameters.values()
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


def preflight(task, executor) -> None:
    """The checks the entry point makes at start-up (distill_llm.checks, the same functions),
    made before anything is submitted, for the executor's world size: layout, batch sizes,
    architectures, and every input path visible from here; and every executor field that
    lands in a job script (executors.safety). Raises ConfigError."""
    check_executor(executor)
    fn = getattr(task, "__fn_or_cls__", None)
    if fn not in (api.distill, api.pretrain, api.prune):
        return
    args = fdl.build(task).keywords
    if fn is api.prune:
        given = {**_defaults(fn), **args}
        checks.check_prune(
            given.get("teacher"), given.get("output_dir"), target=given.get("target"),
            data=given["data"] or DataConfig(), train=given["train"] or TrainConfig(),
            parallel=given["parallel"] or ParallelConfig(),
            calibration_batches=given["calibration_batches"],
            depth_method=given["depth_method"], world_size=_world_size(executor),
            local_files=False, rescale_norms=given["rescale_norms"],
            hidden_method=given["hidden_method"],
        )  # fmt: skip
        return
    common = {
        "data": args.get("data") or DataConfig(),
        "train": args.get("train") or TrainConfig(),
        "optim": args.get("optim") or OptimConfig(),
        "parallel": args.get("parallel") or ParallelConfig(),
        "world_size": _world_size(executor),
        "export_hf": args.get("export_hf"),
        "export_nemo": args.get("export_nemo"),
        "local_files": False,
    }
    if fn is api.pretrain:
        checks.check_pretrain(
            model=args.get("model"), init_checkpoint=args.get("init_checkpoint"), **common
        )
        return
    checks.check_distill(
        teacher=args.get("teacher"), student=args.get("student"),
        student_checkpoint=args.get("student_checkpoint"), kd=args.get("kd") or KDConfig(),
        teacher_cache=args.get("teacher_cache"), output_dir=args.get("output_dir"), **common,
    )  # fmt: skip


def dryrun(task, executor, name: str) -> str:
    """Write what the executor would submit (for Slurm, the sbatch script) without submitting;
    returns the experiment directory. `task`: a run.Partial, or (name, run.Partial) tasks of
    one experiment as `launch_chain` takes them."""
    tasks = task if isinstance(task, list) else [(name, task)]
    with run.Experiment(name, executor=executor, log_level="WARN") as exp:
        for task_name, one, *own in tasks:
            exp.add(one, executor=own[0] if own else None, name=task_name)
        exp.dryrun(delete_exp_dir=False)
    for script in sorted(Path(exp._exp_dir).glob("*_sbatch.sh")):
        print(f"--- {script} ---\n{script.read_text()}")
    return exp._exp_dir


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _explain(err: Exception, args: list[str]) -> str:
    """NeMo-Run's parse errors, cut to one line that names the fix."""

    text = str(err)
    if text.startswith("No matching factory found for"):
        name = text.rsplit(":", 1)[-1].strip()
        return f"unknown recipe {name!r}; choose one of: {', '.join(recipes_list())}"
    if text.startswith("Executor") and text.endswith("not found"):
        return f"unknown executor {text.split()[1]!r}; choose one of: local, slurm, docker"
    if text.startswith("Invalid argument: No parameter named"):
        found = re.search(r"\(Argument: ([^,]+), Context", text)
        arg = found.group(1) if found else "an override"
        parent, _, name = arg.split("=")[0].rpartition(".")
        return (
            f"{arg}: {parent or 'the entry point'} has no field {name!r}; "
            "list the fields with --to-yaml FILE"
        )
    return text.splitlines()[0] if text else type(err).__name__


def recipes_list() -> list[str]:
    """The names `--factory` accepts."""
    return list(RECIPES)


class CheckedRunContext(RunContext):
    """NeMo-Run's run context with: one-line errors for bad input, the engine's layout checks
    before submission, a real dry run (sbatch script written), and a non-zero exit with the
    log tail when the job fails (NeMo-Run's `run.run` returns None then)."""

    def cli_execute(self, fn, args, entrypoint_type="task"):
        """NeMo-Run's `cli_execute`, except that a ConfigError, or any other error unless verbose,
        exits 2 with one `error:` line."""
        import logging

        # the parser logs each error with the whole config before raising; we print one line
        logging.getLogger("nemo_run.cli.cli_parser").setLevel(logging.CRITICAL)
        try:
            return super().cli_execute(fn, args, entrypoint_type)
        except ConfigError as err:
            _fail(str(err))
        except Exception as err:
            if getattr(self, "verbose", False):
                raise
            _fail(_explain(err, args))

    def _execute_task(self, fn, task_args):
        if any([self.to_yaml, self.to_toml, self.to_json]):
            return super()._execute_task(fn, task_args)
        task = self.parse_fn(fn, task_args)
        executor = None if self.direct else self.executor
        if executor is not None:  # NeMo-Run derives job names and log paths from it
            check_value(self.name, "the run name (--name)")
        preflight(task, executor)
        if self.dryrun:
            run.dryrun_fn(task, executor=executor)
            if executor is not None:
                where = dryrun(task, executor, self.name)
                print(f"Dry run: the request is written under {where}; nothing submitted.")
            return None
        if not self._should_continue(self.skip_confirmation):
            print("Exiting...")
            return None
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
evaluate = _register(api.evaluate, "Held-out LM loss, perplexity and KL to the teacher.")
preprocess = _register(preprocess_mod.preprocess, "Tokenize text into a .bin/.idx dataset.")
import_hf = _register(hf.import_hf, "Convert a Hugging Face model directory to a checkpoint.")
export_hf = _register(hf.export_hf, "Write a checkpoint as a Hugging Face model directory.")
export_nemo = _register(
    nemo_io.export_nemo, "Write a checkpoint as a NeMo 1 .nemo file or a NeMo 2 directory."
)
cache_teacher = _register(
    api.cache_teacher, "Store a teacher's top-k log-probs over a run's data for distill."
)
prune = _register(api.prune, "Cut a smaller student out of a teacher (Minitron-style pruning).")
