"""Model architectures as `run.Config[ModelConfig]` factories, with their published shapes
(dense, and mixtures of experts: Qwen3-30B-A3B, Mixtral 8x7B, a tiny CPU one).

On the command line any of them can stand in for a model argument, e.g.
`nemo distill_llm distill --factory tiny student=tiny_student student.num_layers=1`.
"""

import nemo_run as run

from distill_llm.engine.model import ModelConfig


def _llama3(**shape) -> run.Config[ModelConfig]:
    """Llama 3.x: RMSNorm, SwiGLU, no biases, RoPE base 500k with Llama-3 frequency scaling,
    GQA with 8 key/value heads, 128,256-token vocabulary."""
    base = dict(
        num_query_groups=8,
        vocab_size=128256,
        max_seq_length=8192,  # training length; the checkpoints support up to 131072
        rotary_base=500000,
        rope_scaling=True,
        normalization="RMSNorm",
        activation="swiglu",
        norm_epsilon=1e-5,
    )
    return run.Config(ModelConfig, **{**base, **shape})


def _qwen3(**shape) -> run.Config[ModelConfig]:
    """Qwen3 (dense and MoE): RMSNorm, SwiGLU, no biases, RMSNorm of each query / key head
    (QK norm), 128-wide heads whatever the hidden size, RoPE base 1M, eps 1e-6, 151,936-row
    embedding."""
    base = dict(
        kv_channels=128,
        vocab_size=151936,
        max_seq_length=4096,  # training length; the checkpoints support 32768 (131072 with YaRN)
        rotary_base=1000000,
        normalization="RMSNorm",
        activation="swiglu",
        qk_layernorm=True,
        norm_epsilon=1e-6,
    )
    return run.Config(ModelConfig, **{**base, **shape})


def _mistral(**shape) -> run.Config[ModelConfig]:
    """Mistral 7B v0.2+ and Mixtral 8x7B: 32 layers, hidden 4096, SwiGLU width 14336, 32 heads
    / 8 KV heads, RMSNorm eps 1e-5, RoPE base 1M, no sliding window, untied."""
    base = dict(
        num_layers=32,
        hidden_size=4096,
        ffn_hidden_size=14336,
        num_attention_heads=32,
        num_query_groups=8,
        max_seq_length=8192,  # training length; the checkpoints support up to 32768
        rotary_base=1000000,
        normalization="RMSNorm",
        activation="swiglu",
        norm_epsilon=1e-5,
    )
    return run.Config(ModelConfig, **{**base, **shape})


def _qwen25(**shape) -> run.Config[ModelConfig]:
    """Qwen2.5: RMSNorm, SwiGLU, QKV bias only, RoPE base 1M, eps 1e-6."""
    base = dict(
        vocab_size=151936,
        max_seq_length=4096,  # training length; the checkpoints support up to 32768
        rotary_base=1000000,
        normalization="RMSNorm",
        activation="swiglu",
        add_qkv_bias=True,
        norm_epsilon=1e-6,
    )
    return run.Config(ModelConfig, **{**base, **shape})


@run.cli.factory
def llama31_8b() -> run.Config[ModelConfig]:
    """Llama 3.1 8B: 32 layers, hidden 4096, FFN 14336, 32 heads / 8 KV heads, untied."""
    return _llama3(
        num_layers=32,
        hidden_size=4096,
        ffn_hidden_size=14336,
        num_attention_heads=32,
        rope_scaling_factor=8.0,
    )


@run.cli.factory
def llama32_1b() -> run.Config[ModelConfig]:
    """Llama 3.2 1B: 16 layers, hidden 2048, FFN 8192, 32 heads / 8 KV heads, tied."""
    return _llama3(
        num_layers=16,
        hidden_size=2048,
        ffn_hidden_size=8192,
        num_attention_heads=32,
        kv_channels=64,
        tie_embeddings=True,
        rope_scaling_factor=32.0,
    )


@run.cli.factory
def llama32_3b() -> run.Config[ModelConfig]:
    """Llama 3.2 3B: 28 layers, hidden 3072, FFN 8192, 24 heads / 8 KV heads, tied."""
    return _llama3(
        num_layers=28,
        hidden_size=3072,
        ffn_hidden_size=8192,
        num_attention_heads=24,
        kv_channels=128,
        tie_embeddings=True,
        rope_scaling_factor=32.0,
    )


@run.cli.factory
def qwen25_0p5b() -> run.Config[ModelConfig]:
    """Qwen2.5 0.5B: 24 layers, hidden 896, FFN 4864, 14 heads / 2 KV heads, tied."""
    return _qwen25(
        num_layers=24,
        hidden_size=896,
        ffn_hidden_size=4864,
        num_attention_heads=14,
        num_query_groups=2,
        tie_embeddings=True,
    )


