"""Any model path -> its architecture and weights. The one place that tells the formats apart:
a distill_llm checkpoint (a directory with `distill_llm.json`), a Hugging Face directory
(`config.json` + safetensors), or a NeMo checkpoint (a NeMo 1 `.nemo` file or its unpacked
directory, a NeMo 2 directory). Every entry point takes teachers, students and init checkpoints
through here, so a new format is added in one place."""

from pathlib import Path
from typing import Optional

from distill_llm.engine import checkpoint
from distill_llm.engine.model import ModelConfig, build_gpt
from distill_llm.errors import ConfigError
from distill_llm.formats.hf.config import HF_META_KEY, find_tokenizer_dir, is_hf_dir
from distill_llm.formats.hf.weights import checked_config, load_hf_weights
from distill_llm.formats.nemo import checkpoint as nemo


def is_hf(path) -> bool:
    """True for a Hugging Face directory that is not also one of our checkpoints."""
    return is_hf_dir(path) and not (Path(path) / checkpoint.META_FILE).is_file()


def model_config_of(path) -> ModelConfig:
    """The architecture of the model at `path`: stored with a checkpoint, or derived from a
    Hugging Face directory's config.json (whose weights are then checked against it)."""
    if path and not Path(path).exists():
        raise ConfigError(
            f"{str(path)!r} does not exist; give a distill_llm checkpoint, a Hugging Face "
            "directory, a .nemo file or a NeMo 2 directory"
        )
    if is_hf(path):
        return checked_config(path)
    if nemo.is_nemo(path):
        return nemo.model_config_of(path)
    return checkpoint.model_config_of(path)


def load_model(path, module, model_cfg: ModelConfig, role: str) -> None:
    """Load the weights at `path` (any TP size; an HF directory is converted on the fly, each
    rank reading its own shard) into `module`, after checking they are `model_cfg`'s."""
    stored = model_config_of(path)
    if stored != model_cfg:
        diff = {
            k: (v, getattr(model_cfg, k))
            for k, v in stored.to_dict().items()
            if getattr(model_cfg, k) != v
        }
        raise ConfigError(
            f"{role} checkpoint {str(path)!r} holds a different architecture "
            f"(field: (checkpoint, config)) {diff}; leave the {role} config unset to use the "
            "checkpoint's own"
        )
    if is_hf(path):
        load_hf_weights(module, model_cfg, path)
    elif nemo.is_nemo(path):
        nemo.NemoCheckpoint(path).load_into(module)
    else:
        checkpoint.load_model(path, module, model_cfg)


def load_on_layout(path, cfg: ModelConfig, layout, role: str = "model"):
    """This rank's GPTModel for `cfg` built on `layout` (a ParallelConfig) and filled from the
    model at `path` (what every export reloads a checkpoint into)."""
    model = build_gpt(
        cfg,
        tensor_parallel=layout.tensor_parallel,
        pipeline_parallel=layout.pipeline_parallel,
        params_dtype=layout.params_dtype,
    )
    load_model(path, model, cfg, role=role)
    return model


def tokenizer_dir_of(path) -> Optional[str]:
    """The tokenizer belonging to a model path: an HF directory's own tokenizer files, the
    tokenizer a NeMo checkpoint carries (a directory or a SentencePiece file), or that of the
    HF directory a checkpoint was imported from; None if unknown."""
    if path and nemo.is_nemo(path):
        return nemo.NemoCheckpoint(path).tokenizer_path()
    if not path or not Path(path).is_dir():
        return None
    if is_hf_dir(path) and find_tokenizer_dir(Path(path)):
        return str(path)
    if (Path(path) / checkpoint.META_FILE).is_file():
        source = (checkpoint.read_metadata(path).get(HF_META_KEY) or {}).get("source")
        if source and Path(source).is_dir() and find_tokenizer_dir(Path(source)):
            return source
    return None
