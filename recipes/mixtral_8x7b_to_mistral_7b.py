"""Distil Mixtral 8x7B v0.1 (a mixture of experts) into a dense Mistral-7B-shaped student (one
or more 8-GPU nodes).

Mixtral 8x7B v0.1 has Mistral 7B v0.1's 32,000-token tokenizer; Mistral 7B v0.3 (`mistral_7b`)
extended it to 32,768. The student is therefore Mistral 7B's shape with the teacher's 32,000-token
vocabulary, so the logits line up one to one: that is Mistral 7B v0.2's architecture, whose
checkpoint can initialise it (`student_checkpoint`; v0.3's 32,768-row embedding does not fit).
The tokenizers of the teacher, student checkpoint and data are compared before anything runs.
The teacher's 8 experts are split 8 ways (expert parallel, within a node): each GPU holds one,
~13 GB of teacher in bf16 where every expert on every GPU would need ~92 GB. Attention and the
dense student are tensor parallel 2 (8 KV heads) and data parallel over the rest.
CLI:
    nemo distill_llm distill --factory mixtral_8x7b_to_mistral_7b \\
        teacher=/ckpt/mixtral_8x7b data.paths='[1.0,/data/web_text_document]' \\
        data.tokenizer=/tokenizers/mixtral \\
        run.executor=slurm run.executor.account=ACC run.executor.partition=batch \\
        run.executor.nodes=2 --yes
    ... --dryrun   (prints the sbatch script and the resolved config, submits nothing)
Python:
    import fiddle as fdl
    import nemo_run as run
    from distill_llm.executors import slurm
    from distill_llm.recipes import mixtral_8x7b_to_mistral_7b as r
    recipe = r.recipe(teacher="/ckpt/mixtral_8x7b", student_checkpoint="/ckpt/mistral_7b_v02")
    recipe.data.paths = [1.0, "/data/web_text_document"]
    run.run(recipe, executor=fdl.build(slurm(account="ACC", partition="batch", nodes=2)))
"""

from typing import Optional

import nemo_run as run

from distill_llm.api import distill
from distill_llm.recipes import models, training

NAME = "mixtral_8x7b_to_mistral_7b"
EXPERT_PARALLEL = 8  # one node's GPUs: the expert all-to-all stays on NVLink; one expert each


@run.cli.factory(target=distill, name=NAME)
def recipe(
    teacher: str = "/checkpoints/mixtral_8x7b",
    student_checkpoint: Optional[str] = None,
    output_dir: str = "runs/mixtral_8x7b_to_mistral_7b",
    steps: int = 1000,
) -> run.Partial:
    """Logits KD at T=1 on the KD loss alone, TP=2 and the teacher's experts EP=8, bf16,
    sharded AdamW, 4096-token sequences, global batch 128."""
    student = models.mistral_7b()
    student.vocab_size = 32000  # the teacher's vocabulary (see module docstring)
    settings = training.gpu_kd_settings(steps)
    settings["parallel"].expert_parallel = EXPERT_PARALLEL
    return run.Partial(
        distill,
        teacher=teacher,
        student=student,
        student_checkpoint=student_checkpoint,
        output_dir=output_dir,
        **settings,
    )


def teacher_model() -> run.Config:
    """The architecture of the teacher checkpoint this recipe expects."""
    return models.mixtral_8x7b()


if __name__ == "__main__":
    import distill_llm.cli  # noqa: F401  (registers the checked entry points)

    run.cli.main(distill, default_factory=recipe)
