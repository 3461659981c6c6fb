"""GPT architectures: one dataclass, turned into a megatron-core TransformerConfig and GPTModel.

megatron-core is imported inside the functions that use it (a few seconds of import):
`import distill_llm` stays cheap, and megatron loads once an entry point runs.
"""

import dataclasses
import math
from dataclasses import dataclass
from types import MethodType
from typing import List, Literal, Optional

import torch
import torch.nn.functional as F

from distill_llm.errors import ConfigError

Normalization = Literal["RMSNorm", "LayerNorm"]
Activation = Literal["swiglu", "gelu", "squared_relu"]
PositionEmbedding = Literal["rope", "learned_absolute"]
ScoreFunction = Literal["softmax", "sigmoid"]
LoadBalancing = Literal["aux_loss", "seq_aux_loss", "none"]


@dataclass
class ModelConfig:
    """A decoder-only GPT architecture. Defaults describe a tiny CPU-sized Llama-like model."""

    num_layers: int = 2
    hidden_size: int = 64
    ffn_hidden_size: int = 256  # width of the MLP; per branch when gated (SwiGLU)
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None  # GQA key/value heads; None = one per attention head
    kv_channels: Optional[int] = None  # per-head width; None = hidden_size / num_attention_heads
    vocab_size: int = 1024  # the tokenizer's real vocabulary, before Megatron padding
    max_seq_length: int = 256  # longest sequence the positions support
    position_embedding: PositionEmbedding = "rope"
    rotary_base: int = 10000
    rope_scaling: bool = False  # Llama 3.x frequency scaling
    rope_scaling_factor: float = 8.0
    normalization: Normalization = "RMSNorm"
    activation: Activation = "swiglu"
    add_bias_linear: bool = False  # biases on every linear layer
    add_qkv_bias: bool = False  # bias on the QKV projection only (Qwen2)
    qk_layernorm: bool = False  # RMSNorm of each query / key head before RoPE (Qwen3)
    tie_embeddings: bool = False  # output layer shares the input embedding
    norm_epsilon: float = 1e-5
    init_method_std: float = 0.02
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    make_vocab_size_divisible_by: int = 128  # Megatron pads the vocab to a multiple of this x TP
    # Mixture of experts: None = a dense model. Dropless (every token reaches its experts).
    num_experts: Optional[int] = None  # routed experts per MoE layer
    moe_topk: int = 2  # experts each token is routed to
    moe_ffn_hidden_size: Optional[int] = None  # each expert's FFN width; None = ffn_hidden_size
    moe_shared_expert_size: Optional[int] = None  # a shared expert's FFN width (Qwen2-MoE)
    moe_shared_expert_gate: bool = False  # sigmoid gate on the shared expert (Qwen2-MoE)
    moe_score_function: ScoreFunction = "softmax"  # router scores
    moe_renormalize: bool = True  # top-k probabilities rescaled to sum 1 (HF: norm_topk_prob)
    moe_load_balancing: LoadBalancing = "aux_loss"  # the router's balancing loss
    moe_aux_loss_coeff: float = 0.0  # its weight in the student's gradient
    moe_z_loss_coeff: Optional[float] = None  # router z-loss weight; None = off
    moe_layers: Optional[List[int]] = None  # per layer 1 = MoE, 0 = dense; None = every layer

    @property
    def is_moe(self) -> bool:
        """Whether any layer is a mixture of experts."""
        return self.num_experts is not None and any(self.moe_layer_pattern)

    @property
    def moe_layer_pattern(self) -> List[int]:
        """1 for each MoE layer, 0 for each dense one (all 0 for a dense model)."""
        if self.num_experts is None:
            return [0] * self.num_layers
        return list(self.moe_layers) if self.moe_layers is not None else [1] * self.num_layers

    @property
    def expert_ffn(self) -> int:
        """Each routed expert's FFN width."""
        return self.moe_ffn_hidden_size or self.ffn_hidden_size

    @property
    def query_groups(self) -> int:
        """Key/value head count: `num_query_groups`, or one per attention head when unset."""
        return self.num_query_groups or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        """Per-head width: `kv_channels`, or hidden_size / num_attention_heads when unset."""
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    def padded_vocab_size(self, tensor_parallel: int = 1) -> int:
        """Vocabulary size padded the Megatron way: up to a multiple of divisor x TP."""
        multiple = self.make_vocab_size_divisible_by * tensor_parallel
        return int(math.ceil(self.vocab_size / multiple) * multiple)

    def num_parameters(self, active: bool = False) -> int:
        """Parameter count of the unsharded model at TP=1 (embeddings included); with `active`,
        those one token uses (its top-k experts, not every expert)."""
        h, f, v = self.hidden_size, self.ffn_hidden_size, self.padded_vocab_size()
        q = self.num_attention_heads * self.head_dim
        kv = 2 * self.query_groups * self.head_dim
        bias = self.add_bias_linear
        attn = h * (q + kv) + q * h + ((q + kv) if (bias or self.add_qkv_bias) else 0)
        attn += h if bias else 0
        gated = 2 if self.activation == "swiglu" else 1

        def ffn(width: int) -> int:
            return h * width * gated + width * h + ((width * gated + h) if bias else 0)

        norm = h * (2 if self.normalization == "LayerNorm" else 1)
        qk_norm = 2 * self.head_dim if self.qk_layernorm else 0
        moe = 0
        if self.num_experts is not None:
            experts = self.moe_topk if active else self.num_experts
            moe = self.num_experts * h + experts * ffn(self.expert_ffn)  # router + experts
            if self.moe_shared_expert_size:
                moe += ffn(self.moe_shared_expert_size) + (h if self.moe_shared_expert_gate else 0)
        layers = sum(
            attn + (moe if is_moe else ffn(f)) + 2 * norm + qk_norm
            for is_moe in self.moe_layer_pattern
        )
        embed = v * h + (self.max_seq_length * h if self.position_embedding != "rope" else 0)
        output = 0 if self.tie_embeddings else v * h
        return layers + embed + output + norm

    def validate(
        self,
        tensor_parallel: int = 1,
        pipeline_parallel: int = 1,
        role: str = "model",
        expert_parallel: int = 1,
    ):
        """Raise ConfigError when the architecture cannot be laid out on this parallel grid."""
        if self.hidden_size % self.num_attention_heads and self.kv_channels is None:
            raise ConfigError(
                f"{role}: hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}; set kv_channels explicitly"
            )
        if self.num_attention_heads % self.query_groups:
            raise ConfigError(
                f"{role}: num_attention_heads {self.num_attention_heads} is not divisible by "
                f"num_query_groups {self.query_groups}"
            )
        if self.num_attention_heads % tensor_parallel:
            raise ConfigError(
                f"{role}: num_attention_heads {self.num_attention_heads} is not divisible by "
                f"tensor_parallel {tensor_parallel}; choose a TP size that divides it"
            )
        if self.query_groups % tensor_parallel:
            raise ConfigError(
                f"{role}: num_query_groups {self.query_groups} is not divisible by "
                f"tensor_parallel {tensor_parallel}; choose a TP size that divides it"
            )
        if self.ffn_hidden_size % tensor_parallel:
            raise ConfigError(
                f"{role}: ffn_hidden_size {self.ffn_hidden_size} is not divisible by "
                f"tensor_parallel {tensor_parallel}"
            )
        if self.num_layers % pipeline_parallel:
            raise ConfigError(
                f"{role}: num_layers {self.num_layers} is not divisible by "
                f"pipeline_parallel {pipeline_parallel}"
            )
        if self.moe_shared_expert_size and self.moe_shared_expert_size % tensor_parallel:
            raise ConfigError(
                f"{role}: moe_shared_expert_size {self.moe_shared_expert_size} is not divisible "
                f"by tensor_parallel {tensor_parallel}"
            )
        self.validate_moe(expert_parallel, role)

    def validate_moe(self, expert_parallel: int = 1, role: str = "model") -> None:
        """Raise ConfigError for MoE settings that cannot work on `expert_parallel` ranks (a
        dense model ignores EP: its partner in a KD run may be the MoE one)."""
        if self.num_experts is None:
            return
        if self.num_experts < 2:
            raise ConfigError(f"{role}: num_experts must be at least 2, got {self.num_experts}")
        if not 1 <= self.moe_topk <= self.num_experts:
            raise ConfigError(
                f"{role}: moe_topk must be between 1 and num_experts {self.num_experts}, "
                f"got {self.moe_topk}"
            )
        if self.num_experts % expert_parallel:
            raise ConfigError(
                f"{role}: num_experts {self.num_experts} is not divisible by expert_parallel "
                f"{expert_parallel}; choose an EP size that divides it"
            )
        if self.moe_layers is not None and (
            len(self.moe_layers) != self.num_layers or set(self.moe_layers) - {0, 1}
        ):
            raise ConfigError(
                f"{role}: moe_layers must list 0 (dense) or 1 (MoE) for each of the "
                f"{self.num_layers} layers, got {self.moe_layers}"
            )
        if self.moe_shared_expert_gate and not self.moe_shared_expert_size:
            raise ConfigError(f"{role}: moe_shared_expert_gate needs moe_shared_expert_size")
        if self.moe_score_function == "sigmoid" and not self.moe_renormalize:
            raise ConfigError(f"{role}: sigmoid router scores are always renormalised here")
        if self.moe_aux_loss_coeff < 0 or (self.moe_z_loss_coeff or 0) < 0:
            raise ConfigError(f"{role}: MoE loss coefficients must be >= 0")

    def to_dict(self) -> dict:
        """The config as a plain dict of its fields."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        """A ModelConfig from `to_dict`'s output; ConfigError naming any unknown fields."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown model config fields {unknown}; known: {sorted(known)}")
        return cls(**data)


