"""Minitron-style pruning (`distill_llm.prune`) against independent computations: pruning to
the teacher's own shape is the teacher; a pruned Hugging Face Llama (GQA) and Qwen2 (QKV bias,
tied embeddings) equal the HF teacher sliced in plain torch with the kept indices prune.json
records, and export to HF bitwise as that slice; planted structure (zeroed query groups, heads,
FFN neurons and hidden channels, an identity layer) is what goes first, for both depth methods;
pruning at TP=2 keeps the same units and writes the same tensors as at TP=1, the result loads
at TP=2 with TP=1's logits and distils from there; bad targets are refused in one line with
nothing written; a budget picks the largest shape of its family within it."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_worker
from test_hf import save_random_hf

import distill_llm as dl
from distill_llm.data.tokenizer import load_tokenizer, train_bpe_tokenizer
from distill_llm.engine import checkpoint, parallel
from distill_llm.engine.model import build_gpt
from distill_llm.errors import ConfigError
from distill_llm.formats import paths
from distill_llm.prune import shape

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

TRAIN = dict(micro_batch_size=2, global_batch_size=4, seq_length=32)
GQA = dl.ModelConfig(num_layers=3, hidden_size=64, ffn_hidden_size=128, num_attention_heads=8,
                     num_query_groups=4, vocab_size=1000, max_seq_length=64)  # fmt: skip
# drops a layer, hidden channels, FFN neurons, a query group and a head in every kept group
SMALL = dict(num_layers=2, hidden_size=48, ffn_hidden_size=56, num_attention_heads=3,
             num_query_groups=3)  # fmt: skip
# the same at TP=2 (even group and head counts)
SMALL_TP2 = dict(num_layers=2, hidden_size=48, ffn_hidden_size=64, num_attention_heads=4,
                 num_query_groups=2)  # fmt: skip


def _prune(teacher, out, target, **kw) -> dict:
    kw = {"train": dl.TrainConfig(**TRAIN), "calibration_batches": 2, **kw}
    dl.prune(str(teacher), str(out), target, **kw)
    return json.loads((Path(out) / "prune.json").read_text())


def _tokens(vocab: int) -> torch.Tensor:
    # what tests/worker.py's "logits" op feeds the model
    return torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))


def _logits(path) -> torch.Tensor:
    """Our model's logits `[2, 16, vocab]` at TP=1, in this process."""
    cfg = paths.model_config_of(path)
    parallel.initialize(parallel.ParallelConfig(), seed=0)
    model = build_gpt(cfg)
    paths.load_model(path, model, cfg, role="model")
    model.eval()
    with torch.no_grad():
        return model(_tokens(cfg.vocab_size), torch.arange(16).expand(2, 16), None)[
            ..., : cfg.vocab_size
        ]


def _state(path) -> dict:
    cfg = paths.model_config_of(path)
    parallel.initialize(parallel.ParallelConfig(), seed=0)
    model = build_gpt(cfg)
    paths.load_model(path, model, cfg, role="model")
    return {k: v for k, v in model.state_dict().items() if torch.is_tensor(v) and "extra" not in k}


def _save(path, cfg: dl.ModelConfig, edit=None, seed: int = 3) -> str:
    """A teacher checkpoint for `cfg`, random (std 0.1) and changed by `edit(model)`."""
    cfg = dataclasses.replace(cfg, init_method_std=0.1)
    parallel.initialize(parallel.ParallelConfig(), seed=seed)
    model = build_gpt(cfg)
    if edit is not None:
        with torch.no_grad():
            edit(model)
    checkpoint.save_model(path, model, cfg, step=0)
    return str(path)


