"""Distil a NeMo teacher into a NeMo student, NeMo files in and out: the run NeMo's own
distillation page describes, as a recipe.

Teacher and student are NeMo 1 `.nemo` files (or unpacked directories) or NeMo 2 checkpoint
directories; the student may be left out (a student half the teacher's depth). The tokenizer
defaults to the one inside the teacher; the final student is written to `export_nemo`
(`.nemo` suffix: a NeMo 1 file, else a NeMo 2 directory).
CLI:
    nemo distill_llm distill --factory nemo_to_nemo \\
        teacher=/ckpt/teacher.nemo student_checkpoint=/ckpt/student.nemo \\
        data.paths='[1.0,/data/text_document]' export_nemo=/ckpt/distilled.nemo \\
        run.executor=local run.executor.ntasks_per_node=2 --yes
    ... run.executor=slurm run.executor.account=ACC run.executor.partition=batch --yes
Python:
    import fiddle as fdl
    import nemo_run as run
    from distill_llm.executors import local
    from distill_llm.recipes import nemo_to_nemo
    recipe = nemo_to_nemo.recipe(teacher="/ckpt/teacher.nemo", export_nemo="/ckpt/out.nemo")
    recipe.data.paths = [1.0, "/data/text_document"]
    run.run(recipe, executor=fdl.build(local(devices=2)))
The same run from NeMo 1's own command line: `torchrun --nproc_per_node=2 -m
distill_llm.megatron_gpt_distillation model.restore_from_path=... ...`.
"""

from typing import Optional

import nemo_run as run

from distill_llm.api import distill
from distill_llm.recipes import data, training

NAME = "nemo_to_nemo"


@run.cli.factory(target=distill, name=NAME)
def recipe(
    teacher: str = "/checkpoints/teacher.nemo",
    student_checkpoint: Optional[str] = None,
    export_nemo: Optional[str] = "runs/nemo_to_nemo/student.nemo",
    output_dir: str = "runs/nemo_to_nemo",
    tensor_parallel: int = 1,
    steps: int = 100,
) -> run.Partial:
    """What NeMo's distillation script does: forward KL of the output logits at T=1 alone
    (no LM loss), AdamW with cosine decay; TP = `tensor_parallel` (the teacher's and the
    student's layout, as NeMo requires; any TP reads the files). The other settings are the
    config dataclasses' defaults: set train.seq_length, batches and precision to your model."""
    return run.Partial(
        distill,
        teacher=teacher,
        student_checkpoint=student_checkpoint,
        kd=training.kd_loss(temperature=1.0, skip_lm_loss=True),
        data=data.blend(),
        train=training.trainer(steps=steps),
        optim=training.adamw_cosine(),
        parallel=training.layout(tensor_parallel=tensor_parallel),
        output_dir=output_dir,
        export_nemo=export_nemo,
    )


if __name__ == "__main__":
    import distill_llm.cli  # noqa: F401  (registers the checked entry points)

    run.cli.main(distill, default_factory=recipe)
