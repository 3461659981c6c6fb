"""Distil Llama 3.1 8B into the Llama 3.2 1B architecture (one or more 8-GPU nodes).

Both share Llama 3's 128,256-token tokenizer. Give the teacher checkpoint (a distill_llm
checkpoint directory) and the tokenized data:
CLI:
    nemo distill_llm distill --factory llama31_8b_to_llama32_1b \\
        teacher=/ckpt/llama31_8b data.paths='[1.0,/data/web_text_document]' \\
        data.tokenizer=/tokenizers/llama3 \\
        run.executor=slurm run.executor.account=ACC run.executor.partition=batch \\
        run.executor.nodes=2 --yes
    ... --dryrun   (prints the sbatch script and the resolved config, submits nothing)
Python:
    import fiddle as fdl
    import nemo_run as run
    from distill_llm.executors import slurm
    from distill_llm.recipes import llama31_8b_to_llama32_1b as r
    recipe = r.recipe(teacher="/ckpt/llama31_8b")
    recipe.data.paths = [1.0, "/data/web_text_document"]
    run.run(recipe, executor=fdl.build(slurm(account="ACC", partition="batch", nodes=2)))
"""

from typing import Optional

import nemo_run as run

from distill_llm.api import distill
from distill_llm.recipes import models, training

NAME = "llama31_8b_to_llama32_1b"


@run.cli.factory(target=distill, name=NAME)
def recipe(
    teacher: str = "/checkpoints/llama31_8b",
    student_checkpoint: Optional[str] = None,
    output_dir: str = "runs/llama31_8b_to_llama32_1b",
    steps: int = 1000,
) -> run.Partial:
    """Logits KD at T=1 on the KD loss alone, TP=2 (8 KV heads split 2 ways), bf16, sharded
    AdamW, 4096-token sequences, global batch 128."""
    return run.Partial(
        distill,
        teacher=teacher,
        student=models.llama32_1b(),
        student_checkpoint=student_checkpoint,
        output_dir=output_dir,
        **training.gpu_kd_settings(steps),
    )


def teacher_model() -> run.Config:
    """The architecture of the teacher checkpoint this recipe expects."""
    return models.llama31_8b()


if __name__ == "__main__":
    import distill_llm.cli  # noqa: F401  (registers the checked entry points)

    run.cli.main(distill, default_factory=recipe)
