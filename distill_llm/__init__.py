"""distill_llm: knowledge distillation of GPT-style LLMs on megatron-core and ModelOpt.

Importing the package is cheap; megatron-core and ModelOpt load when an entry point runs.
"""

from distill_llm.api import (
    cache_teacher,
    default_student,
    distill,
    evaluate,
    init_model,
    pretrain,
    prune,
)
from distill_llm.data.datasets import DataConfig
from distill_llm.engine.model import ModelConfig
from distill_llm.engine.parallel import ParallelConfig
from distill_llm.engine.training import OptimConfig, TrainConfig
from distill_llm.errors import ConfigError
from distill_llm.kd.config import KDConfig
from distill_llm.prune.shape import PruneTarget

__version__ = "0.1.0"


def __getattr__(name):
    # the converters load on first use, so `python -m distill_llm.hf` / `.nemo` run cleanly
    if name in ("import_hf", "export_hf"):
        from distill_llm.formats.hf import io as hf

        return getattr(hf, name)
    if name == "export_nemo":
        from distill_llm.formats.nemo.io import export_nemo

        return export_nemo
    raise AttributeError(f"module 'distill_llm' has no attribute {name!r}")


__all__ = [
    "cache_teacher",
    "ConfigError",
    "DataConfig",
    "KDConfig",
    "ModelConfig",
    "OptimConfig",
    "ParallelConfig",
    "TrainConfig",
    "default_student",
    "distill",
    "evaluate",
    "export_hf",
    "export_nemo",
    "import_hf",
    "init_model",
    "pretrain",
    "prune",
    "PruneTarget",
]