@pytest.fixture(scope="module")
def gqa(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gqa")
    return _save(tmp / "teacher", GQA)


def test_the_teachers_own_shape_is_the_teacher(gqa, tmp_path):
    record = _prune(gqa, tmp_path / "same", dl.PruneTarget(), depth_method="block_importance")
    diff = (_logits(tmp_path / "same") - _logits(gqa)).abs().max().item()
    assert diff <= 1e-6, diff
    assert paths.model_config_of(tmp_path / "same") == paths.model_config_of(gqa)
    kept = record["kept"]
    assert kept["layers"] == [0, 1, 2] and kept["hidden"] == list(range(64))
    assert kept["query_groups"] == [[0, 1, 2, 3]] * 3 and kept["heads"] == [list(range(8))] * 3
    assert kept["ffn"] == [list(range(128))] * 3
    assert record["layer_scores"] is None and len(record["block_importance"]) == 3


# LayerNorm (with biases), biases on every linear layer, GELU (not gated), learned positions,
# QK norm, tied embeddings, multi-head attention: every other tensor kind a GPT can have
GPT2_LIKE = dl.ModelConfig(num_layers=3, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                           vocab_size=1000, max_seq_length=64, normalization="LayerNorm",
                           activation="gelu", add_bias_linear=True,
                           position_embedding="learned_absolute", qk_layernorm=True,
                           tie_embeddings=True)  # fmt: skip


def test_every_tensor_kind_is_cut_and_the_own_shape_is_the_teacher(tmp_path):
    teacher = _save(tmp_path / "teacher", GPT2_LIKE, seed=4)
    _prune(teacher, tmp_path / "same", {"num_layers": 3}, depth_method="block_importance")
    assert (_logits(tmp_path / "same") - _logits(teacher)).abs().max().item() <= 1e-6
    # a ModelConfig as the target: its shape fields (the head width is the teacher's)
    target = dataclasses.replace(GPT2_LIKE, num_layers=2, hidden_size=32, ffn_hidden_size=48,
                                 num_attention_heads=2, kv_channels=16)  # fmt: skip
    record = _prune(teacher, tmp_path / "small", target)
    student = paths.model_config_of(tmp_path / "small")
    assert student == dataclasses.replace(target, kv_channels=None, init_method_std=0.1)
    assert record["target"] == dict(num_layers=2, hidden_size=32, ffn_hidden_size=48,
                                    num_attention_heads=2, num_query_groups=2)  # fmt: skip
    state, full = _state(tmp_path / "small"), _state(teacher)
    kept = record["kept"]
    hid, ffn = torch.tensor(kept["hidden"]), torch.tensor(kept["ffn"][1])

    def layer(name):  # the teacher layer student layer 1 is cut from
        return full[f"decoder.layers.{kept['layers'][1]}.{name}"]

    for name, want in {
        "embedding.position_embeddings.weight": full["embedding.position_embeddings.weight"],
        "decoder.final_layernorm.bias": full["decoder.final_layernorm.bias"][hid],
        "decoder.layers.1.input_layernorm.bias": layer("input_layernorm.bias")[hid],
        "decoder.layers.1.mlp.linear_fc1.bias": layer("mlp.linear_fc1.bias")[ffn],
        "decoder.layers.1.mlp.linear_fc2.bias": layer("mlp.linear_fc2.bias")[hid],
        "decoder.layers.1.self_attention.k_layernorm.weight":
            layer("self_attention.k_layernorm.weight"),
    }.items():  # fmt: skip
        want = want[:, hid] if name.startswith("embedding.") else want
        assert torch.equal(state[name], want), name
    assert torch.isfinite(_logits(tmp_path / "small")).all()


def test_a_failure_while_writing_leaves_nothing(gqa, tmp_path, monkeypatch):
    real = checkpoint.save_model

    def save_then_fail(*args, **kwargs):
        real(*args, **kwargs)
        raise RuntimeError("disk full")

    monkeypatch.setattr(checkpoint, "save_model", save_then_fail)
    with pytest.raises(RuntimeError, match="disk full"):
        _prune(gqa, tmp_path / "out", SMALL)
    assert list(tmp_path.iterdir()) == []


# -- against Hugging Face, sliced in plain torch --------------------------------------------------
HF = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=8,
          num_key_value_heads=4, max_position_embeddings=64, rms_norm_eps=1e-6)  # fmt: skip
FAMILIES = {
    "llama": dict(model_type="llama", vocab_size=512),
    # QKV bias, tied embeddings, a vocabulary Megatron pads (500 -> 512)
    "qwen2": dict(model_type="qwen2", vocab_size=500, tie_word_embeddings=True),
}


def _hf_teacher(path, family: str) -> None:
    save_random_hf(path, {**HF, **FAMILIES[family]})
    corpus = Path(path) / "corpus.txt"
    corpus.write_text("\n\n".join(f"alpha beta gamma {i}" for i in range(300)))
    train_bpe_tokenizer(str(corpus), str(path), vocab_size=300)


def _hf_sliced(full: dict, kept: dict) -> dict:
    """HF tensors `full` (the teacher's) cut to `kept` (prune.json's), in plain torch."""
    hid = torch.tensor(kept["hidden"])
    d = HF["hidden_size"] // HF["num_attention_heads"]

    def rows(units):
        return torch.tensor([u * d + c for u in units for c in range(d)])

    scales = kept["norm_scales"] or [1.0] * (2 * len(kept["layers"]) + 1)
    out = {"model.embed_tokens.weight": full["model.embed_tokens.weight"][:, hid],
           "model.norm.weight": full["model.norm.weight"][hid] * scales[-1]}  # fmt: skip
    if "lm_head.weight" in full:
        out["lm_head.weight"] = full["lm_head.weight"][:, hid]
    for j, i in enumerate(kept["layers"]):
        t, s = f"model.layers.{i}.", f"model.layers.{j}."
        q, kv = rows(kept["heads"][j]), rows(kept["query_groups"][j])
        ffn = torch.tensor(kept["ffn"][j])
        for k, norm in enumerate(("input_layernorm", "post_attention_layernorm")):
            out[f"{s}{norm}.weight"] = full[f"{t}{norm}.weight"][hid] * scales[2 * j + k]
        for proj, units in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            out[f"{s}self_attn.{proj}.weight"] = full[f"{t}self_attn.{proj}.weight"][units][:, hid]
            if f"{t}self_attn.{proj}.bias" in full:
                out[f"{s}self_attn.{proj}.bias"] = full[f"{t}self_attn.{proj}.bias"][units]
        out[f"{s}self_attn.o_proj.weight"] = full[f"{t}self_attn.o_proj.weight"][hid][:, q]
        for proj in ("gate_proj", "up_proj"):
            out[f"{s}mlp.{proj}.weight"] = full[f"{t}mlp.{proj}.weight"][ffn][:, hid]
        out[f"{s}mlp.down_proj.weight"] = full[f"{t}mlp.down_proj.weight"][hid][:, ffn]
    return out


