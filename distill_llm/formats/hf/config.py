"""Hugging Face `config.json` <-> ModelConfig: which families we read and write (Llama, Mistral,
Qwen2/2.5, Qwen3 and the mixtures of experts Mixtral, Qwen2-MoE, Qwen3-MoE), their RoPE settings
and dtypes, and the config.json written on export."""

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
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}
# each mixture-of-experts family and the dense family its attention is that of
DENSE_OF = {"mixtral": "mistral", "qwen2_moe": "qwen2", "qwen3_moe": "qwen3"}
# transformers' defaults for the MoE keys a config.json may leave out (the config classes'
# field defaults in transformers 5.x: MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig)
MOE_DEFAULTS = {
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2, router_aux_loss_coef=0.001),
    "qwen2_moe": dict(num_experts=60, num_experts_per_tok=4, moe_intermediate_size=1408,
                      shared_expert_intermediate_size=5632, norm_topk_prob=False,
                      decoder_sparse_step=1, router_aux_loss_coef=0.001),
    "qwen3_moe": dict(num_local_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
                      norm_topk_prob=False, decoder_sparse_step=1, router_aux_loss_coef=0.001),
}  # fmt: skip
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
    "chat_template.jinja",  # the chat template, where transformers 5.x saves it
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
    """The family (llama, mistral, qwen2, qwen3, mixtral, qwen2_moe, qwen3_moe) of an HF
    config's architectures; ConfigError naming `where` when none is supported."""
    archs = hf.get("architectures") or []
    for arch in archs:
        if arch in SUPPORTED:
            return SUPPORTED[arch]
    name = archs[0] if archs else hf.get("model_type", "unknown")
    raise ConfigError(
        f"{where}: architecture {name!r} is not supported; supported: {', '.join(SUPPORTED)}"
    )


def _rope(hf: dict, where: str, family: str) -> Tuple[float, Optional[dict]]:
    """(theta, llama3 scaling or None) from either the 4.x or the 5.x way of writing it."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or params
    default = 1000000.0 if family == "mixtral" else 10000.0  # MixtralConfig.default_theta
    theta = params.get("rope_theta", hf.get("rope_theta", default))
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
    theta, scaling = _rope(hf, where, family)
    if float(theta) != int(theta):
        raise ConfigError(f"{where}: rope_theta {theta} is not an integer")
    hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
    max_pos = hf.get("max_position_embeddings", 4096)
    window = hf.get("sliding_window")
    if family not in ("llama", "mistral", "mixtral") and not hf.get("use_sliding_window", False):
        window = None  # the Qwen families ignore sliding_window (Qwen2-MoE writes 0) unless used
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
    if family == "qwen3_moe" and attention_bias:
        raise ConfigError(
            f"{where}: attention_bias=true is not supported for qwen3_moe (its experts have no "
            "biases; megatron-core biases every linear layer or none)"
        )
    moe = _moe_fields(hf, family, where) if family in DENSE_OF else {}
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
        add_bias_linear=attention_bias and family in ("llama", "mistral", "qwen3"),
        add_qkv_bias=family == "qwen2"
        or (family == "qwen2_moe" and bool(hf.get("qkv_bias", True))),
        qk_layernorm=family in ("qwen3", "qwen3_moe"),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        init_method_std=float(hf.get("initializer_range", 0.02)),
        **moe,
    )
    cfg.validate(role=where)
    return cfg, family


def _moe_fields(hf: dict, family: str, where: str) -> dict:
    """ModelConfig's MoE fields for a Mixtral / Qwen2-MoE / Qwen3-MoE config. HF routes by a
    softmax over every expert, the top k of it, renormalised when norm_topk_prob (Mixtral: always):
    megatron's softmax router with moe_renormalize the same."""
    get = {**MOE_DEFAULTS[family], **hf}.get
    if float(hf.get("router_jitter_noise") or 0.0) != 0.0:
        raise ConfigError(
            f"{where}: router_jitter_noise={hf['router_jitter_noise']} is not supported (0 only)"
        )
    layers = hf["num_hidden_layers"]
    # transformers 5.x's Mixtral and Qwen3-MoE configs alias num_experts to num_local_experts
    # (5.x writes the latter for Qwen3-MoE too); Qwen2-MoE knows num_experts only
    aliases = ("num_experts",) if family == "qwen2_moe" else ("num_local_experts", "num_experts")
    experts = next((hf[k] for k in aliases if k in hf), get(aliases[0]))
    if family == "mixtral":
        width, shared = hf["intermediate_size"], 0
        renormalize, pattern = True, [1] * layers  # Mixtral always renormalises
    else:
        width = get("moe_intermediate_size")
        shared = get("shared_expert_intermediate_size") if family == "qwen2_moe" else 0
        renormalize = bool(get("norm_topk_prob"))
        step, dense = get("decoder_sparse_step"), set(hf.get("mlp_only_layers") or [])
        if not isinstance(step, int) or step < 1:
            raise ConfigError(f"{where}: decoder_sparse_step {step!r} is not a positive integer")
        pattern = [int(i not in dense and (i + 1) % step == 0) for i in range(layers)]
        if family == "qwen2_moe" and not shared:
            raise ConfigError(
                f"{where}: shared_expert_intermediate_size=0 is not supported (a Qwen2-MoE "
                "shared expert of width 0)"
            )
    if not experts or not any(pattern):
        raise ConfigError(
            f"{where}: {family} with no mixture-of-experts layer (num_experts {experts}, "
            "mlp_only_layers / decoder_sparse_step leave none) is not supported"
        )
    return dict(
        num_experts=experts,
        moe_topk=get("num_experts_per_tok"),
        moe_ffn_hidden_size=width,
        moe_shared_expert_size=shared or None,
        moe_shared_expert_gate=bool(shared),  # Qwen2-MoE's shared expert is sigmoid-gated
        moe_score_function="softmax",
        moe_renormalize=renormalize,
        moe_load_balancing="aux_loss",
        moe_aux_loss_coeff=float(get("router_aux_loss_coef")),
        moe_layers=None if all(pattern) else pattern,
    )


