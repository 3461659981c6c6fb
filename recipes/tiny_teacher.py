"""Pretrain the tiny teacher that the `tiny` distillation recipe reads (CPU, ~1 minute).

CLI:
    nemo distill_llm pretrain --factory tiny_teacher --yes
    nemo distill_llm pretrain --factory tiny_teacher train.steps=50 run.executor=local --yes
Python:
    import nemo_run as run
    from distill_llm.recipes import tiny_teacher
    run.run(tiny_teacher.recipe(steps=50), direct=True)
Script:
    python recipes/tiny_teacher.py --yes
"""

import nemo_run as run

from distill_llm.api import pretrain
from distill_llm.recipes import data, models, training

NAME = "tiny_teacher"


@run.cli.factory(target=pretrain, name=NAME)
def recipe(output_dir: str = "runs/tiny/teacher", steps: int = 100) -> run.Partial:
    """The tiny teacher on mock data; its weights for the student land in `output_dir/final`."""
    return run.Partial(
        pretrain,
        model=models.tiny_teacher(),
        data=data.mock(),
        train=training.trainer(
            steps=steps,
            micro_batch_size=4,
            global_batch_size=8,
            seq_length=128,
            val_every=max(steps // 4, 1),
            save_every=0,
        ),  # fmt: skip
        optim=training.adamw_cosine(lr=2e-3, min_lr=2e-4, warmup_steps=10),
        parallel=training.layout(),  # ParallelConfig's defaults: TP=1, fp32, plain Adam
        output_dir=output_dir,
    )


if __name__ == "__main__":
    import distill_llm.cli  # noqa: F401  (registers the checked entry points)

    run.cli.main(pretrain, default_factory=recipe)