def _hf_small_logits(family: str, sliced: dict) -> torch.Tensor:
    """transformers' logits of a `SMALL`-shaped HF model of `family` with tensors `sliced`."""
    settings = {**HF, **FAMILIES[family], "num_hidden_layers": 2, "hidden_size": 48,
                "intermediate_size": 56, "num_attention_heads": 3, "num_key_value_heads": 3,
                "head_dim": 8}  # fmt: skip
    cfg = transformers.AutoConfig.for_model(settings.pop("model_type"), **settings)
    reference = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    missing, unexpected = reference.load_state_dict(sliced, strict=False)
    assert unexpected == [] and set(missing) <= {"lm_head.weight"}
    reference.tie_weights()
    with torch.no_grad():
        return reference(_tokens(cfg.vocab_size)).logits


def _hf_rotated(full: dict, q: torch.Tensor) -> dict:
    """A Llama's HF tensors with every RMSNorm weight folded into the projections that read
    its output and the residual stream rotated by `q` (x -> q^T x), in float64 then float32:
    the SliceGPT change of basis, written out independently of prune.rotation."""
    full, q = {k: v.double() for k, v in full.items()}, q.double()
    out = dict(full)
    layers = {int(k.split(".")[2]) for k in full if k.startswith("model.layers.")}
    for i in layers:
        t = f"model.layers.{i}."
        for norm, readers in (
            ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        ):
            g = full[f"{t}{norm}.weight"]
            for r in readers:
                out[f"{t}{r}.weight"] = full[f"{t}{r}.weight"] * g @ q
            out[f"{t}{norm}.weight"] = torch.ones_like(g)
        for w in ("self_attn.o_proj", "mlp.down_proj"):
            out[f"{t}{w}.weight"] = q.T @ full[f"{t}{w}.weight"]
    out["lm_head.weight"] = full["lm_head.weight"] * full["model.norm.weight"] @ q
    out["model.norm.weight"] = torch.ones_like(full["model.norm.weight"])
    out["model.embed_tokens.weight"] = full["model.embed_tokens.weight"] @ q
    return {k: v.float() for k, v in out.items()}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_pruned_model_is_the_hf_teacher_sliced_in_plain_torch(family, tmp_path):
    _hf_teacher(tmp_path / "hf", family)
    record = _prune(tmp_path / "hf", tmp_path / "pruned", SMALL)
    kept = record["kept"]
    assert len(kept["layers"]) == 2 and all(len(h) == 3 for h in kept["heads"])
    # hidden 64 -> 48: each kept RMSNorm (2 per layer, the final) has its factor, applied above
    assert len(kept["norm_scales"]) == 5 and any(abs(f - 1) > 1e-3 for f in kept["norm_scales"])
    # every kept group keeps one of its two heads: the heads are not just the first ones
    assert all(h // 2 == g for hs, gs in zip(kept["heads"], kept["query_groups"])
               for h, g in zip(hs, gs))  # fmt: skip
    sliced = _hf_sliced(load_file(tmp_path / "hf/model.safetensors"), kept)
    diff = (_logits(tmp_path / "pruned") - _hf_small_logits(family, sliced)).abs().max().item()
    print(f"{family}: max |logit difference| pruned vs HF sliced {diff:.2e}")
    assert diff <= 1e-5, diff
    # the pruned checkpoint exports to HF as exactly that slice, with the teacher's tokenizer
    # family and dtype carried over
    dl.export_hf(str(tmp_path / "pruned"), str(tmp_path / "export"))
    exported = load_file(tmp_path / "export/model.safetensors")
    assert sorted(exported) == sorted(sliced)
    for name, t in sliced.items():
        assert torch.equal(exported[name], t), name
    config = json.loads((tmp_path / "export/config.json").read_text())
    assert config["model_type"] == family and config["head_dim"] == 8
    assert (tmp_path / "export/tokenizer.json").is_file()
    assert paths.tokenizer_dir_of(str(tmp_path / "pruned")) == str((tmp_path / "hf").resolve())


