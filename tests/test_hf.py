"""Hugging Face checkpoints in and out, against transformers' own models (built from configs,
random weights, nothing downloaded): logits equal after import at TP=1 and TP=2, exports load
in transformers with equal logits, import -> export is bitwise, distill runs on HF directories
and ends with an HF export, and bad inputs get one line and leave nothing behind."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_worker

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

from distill_llm.data.tokenizer import train_bpe_tokenizer  # noqa: E402
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
    vocab_size=512,
)
FAMILIES = {
    # Llama 3.x: llama3 RoPE scaling, untied
    "llama": dict(
        model_type="llama",
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
    ),
    # Qwen2.5 small: QKV bias, tied embeddings, a vocabulary Megatron pads (500 -> 512)
    "qwen2": dict(
        model_type="qwen2", rope_theta=1000000.0, tie_word_embeddings=True, vocab_size=500
    ),
    "mistral": dict(model_type="mistral", rope_theta=1000000.0, sliding_window=None),
    # Qwen3: QK norm, head_dim 32 != hidden / heads
    "qwen3": dict(model_type="qwen3", rope_theta=1000000.0, head_dim=32),
}


def _tokens(vocab: int) -> torch.Tensor:
    # what tests/worker.py's "logits" op feeds our model
    return torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))


def _hf_logits(path) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    with torch.no_grad():
        return model(_tokens(vocab)).logits  # [batch, seq, vocab], as GPTModel returns them


def _make_hf(path, family: str) -> None:
    save_random_hf(path, {**BASE, **FAMILIES[family]})


def save_random_hf(path, settings: dict) -> None:
    """A randomly initialised transformers model of `settings` (with its `model_type`), saved
    to `path`, its weights perturbed so that norms and biases differ from their defaults."""
    settings = dict(settings)
    cfg = transformers.AutoConfig.for_model(settings.pop("model_type"), **settings)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # norms away from 1 and biases away from 0, so a mix-up shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(path)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Each family: made by transformers, imported at TP=1 (one process) and TP=2 (torchrun),
    logits of both imports, and an export of the TP=1 import."""
    tmp = tmp_path_factory.mktemp("hf")
    for family in FAMILIES:
        _make_hf(tmp / family / "hf", family)
    ops1, ops2 = [], []
    for family in FAMILIES:
        d = tmp / family
        ops1 += [
            dict(op="import_hf", hf_path=str(d / "hf"), output_dir=str(d / "tp1")),
            dict(op="logits", checkpoint=str(d / "tp1"), out=str(d / "tp1.pt")),
            dict(op="export_hf", checkpoint=str(d / "tp1"), output_dir=str(d / "export")),
        ]
        ops2 += [
            dict(op="import_hf", hf_path=str(d / "hf"), output_dir=str(d / "tp2"),
                 tensor_parallel=2),
            dict(op="logits", checkpoint=str(d / "tp2"), out=str(d / "tp2.pt"),
                 tensor_parallel=2),
        ]  # fmt: skip
    run_worker(tmp, ops1)
    run_worker(tmp, ops2, nproc=2)
    return tmp


@pytest.mark.parametrize("family", list(FAMILIES))
def test_import_logits_equal_transformers_tp1_and_tp2(converted, family):
    d = converted / family
    expected = _hf_logits(d / "hf")
    for layout in ("tp1", "tp2"):
        ours = torch.load(d / f"{layout}.pt")
        assert ours.shape == expected.shape
        diff = (ours - expected).abs().max().item()
        print(f"{family} {layout}: max |logit difference| vs transformers {diff:.2e}")
        assert diff <= 1e-4, f"{family} {layout}: max |logit difference| {diff}"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_export_loads_in_transformers_and_round_trips_bitwise(converted, family):
    d = converted / family
    assert torch.equal(_hf_logits(d / "export"), _hf_logits(d / "hf"))
    original, exported = (
        load_file(d / "hf/model.safetensors"),
        load_file(d / "export/model.safetensors"),
    )
    assert sorted(original) == sorted(exported)
    for name, t in original.items():
        assert t.dtype == exported[name].dtype and torch.equal(t, exported[name]), name
    config = json.loads((d / "export/config.json").read_text())
    assert config["model_type"] == family and config["architectures"] == [hf.CLASS_OF[family]]
    assert (d / "export/generation_config.json").is_file()


