"""Hugging Face mixtures of experts in and out (Mixtral, Qwen2-MoE, Qwen3-MoE), against
transformers' own models (built from configs, every weight perturbed, nothing downloaded):
logits equal transformers' at EP=1, EP=2 and TP=2, read from an imported checkpoint or straight
from the HF directory; a checkpoint saved at EP=2 loads at EP=1; import -> export is bitwise,
also when the export gathers experts from EP=2 ranks; what cannot be mapped is refused in one
line."""

import json

import pytest
import torch
from conftest import run_worker

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

from distill_llm.engine.model import ModelConfig  # noqa: E402
from distill_llm.errors import ConfigError  # noqa: E402
from distill_llm.formats import hf  # noqa: E402

BASE = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
    vocab_size=256,
    num_experts_per_tok=2,
)
FAMILIES = {
    # every layer MoE (block_sparse_moe, experts w1/w3/w2), top-k always renormalised;
    # intermediate_size is the expert width
    "mixtral": dict(num_local_experts=4, intermediate_size=32, rope_theta=1000000.0),
    # QKV bias, a sigmoid-gated shared expert, layer 1 dense (mlp_only_layers), top-k not
    # renormalised (norm_topk_prob false), a vocabulary Megatron pads at TP=2 (250 -> 256)
    "qwen2_moe": dict(
        num_experts=4,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        mlp_only_layers=[1],
        norm_topk_prob=False,
        vocab_size=250,
    ),
    # QK norm, head_dim 32 != hidden / heads, renormalised top-k, tied embeddings
    "qwen3_moe": dict(
        num_experts=4,
        moe_intermediate_size=32,
        head_dim=32,
        norm_topk_prob=True,
        tie_word_embeddings=True,
    ),
}
# (file stem, what it holds); each compared with transformers' logits
LAYOUTS = {
    "ep1": "imported at EP=1, run at EP=1",
    "ep2": "imported at EP=2, run at EP=2",
    "ep2_at_ep1": "imported at EP=2, run at EP=1",
    "hf_ep2": "HF directory read directly at EP=2 (each rank its own experts)",
    "hf_tp2": "HF directory read directly at TP=2 x EP=1",
}


def _tokens(vocab: int) -> torch.Tensor:
    # what tests/worker.py's "logits" op feeds our model
    return torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))


def _hf_logits(path) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(_tokens(model.config.vocab_size)).logits  # [batch, seq, vocab]


def _make_hf(path, family: str) -> None:
    cfg = transformers.AutoConfig.for_model(family, **{**BASE, **FAMILIES[family]})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # norms != 1, biases != 0, routers far from uniform
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(path)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Each family made by transformers; two worker launches (2 processes, then 1) run every
    import, logits and export the tests below compare."""
    tmp = tmp_path_factory.mktemp("hf_moe")
    ops2, ops1 = [], []
    for family in FAMILIES:
        d = tmp / family
        _make_hf(d / "hf", family)
        src = str(d / "hf")
        ops2 += [
            dict(op="import_hf", hf_path=src, output_dir=str(d / "ckpt_ep2"), expert_parallel=2),
            dict(op="logits", checkpoint=str(d / "ckpt_ep2"), out=str(d / "ep2.pt"),
                 expert_parallel=2),
            dict(op="logits", checkpoint=src, out=str(d / "hf_ep2.pt"), expert_parallel=2),
            dict(op="logits", checkpoint=src, out=str(d / "hf_tp2.pt"), tensor_parallel=2),
        ]  # fmt: skip
        ops1 += [
            dict(op="import_hf", hf_path=src, output_dir=str(d / "ckpt_ep1")),
            dict(op="logits", checkpoint=str(d / "ckpt_ep1"), out=str(d / "ep1.pt")),
            dict(op="logits", checkpoint=str(d / "ckpt_ep2"), out=str(d / "ep2_at_ep1.pt")),
            dict(op="export_hf", checkpoint=str(d / "ckpt_ep1"), output_dir=str(d / "export")),
            dict(op="export_hf", checkpoint=str(d / "ckpt_ep2"), output_dir=str(d / "export2")),
        ]
    run_worker(tmp, ops2, nproc=2)
    run_worker(tmp, ops1)
    return tmp


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_equal_transformers_at_ep1_ep2_and_tp2(converted, family):
    d = converted / family
    expected = _hf_logits(d / "hf")
    for stem, what in LAYOUTS.items():
        ours = torch.load(d / f"{stem}.pt")
        assert ours.shape == expected.shape, what
        diff = (ours - expected).abs().max().item()
        print(f"{family} {stem}: max |logit difference| vs transformers {diff:.2e}")
        assert diff <= 1e-4, f"{family}, {what}: max |logit difference| {diff}"
    # the same weights on the same layout: a checkpoint saved at EP=2 is the EP=1 import
    assert torch.equal(torch.load(d / "ep2_at_ep1.pt"), torch.load(d / "ep1.pt"))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_routing_is_exercised(converted, family):
    """The fixtures route tokens to every expert, by clear margins (so the comparison above
    checks the routing): top-k choices of transformers' own routers, layer 0."""
    model = transformers.AutoModelForCausalLM.from_pretrained(converted / family / "hf").eval()
    captured = []
    router = model.model.layers[0].mlp.gate
    router.register_forward_hook(lambda mod, args, out: captured.append(out))
    with torch.no_grad():
        model(_tokens(model.config.vocab_size))
    logits, _, chosen = captured[0]
    assert set(chosen.flatten().tolist()) == set(range(4))
    top = logits.topk(3, dim=-1).values  # the k-th and (k+1)-th largest are far apart
    assert (top[:, 1] - top[:, 2]).abs().min() > 1e-4


