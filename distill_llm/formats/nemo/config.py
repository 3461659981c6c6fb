"""NeMo model configs <-> ModelConfig: NeMo 1 `model_config.yaml` (MegatronGPTModel) and NeMo 2
`context/model.yaml` (GPTConfig / LlamaConfig / Qwen configs). Read with a safe YAML loader;
anything that would change the maths and that the engine cannot express is refused in one line.
"""

from __future__ import annotations

from typing import Optional

import torch
import yaml

from distill_llm.engine.model import ModelConfig
from distill_llm.errors import ConfigError

NEMO1_TARGET = "nemo.collections.nlp.models.language_modeling.megatron_gpt_model.MegatronGPTModel"
NEMO_VERSION = "2.4.1"  # the NeMo whose files we were measured against (tests/fixtures/nemo)

_NEMO1_NORMS = {"rmsnorm": "RMSNorm", "layernorm": "LayerNorm"}
_NEMO1_ACTIVATIONS = {
    "swiglu": "swiglu", "fast-swiglu": "swiglu", "gelu": "gelu", "squared-relu": "squared_relu",
}  # fmt: skip
_POSITIONS = ("rope", "learned_absolute")
_NEMO2_ACTIVATIONS = {
    ("torch.nn.functional.silu", True): "swiglu",
    ("torch.nn.functional.gelu", False): "gelu",
    ("torch._C._nn.gelu", False): "gelu",  # how NeMo itself spells F.gelu
    ("megatron.core.activations.squared_relu", False): "squared_relu",
    ("nemo.collections.llm.fn.activation.squared_relu", False): "squared_relu",
}