def test_pca_pruned_model_is_the_rotated_hf_teacher_sliced_in_plain_torch(tmp_path):
    _hf_teacher(tmp_path / "hf", "llama")
    record = _prune(tmp_path / "hf", tmp_path / "pruned", SMALL, hidden_method="pca")
    kept = record["kept"]
    assert record["hidden_method"] == "pca" and kept["hidden"] == list(range(48))
    assert 0.75 < record["rotation_energy"] < 1
    q = torch.load(tmp_path / "pruned" / record["rotation"], weights_only=True)
    assert torch.allclose(q.double() @ q.double().T, torch.eye(64, dtype=torch.float64), atol=1e-6)
    full = load_file(tmp_path / "hf/model.safetensors")
    sliced = _hf_sliced(_hf_rotated(full, q), kept)
    diff = (_logits(tmp_path / "pruned") - _hf_small_logits("llama", sliced)).abs().max().item()
    print(f"pca: max |logit difference| pruned vs HF rotated and sliced {diff:.2e}")
    assert diff <= 1e-5, diff
    # the rotation alone changes nothing: the rotated teacher's logits are the teacher's
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = _tokens(hf.config.vocab_size)
    with torch.no_grad():
        before = hf(tokens).logits
        hf.load_state_dict(_hf_rotated(full, q))
        after = hf(tokens).logits
    assert (after - before).abs().max().item() <= 1e-5


def test_a_nemo_teacher_prunes_and_its_tokenizer_travels(tmp_path):
    nemo = ROOT / "tests/fixtures/nemo/nemo2_llama"
    _prune(nemo, tmp_path / "out", dict(num_layers=1, ffn_hidden_size=32))
    found, expected = paths.tokenizer_dir_of(str(tmp_path / "out")), paths.tokenizer_dir_of(nemo)
    assert (
        found is not None
        and load_tokenizer(found).vocab_size == load_tokenizer(expected).vocab_size
    )
    dl.export_hf(str(tmp_path / "out"), str(tmp_path / "export"))
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "export") is not None


# -- planted structure -----------------------------------------------------------------------------
PLANTED = dataclasses.replace(GQA, num_layers=4)
DEAD_GROUP = {0: 1, 1: 3, 2: 0, 3: 2}  # layer -> the query group whose value head is zero
DEAD_NEURONS = {i: [5 + 7 * i, 40 + i, 100 - i] for i in range(4)}
DEAD_CHANNELS = [3, 17, 50]  # zero in every layer norm's weight
IDENTITY = 2  # output projections zero: the residual passes through


def _plant(model, cfg, groups, neurons=None, channels=()) -> None:
    """Zero the value head of query group `groups[i]` in layer i (its heads then output 0), the
    FFN neurons `neurons[i]` (their gate and up rows) and the hidden `channels` of every norm,
    and make layer IDENTITY pass its input through (its output projections zero)."""
    d = cfg.head_dim
    per_group = cfg.num_attention_heads // cfg.query_groups
    for i, layer in enumerate(model.decoder.layers):
        value = (groups[i] * (per_group + 2) + per_group + 1) * d  # megatron's [q.., k, v]
        layer.self_attention.linear_qkv.weight[value : value + d] = 0
        fc1 = layer.mlp.linear_fc1.weight
        for n in (neurons or {}).get(i, []):
            fc1[n] = fc1[n + cfg.ffn_hidden_size] = 0
        for norm in (layer.input_layernorm, layer.pre_mlp_layernorm):
            norm.weight[list(channels)] = 0
    model.decoder.layers[IDENTITY].self_attention.linear_proj.weight.zero_()
    model.decoder.layers[IDENTITY].mlp.linear_fc2.weight.zero_()


def test_planted_groups_neurons_channels_and_identity_layer_go_first(tmp_path):
    def plant(model):
        _plant(model, PLANTED, DEAD_GROUP, DEAD_NEURONS, DEAD_CHANNELS)

    teacher = _save(tmp_path / "teacher", PLANTED, plant)
    target = dict(num_layers=3, hidden_size=61, ffn_hidden_size=125, num_query_groups=3)
    record = _prune(teacher, tmp_path / "out", target, depth_method="block_importance")
    kept = record["kept"]
    assert kept["layers"] == [0, 1, 3]
    assert kept["hidden"] == [c for c in range(64) if c not in DEAD_CHANNELS]
    for j, i in enumerate(kept["layers"]):
        assert kept["query_groups"][j] == [g for g in range(4) if g != DEAD_GROUP[i]]
        assert kept["heads"][j] == [h for g in kept["query_groups"][j] for h in (2 * g, 2 * g + 1)]
        assert kept["ffn"][j] == [n for n in range(128) if n not in DEAD_NEURONS[i]]
    scores = record["layer_scores"]
    assert scores[IDENTITY] < 1e-6 < min(s for i, s in enumerate(scores) if i != IDENTITY)