@pytest.mark.parametrize("family", list(FAMILIES))
def test_export_loads_in_transformers_and_round_trips_bitwise(converted, family):
    d = converted / family
    source = load_file(d / "hf/model.safetensors")
    reference = _hf_logits(d / "hf")
    for export in ("export", "export2"):  # from the EP=1 and the EP=2 checkpoint
        exported = load_file(d / export / "model.safetensors")
        assert sorted(exported) == sorted(source)
        for name, t in source.items():
            assert t.dtype == exported[name].dtype and torch.equal(t, exported[name]), name
        assert torch.equal(_hf_logits(d / export), reference)
        config = json.loads((d / export / "config.json").read_text())
        assert config["model_type"] == family and config["architectures"] == [hf.CLASS_OF[family]]
        assert hf.checked_config(d / export) == hf.checked_config(d / "hf")


def test_export_gathers_experts_across_ep_ranks(tmp_path):
    """pretrain at EP=2 from a Qwen2-MoE directory, exported at the end by the EP=2 ranks (each
    holding two of the four experts). The learning rate is too small to move a float32 weight,
    so the export must be the source, bitwise."""
    _make_hf(tmp_path / "hf", "qwen2_moe")
    run_worker(
        tmp_path,
        [
            dict(
                op="pretrain",
                init_checkpoint=str(tmp_path / "hf"),
                output_dir=str(tmp_path / "run"),
                export_hf=str(tmp_path / "export"),
                parallel=dict(expert_parallel=2),
                optim=dict(lr=1e-30, min_lr=0.0, warmup_steps=0),
                train=dict(steps=1, micro_batch_size=2, global_batch_size=4, seq_length=32,
                           val_every=0, val_batches=1, log_every=1),
            )
        ],
        nproc=2,
    )  # fmt: skip
    source = load_file(tmp_path / "hf/model.safetensors")
    exported = load_file(tmp_path / "export/model.safetensors")
    assert sorted(exported) == sorted(source)
    for name, t in source.items():
        assert torch.equal(t, exported[name]), name


def _config(family: str, **overrides) -> dict:
    cfg = transformers.AutoConfig.for_model(family, **{**BASE, **FAMILIES[family]})
    return {**cfg.to_dict(), "architectures": [hf.CLASS_OF[family]], **overrides}


