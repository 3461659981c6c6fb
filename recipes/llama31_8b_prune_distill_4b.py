"""Llama 3.1 8B -> Minitron 4B-Width: prune the teacher's width, then distil the pruned model from
it (Sreenivas et al. 2024, arXiv 2408.11796): 32 layers kept, hidden 4096 -> 3072, FFN 14336 ->
9216, all 32 heads / 8 query groups of width 128 kept. 4.51B parameters, as the model card says.

The two steps run as one NeMo-Run experiment, the distillation after the pruning has succeeded
(on Slurm: both submitted at once, the second held by an afterok dependency):
Command line:
    python -m distill_llm.recipes.llama31_8b_prune_distill_4b --teacher /ckpt/llama31_8b \\
        --data-path /data/web_text_document --tokenizer /tokenizers/llama3 \\
        --executor slurm --account ACC --partition batch --nodes 2 [--dryrun]
Python:
    import fiddle as fdl
    from distill_llm.executors import slurm
    from distill_llm.recipes import llama31_8b_prune_distill_4b as r
    tasks = r.tasks(teacher="/ckpt/llama31_8b", output_dir="runs/minitron_4b")
    r.launch(tasks, fdl.build(slurm(account="ACC", partition="batch", nodes=2)))
Each step alone, through the `nemo` CLI:
    nemo distill_llm prune --factory llama31_8b_prune_4b teacher=/ckpt/llama31_8b ...
    nemo distill_llm distill --factory llama31_8b_prune_distill_4b teacher=/ckpt/llama31_8b ...
"""

import argparse
import sys
from pathlib import Path
from typing import List, Optional, Tuple

import nemo_run as run

from distill_llm.api import distill, prune
from distill_llm.engine.model import ModelConfig
from distill_llm.prune.shape import PruneTarget
from distill_llm.recipes import models, training

NAME = "llama31_8b_prune_distill_4b"
PRUNE_NAME = "llama31_8b_prune_4b"
OUTPUT_DIR = "runs/llama31_8b_prune_distill_4b"


@run.cli.factory
def minitron_4b_width() -> run.Config[PruneTarget]:
    """Llama-3.1-Minitron-4B-Width's shape: the depth and every head of the 8B, hidden 3072,
    FFN 9216."""
    return run.Config(
        PruneTarget,
        num_layers=32,
        hidden_size=3072,
        ffn_hidden_size=9216,
        num_attention_heads=32,
        num_query_groups=8,
    )


@run.cli.factory(target=prune, name=PRUNE_NAME)
def prune_recipe(
    teacher: str = "/checkpoints/llama31_8b",
    output_dir: str = f"{OUTPUT_DIR}/pruned",
    calibration_batches: int = 8,
) -> run.Partial:
    """The 8B pruned to `minitron_4b_width`: importance from `calibration_batches` global
    batches of the distillation's own data (128 x 4096 tokens each; the paper calibrates on
    1024 samples), layers ranked by the LM loss without them (none is dropped here)."""
    settings = training.gpu_kd_settings(steps=1)
    return run.Partial(
        prune,
        teacher=teacher,
        output_dir=output_dir,
        target=minitron_4b_width(),
        data=settings["data"],
        train=settings["train"],
        calibration_batches=calibration_batches,
        depth_method="lm_loss",
        parallel=settings["parallel"],
    )


@run.cli.factory(target=distill, name=NAME)
def recipe(
    teacher: str = "/checkpoints/llama31_8b",
    student_checkpoint: str = f"{OUTPUT_DIR}/pruned",
    output_dir: str = f"{OUTPUT_DIR}/distill",
    steps: int = 1000,
) -> run.Partial:
    """The pruned model (`student_checkpoint`, written by `prune_recipe`) distilled from the
    8B: logits KD at T=1 on the KD loss alone, as the paper's width-pruned models; TP=2, bf16,
    sharded AdamW, 4096-token sequences, global batch 128 (`training.gpu_kd_settings`). The
    student's architecture is `minitron_4b_width` applied to the 8B, stated so the layout can be
    checked before the pruned checkpoint exists; loading refuses a checkpoint of another shape."""
    return run.Partial(
        distill,
        teacher=teacher,
        student=student_model(),
        student_checkpoint=student_checkpoint,
        output_dir=output_dir,
        **training.gpu_kd_settings(steps),
    )