def parse_yaml(text: str, where: str) -> dict:
    """A YAML mapping read with the safe loader (tags that build objects are refused)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        line = str(e).replace("\n", " ")
        raise ConfigError(f"{where} is not plain YAML ({line}); refusing it") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where} does not hold a YAML mapping")
    return data


def _need(data: dict, key: str, where: str):
    if data.get(key) is None:
        raise ConfigError(f"{where}: {key} is missing")
    return data[key]


def _refuse_moe(num_experts, where: str) -> None:
    if num_experts not in (None, 0, 1):
        raise ConfigError(
            f"{where}: a mixture-of-experts model ({num_experts} experts) is not supported yet"
        )


def from_nemo1(data: dict, where: str, vocab_size: int) -> ModelConfig:
    """The architecture a NeMo 1 `model_config.yaml` describes (`vocab_size`: the tokenizer's,
    which NeMo 1 keeps out of the YAML)."""
    if not data.get("mcore_gpt", False):
        raise ConfigError(
            f"{where}: mcore_gpt is false (a legacy, pre-megatron-core NeMo GPT); convert it "
            "with NeMo's megatron_gpt legacy-to-mcore script first"
        )
    _refuse_moe(data.get("num_moe_experts"), where)
    norm = str(data.get("normalization", "layernorm")).lower()
    if norm not in _NEMO1_NORMS:
        raise ConfigError(
            f"{where}: normalization {norm!r} is not supported ({', '.join(_NEMO1_NORMS)})"
        )
    act = str(data.get("activation", "gelu")).lower()
    if act not in _NEMO1_ACTIVATIONS:
        raise ConfigError(
            f"{where}: activation {act!r} is not supported ({', '.join(_NEMO1_ACTIVATIONS)})"
        )
    pos = data.get("position_embedding_type", "learned_absolute")
    if pos not in _POSITIONS:
        raise ConfigError(
            f"{where}: position_embedding_type {pos!r} is not supported ({', '.join(_POSITIONS)})"
        )
    _refuse_unless(data, where, {
        "rotary_percentage": 1.0, "seq_len_interpolation_factor": None, "headscale": False,
        "transformer_block_type": "pre_ln", "normalize_attention_scores": True,
        "layernorm_zero_centered_gamma": False, "window_size": None,
    })  # fmt: skip
    seq = data.get("max_position_embeddings") or _need(data, "encoder_seq_length", where)
    cfg = ModelConfig(
        num_layers=int(_need(data, "num_layers", where)),
        hidden_size=int(_need(data, "hidden_size", where)),
        ffn_hidden_size=int(_need(data, "ffn_hidden_size", where)),
        num_attention_heads=int(_need(data, "num_attention_heads", where)),
        num_query_groups=data.get("num_query_groups"),
        kv_channels=data.get("kv_channels"),
        vocab_size=vocab_size,
        max_seq_length=int(seq),
        position_embedding=pos,
        rotary_base=_integer(data.get("rotary_base", 10000), "rotary_base", where),
        rope_scaling=bool(data.get("scale_positional_embedding", False)),
        normalization=_NEMO1_NORMS[norm],
        activation=_NEMO1_ACTIVATIONS[act],
        add_bias_linear=bool(data.get("bias", True)),
        add_qkv_bias=bool(data.get("qkv_bias", False)) and not data.get("bias", True),
        qk_layernorm=bool(data.get("qk_layernorm", False)),
        tie_embeddings=bool(data.get("share_embeddings_and_output_weights", True)),
        norm_epsilon=float(data.get("layernorm_epsilon", 1e-5)),
        init_method_std=float(data.get("init_method_std", 0.02)),
        hidden_dropout=float(data.get("hidden_dropout", 0.0)),
        attention_dropout=float(data.get("attention_dropout", 0.0)),
        make_vocab_size_divisible_by=int(data.get("make_vocab_size_divisible_by", 128)),
    )
    cfg.validate(role=where)
    return cfg


def _integer(value, key: str, where: str) -> int:
    if float(value) != int(float(value)):
        raise ConfigError(f"{where}: {key} {value} is not an integer; not supported")
    return int(float(value))


def _refuse_unless(data: dict, where: str, defaults: dict) -> None:
    """Refuse settings that change the maths away from what the engine computes."""
    for key, ok in defaults.items():
        if key in data and data[key] != ok and not (ok is None and data[key] in (None, 1.0)):
            raise ConfigError(f"{where}: {key}={data[key]!r} is not supported (only {ok!r})")


def _target(value) -> Optional[str]:
    return value.get("_target_") if isinstance(value, dict) else value


def from_nemo2(model_yaml: dict, where: str, vocab_size: Optional[int]) -> ModelConfig:
    """The architecture a NeMo 2 `context/model.yaml` describes (`vocab_size` is used when the
    config leaves it null)."""
    cfg_yaml = model_yaml.get("config")
    if not isinstance(cfg_yaml, dict):
        raise ConfigError(f"{where}: no model config section (config:)")
    c = cfg_yaml
    _refuse_moe(c.get("num_moe_experts"), where)
    if c.get("multi_latent_attention"):
        raise ConfigError(f"{where}: multi-latent attention is not supported")
    norm = c.get("normalization", "LayerNorm")
    if norm not in ("RMSNorm", "LayerNorm"):
        raise ConfigError(f"{where}: normalization {norm!r} is not supported (RMSNorm, LayerNorm)")
    act_key = (_target(c.get("activation_func")), bool(c.get("gated_linear_unit", False)))
    if act_key not in _NEMO2_ACTIVATIONS:
        raise ConfigError(
            f"{where}: activation {act_key[0]} (gated_linear_unit={act_key[1]}) is not supported "
            "(SwiGLU, GELU, squared ReLU)"
        )
    pos = c.get("position_embedding_type", "learned_absolute")
    if pos not in _POSITIONS:
        raise ConfigError(
            f"{where}: position_embedding_type {pos!r} is not supported ({', '.join(_POSITIONS)})"
        )
    _refuse_unless(c, where, {
        "rotary_percent": 1.0, "seq_len_interpolation_factor": None, "window_size": None,
        "layernorm_zero_centered_gamma": False, "rotary_interleaved": False,
        "apply_residual_connection_post_layernorm": False,
    })  # fmt: skip
    config_class = str(_target(c) or "")
    scale = c.get("scale_factor") if "Llama3" in config_class else None
    vocab = c.get("vocab_size") or vocab_size
    if not vocab:
        raise ConfigError(f"{where}: vocab_size is null and no tokenizer says it")
    cfg = ModelConfig(
        num_layers=int(_need(c, "num_layers", where)),
        hidden_size=int(_need(c, "hidden_size", where)),
        ffn_hidden_size=int(_need(c, "ffn_hidden_size", where)),
        num_attention_heads=int(_need(c, "num_attention_heads", where)),
        num_query_groups=c.get("num_query_groups"),
        kv_channels=c.get("kv_channels"),
        vocab_size=int(vocab),
        max_seq_length=int(_need(c, "seq_length", where)),
        position_embedding=pos,
        rotary_base=_integer(c.get("rotary_base", 10000), "rotary_base", where),
        rope_scaling=scale is not None,
        rope_scaling_factor=float(scale) if scale is not None else 8.0,
        normalization=norm,
        activation=_NEMO2_ACTIVATIONS[act_key],
        add_bias_linear=bool(c.get("add_bias_linear", True)),
        add_qkv_bias=bool(c.get("add_qkv_bias", False)) and not c.get("add_bias_linear", True),
        qk_layernorm=bool(c.get("qk_layernorm", False)),
        tie_embeddings=bool(c.get("share_embeddings_and_output_weights", True)),
        norm_epsilon=float(c.get("layernorm_epsilon", 1e-5)),
        init_method_std=float(c.get("init_method_std", 0.02)),
        hidden_dropout=float(c.get("hidden_dropout", 0.0)),
        attention_dropout=float(c.get("attention_dropout", 0.0)),
        make_vocab_size_divisible_by=int(c.get("make_vocab_size_divisible_by", 128)),
    )
    cfg.validate(role=where)
    return cfg


# -- writing ---------------------------------------------------------------------------------
# The keys NeMo 2.4.1's converter writes into a MegatronGPTModel's model_config.yaml (the
# fixture), with its values; the architecture keys are overwritten from the ModelConfig.
_NEMO1_TEMPLATE = """
restore_from_path: null
restore_from_ckpt: null
mcore_gpt: true
micro_batch_size: 1
global_batch_size: 8
tensor_model_parallel_size: 1
pipeline_model_parallel_size: 1
virtual_pipeline_model_parallel_size: null
encoder_seq_length: 4096
max_position_embeddings: 4096
num_layers: 1
hidden_size: 1
ffn_hidden_size: 1
num_attention_heads: 1
init_method_std: 0.02
use_scaled_init_method: true
hidden_dropout: 0.0
attention_dropout: 0.0
ffn_dropout: 0.0
kv_channels: null
apply_query_key_layer_scaling: true
normalization: rmsnorm
layernorm_epsilon: 1.0e-05
do_layer_norm_weight_decay: false
make_vocab_size_divisible_by: 128
pre_process: true
post_process: true
persist_layer_norm: true
bias: false
activation: fast-swiglu
headscale: false
transformer_block_type: pre_ln
openai_gelu: false
normalize_attention_scores: true
position_embedding_type: rope
rotary_percentage: 1.0
attention_type: multihead
share_embeddings_and_output_weights: false
overlap_p2p_comm: false
batch_p2p_comm: true
num_query_groups: null
tokenizer:
  library: sentencepiece
  type: null
  model: null
  vocab_file: null
  merge_file: null
  delimiter: null
  sentencepiece_legacy: false