def test_family_mappings():
    """config.json keys -> ModelConfig, and back to the same keys."""
    mixtral, fam = hf.model_config_from_hf(_config("mixtral"))
    assert fam == "mixtral" and mixtral.num_experts == 4 and mixtral.moe_topk == 2
    assert mixtral.expert_ffn == mixtral.ffn_hidden_size == 32 and mixtral.moe_renormalize
    assert mixtral.moe_layers is None and mixtral.moe_shared_expert_size is None
    assert mixtral.rotary_base == 1000000 and mixtral.moe_aux_loss_coeff == 0.001
    qwen2, _ = hf.model_config_from_hf(_config("qwen2_moe"))
    assert qwen2.moe_layers == [1, 0] and qwen2.ffn_hidden_size == 96 and qwen2.expert_ffn == 32
    assert qwen2.moe_shared_expert_size == 48 and qwen2.moe_shared_expert_gate
    assert qwen2.add_qkv_bias and not qwen2.moe_renormalize
    every_other = _config(
        "qwen2_moe", mlp_only_layers=[], num_hidden_layers=4, decoder_sparse_step=2
    )
    sparse, _ = hf.model_config_from_hf(every_other)
    assert sparse.moe_layers == [0, 1, 0, 1]
    qwen3, _ = hf.model_config_from_hf(_config("qwen3_moe"))
    assert qwen3.qk_layernorm and qwen3.head_dim == 32 and qwen3.moe_renormalize
    assert qwen3.tie_embeddings and not qwen3.add_qkv_bias
    no_head_dim = {k: v for k, v in _config("qwen3_moe").items() if k != "head_dim"}
    assert hf.model_config_from_hf(no_head_dim)[0].head_dim == 16  # hidden / heads, not 128
    for cfg, family in ((mixtral, "mixtral"), (qwen2, "qwen2_moe"), (qwen3, "qwen3_moe")):
        assert hf.family_for(cfg) == family
        written = hf.hf_config_for(cfg, family, torch.float32, {})
        assert hf.model_config_from_hf(written)[0] == cfg
    # a dense student of an MoE teacher exports as the dense kin of its family
    dense = ModelConfig(num_layers=1, hidden_size=64, num_attention_heads=4)
    assert hf.family_for(dense, "mixtral") == "mistral"


def _refused(call, match):
    with pytest.raises(ConfigError, match=match) as err:
        call()
    assert "\n" not in str(err.value)


def test_what_cannot_be_mapped_is_refused_in_one_line(tmp_path):
    read = hf.model_config_from_hf
    _refused(lambda: read(_config("mixtral", sliding_window=16)), "sliding-window attention")
    _refused(lambda: read(_config("mixtral", router_jitter_noise=0.1)), "router_jitter_noise")
    _refused(lambda: read(_config("qwen3_moe", attention_bias=True)), "attention_bias=true")
    _refused(lambda: read(_config("qwen2_moe", shared_expert_intermediate_size=0)), "shared_exp")
    _refused(lambda: read(_config("qwen2_moe", mlp_only_layers=[0, 1])), "no mixture-of-experts")
    _refused(lambda: read(_config("qwen3_moe", num_experts_per_tok=5)), "moe_topk")

    moe = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_experts=4)
    export = hf.check_exportable
    sigmoid = ModelConfig(**moe, moe_score_function="sigmoid")
    _refused(lambda: export(sigmoid, hf.family_for(sigmoid)), "softmax router scores")
    unnormalised = ModelConfig(**moe, moe_renormalize=False)
    _refused(lambda: export(unnormalised, "mixtral"), "renormalised top-k")
    ungated = ModelConfig(**moe, moe_shared_expert_size=32)
    _refused(lambda: export(ungated, hf.family_for(ungated)), "sigmoid-gated shared expert")
    _refused(lambda: export(ModelConfig(**moe), "llama"), "llama is a dense family")
    _refused(lambda: export(ModelConfig(num_layers=2), "qwen3_moe"), "model is dense")

    _make_hf(tmp_path / "hf", "mixtral")
    config = json.loads((tmp_path / "hf/config.json").read_text())
    (tmp_path / "hf/config.json").write_text(json.dumps({**config, "num_local_experts": 3}))
    out = tmp_path / "out"
    _refused(lambda: hf.import_hf(str(tmp_path / "hf"), str(out)), "config and weights disagree")
    assert not out.exists()
