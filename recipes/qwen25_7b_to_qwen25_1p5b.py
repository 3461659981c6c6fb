"""Distil Qwen2.5 7B into the Qwen2.5 1.5B architecture (one or more 8-GPU nodes).

Same tokenizer, but the 7B's embedding has 152,064 rows and the 1.5B's 151,936; the student
here carries 152,064 rows (the extra rows are padding no token id reaches), so the logits line
up one to one.
CLI:
    nemo distill_llm distill --factory qwen25_7b_to_qwen25_1p5b \\
        teacher=/ckpt/qwen25_7b data.paths='[1.0,/data/web_text_document]' \\
        run.executor=slurm run.executor.account=ACC run.executor.partition=batch --yes
Python:
    import fiddle as fdl
    import nemo_run as run
    from distill_llm.executors import slurm
    from distill_llm.recipes import qwen25_7b_to_qwen25_1p5b as r
    executor = fdl.build(slurm(account="ACC", partition="batch"))
    run.run(r.recipe(teacher="/ckpt/qwen25_7b"), executor=executor)
"""

from typing import Optional

import nemo_run as run

from distill_llm.api import distill
from distill_llm.recipes import models, training

NAME = "qwen25_7b_to_qwen25_1p5b"


@run.cli.factory(target=distill, name=NAME)
def recipe(
    teacher: str = "/checkpoints/qwen25_7b",
    student_checkpoint: Optional[str] = None,
    output_dir: str = "runs/qwen25_7b_to_qwen25_1p5b",
    steps: int = 1000,
) -> run.Partial:
    """Logits KD at T=1 on the KD loss alone, TP=2 (the student has 2 KV heads), bf16, sharded
    AdamW, 4096-token sequences, global batch 128."""
    student = models.qwen25_1p5b()
    student.vocab_size = 152064  # match the 7B teacher's embedding rows (see module docstring)
    return run.Partial(
        distill,
        teacher=teacher,
        student=student,
        student_checkpoint=student_checkpoint,
        output_dir=output_dir,
        **training.gpu_kd_settings(steps),
    )


def teacher_model() -> run.Config:
    """The architecture of the teacher checkpoint this recipe expects."""
    return models.qwen25_7b()


if __name__ == "__main__":
    import distill_llm.cli  # noqa: F401  (registers the checked entry points)

    run.cli.main(distill, default_factory=recipe)
