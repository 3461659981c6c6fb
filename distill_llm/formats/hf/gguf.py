"""A GGUF file (llama.cpp's format, often quantized) -> a float32 Hugging Face directory.

    dequantize_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", "hf/smollm2")   # then use hf/smollm2
                                                                       # wherever an HF dir goes

transformers' GGUF loader does the reading: it dequantizes every tensor to float32, undoes
llama.cpp's Q/K row permutation and rebuilds the tokenizer (with its chat template) from the
GGUF metadata. Its model refuses `save_pretrained` (its GGUF quantizer is not serializable), so
the tensors move into a plain model built from the same config, which saves. The directory is
written through `<output_dir>.tmp`, renamed at the end: a failed run leaves nothing half
written. `gguf_source.json` in it records the file it came from (name, sha256) and the versions
that read it. Llama-architecture GGUFs only (general.architecture "llama": Llama 2 / 3.x,
SmolLM, Mistral as llama.cpp writes it), dense: the family our engine and transformers' loader
share. Tested on SmolLM2-135M-Instruct (Q4_1/Q8_0, `tests/test_smollm2.py`); the tokenizer
repair below knows llama.cpp's "smollm" pre-tokenizer only, other GGUF tokenizers are taken as
transformers converts them.
"""

import hashlib
import json
import os
import shutil
import time
from importlib.metadata import version
from pathlib import Path
from typing import Callable

from distill_llm.errors import ConfigError

GGUF_MAGIC = b"GGUF"
SOURCE_FILE = "gguf_source.json"  # provenance, written into the HF directory
ARCHITECTURES = ("llama",)  # general.architecture values we dequantize
EXTRA = "pip install 'distill-llm[gguf]'"


def file_sha256(path) -> str:
    """The sha256 hex digest of the file at `path`, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_is_gguf(path: Path) -> None:
    if not path.is_file():
        raise ConfigError(f"GGUF file {str(path)!r} does not exist")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ConfigError(
            f"{str(path)!r} is not a GGUF file (it starts with {magic!r}, not b'GGUF'); give a "
            "llama.cpp .gguf model file"
        )


def _modules():
    """(gguf, transformers), or a one-line ConfigError naming the extra that installs them."""
    missing = []
    for name in ("gguf", "accelerate", "transformers"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ConfigError(f"reading GGUF files needs {', '.join(missing)}: {EXTRA}")
    import gguf
    import transformers

    return gguf, transformers


def _architecture(gguf, path: Path) -> dict:
    """The GGUF's architecture and quantization, refused unless Llama and dense."""
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as err:  # a truncated or corrupt file: gguf raises many kinds
        raise ConfigError(f"{str(path)!r} is not a readable GGUF file ({err})") from None

    def field(key, default=None):
        return reader.fields[key].contents() if key in reader.fields else default

    arch = field("general.architecture", "unknown")
    if arch not in ARCHITECTURES:
        raise ConfigError(
            f"{str(path)!r}: GGUF architecture {arch!r} is not supported (Llama-family GGUF "
            f"only: general.architecture {' / '.join(ARCHITECTURES)})"
        )
    if field(f"{arch}.expert_count", 0):
        raise ConfigError(
            f"{str(path)!r}: a mixture-of-experts GGUF ({field(f'{arch}.expert_count')} experts) "
            "is not supported; give a dense Llama GGUF"
        )
    kinds = sorted({t.tensor_type.name for t in reader.tensors})
    return {
        "architecture": arch,
        "tensor_types": kinds,
        "tensors": len(reader.tensors),
        "pre_tokenizer": field("tokenizer.ggml.pre"),
        "context_length": field(f"{arch}.context_length"),
    }


def _mend_tokenizer(tokenizer, info: dict) -> None:
    """Undo what transformers' GGUF tokenizer conversion loses (transformers 5.24,
    `integrations/ggml.py` GGUFGPTConverter): llama.cpp's "smollm" pre-tokenizer splits every
    digit before the GPT-2 regex (`llama-vocab.cpp`: "\\p{N}", then the GPT-2 expression; the
    original tokenizer.json: Digits(individual_digits) + ByteLevel), the converter keeps only
    the ByteLevel step, so whitespace runs before digits encode differently ("\\n\\n2" ->
    "Ċ","Ċ","2" instead of "ĊĊ","2"). And the model's context length as model_max_length."""
    from tokenizers import pre_tokenizers

    if info["pre_tokenizer"] == "smollm":
        tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
            ]
        )
    if info["context_length"]:
        tokenizer.model_max_length = int(info["context_length"])


def _portable_tokenizer_config(path: Path) -> None:
    """transformers 5.x names its tokenizer class TokenizersBackend, which 4.x (and so many a
    vLLM install) cannot resolve; PreTrainedTokenizerFast is the same class in 5.x and exists
    in 4.x. The 5.x loader's own bookkeeping keys (is_local, local_files_only) go too."""
    config = json.loads(path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    for key in ("is_local", "local_files_only"):
        config.pop(key, None)
    path.write_text(json.dumps(config, indent=2) + "\n")


def dequantize_gguf(gguf_path, output_dir, log: Callable[[str], None] = print) -> Path:
    """Write the Llama GGUF at `gguf_path` as a float32 Hugging Face directory `output_dir`
    (model.safetensors, config.json, generation_config.json, tokenizer.json and
    tokenizer_config.json with the chat template the GGUF carries, gguf_source.json); `log`
    gets a progress line per slow step. ConfigError, with nothing written, when the file is not
    a Llama GGUF, the GGUF packages are missing or `output_dir` exists."""
    import torch

    src, out = Path(gguf_path), Path(output_dir)
    _check_is_gguf(src)
    gguf, transformers = _modules()
    info = _architecture(gguf, src)
    if out.exists():
        raise ConfigError(f"{out} already exists; remove it or choose another output_dir")
    start = time.perf_counter()
    log(f"dequantizing {src.name} ({info['tensors']} tensors: {', '.join(info['tensor_types'])})")
    # a directory and a name within it (transformers joins them); local files only: no hub
    where = dict(gguf_file=src.name, local_files_only=True)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        str(src.parent.resolve()), dtype=torch.float32, **where
    )
    config = loaded.config
    # Only the GGUF quantizer makes the loaded model unsaveable; the config without it is a
    # plain LlamaConfig (transformers' PreTrainedModel.save_pretrained checks the quantizer).
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), assign=True, strict=True)
    plain.tie_weights()  # assign=True replaced the tied parameter objects
    del loaded
    plain.generation_config = transformers.GenerationConfig.from_model_config(config)
    log(f"  dequantized in {time.perf_counter() - start:.1f} s; reading the tokenizer")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(src.parent.resolve()), **where)
    _mend_tokenizer(tokenizer, info)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        plain.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        _portable_tokenizer_config(tmp / "tokenizer_config.json")
        record = {
            "file": src.name,
            "sha256": file_sha256(src),
            **info,
            "transformers": transformers.__version__,
            "gguf": version("gguf"),
        }
        (tmp / SOURCE_FILE).write_text(json.dumps(record, indent=2))
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"  wrote {out} in {time.perf_counter() - start:.1f} s")
    return out


def gguf_source(hf_dir) -> dict:
    """What `dequantize_gguf` recorded about the GGUF behind `hf_dir`; {} for any other
    directory."""
    p = Path(hf_dir) / SOURCE_FILE
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
