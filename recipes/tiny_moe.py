"""Distil a tiny mixture-of-experts teacher into the dense `tiny_student`, on a CPU in seconds.

Make the teacher first (`tiny_moe_teacher`, a pretrain recipe defined here), then distil:
CLI:
    nemo distill_llm pretrain --factory tiny_moe_teacher --yes
    nemo distill_llm distill --factory tiny_moe --yes
    nemo distill_llm distill --factory tiny_moe train.steps=50 kd.temperature=2.0 --yes
    # the teacher's 8 experts split over 2 processes (the dense student is data parallel)
    nemo distill_llm distill --factory tiny_moe parallel.expert_parallel=2 \\
        output_dir=runs/tiny_moe/distill_ep2 run.executor=local run.executor.ntasks_per_node=2 --yes
Python:
    import nemo_run as run
    from distill_llm.recipes import tiny_moe
    run.run(tiny_moe.teacher_recipe(), direct=True)
    run.run(tiny_moe.recipe(steps=50), direct=True)
    recipe = tiny_moe.recipe(output_dir="runs/tiny_moe/distill_ep2")
    recipe.parallel.expert_parallel = 2
    run.run(recipe, executor=run.LocalExecutor(ntasks_per_node=2, launcher="torchrun"))
Script:
    python recipes/tiny_moe.py train.steps=50 --yes
"""

import nemo_run as run

from distill_llm.api import distill, pretrain
from distill_llm.recipes import data, models, tiny, tiny_teacher, training

NAME = "tiny_moe"
TEACHER_NAME = "tiny_moe_teacher"


@run.cli.factory(target=pretrain, name=TEACHER_NAME)
def teacher_recipe(output_dir: str = "runs/tiny_moe/teacher", steps: int = 100) -> run.Partial:
    """The `tiny_teacher` recipe with `tiny_moe_teacher`'s architecture (its router's balancing
    loss included); the weights the `tiny_moe` recipe reads land in `output_dir/final`."""
    recipe = tiny_teacher.recipe(output_dir=output_dir, steps=steps)
    recipe.model = models.tiny_moe_teacher()
    return recipe


@run.cli.factory(target=distill, name=NAME)
def recipe(
    teacher: str = "runs/tiny_moe/teacher/final",
    output_dir: str = "runs/tiny_moe/distill",
    steps: int = 30,
) -> run.Partial:
    """KD of `tiny_student` from the tiny MoE teacher checkpoint at `teacher`, on mock data,
    with the `tiny` recipe's temperature, batches and optimizer."""
    return run.Partial(
        distill,
        teacher=teacher,
        student=models.tiny_student(),
        kd=training.kd_loss(temperature=tiny.TEMPERATURE),
        data=data.mock(),
        train=tiny.train_config(steps),
        optim=training.adamw_cosine(lr=2e-3, min_lr=2e-4, warmup_steps=5),
        parallel=training.layout(),  # ParallelConfig's defaults: TP=1, EP=1, fp32, plain Adam
        output_dir=output_dir,
    )


def teacher_model() -> run.Config:
    """The architecture of the teacher checkpoint this recipe expects."""
    return models.tiny_moe_teacher()


if __name__ == "__main__":
    import distill_llm.cli  # noqa: F401  (registers the checked entry points)

    run.cli.main(distill, default_factory=recipe)