def _activation(name: str):
    from megatron.core.activations import squared_relu

    if name == "swiglu":
        return F.silu, True
    if name == "gelu":
        return F.gelu, False
    if name == "squared_relu":
        return squared_relu, False
    raise ConfigError(f"unknown activation {name!r}; choose swiglu, gelu or squared_relu")


def transformer_config(
    cfg: ModelConfig,
    *,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    params_dtype: torch.dtype = torch.float32,
    expert_parallel: int = 1,
):
    """The megatron-core TransformerConfig for `cfg` on the given parallel grid."""
    from megatron.core.transformer import TransformerConfig

    activation, gated = _activation(cfg.activation)
    on_gpu = torch.cuda.is_available()
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.query_groups,
        kv_channels=cfg.head_dim,
        normalization=cfg.normalization,
        layernorm_epsilon=cfg.norm_epsilon,
        activation_func=activation,
        gated_linear_unit=gated,
        add_bias_linear=cfg.add_bias_linear,
        add_qkv_bias=cfg.add_qkv_bias,
        qk_layernorm=cfg.qk_layernorm,
        init_method_std=cfg.init_method_std,
        hidden_dropout=cfg.hidden_dropout,
        attention_dropout=cfg.attention_dropout,
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        pipeline_dtype=params_dtype,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        use_cpu_initialization=not on_gpu,
        # Fusions need apex/TE kernels; the unfused paths run everywhere.
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        cross_entropy_loss_fusion=False,
        bias_dropout_fusion=False,
        # Loss is summed per token and divided by the global token count at the end, so
        # micro-batch and DP splits of one global batch give the same gradient.
        calculate_per_token_loss=True,
        **_moe_settings(cfg, expert_parallel, on_gpu),
    )