# RMSNorm with every other tensor that writes the stream: learned positions, biases on the
# output projections; and QK norm, GELU, multi-head attention
RMS_BIASED = dataclasses.replace(GPT2_LIKE, normalization="RMSNorm", tie_embeddings=False)


@pytest.mark.parametrize("base", [GQA, RMS_BIASED], ids=["gqa", "biases_positions"])
def test_a_stream_in_a_planted_subspace_is_cut_to_it_by_pca_unchanged(base, tmp_path):
    # every tensor that writes the residual stream writes into one random 40-dimensional
    # subspace, so the stream never leaves it: rotated onto its principal axes, the last 24
    # channels are zero and cutting them loses nothing (the norms' factors, sqrt(64 / 40) each,
    # restore the root mean square over 40 channels to that over 64; epsilon ~0 so that holds
    # to rounding). Minitron's channel scores cannot find a subspace that is not channels.
    cfg = dataclasses.replace(base, norm_epsilon=1e-12)
    basis, _ = torch.linalg.qr(torch.randn(64, 40, generator=torch.Generator().manual_seed(5)))
    inside = basis @ basis.T

    def plant(model):
        embeddings = [model.embedding.word_embeddings.weight]
        if cfg.position_embedding == "learned_absolute":
            embeddings.append(model.embedding.position_embeddings.weight)
        for e in embeddings:
            e.copy_(e @ inside)
        for layer in model.decoder.layers:
            for linear in (layer.self_attention.linear_proj, layer.mlp.linear_fc2):
                linear.weight.copy_(inside @ linear.weight)
                if cfg.add_bias_linear:
                    linear.bias.copy_(
                        inside @ torch.randn(64, generator=torch.Generator().manual_seed(6))
                    )

    teacher = _save(tmp_path / "teacher", cfg, plant)
    pca = _prune(teacher, tmp_path / "pca", dict(hidden_size=40), hidden_method="pca")
    assert pca["rotation_energy"] == pytest.approx(1, abs=1e-9)
    scales = [(64 / 40) ** 0.5] * (2 * cfg.num_layers + 1)
    assert pca["kept"]["norm_scales"] == pytest.approx(scales, rel=1e-6)
    expected = _logits(teacher)
    diff = (_logits(tmp_path / "pca") - expected).abs().max().item()
    _prune(teacher, tmp_path / "channels", dict(hidden_size=40))
    off = (_logits(tmp_path / "channels") - expected).abs().max().item()
    print(f"max |logit difference| to the teacher: pca {diff:.2e}, activation {off:.2e}")
    # float32 weights rounded after a float64 rotation (~6e-8 relative each) through three
    # layers: a few 1e-6 here (3e-6 measured)
    assert diff <= 2e-5, diff
    assert off > 0.1, off


@pytest.fixture(scope="module")
def trained_mha(tmp_path_factory):
    """A multi-head (one head per group) teacher trained on the mock data (to an LM loss near
    0.1: every layer matters), then planted: head 2 zero in every layer (its value rows), layer
    IDENTITY passing its input through."""
    tmp = tmp_path_factory.mktemp("mha")
    cfg = dl.ModelConfig(num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                         vocab_size=128, max_seq_length=64)  # fmt: skip
    dl.pretrain(
        model=cfg,
        train=dl.TrainConfig(steps=60, val_every=0, val_batches=1, log_every=60, **TRAIN),
        optim=dl.OptimConfig(lr=5e-3, min_lr=5e-4, warmup_steps=5),
        output_dir=str(tmp / "run"),
    )
    parallel.initialize(parallel.ParallelConfig(), seed=0)
    model = build_gpt(cfg)
    paths.load_model(str(tmp / "run/final"), model, cfg, role="model")
    with torch.no_grad():
        _plant(model, cfg, groups={i: 2 for i in range(4)})
    checkpoint.save_model(tmp / "teacher", model, cfg, step=0)
    return str(tmp / "teacher")


@pytest.mark.parametrize("depth_method", ["lm_loss", "block_importance", "iterative_lm_loss"])
def test_planted_heads_and_identity_layer_go_first(trained_mha, depth_method, tmp_path):
    record = _prune(trained_mha, tmp_path / "out", dict(num_layers=3, num_attention_heads=3),
                    depth_method=depth_method)  # fmt: skip
    kept = record["kept"]
    assert kept["layers"] == [i for i in range(4) if i != IDENTITY]
    assert kept["heads"] == kept["query_groups"] == [[0, 1, 3]] * 3
    scores = record["layer_scores"]
    others = [s for i, s in enumerate(scores) if i != IDENTITY]
    base = record["calibration"]["teacher_loss"]
    if depth_method == "lm_loss":  # without the identity layer the loss is the teacher's own
        assert scores[IDENTITY] == pytest.approx(base, abs=1e-5) and min(others) > base + 1e-3
    elif depth_method == "iterative_lm_loss":  # removed in the first (only) round
        assert scores[IDENTITY] == 0 and others == [1, 1, 1]
        [removal] = record["removals"]
        assert removal["layer"] == IDENTITY and removal["lm_loss"] == pytest.approx(base, abs=1e-5)
    else:
        assert scores[IDENTITY] < 1e-6 < min(others)
    assert paths.model_config_of(tmp_path / "out").num_query_groups is None  # still MHA