@run.cli.factory
def qwen25_1p5b() -> run.Config[ModelConfig]:
    """Qwen2.5 1.5B: 28 layers, hidden 1536, FFN 8960, 12 heads / 2 KV heads, tied."""
    return _qwen25(
        num_layers=28,
        hidden_size=1536,
        ffn_hidden_size=8960,
        num_attention_heads=12,
        num_query_groups=2,
        tie_embeddings=True,
    )


@run.cli.factory
def qwen25_7b() -> run.Config[ModelConfig]:
    """Qwen2.5 7B: 28 layers, hidden 3584, FFN 18944, 28 heads / 4 KV heads, untied; its
    embedding has 152,064 rows (the 0.5B-3B models have 151,936; same tokenizer)."""
    return _qwen25(
        num_layers=28,
        hidden_size=3584,
        ffn_hidden_size=18944,
        num_attention_heads=28,
        num_query_groups=4,
        vocab_size=152064,
    )


@run.cli.factory
def qwen3_4b() -> run.Config[ModelConfig]:
    """Qwen3 4B: 36 layers, hidden 2560, FFN 9728, 32 heads / 8 KV heads of width 128, tied."""
    return _qwen3(
        num_layers=36,
        hidden_size=2560,
        ffn_hidden_size=9728,
        num_attention_heads=32,
        num_query_groups=8,
        tie_embeddings=True,
    )


@run.cli.factory
def qwen3_30b_a3b() -> run.Config[ModelConfig]:
    """Qwen3-30B-A3B: 48 MoE layers, hidden 2048, 32 heads / 4 KV heads of width 128; 128
    experts of width 768, 8 per token (renormalised), no shared expert, untied."""
    return _qwen3(
        num_layers=48,
        hidden_size=2048,
        ffn_hidden_size=6144,  # config.json's intermediate_size; unused: every layer is MoE
        num_attention_heads=32,
        num_query_groups=4,
        num_experts=128,
        moe_topk=8,
        moe_ffn_hidden_size=768,
        moe_renormalize=True,  # norm_topk_prob: true
        moe_aux_loss_coeff=0.001,  # router_aux_loss_coef (only a training MoE model uses it)
    )


@run.cli.factory
def mistral_7b() -> run.Config[ModelConfig]:
    """Mistral 7B v0.3: 32 layers, hidden 4096, FFN 14336, 32 heads / 8 KV heads, 32,768-token
    vocabulary, RoPE base 1M, untied. (v0.1 and v0.2 have the v0.1 32,000-token vocabulary;
    v0.1 also has a 4096-token sliding window and RoPE base 10k.)"""
    return _mistral(vocab_size=32768)


@run.cli.factory
def mixtral_8x7b() -> run.Config[ModelConfig]:
    """Mixtral 8x7B v0.1: Mistral 7B's attention with, in each of the 32 layers, 8 SwiGLU experts
    of width 14336, 2 per token (renormalised); Mistral 7B v0.1's 32,000-token vocabulary."""
    return _mistral(
        vocab_size=32000,
        num_experts=8,
        moe_topk=2,
        moe_ffn_hidden_size=14336,
        moe_renormalize=True,  # HF Mixtral always renormalises its top-2 weights
        moe_aux_loss_coeff=0.02,  # router_aux_loss_coef (only a training MoE model uses it)
    )


@run.cli.factory
def tiny_teacher() -> run.Config[ModelConfig]:
    """A Llama-shaped teacher that trains on a laptop CPU: 4 layers, hidden 128, ~0.5M params."""
    return run.Config(
        ModelConfig,
        num_layers=4,
        hidden_size=128,
        ffn_hidden_size=352,
        num_attention_heads=4,
        num_query_groups=2,
        vocab_size=1024,
        max_seq_length=256,
    )


@run.cli.factory
def tiny_student() -> run.Config[ModelConfig]:
    """The tiny teacher's student: half the depth and width."""
    return run.Config(
        ModelConfig,
        num_layers=2,
        hidden_size=64,
        ffn_hidden_size=176,
        num_attention_heads=4,
        num_query_groups=2,
        vocab_size=1024,
        max_seq_length=256,
    )


@run.cli.factory
def tiny_moe_teacher() -> run.Config[ModelConfig]:
    """A Mixtral-shaped teacher that trains on a laptop CPU: 4 layers, hidden 128, 8 experts of
    width 128 with 2 per token; ~2.0M parameters, ~0.8M of them used per token. Its vocabulary is
    `tiny_student`'s."""
    return run.Config(
        ModelConfig,
        num_layers=4,
        hidden_size=128,
        ffn_hidden_size=128,
        num_attention_heads=4,
        num_query_groups=2,
        vocab_size=1024,
        max_seq_length=256,
        num_experts=8,
        moe_topk=2,
        moe_ffn_hidden_size=128,
        moe_aux_loss_coeff=0.01,  # keeps all 8 experts in use while it pretrains from scratch
    )