def _moe_settings(cfg: ModelConfig, expert_parallel: int, on_gpu: bool) -> dict:
    """TransformerConfig's MoE fields for `cfg` (none for a dense model)."""
    if not cfg.is_moe:
        return {}
    balancing = cfg.moe_load_balancing if cfg.moe_aux_loss_coeff > 0 else "none"
    return dict(
        num_moe_experts=cfg.num_experts,
        moe_router_topk=cfg.moe_topk,
        moe_ffn_hidden_size=cfg.expert_ffn,
        moe_shared_expert_intermediate_size=cfg.moe_shared_expert_size,
        moe_shared_expert_gate=cfg.moe_shared_expert_gate,
        moe_router_score_function=cfg.moe_score_function,
        # softmax then top-k (not renormalised), or top-k of the logits then softmax over
        # them (= the top-k probabilities renormalised)
        moe_router_pre_softmax=not cfg.moe_renormalize,
        moe_router_load_balancing_type=balancing,
        moe_aux_loss_coeff=cfg.moe_aux_loss_coeff,
        moe_z_loss_coeff=cfg.moe_z_loss_coeff,
        moe_layer_freq=cfg.moe_layer_pattern,
        moe_expert_capacity_factor=None,  # dropless
        moe_router_dtype="fp32",  # routing decisions in fp32 under bf16 too
        # alltoall builds CUDA streams and events (engine.cpu_compat)
        moe_token_dispatcher_type="alltoall" if on_gpu else "allgather",
        # experts stay SequentialMLPs, also under the TE spec: their parameter names are the
        # ones the HF mapping uses (TEGroupedMLP's grouped GEMM would rename them; not wired)
        moe_grouped_gemm=False,
        expert_model_parallel_size=expert_parallel,
        expert_tensor_parallel_size=1,
    )