@run.cli.factory
def student_model() -> run.Config[ModelConfig]:
    """Llama 3.1 8B with `minitron_4b_width`'s widths (head width 128 kept)."""
    cfg = models.llama31_8b()
    cfg.hidden_size, cfg.ffn_hidden_size, cfg.kv_channels = 3072, 9216, 128
    return cfg


def teacher_model() -> run.Config:
    """The architecture of the teacher checkpoint this recipe expects."""
    return models.llama31_8b()


def tasks(
    teacher: str,
    output_dir: str = OUTPUT_DIR,
    steps: int = 1000,
    calibration_batches: int = 8,
    data_paths: Optional[list] = None,
    tokenizer: Optional[str] = None,
) -> List[Tuple[str, run.Partial]]:
    """The experiment's two tasks, in order: ("prune", ...) then ("distill", ...), the second
    reading what the first writes (`output_dir`/pruned), both on the same data."""
    pruned = str(Path(output_dir) / "pruned")
    steps_ = [
        ("prune", prune_recipe(teacher, pruned, calibration_batches)),
        ("distill", recipe(teacher, pruned, str(Path(output_dir) / "distill"), steps)),
    ]
    for _, task in steps_:
        if data_paths is not None:
            task.data.paths = list(data_paths)
        if tokenizer is not None:
            task.data.tokenizer = tokenizer
    return steps_


def launch(named_tasks, executor, name: str = NAME, dryrun: bool = False, detach: bool = False):
    """Check both tasks for `executor`'s world (the entry points' own checks), then run them as
    one experiment (`cli.launch_chain`), or with `dryrun` write what would be submitted."""
    from distill_llm import cli  # heavy: only when launching

    for _, task in named_tasks:
        cli.preflight(task, executor)
    if dryrun:
        cli.dryrun(list(named_tasks), executor, name)
        return "DRYRUN"
    return cli.launch_chain(named_tasks, executor, name, detach)


def main(argv=None) -> int:
    """`python -m distill_llm.recipes.llama31_8b_prune_distill_4b`: prune, then distil."""
    import fiddle as fdl

    from distill_llm.errors import ConfigError
    from distill_llm.executors import local, slurm

    ap = argparse.ArgumentParser(prog=f"python -m distill_llm.recipes.{NAME}", description=__doc__)
    ap.formatter_class = argparse.RawDescriptionHelpFormatter
    ap.add_argument("--teacher", required=True, help="the Llama 3.1 8B checkpoint directory")
    ap.add_argument("--output-dir", default=OUTPUT_DIR, help="pruned/ and distill/ go here")
    ap.add_argument("--steps", type=int, default=1000, help="distillation steps")
    ap.add_argument("--calibration-batches", type=int, default=8)
    ap.add_argument("--data-path", nargs="+", help="dataset prefixes, optionally weighted")
    ap.add_argument("--tokenizer", help="the tokenizer the data was made with")
    ap.add_argument("--executor", choices=("local", "slurm"), default="local")
    ap.add_argument("--devices", type=int, default=8, help="local: processes (GPUs)")
    ap.add_argument("--account", default="")
    ap.add_argument("--partition")
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--dryrun", action="store_true", help="write the request, submit nothing")
    ap.add_argument("--detach", action="store_true", help="return once submitted (Slurm)")
    args = ap.parse_args(argv)
    paths = None
    if args.data_path:  # "0.7 /a 0.3 /b" or "/a": numbers stay numbers
        paths = [float(p) if p.replace(".", "", 1).isdigit() else p for p in args.data_path]
    try:
        if args.executor == "slurm":
            executor = slurm(account=args.account, partition=args.partition, nodes=args.nodes)
        else:
            executor = local(devices=args.devices)
        named = tasks(
            args.teacher, args.output_dir, args.steps, args.calibration_batches, paths,
            args.tokenizer,
        )  # fmt: skip
        state = launch(named, fdl.build(executor), dryrun=args.dryrun, detach=args.detach)
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{NAME}: {state}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