def test_sharded_export_reads_back(converted, tmp_path):
    """Past max_shard_bytes the export writes numbered shards and an index that transformers
    and our importer's checks both read."""
    d = converted / "llama"
    tensors = load_file(d / "export/model.safetensors")
    config = json.loads((d / "export/config.json").read_text())
    out = hf.write_hf_dir(tensors, config, tmp_path / "sharded", max_shard_bytes=100_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and all((out / f).is_file() for f in files)
    assert sorted(index["weight_map"]) == sorted(tensors)
    assert hf.checked_config(out) == hf.checked_config(d / "hf")
    assert torch.equal(_hf_logits(out), _hf_logits(d / "hf"))


def test_distill_from_hf_directories_ends_with_hf_export(tmp_path):
    """Teacher and student given as HF directories (converted on the fly, TP=2), the trained
    student exported to HF at the end and loaded by transformers."""
    _make_hf(tmp_path / "teacher", "llama")
    settings = {**BASE, **FAMILIES["llama"], "num_hidden_layers": 1}
    small = transformers.AutoConfig.for_model(settings.pop("model_type"), **settings)
    transformers.AutoModelForCausalLM.from_config(small).save_pretrained(tmp_path / "student")
    run_worker(
        tmp_path,
        [
            dict(
                op="distill",
                teacher=str(tmp_path / "teacher"),
                student_checkpoint=str(tmp_path / "student"),
                output_dir=str(tmp_path / "run"),
                export_hf=str(tmp_path / "student_hf"),
                parallel=dict(tensor_parallel=2),
                train=dict(steps=3, micro_batch_size=2, global_batch_size=2, seq_length=32,
                           val_every=0, val_batches=1, log_every=1),
            )
        ],
        nproc=2,
    )  # fmt: skip
    out = tmp_path / "student_hf"
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.config.num_hidden_layers == 1 and model.config.model_type == "llama"
    before = load_file(tmp_path / "student/model.safetensors")
    after = load_file(out / "model.safetensors")
    assert sorted(before) == sorted(after)
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it was trained
    with torch.no_grad():
        assert torch.isfinite(model(_tokens(512)).logits).all()


@pytest.fixture
def llama_dir(tmp_path):
    _make_hf(tmp_path / "hf", "llama")
    return tmp_path / "hf"


def _refused(hf_path, out, match):
    with pytest.raises(ConfigError, match=match) as err:
        hf.import_hf(str(hf_path), str(out))
    assert "\n" not in str(err.value)
    assert not out.exists() and not out.with_name(out.name + ".tmp").exists()


def test_bad_hf_inputs_are_refused_in_one_line(llama_dir, tmp_path):
    out = tmp_path / "out"
    config = json.loads((llama_dir / "config.json").read_text())

    (llama_dir / "config.json").write_text(
        json.dumps({**config, "architectures": ["GPT2LMHeadModel"]})
    )
    _refused(llama_dir, out, "'GPT2LMHeadModel' is not supported; supported: LlamaForCausalLM")

    (llama_dir / "config.json").write_text(json.dumps({**config, "dtype": "float8_e4m3"}))
    _refused(llama_dir, out, "dtype 'float8_e4m3' is unknown")

    (llama_dir / "config.json").write_text(json.dumps({**config, "intermediate_size": 100}))
    _refused(llama_dir, out, r"mlp.gate_proj.weight' has shape \(96, 64\), config.json implies")

    (llama_dir / "config.json").write_text(json.dumps(config))
    weights = load_file(llama_dir / "model.safetensors")
    names = sorted(weights)
    save_file(
        {n: weights[n] for n in names[:5]}, str(llama_dir / "model-00001-of-00002.safetensors")
    )
    (llama_dir / "model.safetensors").unlink()
    index = {"weight_map": {n: f"model-0000{1 + (i >= 5)}-of-00002.safetensors"
                            for i, n in enumerate(names)}}  # fmt: skip
    (llama_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    _refused(llama_dir, out, "model-00002-of-00002.safetensors named in .* missing")

    _refused(tmp_path / "nowhere", out, "does not exist")


def test_cli_import_and_export(llama_dir, tmp_path):
    """`nemo distill_llm import_hf / export_hf` for real, and the module CLI's one-line error."""
    env = dict(os.environ, NEMORUN_HOME=str(tmp_path / "home"), PYTHONWARNINGS="ignore",
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")  # fmt: skip
    nemo = [str(Path(sys.executable).parent / "nemo"), "distill_llm"]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"document {i} about tokens" for i in range(200)))
    tok = train_bpe_tokenizer(str(corpus), str(tmp_path / "tok"), vocab_size=300)
    for args in (
        ["import_hf", f"hf_path={llama_dir}", f"output_dir={tmp_path / 'ckpt'}", "--yes"],
        ["export_hf", f"checkpoint={tmp_path / 'ckpt'}", f"output_dir={tmp_path / 'out'}",
         f"tokenizer={tmp_path / 'tok'}", "--yes"],
    ):  # fmt: skip
        proc = subprocess.run([*nemo, *args], capture_output=True, text=True, cwd=tmp_path, env=env)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert torch.equal(_hf_logits(tmp_path / "out"), _hf_logits(llama_dir))
    # the tokenizer travels with the model, its end-of-document id in the generation config
    assert (tmp_path / "out/tokenizer.json").is_file()
    generation = json.loads((tmp_path / "out/generation_config.json").read_text())
    assert generation["eos_token_id"] == tok.eod

    proc = subprocess.run(
        [sys.executable, "-m", "distill_llm.hf", "import", str(tmp_path / "none"),
         str(tmp_path / "out2")],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "does not exist" in proc.stderr


def test_different_tokenizers_are_refused_before_anything_runs(tmp_path):
    """Teacher and student HF directories whose tokenizers map ids to different tokens."""
    from distill_llm import checks, distill

    for name, words in (("teacher", "alpha beta gamma"), ("student", "delta epsilon zeta")):
        _make_hf(tmp_path / name, "llama")
        corpus = tmp_path / f"{name}.txt"
        corpus.write_text("\n\n".join(f"{words} {i}" for i in range(300)))
        train_bpe_tokenizer(str(corpus), str(tmp_path / name), vocab_size=300)
    with pytest.raises(ConfigError, match="cross-tokenizer distillation is not supported") as err:
        distill(
            teacher=str(tmp_path / "teacher"),
            student_checkpoint=str(tmp_path / "student"),
            output_dir=str(tmp_path / "run"),
        )
    assert "\n" not in str(err.value) and "teacher's tokenizer" in str(err.value)
    assert not (tmp_path / "run").exists()
    # the same tokenizer on both sides (and as data.tokenizer) passes the check
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tmp_path / "teacher" / f).is_file():
            (tmp_path / "student" / f).write_bytes((tmp_path / "teacher" / f).read_bytes())
    checks.check_same_tokenizer({
        "teacher": str(tmp_path / "teacher"), "student": str(tmp_path / "student"),
        "data.tokenizer": str(tmp_path / "teacher"),
    })  # fmt: skip


def test_lm_loss_is_over_the_real_vocabulary_at_tp1_and_tp2(tmp_path):
    """A 384-id vocabulary is not padded at TP=1 and padded to 512 at TP=2; the LM loss we
    train, validate and evaluate on (plain GPT, and the KD wrapper's student, plain and fused)
    is transformers' cross entropy at both: Megatron's padding rows take no probability. The
    KD wrapper's training forward with grad ("ride") has its logged LM loss written by the KD
    loss's chunks."""
    hf_dir = tmp_path / "hf"
    settings = {**BASE, **FAMILIES["llama"], "vocab_size": 384}
    cfg = transformers.AutoConfig.for_model(settings.pop("model_type"), **settings)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(hf_dir)
    ops = {}
    for tp in (1, 2):
        ops[tp] = [
            dict(op="lm_loss", checkpoint=str(hf_dir), tensor_parallel=tp, kd=kd, training=train,
                 out=str(tmp_path / f"tp{tp}_{kd}_{train}_{grad}.pt"), with_grad=grad)
            for kd, train, grad in ((None, False, False), ("plain", True, False),
                                    ("plain", False, False), ("fused", True, False),
                                    ("plain", True, True))
        ]  # fmt: skip
    run_worker(tmp_path, ops[1])
    run_worker(tmp_path, ops[2], nproc=2)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    for op in ops[1] + ops[2]:
        got = torch.load(op["out"])
        with torch.no_grad():
            logits = model(got["tokens"]).logits
        want = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), got["labels"].flatten(), reduction="none"
        ).view_as(got["labels"])
        torch.testing.assert_close(got["loss"], want, rtol=0, atol=1e-5, msg=str(op))
        assert got["deferred"] == op["with_grad"], op