def layer_spec(cfg: ModelConfig, config=None, attention: str = "sdpa"):
    """TransformerEngine layer spec on a GPU with TE installed, else megatron-core's local spec.
    An MoE model gets a block spec (`config`: its TransformerConfig) mixing dense and MoE
    layers as `cfg.moe_layer_pattern` says; experts are `SequentialMLP`s. Without TE, core
    attention is torch's SDPA (`engine.attention`), or megatron's unfused local attention with
    `attention="unfused"` (the same maths, kept for comparison)."""
    from megatron.core.models.gpt import gpt_layer_specs

    use_te = False
    if torch.cuda.is_available():
        try:
            import transformer_engine  # noqa: F401

            use_te = True
        except ImportError:
            pass
    if attention not in ("sdpa", "unfused"):
        raise ValueError(f"attention must be 'sdpa' or 'unfused', got {attention!r}")
    if cfg.is_moe:
        spec = gpt_layer_specs.get_gpt_decoder_block_spec(
            config, use_transformer_engine=use_te, normalization=cfg.normalization
        )
    elif use_te:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            qk_layernorm=cfg.qk_layernorm
        )
    else:
        spec = gpt_layer_specs.get_gpt_layer_local_spec(
            normalization=cfg.normalization, qk_layernorm=cfg.qk_layernorm
        )
    if not use_te and attention == "sdpa":
        from distill_llm.engine.attention import use_sdpa

        use_sdpa(spec)
    return spec


# A logit of probability exactly 0 that keeps every later operation finite.
EXCLUDED_LOGIT = -1e30


def padding_ids(local: int, real: int, rank: int, device=None) -> Optional[torch.Tensor]:
    """THE shared-vocabulary rule's mask: which ids of a vocabulary shard (rank x local onwards)
    are at or beyond `real` (Megatron's padding rows, or ids another model lacks), bool
    `[local]`; None when none are. Those ids get probability exactly 0 in every loss."""
    first_padding = real - rank * local
    if first_padding >= local:
        return None
    return torch.arange(local, device=device) >= first_padding


def lm_loss(model, labels: torch.Tensor, logits: torch.Tensor, copy: bool = False):
    """The language-model loss of a GPTModel over its real vocabulary: per-token cross entropy
    `[b, s]` of `labels` `[b, s]` under `logits` `[s, b, V/TP]` (this rank's shard), with
    Megatron's padding rows (ids >= model.real_vocab_size) given probability 0.

    megatron's `vocab_parallel_cross_entropy` overwrites its logits argument in place (its
    `.float()` copies nothing for fp32 logits): with `copy` the CE gets a copy, so logits read
    afterwards (by a KD loss) stay logits. Masking the padding makes that copy anyway."""
    # megatron-core is heavy to import; every caller has already built a model with it
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    local = logits.shape[-1]
    rank = parallel_state.get_tensor_model_parallel_rank()
    real = getattr(model, "real_vocab_size", local * 10**9)
    excluded = padding_ids(local, real, rank, logits.device)
    if excluded is not None:
        logits = logits.float().masked_fill(excluded, EXCLUDED_LOGIT).contiguous()
    elif copy and logits.dtype == torch.float32:
        logits = logits.clone(memory_format=torch.contiguous_format)
    return GPTModel.compute_language_model_loss(model, labels, logits)


def build_gpt(
    cfg: ModelConfig,
    *,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    params_dtype: torch.dtype = torch.float32,
    expert_parallel: Optional[int] = None,
    attention: str = "sdpa",
):
    """Build this rank's GPTModel shard (parallel_state must be initialised; the expert-parallel
    size defaults to the one the process groups were built with; `attention`: see
    `layer_spec`)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    if expert_parallel is None:
        expert_parallel = parallel_state.get_expert_model_parallel_world_size()

    config = transformer_config(
        cfg,
        tensor_parallel=tensor_parallel,
        pipeline_parallel=pipeline_parallel,
        params_dtype=params_dtype,
        expert_parallel=expert_parallel,
    )
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(cfg, config, attention),
        vocab_size=cfg.padded_vocab_size(tensor_parallel),
        max_sequence_length=cfg.max_seq_length,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=cfg.tie_embeddings,
        position_embedding_type=cfg.position_embedding,
        rotary_base=cfg.rotary_base,
        rope_scaling=cfg.rope_scaling,
        rope_scaling_factor=cfg.rope_scaling_factor,
    )
    # Ids from here up to the padded size are Megatron's padding rows, not tokens: the LM
    # loss (below) and the KD loss (kd.criterion) leave them out.
    model.real_vocab_size = cfg.vocab_size
    model.compute_language_model_loss = MethodType(lm_loss, model)
    if params_dtype != torch.float32:
        # Megatron-LM's Float16Module does the same: every parameter in the low precision,
        # norms included (the local spec builds norm weights in fp32). The optimizer keeps
        # fp32 master copies; mixed-dtype groups would break its checkpoint mapping.
        model.to(dtype=params_dtype)
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model
