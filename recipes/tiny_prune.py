"""Prune the tiny teacher to the `tiny` recipe's student size (Minitron-style: the highest-
scored layers, channels, heads and neurons kept), on a CPU in seconds; then distil from there.

Make the teacher first (`tiny_teacher` recipe), then:
CLI:
    nemo distill_llm prune --factory tiny_prune --yes
    nemo distill_llm prune --factory tiny_prune target.num_layers=3 depth_method=block_importance \\
        output_dir=runs/tiny/pruned_3l --yes
    nemo distill_llm prune --factory tiny_prune target=300K output_dir=runs/tiny/pruned_300k --yes
    # the pruned model as the student's start (its own architecture: student=None)
    nemo distill_llm distill --factory tiny student=None student_checkpoint=runs/tiny/pruned --yes
Python:
    import nemo_run as run
    from distill_llm.recipes import tiny, tiny_prune
    run.run(tiny_prune.recipe(), executor=run.LocalExecutor())
    student = tiny.recipe()
    student.student, student.student_checkpoint = None, "runs/tiny/pruned"
    run.run(student, executor=run.LocalExecutor())
"""

import nemo_run as run

from distill_llm.api import prune
from distill_llm.prune.shape import PruneTarget
from distill_llm.recipes import data, models, tiny, training

NAME = "tiny_prune"


@run.cli.factory
def tiny_student_shape() -> run.Config[PruneTarget]:
    """`tiny_student`'s depth, widths and parameter count with the teacher's 32-wide heads
    (pruning keeps head width): 2 layers, hidden 64, FFN 176, 2 heads in 1 query group (the
    student's 4 x 16 query and 2 x 2 x 16 key/value channels, as 2 x 32 and 2 x 1 x 32)."""
    return run.Config(
        PruneTarget,
        num_layers=2,
        hidden_size=64,
        ffn_hidden_size=176,
        num_attention_heads=2,
        num_query_groups=1,
    )


@run.cli.factory(target=prune, name=NAME)
def recipe(
    teacher: str = "runs/tiny/teacher/final",
    output_dir: str = "runs/tiny/pruned",
    calibration_batches: int = 16,
    depth_method: str = "lm_loss",
    hidden_method: str = "activation",
) -> run.Partial:
    """The tiny teacher at `teacher` pruned to `tiny_student_shape`, importance from
    `calibration_batches` batches of the `tiny` recipe's training stream (mock data, 8 x 128
    tokens each); layers ranked by `depth_method` ("lm_loss", "block_importance" or
    "iterative_lm_loss"); hidden channels by `hidden_method` ("activation" or "pca")."""
    return run.Partial(
        prune,
        teacher=teacher,
        output_dir=output_dir,
        target=tiny_student_shape(),
        data=data.mock(),
        train=tiny.train_config(steps=30),
        calibration_batches=calibration_batches,
        depth_method=depth_method,
        hidden_method=hidden_method,
        parallel=training.layout(),
    )


def teacher_model() -> run.Config:
    """The architecture of the teacher checkpoint this recipe expects."""
    return models.tiny_teacher()


if __name__ == "__main__":
    import distill_llm.cli  # noqa: F401  (registers the checked entry points)

    run.cli.main(prune, default_factory=recipe)