native_amp_init_scale: 4294967296
native_amp_growth_interval: 1000
hysteresis: 2
fp32_residual_connection: false
fp16_lm_cross_entropy: false
megatron_amp_O2: false
grad_allreduce_chunk_size_mb: 125
grad_div_ar_fusion: true
gradient_accumulation_fusion: false
bias_activation_fusion: false
bias_dropout_add_fusion: false
masked_softmax_fusion: true
get_attention_mask_from_fusion: true
apply_rope_fusion: false
seed: 1234
resume_from_checkpoint: null
use_cpu_initialization: false
onnx_safe: false
apex_transformer_log_level: 30
gradient_as_bucket_view: true
sync_batch_comm: false
activations_checkpoint_granularity: null
activations_checkpoint_method: null
activations_checkpoint_num_layers: null
num_micro_batches_with_partial_activation_checkpoints: null
activations_checkpoint_layers_per_pipeline: null
sequence_parallel: false
transformer_engine: true
fp8: false
fp8_e4m3: false
fp8_hybrid: true
fp8_margin: 0
fp8_interval: 1
fp8_amax_history_len: 1024
fp8_amax_compute_algo: max
reduce_amax: true
use_emha: false
data:
  index_mapping_dir: null
  data_impl: mmap
  splits_string: 900,50,50
  seq_length: 4096
  skip_warmup: true
  num_workers: 2
  dataloader_type: single
  reset_position_ids: false
  reset_attention_mask: false
  eod_mask_loss: false
  validation_drop_last: true
  no_seqlen_plus_one_input_tokens: false
  pad_samples_to_global_batch_size: false
  shuffle_documents: true
nsys_profile:
  enabled: false
  start_step: 10
  end_step: 10
  ranks:
  - 0
  gen_shape: false
optim:
  name: fused_adam
  lr: 0.0002
  weight_decay: 0.01
  betas:
  - 0.9
  - 0.98
  sched:
    name: CosineAnnealing
    warmup_steps: 500
    constant_steps: 50000
    min_lr: 2.0e-05
rotary_base: 10000.0
scale_positional_embedding: false
precision: 32
target: null
nemo_version: null
"""

_NEMO1_ACT_NAMES = {"swiglu": "fast-swiglu", "gelu": "gelu", "squared_relu": "squared-relu"}
_PRECISION = {torch.float32: 32, torch.bfloat16: "bf16", torch.float16: 16}


def check_nemo1(cfg: ModelConfig) -> None:
    """Refuse, in one line, an architecture NeMo 1's MegatronGPTModel cannot describe."""
    if cfg.rope_scaling and cfg.rope_scaling_factor != 8.0:
        raise ConfigError(
            f"NeMo 1 has Llama 3.1 RoPE scaling with factor 8 only, not {cfg.rope_scaling_factor}; "
            "export as NeMo 2 (a directory) instead"
        )
    if cfg.add_qkv_bias and not cfg.add_bias_linear:
        raise ConfigError(
            "NeMo 1's MegatronGPTModel has no QKV-only bias; export as NeMo 2 (a directory)"
        )