def test_greedy_removal_finds_the_pair_that_single_rankings_miss():
    """The quickstart teacher's case (seed 1234, losses rounded): alone, layers 3 and 2 cost
    least, so one-shot ranking keeps [0, 1]; with 3 gone, removing 1 costs less than removing
    2, so greedy removal keeps [0, 2], the pair with the lowest loss."""
    from distill_llm.prune.importance import greedy_removal
    from distill_llm.prune.plan import top

    table = {
        (0,): 7.9, (1,): 4.02, (2,): 3.97, (3,): 3.95,
        (0, 1): 8.2, (0, 2): 7.4, (0, 3): 7.0, (1, 2): 4.297, (1, 3): 4.230, (2, 3): 4.304,
    }  # fmt: skip
    calls = []

    def loss_without(layers):
        calls.append(sorted(layers))
        return table[tuple(sorted(layers))]

    assert greedy_removal(loss_without, 4, 2) == [(3, 3.95), (1, 4.230)]
    assert calls == [[0], [1], [2], [3], [0, 3], [1, 3], [2, 3]]  # 4 + 3 passes
    singles = torch.tensor([table[(i,)] for i in range(4)])
    assert top(singles, 2) == [0, 1]
    # ties go to the lower index, as in plan.top
    assert greedy_removal(lambda layers: 1.0, 3, 2) == [(0, 1.0), (1, 1.0)]


def test_data_parallel_removes_the_same_layers_in_the_same_order(trained_mha, tmp_path):
    """Two data-parallel ranks share the calibration batches and sum their losses: every round
    of greedy removal decides as one process does, and the result is the one-process result."""
    target = dict(num_layers=2)
    record = _prune(trained_mha, tmp_path / "dp1", target, depth_method="iterative_lm_loss")
    run_worker(
        tmp_path,
        [dict(op="prune", teacher=trained_mha, output_dir=str(tmp_path / "dp2"), target=target,
              train=TRAIN, calibration_batches=2, depth_method="iterative_lm_loss")],
        nproc=2,
    )  # fmt: skip
    at_dp2 = json.loads((tmp_path / "dp2/prune.json").read_text())
    assert [r["layer"] for r in record["removals"]][0] == IDENTITY
    assert at_dp2["kept"] == record["kept"] and at_dp2["layer_scores"] == record["layer_scores"]
    for one, two in zip(record["removals"], at_dp2["removals"], strict=True):
        # float32 loss sums added in another order: relative rounding ~1e-7 per addition
        assert two["layer"] == one["layer"]
        assert two["lm_loss"] == pytest.approx(one["lm_loss"], rel=1e-5)


