"""Cache the tiny teacher's top-k log-probabilities for the `tiny` recipe's exact samples, so
`tiny` can then distil with no teacher in memory.

Make the teacher first (`tiny_teacher` recipe), then:
CLI:
    nemo distill_llm cache_teacher --factory tiny_cache --yes
    nemo distill_llm distill --factory tiny teacher=None teacher_cache=runs/tiny/teacher_cache --yes
Python:
    import nemo_run as run
    from distill_llm.recipes import tiny, tiny_cache
    run.run(tiny_cache.recipe(), executor=run.LocalExecutor())
    run.run(tiny.recipe(teacher=None, teacher_cache="runs/tiny/teacher_cache"),
            executor=run.LocalExecutor())
"""

import nemo_run as run

from distill_llm.api import cache_teacher
from distill_llm.recipes import data, tiny

NAME = "tiny_cache"


@run.cli.factory(target=cache_teacher, name=NAME)
def recipe(
    teacher: str = "runs/tiny/teacher/final",
    output_dir: str = "runs/tiny/teacher_cache",
    k: int = 32,
    steps: int = 30,
) -> run.Partial:
    """Top-`k` float16 cache of the teacher at `teacher` over the samples of `tiny.recipe(steps)`
    (same data and training settings, so the same sample stream), at the KD temperature."""
    return run.Partial(
        cache_teacher,
        teacher=teacher,
        output_dir=output_dir,
        k=k,
        temperature=tiny.TEMPERATURE,
        data=data.mock(),
        train=tiny.train_config(steps),
        dtype="float16",
    )
