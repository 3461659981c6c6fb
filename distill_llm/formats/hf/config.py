"""Hugging Face `config.json` <-> ModelConfig: which families we read and write (Llama, Mistral,
Qwen2/2.5, Qwen3), their RoPE settings and dtypes, and the config.json written on export."""

import json
from pathlib import Path
from typing import Optional, Tuple

import torch

from distill_llm.engine.model import ModelConfig
from distill_llm.errors import ConfigError

SUPPORTED = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
CLASS_OF = {family: arch for arch, family in SUPPORTED.items()}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)
HF_META_KEY = "hf"  # key in distill_llm.json recording the HF source of an imported checkpoint
INDEX_FILE = "model.safetensors.index.json"


# -- recognising and reading an HF directory ---------------------------------------------------
def is_hf_dir(path) -> bool:
    """A directory with config.json and safetensors weights (not an engine checkpoint)."""
    p = Path(path)
    return (p / "config.json").is_file() and (
        (p / "model.safetensors").is_file() or (p / INDEX_FILE).is_file()
    )


def read_config(path) -> dict:
    """The parsed `config.json` of HF directory `path`; ConfigError when missing or invalid."""
    p = Path(path)
    if not p.is_dir():
        raise ConfigError(f"Hugging Face directory {str(p)!r} does not exist")
    if not (p / "config.json").is_file():
        raise ConfigError(f"{str(p)!r} has no config.json; give a Hugging Face model directory")
    try:
        return json.loads((p / "config.json").read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{p / 'config.json'} is not valid JSON ({err})") from None


def family_of(hf: dict, where: str) -> str:
    """The family (llama, mistral, qwen2, qwen3) of an HF config's architectures; ConfigError
    naming `where` when none is supported."""
    archs = hf.get("architectures") or []
    for arch in archs:
        if arch in SUPPORTED:
            return SUPPORTED[arch]
    name = archs[0] if archs else hf.get("model_type", "unknown")
    raise ConfigError(
        f"{where}: architecture {name!r} is not supported; supported: {', '.join(SUPPORTED)}"
    )


def _rope(hf: dict, where: str) -> Tuple[float, Optional[dict]]:
    """(theta, llama3 scaling or None) from either the 4.x or the 5.x way of writing it."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or params
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise ConfigError(f"{where}: RoPE scaling {kind!r} is not supported (default or llama3)")
    expected = {"low_freq_factor": 1.0, "high_freq_factor": 4.0}
    for key, value in expected.items():
        if float(scaling.get(key, value)) != value:
            raise ConfigError(
                f"{where}: llama3 RoPE with {key}={scaling[key]} is not supported "
                f"(megatron-core fixes it at {value})"
            )
    if int(scaling.get("original_max_position_embeddings", 8192)) != 8192:
        raise ConfigError(
            f"{where}: llama3 RoPE with original_max_position_embeddings="
            f"{scaling['original_max_position_embeddings']} is not supported (megatron-core: 8192)"
        )
    return theta, scaling


def model_config_from_hf(hf: dict, where: str = "config.json") -> Tuple[ModelConfig, str]:
    """The engine's architecture for an HF config, and the family; one-line errors otherwise."""
    family = family_of(hf, where)
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{where}: hidden_act {act!r} is not supported (silu / SwiGLU only)")
    theta, scaling = _rope(hf, where)
    if float(theta) != int(theta):
        raise ConfigError(f"{where}: rope_theta {theta} is not an integer")
    hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
    max_pos = hf.get("max_position_embeddings", 4096)
    window = hf.get("sliding_window")
    if family in ("qwen2", "qwen3") and not hf.get("use_sliding_window", False):
        window = None
    if window is not None and window < max_pos:
        raise ConfigError(
            f"{where}: sliding-window attention ({window} < {max_pos} positions) is not supported"
        )
    attention_bias = bool(hf.get("attention_bias", False))
    mlp_bias = bool(hf.get("mlp_bias", False))
    if family in ("llama", "qwen3", "mistral") and attention_bias != mlp_bias:
        raise ConfigError(
            f"{where}: attention_bias={attention_bias} with mlp_bias={mlp_bias} is not supported "
            "(megatron-core biases every linear layer or none)"
        )
    cfg = ModelConfig(
        num_layers=hf["num_hidden_layers"],
        hidden_size=hidden,
        ffn_hidden_size=hf["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        kv_channels=hf.get("head_dim") or (128 if family == "qwen3" else hidden // heads),
        vocab_size=hf["vocab_size"],
        max_seq_length=max_pos,
        rotary_base=int(theta),
        rope_scaling=scaling is not None,
        rope_scaling_factor=float(scaling["factor"]) if scaling else 8.0,
        normalization="RMSNorm",
        activation="swiglu",
        add_bias_linear=attention_bias and family != "qwen2",
        add_qkv_bias=family == "qwen2",
        qk_layernorm=family == "qwen3",
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        init_method_std=float(hf.get("initializer_range", 0.02)),
    )
    cfg.validate(role=where)
    return cfg, family


def source_dtype(hf: dict, where: str) -> torch.dtype:
    """The torch dtype an HF config records (`dtype` or `torch_dtype`); float32 when absent."""
    name = hf.get("dtype") or hf.get("torch_dtype") or "float32"  # 5.x writes dtype
    if name not in DTYPES:
        raise ConfigError(f"{where}: dtype {name!r} is unknown; known: {', '.join(DTYPES)}")
    return DTYPES[name]


def hf_config_for(cfg: ModelConfig, family: str, dtype: torch.dtype, tokens: dict) -> dict:
    """config.json for `cfg`, readable by transformers 4.x and 5.x (legacy rope keys)."""
    if cfg.position_embedding != "rope" or cfg.activation != "swiglu":
        raise ConfigError("only RoPE + SwiGLU models can be exported to Hugging Face")
    if cfg.normalization != "RMSNorm":
        raise ConfigError("only RMSNorm models can be exported to Hugging Face")
    scaling = None
    if cfg.rope_scaling:
        scaling = {
            "rope_type": "llama3",
            "factor": cfg.rope_scaling_factor,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        }
    dtype_name = {v: k for k, v in DTYPES.items()}[dtype]
    hf = {
        "architectures": [CLASS_OF[family]],
        "model_type": family,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.query_groups,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_length,
        "rms_norm_eps": cfg.norm_epsilon,
        "rope_theta": float(cfg.rotary_base),
        "rope_scaling": scaling,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_method_std,
        "attention_dropout": 0.0,
        "torch_dtype": dtype_name,
        "dtype": dtype_name,
        "use_cache": True,
        **tokens,
    }
    if family in ("llama", "qwen3", "mistral"):
        hf["attention_bias"] = cfg.add_bias_linear
    if family == "llama":
        hf["mlp_bias"] = cfg.add_bias_linear
        hf["pretraining_tp"] = 1
    if family == "mistral":
        hf["sliding_window"] = None  # transformers assumes 4096 when the key is absent
    if family in ("qwen2", "qwen3"):
        hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_layers)
    return hf


def family_for(cfg: ModelConfig, recorded: Optional[str] = None) -> str:
    """The HF family to export as: the one imported from, else what the architecture implies."""
    if cfg.qk_layernorm:
        return "qwen3"
    if cfg.add_qkv_bias:
        return "qwen2"
    if cfg.add_bias_linear and recorded not in ("llama", "qwen3"):
        return "llama"
    return recorded or "llama"


def check_exportable(cfg: ModelConfig, family: str) -> None:
    """Raises ConfigError when `cfg`'s biases or QK norm cannot be written as `family`."""
    if family == "qwen2" and (not cfg.add_qkv_bias or cfg.add_bias_linear):
        raise ConfigError("a Qwen2 export needs QKV biases only (add_qkv_bias, no add_bias_linear)")
    if family != "qwen2" and cfg.add_qkv_bias and not cfg.add_bias_linear:
        raise ConfigError(f"{family} has no QKV-only bias; export this model as qwen2")
    if cfg.qk_layernorm and family != "qwen3":
        raise ConfigError(f"{family} has no QK norm; export this model as qwen3")


def find_tokenizer_dir(path: Path) -> Optional[Path]:
    """`path` when it holds `tokenizer.json` or `tokenizer.model`, else None."""
    return (
        path
        if any((path / f).is_file() for f in TOKENIZER_FILES[:1] + ("tokenizer.model",))
        else None
    )
