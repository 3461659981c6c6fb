"""The data module factory."""

from typing import Any, List, Optional

import nemo_run as run

from distill_llm.data.datasets import DataConfig


@run.cli.factory
def blend(
    paths: Optional[List[Any]] = None, split: str = "98,1,1", tokenizer: Optional[str] = None
) -> run.Config[DataConfig]:
    """Weighted Megatron prefixes `[w1, prefix1, w2, prefix2, ...]` (see
    `python -m distill_llm.preprocess`); None or [] = megatron-core's mock data."""
    return run.Config(DataConfig, paths=list(paths or []), split=split, tokenizer=tokenizer)


@run.cli.factory
def mock() -> run.Config[DataConfig]:
    """megatron-core's mock GPT data: no files needed."""
    return run.Config(
        DataConfig,
    )
