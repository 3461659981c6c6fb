"""Hugging Face model directories: `config` (config.json <-> ModelConfig), `weights` (tensor
names, fused/sharded layout), `io` (import_hf, export_hf and `python -m distill_llm.hf`).
The public names of all three are re-exported here."""

from distill_llm.formats.hf.config import *  # noqa: F403
from distill_llm.formats.hf.config import HF_META_KEY, TOKENIZER_FILES, is_hf_dir  # noqa: F401
from distill_llm.formats.hf.io import *  # noqa: F403
from distill_llm.formats.hf.io import export_hf, import_hf, main  # noqa: F401
from distill_llm.formats.hf.weights import *  # noqa: F403