def to_nemo1(cfg: ModelConfig, dtype: torch.dtype, tokenizer: dict) -> dict:
    """A NeMo 1 MegatronGPTModel `model_config.yaml` (as a dict) for `cfg`; `tokenizer` is its
    `tokenizer:` section."""
    check_nemo1(cfg)
    out = yaml.safe_load(_NEMO1_TEMPLATE)
    out.update(
        encoder_seq_length=cfg.max_seq_length,
        max_position_embeddings=cfg.max_seq_length,
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        init_method_std=cfg.init_method_std,
        hidden_dropout=cfg.hidden_dropout,
        attention_dropout=cfg.attention_dropout,
        kv_channels=cfg.kv_channels,
        normalization=cfg.normalization.lower(),
        layernorm_epsilon=cfg.norm_epsilon,
        make_vocab_size_divisible_by=cfg.make_vocab_size_divisible_by,
        bias=cfg.add_bias_linear,
        activation=_NEMO1_ACT_NAMES[cfg.activation],
        position_embedding_type=cfg.position_embedding,
        share_embeddings_and_output_weights=cfg.tie_embeddings,
        num_query_groups=cfg.num_query_groups,
        tokenizer={**out["tokenizer"], **tokenizer},
        rotary_base=float(cfg.rotary_base),
        scale_positional_embedding=cfg.rope_scaling,
        precision=_PRECISION[dtype],
        target=NEMO1_TARGET,
        nemo_version=NEMO_VERSION,
    )
    if cfg.qk_layernorm:
        out["qk_layernorm"] = True
    out["data"]["seq_length"] = cfg.max_seq_length
    return out


def nemo2_classes(cfg: ModelConfig) -> tuple:
    """(model class, config class) NeMo 2 names for `cfg`, as strings."""
    base = "nemo.collections.llm.gpt.model."
    if cfg.qk_layernorm:
        return base + "qwen3.Qwen3Model", base + "qwen3.Qwen3Config"
    if cfg.add_qkv_bias:
        return base + "qwen2.Qwen2Model", base + "qwen2.Qwen2Config"
    llama_like = (
        cfg.normalization == "RMSNorm" and cfg.activation == "swiglu"
        and cfg.position_embedding == "rope" and not cfg.add_bias_linear
    )  # fmt: skip
    if llama_like:
        if cfg.rope_scaling:
            return base + "llama.LlamaModel", base + "llama.Llama31Config"
        return base + "llama.LlamaModel", base + "llama.LlamaConfig"
    return base + "base.GPTModel", base + "base.GPTConfig"


_NEMO2_ACT_TARGET = {
    "swiglu": ("torch.nn.functional.silu", True),
    "gelu": ("torch.nn.functional.gelu", False),
    "squared_relu": ("megatron.core.activations.squared_relu", False),
}


def to_nemo2(cfg: ModelConfig, dtype: torch.dtype) -> dict:
    """NeMo 2 model-config fields (GPTConfig names) for `cfg`."""
    act, gated = _NEMO2_ACT_TARGET[cfg.activation]
    fields = dict(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,  # None (one per head) and ours stay identical
        kv_channels=cfg.kv_channels,
        normalization=cfg.normalization,
        layernorm_epsilon=cfg.norm_epsilon,
        activation_func=act,
        gated_linear_unit=gated,
        add_bias_linear=cfg.add_bias_linear,
        add_qkv_bias=cfg.add_qkv_bias,
        qk_layernorm=cfg.qk_layernorm,
        position_embedding_type=cfg.position_embedding,
        rotary_base=float(cfg.rotary_base),
        rotary_percent=1.0,
        seq_length=cfg.max_seq_length,
        share_embeddings_and_output_weights=cfg.tie_embeddings,
        make_vocab_size_divisible_by=cfg.make_vocab_size_divisible_by,
        vocab_size=cfg.vocab_size,
        init_method_std=cfg.init_method_std,
        hidden_dropout=cfg.hidden_dropout,
        attention_dropout=cfg.attention_dropout,
        params_dtype=str(dtype),
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        tensor_model_parallel_size=1,
        pipeline_model_parallel_size=1,
    )
    if cfg.rope_scaling:
        fields.update(scale_factor=cfg.rope_scaling_factor, low_freq_factor=1.0,
                      high_freq_factor=4.0, old_context_len=8192)  # fmt: skip
    return fields