# -- tensor parallel -------------------------------------------------------------------------------
def test_tp2_keeps_the_same_units_loads_at_tp2_and_distils(gqa, tmp_path):
    tp1 = tmp_path / "tp1"
    record = _prune(gqa, tp1, SMALL_TP2, depth_method="iterative_lm_loss")
    worker_train = dict(TRAIN, steps=2, val_every=0, val_batches=1, log_every=1)
    run_worker(
        tmp_path,
        [
            dict(op="prune", teacher=gqa, output_dir=str(tmp_path / "tp2"), target=SMALL_TP2,
                 train=TRAIN, calibration_batches=2, parallel=dict(tensor_parallel=2),
                 depth_method="iterative_lm_loss"),
            dict(op="logits", checkpoint=str(tp1), tensor_parallel=2,
                 out=str(tmp_path / "tp1_at_tp2.pt")),
            dict(op="distill", teacher=gqa, student_checkpoint=str(tmp_path / "tp2"),
                 output_dir=str(tmp_path / "run"), train=worker_train,
                 parallel=dict(tensor_parallel=2)),
            dict(op="prune", teacher=gqa, output_dir=str(tmp_path / "tp2_pca"), target=SMALL_TP2,
                 train=TRAIN, calibration_batches=2, parallel=dict(tensor_parallel=2),
                 depth_method="iterative_lm_loss", hidden_method="pca"),
        ],
        nproc=2,
    )  # fmt: skip
    at_tp2 = json.loads((tmp_path / "tp2/prune.json").read_text())
    # the same units; the RMSNorm factors come from float32 sums of squares that TP=2 adds in
    # another order (relative rounding ~1e-7, halved by the square root)
    scales, scales_tp2 = record["kept"].pop("norm_scales"), at_tp2["kept"].pop("norm_scales")
    assert at_tp2["kept"] == record["kept"]
    assert scales_tp2 == pytest.approx(scales, rel=1e-6)
    assert at_tp2["layer_scores"] == record["layer_scores"]  # removal rounds
    [removal], [removal_tp2] = record["removals"], at_tp2["removals"]
    assert removal_tp2["layer"] == removal["layer"]
    assert removal_tp2["lm_loss"] == pytest.approx(removal["lm_loss"], rel=1e-5)
    one, two = _state(tp1), _state(tmp_path / "tp2")
    assert sorted(one) == sorted(two)
    for name, t in one.items():
        if "layernorm" in name:  # times those factors
            torch.testing.assert_close(two[name], t, rtol=1e-6, atol=0)
        else:
            assert torch.equal(t, two[name]), name
    diff = (torch.load(tmp_path / "tp1_at_tp2.pt") - _logits(tp1)).abs().max().item()
    assert diff <= 1e-5, diff
    assert (tmp_path / "run/final/distill_llm.json").is_file()
    # pca at TP=2: the same units and rotation (from sums TP=2 rounds otherwise), so the same
    # model up to that rounding
    pca = _prune(gqa, tmp_path / "tp1_pca", SMALL_TP2, depth_method="iterative_lm_loss",
                 hidden_method="pca")  # fmt: skip
    pca_tp2 = json.loads((tmp_path / "tp2_pca/prune.json").read_text())
    pca["kept"].pop("norm_scales"), pca_tp2["kept"].pop("norm_scales")
    assert pca_tp2["kept"] == pca["kept"] and pca_tp2["rotation"] == "rotation.pt"
    rotations = [torch.load(tmp_path / d / "rotation.pt") for d in ("tp1_pca", "tp2_pca")]
    torch.testing.assert_close(rotations[1], rotations[0], rtol=0, atol=1e-5)
    diff = (_logits(tmp_path / "tp2_pca") - _logits(tmp_path / "tp1_pca")).abs().max().item()
    assert diff <= 1e-5, diff


# -- refusals and the budget search ----------------------------------------------------------------
def _fake_checkpoint(path, cfg: dl.ModelConfig) -> str:
    """A directory with only the metadata the checks read."""
    path.mkdir()
    (path / checkpoint.META_FILE).write_text(json.dumps({"model": cfg.to_dict()}))
    return str(path)


@pytest.mark.parametrize(
    "target, extra, message",
    [
        (dict(hidden_size=128), {}, "target hidden_size 128 is larger than the teacher's 64"),
        (dict(num_layers=0), {}, "target num_layers must be a whole number >= 1, got 0"),
        (dict(num_attention_heads=6), {}, "target num_attention_heads 6 is not a multiple of"),
        (dict(num_attention_heads=8, num_query_groups=2), {}, "target has 4 heads per query"),
        (dict(num_query_groups=3), {"tp": 2}, "pruned model: num_query_groups 3 is not divisible"),
        (dict(ffn_hidden_size=63), {"tp": 2}, "pruned model: ffn_hidden_size 63 is not divisible"),
        (dict(hidden=3), {}, "target fields ['hidden'] are not shape fields"),
        ("1K", {}, "budget 1,000 parameters is below the smallest shape"),
        ("4B", {}, "budget 4,000,000,000 parameters is larger than the teacher's"),
        ("lots", {}, "target 'lots' is neither a shape nor a parameter budget"),
        ({}, {"depth_method": "random"}, "depth_method 'random' is unknown"),
        ({}, {"hidden_method": "svd"}, "hidden_method 'svd' is unknown"),
        ({}, {"hidden_method": "pca", "tied": True}, "hidden_method='pca' needs an untied"),
        ({}, {"hidden_method": "pca", "layernorm": True}, "hidden_method='pca' needs an RMSNorm"),
        ({}, {"rescale_norms": "yes"}, "rescale_norms must be True or False, got 'yes'"),
        ({}, {"pp": 2}, "prune runs with pipeline_parallel=1"),
        ({}, {"moe": True}, "pruning a mixture-of-experts teacher is not supported"),
        ({}, {"exists": True}, "exists; choose a new directory"),
    ],
)  # fmt: skip
def test_bad_targets_are_refused_in_one_line_with_nothing_written(
    gqa, tmp_path, monkeypatch, target, extra, message
):
    teacher, out = gqa, tmp_path / "out"
    kw = {"depth_method": extra.get("depth_method", "lm_loss"), "train": dl.TrainConfig(**TRAIN),
          "hidden_method": extra.get("hidden_method", "activation")}  # fmt: skip
    if "tp" in extra or "pp" in extra:
        monkeypatch.setenv("WORLD_SIZE", "2")
        kw["parallel"] = dl.ParallelConfig(tensor_parallel=extra.get("tp", 1),
                                           pipeline_parallel=extra.get("pp", 1))  # fmt: skip
    if "rescale_norms" in extra:
        kw["rescale_norms"] = extra["rescale_norms"]
    if extra.get("moe"):
        teacher = _fake_checkpoint(tmp_path / "moe", dataclasses.replace(GQA, num_experts=4))
    if extra.get("tied"):
        teacher = _fake_checkpoint(tmp_path / "moe", dataclasses.replace(GQA, tie_embeddings=True))
    if extra.get("layernorm"):
        layernorm = dataclasses.replace(GQA, normalization="LayerNorm")
        teacher = _fake_checkpoint(tmp_path / "moe", layernorm)
    if extra.get("exists"):
        out.mkdir()
    with pytest.raises(ConfigError) as err:
        dl.prune(teacher, str(out), target, **kw)
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        (["out"] if extra.get("exists") else [])
        + (["moe"] if {"moe", "tied", "layernorm"} & set(extra) else [])
    )


