"""Distil Qwen3-30B-A3B (a mixture of experts) into the dense Qwen3 4B architecture (one or more
8-GPU nodes).

Both share Qwen3's tokenizer and 151,936-row embedding, so the logits line up one to one. The
teacher's 128 experts are split 8 ways (expert parallel, within a node): each GPU holds 16 of
them, ~9 GB of teacher in bf16 instead of ~60 GB with every expert on every GPU. Attention and
the dense student are tensor parallel 2 (the teacher has 4 KV heads, the student 8) and data
parallel over the rest. Give the teacher checkpoint and the tokenized data:
CLI:
    nemo distill_llm distill --factory qwen3_30b_a3b_to_qwen3_4b \\
        teacher=/ckpt/qwen3_30b_a3b data.paths='[1.0,/data/web_text_document]' \\
        data.tokenizer=/tokenizers/qwen3 \\
        run.executor=slurm run.executor.account=ACC run.executor.partition=batch \\
        run.executor.nodes=2 --yes
    ... --dryrun   (prints the sbatch script and the resolved config, submits nothing)
Python:
    import fiddle as fdl
    import nemo_run as run
    from distill_llm.executors import slurm
    from distill_llm.recipes import qwen3_30b_a3b_to_qwen3_4b as r
    recipe = r.recipe(teacher="/ckpt/qwen3_30b_a3b")
    recipe.data.paths = [1.0, "/data/web_text_document"]
    run.run(recipe, executor=fdl.build(slurm(account="ACC", partition="batch", nodes=2)))
"""

from typing import Optional

import nemo_run as run

from distill_llm.api import distill
from distill_llm.recipes import models, training

NAME = "qwen3_30b_a3b_to_qwen3_4b"
EXPERT_PARALLEL = 8  # one node's GPUs: the expert all-to-all stays on NVLink; 128 experts / 8


@run.cli.factory(target=distill, name=NAME)
def recipe(
    teacher: str = "/checkpoints/qwen3_30b_a3b",
    student_checkpoint: Optional[str] = None,
    output_dir: str = "runs/qwen3_30b_a3b_to_qwen3_4b",
    steps: int = 1000,
) -> run.Partial:
    """Logits KD at T=1 on the KD loss alone, TP=2 and the teacher's experts EP=8, bf16,
    sharded AdamW, 4096-token sequences, global batch 128."""
    settings = training.gpu_kd_settings(steps)
    settings["parallel"].expert_parallel = EXPERT_PARALLEL
    return run.Partial(
        distill,
        teacher=teacher,
        student=models.qwen3_4b(),
        student_checkpoint=student_checkpoint,
        output_dir=output_dir,
        **settings,
    )


def teacher_model() -> run.Config:
    """The architecture of the teacher checkpoint this recipe expects."""
    return models.qwen3_30b_a3b()


if __name__ == "__main__":
    import distill_llm.cli  # noqa: F401  (registers the checked entry points)

    run.cli.main(distill, default_factory=recipe)