def source_dtype(hf: dict, where: str) -> torch.dtype:
    """The torch dtype an HF config records (`dtype` or `torch_dtype`); float32 when absent."""
    name = hf.get("dtype") or hf.get("torch_dtype") or "float32"  # 5.x writes dtype
    if name not in DTYPES:
        raise ConfigError(f"{where}: dtype {name!r} is unknown; known: {', '.join(DTYPES)}")
    return DTYPES[name]


def hf_config_for(cfg: ModelConfig, family: str, dtype: torch.dtype, tokens: dict) -> dict:
    """config.json for `cfg` as `family`, readable by transformers 4.x and 5.x (legacy rope
    keys); an MoE family gets its expert keys."""
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
    if family in ("llama", "qwen3", "mistral", "qwen3_moe"):
        hf["attention_bias"] = cfg.add_bias_linear
    if family == "llama":
        hf["mlp_bias"] = cfg.add_bias_linear
        hf["pretraining_tp"] = 1
    if family in ("mistral", "mixtral"):
        hf["sliding_window"] = None  # transformers' Mistral assumes 4096 when the key is absent
    if family in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe"):
        hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_layers)
    if family in DENSE_OF:
        hf.update(_moe_keys(cfg, family))
    return hf


def _moe_keys(cfg: ModelConfig, family: str) -> dict:
    """config.json's mixture-of-experts keys for `cfg` written as `family` (checked first by
    check_exportable)."""
    common = dict(
        num_experts_per_tok=cfg.moe_topk,
        router_aux_loss_coef=cfg.moe_aux_loss_coeff,
        output_router_logits=False,
    )
    if family == "mixtral":  # one width for every layer: all are MoE
        return dict(common, num_local_experts=cfg.num_experts, intermediate_size=cfg.expert_ffn,
                    router_jitter_noise=0.0)  # fmt: skip
    keys = dict(
        common,
        num_experts=cfg.num_experts,
        moe_intermediate_size=cfg.expert_ffn,
        norm_topk_prob=cfg.moe_renormalize,
        decoder_sparse_step=1,
        mlp_only_layers=[i for i, moe in enumerate(cfg.moe_layer_pattern) if not moe],
    )
    if family == "qwen2_moe":
        keys.update(shared_expert_intermediate_size=cfg.moe_shared_expert_size,
                    qkv_bias=cfg.add_qkv_bias)  # fmt: skip
    return keys


