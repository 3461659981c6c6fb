"""Distil the tiny teacher into a student half its depth and width, on a CPU in seconds.

Make the teacher first (`tiny_teacher` recipe), then:
CLI:
    nemo distill_llm distill --factory tiny --yes
    nemo distill_llm distill --factory tiny train.steps=50 kd.temperature=2.0 --yes
    nemo distill_llm distill --factory tiny run.executor=local run.executor.ntasks_per_node=2 --yes
    # no teacher in memory: from the cache the `tiny_cache` recipe writes
    nemo distill_llm distill --factory tiny teacher=None teacher_cache=runs/tiny/teacher_cache --yes
Python:
    import fiddle as fdl
    import nemo_run as run
    from distill_llm.executors import local
    from distill_llm.recipes import tiny
    run.run(tiny.recipe(steps=50), executor=fdl.build(local(devices=2)))
Script:
    python recipes/tiny.py train.steps=50 --yes
"""

from typing import Optional

import nemo_run as run

from distill_llm.api import distill
from distill_llm.recipes import data, models, training

NAME = "tiny"
TEMPERATURE = 1.0


def train_config(steps: int) -> run.Config:
    """Training length and batches (the `tiny_cache` recipe caches these very samples)."""
    return training.trainer(
        steps=steps,
        micro_batch_size=4,
        global_batch_size=8,
        seq_length=128,
        val_every=max(steps // 3, 1),
        save_every=0,
    )


@run.cli.factory(target=distill, name=NAME)
def recipe(
    teacher: Optional[str] = "runs/tiny/teacher/final",
    output_dir: str = "runs/tiny/distill",
    steps: int = 30,
    teacher_cache: Optional[str] = None,
) -> run.Partial:
    """KD of `tiny_student` from the tiny teacher checkpoint at `teacher`, on mock data (or,
    with `teacher_cache` and teacher=None, from the cache the `tiny_cache` recipe wrote, with no
    teacher in memory; with both, the cache is checked against the teacher)."""
    return run.Partial(
        distill,
        teacher=teacher,
        teacher_cache=teacher_cache,
        student=models.tiny_student(),
        kd=training.kd_loss(temperature=TEMPERATURE),
        data=data.mock(),
        train=train_config(steps),
        optim=training.adamw_cosine(lr=2e-3, min_lr=2e-4, warmup_steps=5),
        parallel=training.layout(),  # ParallelConfig's defaults: TP=1, fp32, plain Adam
        output_dir=output_dir,
    )


def teacher_model() -> run.Config:
    """The architecture of the teacher checkpoint this recipe expects."""
    return models.tiny_teacher()


if __name__ == "__main__":
    import distill_llm.cli  # noqa: F401  (registers the checked entry points)

    run.cli.main(distill, default_factory=recipe)