def test_norm_scales_are_the_ratio_of_root_mean_squares_kept_to_all():
    from distill_llm.prune.plan import norm_scales

    # 2 teacher layers (4 norms) and the final norm, 4 channels; channels 1 and 3 kept
    m = torch.tensor([[1.0, 4.0, 1.0, 4.0], [9.0, 9.0, 9.0, 9.0], [0.0, 2.0, 2.0, 4.0],
                      [1.0, 1.0, 1.0, 1.0], [2.0, 8.0, 2.0, 8.0]])  # fmt: skip
    # layer 1 kept alone: its two norms (rows 2, 3), then the final (row 4)
    got = norm_scales(m, [1, 3], [1])
    expected = [(3.0 / 2.0) ** 0.5, 1.0, (8.0 / 5.0) ** 0.5]
    assert got == pytest.approx(expected, rel=1e-12)


def test_a_budget_picks_the_largest_shape_of_its_family_within_it():
    for budget in (60_000, 100_000, 200_000):
        cfg = shape.resolve(GQA, budget)
        assert cfg.num_parameters() <= budget and cfg.num_layers == GQA.num_layers
        for hidden in range(cfg.hidden_size + 8, 65, 8):  # every larger member of the family
            groups = max(1, hidden * 4 // 64)
            bigger = shape.pruned_config(GQA, dict(
                hidden_size=hidden, ffn_hidden_size=hidden * 128 // (64 * 8) * 8,
                num_query_groups=groups, num_attention_heads=2 * groups,
            ))  # fmt: skip
            # too big, or a shape transformers' Llama cannot hold
            assert bigger.num_parameters() > budget or hidden % (2 * groups), hidden
        # the family: heads per group kept, every width at one fraction of the teacher's
        assert cfg.num_attention_heads == 2 * cfg.query_groups and cfg.head_dim == 8
    assert shape.parse_budget("1.5B") == 1_500_000_000 and shape.parse_budget("2_000k") == 2 * 10**6
    # Minitron's Llama-3.1-Minitron-4B-Width: the 8B's 32 layers, hidden 3072, FFN 9216, all
    # 32 heads in 8 groups: 4.5B parameters (its model card)
    llama = dl.ModelConfig(num_layers=32, hidden_size=4096, ffn_hidden_size=14336,
                           num_attention_heads=32, num_query_groups=8, vocab_size=128256,
                           max_seq_length=8192, rotary_base=500000, rope_scaling=True)  # fmt: skip
    width = shape.resolve(llama, dl.PruneTarget(hidden_size=3072, ffn_hidden_size=9216), 8)
    assert width.num_parameters() / 1e9 == pytest.approx(4.51, abs=0.01)
    assert width.head_dim == 128 and width.kv_channels == 128


def test_a_llama_export_needs_heads_dividing_the_hidden_size():
    """Pruning can reach hidden 40 with three 8-wide heads; transformers' Llama refuses that
    shape (head_dim given or not), so export_hf refuses it up front, and the budget search never
    picks it."""
    from distill_llm.formats.hf.config import check_exportable

    odd = shape.pruned_config(GQA, dict(hidden_size=40, num_attention_heads=3, num_query_groups=3))
    with pytest.raises(Exception, match="not a multiple of the number of attention heads"):
        transformers.LlamaConfig(
            hidden_size=40, num_attention_heads=3, num_key_value_heads=3, head_dim=8
        )
    with pytest.raises(ConfigError, match="a Llama export needs hidden_size divisible by"):
        check_exportable(odd, "llama")
    check_exportable(odd, "mistral")  # transformers' Mistral holds it
    transformers.MistralConfig(
        hidden_size=40, num_attention_heads=3, num_key_value_heads=3, head_dim=8
    )