def family_for(cfg: ModelConfig, recorded: Optional[str] = None) -> str:
    """The HF family to export as: the one imported from, else what the architecture implies.
    A mixture of experts is Qwen3-MoE with QK norm, Qwen2-MoE with a shared expert or QKV
    biases, else Mixtral; a dense model recorded as an MoE family exports as its dense kin."""
    if cfg.is_moe:
        if cfg.qk_layernorm:
            return "qwen3_moe"
        if cfg.moe_shared_expert_size or cfg.add_qkv_bias:
            return "qwen2_moe"
        return "mixtral"
    recorded = DENSE_OF.get(recorded, recorded)
    if cfg.qk_layernorm:
        return "qwen3"
    if cfg.add_qkv_bias:
        return "qwen2"
    if cfg.add_bias_linear and recorded not in ("llama", "qwen3"):
        return "llama"
    return recorded or "llama"


def check_exportable(cfg: ModelConfig, family: str) -> None:
    """Raises ConfigError when `cfg`'s biases, QK norm or experts cannot be written as
    `family`."""
    if cfg.is_moe and family not in DENSE_OF:
        raise ConfigError(
            f"{family} is a dense family; a mixture-of-experts model exports as "
            f"{', '.join(DENSE_OF)}"
        )
    if family in DENSE_OF:
        if not cfg.is_moe:
            raise ConfigError(
                f"{family} is a mixture-of-experts family and this model is dense; export it "
                f"as {DENSE_OF[family]}"
            )
        _check_moe_exportable(cfg, family)
        return
    if family == "qwen2" and (not cfg.add_qkv_bias or cfg.add_bias_linear):
        raise ConfigError("a Qwen2 export needs QKV biases only (add_qkv_bias, no add_bias_linear)")
    if family != "qwen2" and cfg.add_qkv_bias and not cfg.add_bias_linear:
        raise ConfigError(f"{family} has no QKV-only bias; export this model as qwen2")
    if cfg.qk_layernorm and family != "qwen3":
        raise ConfigError(f"{family} has no QK norm; export this model as qwen3")
    if family == "llama" and cfg.hidden_size % cfg.num_attention_heads:
        # transformers' LlamaConfig.validate_architecture, even with head_dim given
        raise ConfigError(
            f"a Llama export needs hidden_size divisible by num_attention_heads (transformers "
            f"refuses {cfg.hidden_size} / {cfg.num_attention_heads}, head_dim or not); choose a "
            "head count that divides the hidden size"
        )


def _check_moe_exportable(cfg: ModelConfig, family: str) -> None:
    """What Mixtral, Qwen2-MoE and Qwen3-MoE can hold: softmax routers, unbiased MLPs; Mixtral:
    renormalised top-k, every layer MoE; Qwen2-MoE: a gated shared expert; Qwen3-MoE: QK norm."""
    mixtral, qwen2, qwen3 = (family == f for f in ("mixtral", "qwen2_moe", "qwen3_moe"))
    shared, gated = bool(cfg.moe_shared_expert_size), cfg.moe_shared_expert_gate
    needs = [
        ("softmax router scores (moe_score_function)", cfg.moe_score_function == "softmax"),
        ("no MLP or expert biases (add_bias_linear)", not cfg.add_bias_linear),
        ("QK norm (qk_layernorm)", cfg.qk_layernorm or not qwen3),
        ("no QK norm (qk_layernorm)", not cfg.qk_layernorm or qwen3),
        ("a sigmoid-gated shared expert (moe_shared_expert_size, moe_shared_expert_gate)",
         (shared and gated) or not qwen2),
        ("no shared expert (moe_shared_expert_size)", not shared or qwen2),
        ("no QKV-only bias (add_qkv_bias)", not cfg.add_qkv_bias or qwen2),
        ("renormalised top-k probabilities (moe_renormalize)", cfg.moe_renormalize or not mixtral),
        ("every layer an MoE layer (moe_layers)", all(cfg.moe_layer_pattern) or not mixtral),
    ]  # fmt: skip
    for what, ok in needs:
        if not ok:
            raise ConfigError(f"a {family} export needs {what}; this model differs")


def find_tokenizer_dir(path: Path) -> Optional[Path]:
    """`path` when it holds `tokenizer.json` or `tokenizer.model`, else None."""
    return (
        path
        if any((path / f).is_file() for f in TOKENIZER_FILES[:1] + ("tokenizer.model",))
        else None
    )
