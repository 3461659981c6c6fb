"""Core attention through torch's SDPA (engine.attention) computes what megatron's unfused local
attention computes, and what transformers computes: logits within 1e-5 (fp32) at TP=1 and TP=2,
causal, with GQA and MHA, RoPE and learned positions, QK norm, and MoE layers. (The loss
mask, `eod_mask_loss`, acts on the loss only; attention is causal over the whole sequence.)"""

import pytest
import torch
import transformers
from conftest import run_worker

from distill_llm.engine.model import ModelConfig

SHAPES = {
    "gqa_rope_qknorm": dict(num_attention_heads=4, num_query_groups=2, qk_layernorm=True),
    "mha_learned_layernorm_bias": dict(
        num_attention_heads=4,
        position_embedding="learned_absolute",
        normalization="LayerNorm",
        activation="gelu",
        add_bias_linear=True,
    ),  # fmt: skip
    "gqa_moe": dict(num_attention_heads=4, num_query_groups=2, num_experts=4, moe_topk=2),
}
BASE = dict(num_layers=2, hidden_size=64, ffn_hidden_size=96, vocab_size=256,
            max_seq_length=64, init_method_std=0.1)  # fmt: skip


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("attention")
    ops = {1: [], 2: []}
    for name, shape in SHAPES.items():
        for tp in (1, 2):
            ops[tp].append(dict(op="attention_paths", model={**BASE, **shape}, tensor_parallel=tp,
                                out=str(tmp / f"{name}_tp{tp}.pt")))  # fmt: skip
    run_worker(tmp, ops[1])
    run_worker(tmp, ops[2], nproc=2)
    return tmp


@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("tp", [1, 2])
def test_sdpa_logits_equal_megatrons_unfused_attention(paths, name, tp):
    got = torch.load(paths / f"{name}_tp{tp}.pt")
    # logits of order 1 (the 1e-5 is then float32 rounding over a few layers, not a loosening)
    assert 0.5 < got["sdpa"].abs().max() < 5.0
    torch.testing.assert_close(got["sdpa"], got["unfused"], atol=1e-5, rtol=0)


def test_sdpa_logits_equal_transformers(tmp_path):
    """A Llama with GQA from transformers, loaded into our SDPA model: logits within 1e-5."""
    from distill_llm.engine import parallel
    from distill_llm.engine.model import build_gpt
    from distill_llm.formats import paths as model_paths

    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                   max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf.save_pretrained(tmp_path / "hf")
    parallel.initialize(parallel.ParallelConfig(), seed=0)
    ours_cfg = model_paths.model_config_of(str(tmp_path / "hf"))
    ours = build_gpt(ours_cfg)
    model_paths.load_model(str(tmp_path / "hf"), ours, ours_cfg, role="model")
    assert type(ours.decoder.layers[0].self_attention.core_attention).__name__ == "SDPAttention"
    tokens = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(tokens).logits
        got = ours.eval()(tokens, torch.arange(32).expand(2, 32), None)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_anything_but_plain_causal_attention_takes_megatrons_path():
    """Attention dropout while training (and explicit masks) go to megatron's own forward."""
    from distill_llm.engine import parallel
    from distill_llm.engine.attention import SDPAttention
    from distill_llm.engine.model import build_gpt

    parallel.initialize(parallel.ParallelConfig(), seed=0)
    model = build_gpt(ModelConfig(**BASE, num_attention_heads=4, attention_dropout=0.1))
    core = model.decoder.layers[0].self_attention.core_attention
    assert isinstance(core, SDPAttention)
    core.train()
    assert not core._fast_path(None, None, None, None)
    core.eval()
    assert core._fast_path(None, None, None, None)
    assert not core._fast_path(torch.ones(1, dtype=torch.bool), None, None, None)
