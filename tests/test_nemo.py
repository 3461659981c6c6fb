"""NeMo checkpoints in and out, against files NeMo itself wrote (tests/fixtures/nemo, made by
nemo_toolkit 2.4.1's converters from the tiny HF Llamas beside them; no NeMo import here):
logits equal transformers' at TP=1 and TP=2, exports read back bitwise and have NeMo's layout,
crafted files stay data, and every bad input is refused in one line with nothing written."""

import gzip
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from conftest import ROOT, run_worker, sp_data

from distill_llm.errors import ConfigError
from distill_llm.formats import paths
from distill_llm.formats.nemo.checkpoint import NemoCheckpoint, open_checkpoint
from distill_llm.formats.nemo.dcp import DcpReader
from distill_llm.formats.nemo.source import NemoSource

FIX = ROOT / "tests" / "fixtures" / "nemo"
NEMO1, NEMO1_DIR, NEMO2 = (
    FIX / "nemo1_llama.nemo",
    FIX / "nemo1_llama_unpacked",
    FIX / "nemo2_llama",
)
SP, BPE = FIX / "hf_llama_sp", FIX / "hf_llama_bpe"
HF_SOURCE = {"nemo1": SP, "nemo1_gz": SP, "nemo1_dir": SP, "nemo2": BPE}
# nemo1_gz: the NeMo 1 file gzipped, as NeMo < 1.7 wrote them (made in `work`)
FIXTURES = {"nemo1": NEMO1, "nemo1_gz": None, "nemo1_dir": NEMO1_DIR, "nemo2": NEMO2}
OURS = dict(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
            num_query_groups=2, vocab_size=256, max_seq_length=64)  # fmt: skip


def _hf_logits(path) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokens = torch.randint(
        0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        return model(tokens).logits  # the tokens tests/worker.py's "logits" op feeds


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """One worker run at TP=1 and one at TP=2: fixture logits, our checkpoint exported to NeMo
    1 and NeMo 2 (and the NeMo 1 fixture re-exported), and the tensors of each read back."""
    d = tmp_path_factory.mktemp("nemo")
    fixtures = {**FIXTURES, "nemo1_gz": d / "old.nemo"}
    with open(NEMO1, "rb") as src, gzip.open(fixtures["nemo1_gz"], "wb") as dst:
        shutil.copyfileobj(src, dst)
    short = dict(steps=1, micro_batch_size=2, global_batch_size=2, seq_length=32, val_batches=1)
    ops1 = [dict(op="init_model", model=OURS, output_dir=str(d / "ours"), seed=7)]
    ops1 += [dict(op="export_nemo", checkpoint=str(d / "ours"), output=str(d / "ours.nemo"),
                  tokenizer=str(HF_SOURCE["nemo1"] / "tokenizer.model")),
             dict(op="export_nemo", checkpoint=str(d / "ours"), output=str(d / "ours_nemo2"),
                  tokenizer=str(HF_SOURCE["nemo1"])),
             dict(op="export_nemo", checkpoint=str(NEMO1),
                  output=str(d / "again.nemo"))]  # fmt: skip
    ops1.append(dict(op="pretrain", model=OURS, train=short, output_dir=str(d / "pre"),
                     export_nemo=str(d / "pre_nemo2")))  # fmt: skip
    for name in ("ours", "ours.nemo", "ours_nemo2", "pre/final", "pre_nemo2"):
        out = str(d / f"{name.replace('/', '_')}.pt")
        ops1.append(dict(op="weights", checkpoint=str(d / name), out=out))
    ops1 += [dict(op="export_hf", checkpoint=str(NEMO1), output_dir=str(d / "hf_from_nemo1")),
             dict(op="export_hf", checkpoint=str(NEMO2), output_dir=str(d / "hf_from_nemo2")),
             dict(op="evaluate", teacher=str(NEMO1), model_checkpoint=str(d / "again.nemo"),
                  train=short, output_file=str(d / "eval.json")),
             dict(op="cache_teacher", teacher=str(NEMO2), output_dir=str(d / "cache"), k=4,
                  train=short)]  # fmt: skip
    for key, path in fixtures.items():
        ops1.append(dict(op="logits", checkpoint=str(path), out=str(d / f"{key}_tp1.pt")))
    run_worker(d, ops1)
    ops2 = [dict(op="logits", checkpoint=str(path), tensor_parallel=2, out=str(d / f"{key}_tp2.pt"))
            for key, path in fixtures.items()]  # fmt: skip
    ops2.append(dict(op="init_model", model=OURS, output_dir=str(d / "ours_tp2"), seed=7,
                     parallel=dict(tensor_parallel=2)))  # fmt: skip
    run_worker(d, ops2, nproc=2)
    return d


@pytest.mark.parametrize("key", list(FIXTURES))
@pytest.mark.parametrize("tp", [1, 2])
def test_nemo_fixture_logits_equal_transformers(work, key, tp):
    """A NeMo-written checkpoint as a teacher gives its HF source's logits (float32 sums in a
    different order: 1e-4 on logits of size ~1)."""
    ours = torch.load(work / f"{key}_tp{tp}.pt")
    expected = _hf_logits(HF_SOURCE[key])
    assert ours.shape == expected.shape
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)


def test_nemo_checkpoints_work_in_export_hf_evaluate_and_cache_teacher(work):
    """NeMo paths as `export_hf`'s, `evaluate`'s and `cache_teacher`'s checkpoints: the HF
    exports are the NeMo files' HF sources exactly; a model evaluated against itself (the same
    weights as NeMo 1 and re-exported) has KL 0."""
    for name, source in (("hf_from_nemo1", SP), ("hf_from_nemo2", BPE)):
        assert torch.equal(_hf_logits(work / name), _hf_logits(source))
    assert (work / "hf_from_nemo1" / "tokenizer.model").read_bytes() == (
        SP / "tokenizer.model"
    ).read_bytes()
    result = json.loads((work / "eval.json").read_text())
    assert abs(result["kl_to_teacher"]) < 1e-6 and result["val_loss"] > 0
    assert (work / "cache" / "train").is_dir()


def test_a_tensor_parallel_rank_reads_only_the_chunks_of_its_shard(work, monkeypatch):
    """A dist-ckpt saved at TP=2 stores each layer's QKV as two chunks; the region one TP=2
    rank needs (layer 0, its half of the rows) loads one chunk of the four."""
    reader = DcpReader(NemoSource(work / "ours_tp2"), "")
    key = "decoder.layers.self_attention.linear_qkv.weight"
    layers, rows, cols = reader.tensor_shapes()[key]
    assert len(reader.meta.state_dict_metadata[key].chunks) == 4
    loaded, real = [], reader._chunk
    monkeypatch.setattr(reader, "_chunk", lambda k, c: loaded.append(c) or real(k, c))
    half = reader.read(key, (0, 0, 0), (1, rows // 2, cols))
    assert len(loaded) == 1 and tuple(loaded[0].offsets) == (0, 0, 0)
    whole = reader.read(key, (0, 0, 0), (layers, rows, cols))
    assert torch.equal(half, whole[:1, : rows // 2])


def test_pretrain_ends_with_a_nemo2_export_of_its_final_model(work):
    final, exported = torch.load(work / "pre_final.pt"), torch.load(work / "pre_nemo2.pt")
    assert final.keys() == exported.keys()
    assert all(torch.equal(final[k], exported[k]) for k in final)
    assert not (work / ".pre_nemo2.tmp").exists()


def test_a_nemo_teachers_tokenizer_is_checked_against_the_data(tmp_path):
    from distill_llm import checks
    from distill_llm.data.datasets import DataConfig
    from distill_llm.engine.parallel import ParallelConfig
    from distill_llm.engine.training import OptimConfig, TrainConfig
    from distill_llm.kd.config import KDConfig

    with pytest.raises(ConfigError, match="tokenizer .* differ"):
        checks.check_distill(
            teacher=str(NEMO1), student=None, student_checkpoint=None, kd=KDConfig(),
            data=DataConfig(tokenizer=str(BPE)), train=TrainConfig(seq_length=32),
            optim=OptimConfig(), parallel=ParallelConfig(), world_size=1,
        )  # fmt: skip


def test_exports_round_trip_bitwise_and_formats_hold_the_same_tensors(work):
    ours = torch.load(work / "ours.pt")
    for name in ("ours.nemo", "ours_nemo2"):
        back = torch.load(work / f"{name}.pt")
        assert back.keys() == ours.keys()
        assert all(torch.equal(back[k], ours[k]) for k in ours), name
    one = DcpReader(NemoSource(work / "ours.nemo"), "model_weights")
    two = DcpReader(NemoSource(work / "ours_nemo2"), "weights")
    shapes1, shapes2 = one.tensor_shapes(), two.tensor_shapes()
    assert {k[len("model.") :] for k in shapes1} == {k[len("module.") :] for k in shapes2}
    for key, shape in shapes1.items():
        other = "module." + key[len("model.") :]
        zeros = (0,) * len(shape)
        assert torch.equal(one.read(key, zeros, shape), two.read(other, zeros, shape)), key


def _entries(ckpt) -> dict:
    """Every stored entry (tensors and byte blobs) with its kind and global shape."""
    meta = DcpReader(ckpt.source, "model_weights").meta.state_dict_metadata
    return {k: (type(v).__name__, tuple(getattr(v, "size", ()))) for k, v in meta.items()}


def test_nemo1_export_has_nemo_layout(work):
    """Same YAML keys, tensor names, shapes and stacking as the file NeMo's converter wrote;
    members named ./..., the tokenizer as a nemo: artifact."""
    ours = NemoCheckpoint(work / "again.nemo")
    theirs = NemoCheckpoint(NEMO1)
    assert set(ours.yaml) == set(theirs.yaml)
    differ = {k for k in theirs.yaml if ours.yaml[k] != theirs.yaml[k]}
    assert differ == {"tokenizer"}  # the artifact's random name
    assert ours.yaml["tokenizer"]["model"].startswith("nemo:")
    assert ours.yaml["tokenizer"]["model"].endswith("_tokenizer.model")
    assert _entries(ours) == _entries(theirs)
    with tarfile.open(work / "again.nemo", "r:") as tar:  # uncompressed, like NeMo's
        names = tar.getnames()
    assert all(n == "." or n.startswith("./") for n in names)
    assert ours.yaml["tokenizer"]["model"][len("nemo:") :] in {n[2:] for n in names}
    assert (
        Path(ours.tokenizer_path()).read_bytes()
        == (HF_SOURCE["nemo1"] / "tokenizer.model").read_bytes()
    )


def test_nemo2_export_has_nemo_layout(work):
    out = work / "ours_nemo2"
    model_yaml = yaml.safe_load((out / "context" / "model.yaml").read_text())
    fixture_yaml = yaml.safe_load((NEMO2 / "context" / "model.yaml").read_text())
    assert model_yaml["_target_"] == fixture_yaml["_target_"]
    assert model_yaml["config"]["_target_"] == fixture_yaml["config"]["_target_"]
    io_json = json.loads((out / "context" / "io.json").read_text())
    classes = {
        (o["type"].get("module"), o["type"].get("name")) for o in io_json["objects"].values()
    }
    assert ("nemo.collections.llm.gpt.model.llama", "LlamaModel") in {
        (it[1].get("module"), it[1].get("name"))
        for o in io_json["objects"].values() for it in o.get("items", [])
        if isinstance(it, list) and len(it) == 2 and isinstance(it[1], dict)
    } | classes  # fmt: skip
    assert (out / "context" / "nemo_tokenizer" / "tokenizer.model").is_file()
    ours = DcpReader(NemoSource(out), "weights").tensor_shapes()
    assert all(k.startswith("module.") for k in ours)
    theirs = DcpReader(NemoSource(NEMO2), "weights").tensor_shapes()
    assert set(ours) == set(theirs)


def test_nemo_checkpoint_carries_its_tokenizer_for_the_checks():
    """The NeMo 1 SentencePiece artifact and the NeMo 2 nemo_tokenizer/ are found and are the
    HF sources' own tokenizers."""
    from distill_llm.data.tokenizer import load_tokenizer

    sp = paths.tokenizer_dir_of(str(NEMO1))
    assert Path(sp).read_bytes() == (HF_SOURCE["nemo1"] / "tokenizer.model").read_bytes()
    assert load_tokenizer(sp).vocab_size == 256
    hf = paths.tokenizer_dir_of(str(NEMO2))
    assert load_tokenizer(hf).fingerprint == load_tokenizer(HF_SOURCE["nemo2"]).fingerprint


# -- untrusted files stay data ----------------------------------------------------------------
class _RunsCode:
    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def _copy_dir(tmp_path, name="copy") -> Path:
    d = tmp_path / name
    shutil.copytree(NEMO1_DIR, d)
    return d


def test_crafted_metadata_pickle_is_refused_without_running(tmp_path):
    d = _copy_dir(tmp_path)
    sentinel = tmp_path / "pwned"
    (d / "model_weights" / ".metadata").write_bytes(pickle.dumps(_RunsCode(sentinel)))
    with pytest.raises(ConfigError, match="refusing to unpickle"):
        open_checkpoint(d)
    assert not sentinel.exists()


def test_crafted_chunk_is_refused_without_running(tmp_path):
    d = _copy_dir(tmp_path)
    sentinel = tmp_path / "pwned"
    meta = DcpReader(NemoSource(d), "model_weights").meta
    key = "model.decoder.final_layernorm.weight"
    info = next(v for k, v in meta.storage_data.items() if k.fqn == key)
    blob = io.BytesIO()
    torch.save({"x": _RunsCode(sentinel)}, blob)
    data = bytearray((d / "model_weights" / info.relative_path).read_bytes())
    payload = blob.getvalue()
    # the crafted blob replaces the chunk (same length budget: pad or cut the tail it may overrun)
    start = info.offset
    data[start : start + info.length] = payload[: info.length].ljust(info.length, b"\0")
    (d / "model_weights" / info.relative_path).write_bytes(bytes(data))
    reader = DcpReader(NemoSource(d), "model_weights")
    with pytest.raises(ConfigError, match="cannot be read"):
        reader.read(key, (0,), (64,))
    assert not sentinel.exists()


def test_crafted_yaml_is_refused_without_running(tmp_path):
    d = _copy_dir(tmp_path)
    sentinel = tmp_path / "pwned"
    text = (d / "model_config.yaml").read_text()
    (d / "model_config.yaml").write_text(
        f"evil: !!python/object/apply:os.system ['touch {sentinel}']\n" + text
    )
    with pytest.raises(ConfigError, match="not plain YAML"):
        open_checkpoint(d)
    assert not sentinel.exists()


def _tar_with(tmp_path, extra: tarfile.TarInfo, data: bytes = b"") -> Path:
    out = tmp_path / "crafted.nemo"
    with tarfile.open(NEMO1) as src, tarfile.open(out, "w:") as dst:
        for m in src.getmembers():
            dst.addfile(m, src.extractfile(m) if m.isfile() else None)
        dst.addfile(extra, io.BytesIO(data) if data else None)
    return out


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "hardlink"])
def test_tar_members_escaping_or_linking_are_refused_before_reading(tmp_path, kind):
    info = tarfile.TarInfo({"dotdot": "./../escape.txt", "absolute": "/tmp/abs.txt",
                            "symlink": "./link", "hardlink": "./hard"}[kind])  # fmt: skip
    data = b""
    if kind == "symlink":
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
    elif kind == "hardlink":
        info.type, info.linkname = tarfile.LNKTYPE, "./model_config.yaml"
    else:
        data = b"x"
        info.size = 1
    crafted = _tar_with(tmp_path, info, data)
    with pytest.raises(ConfigError) as err:
        paths.model_config_of(str(crafted))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "escape.txt").exists() and not Path("/tmp/abs.txt").exists()


# -- bad input: one line each, nothing written ------------------------------------------------
def _edit_yaml(tmp_path, **changes) -> Path:
    d = _copy_dir(tmp_path, "edited")
    data = yaml.safe_load((d / "model_config.yaml").read_text())
    data.update(changes)
    (d / "model_config.yaml").write_text(yaml.safe_dump(data))
    return d


def _bad(tmp_path, name):
    if name == "tar_without_config":
        out = tmp_path / "no_config.nemo"
        with tarfile.open(NEMO1) as src, tarfile.open(out, "w:") as dst:
            for m in src.getmembers():
                if not m.name.endswith("model_config.yaml"):
                    dst.addfile(m, src.extractfile(m) if m.isfile() else None)
        return out
    if name == "not_a_tar":
        out = tmp_path / "junk.nemo"
        out.write_bytes(b"not a tar at all" * 100)
        return out
    if name == "truncated_tar":
        out = tmp_path / "cut.nemo"
        out.write_bytes(NEMO1.read_bytes()[: NEMO1.stat().st_size // 2])
        return out
    if name == "nemo2_without_context":
        d = tmp_path / "no_context"
        shutil.copytree(NEMO2 / "weights", d / "weights")
        return d
    if name == "zarr":
        d = _copy_dir(tmp_path, "zarr")
        (d / "model_weights" / "metadata.json").write_text(json.dumps({"sharded_backend": "zarr"}))
        return d
    if name == "legacy":
        d = _copy_dir(tmp_path, "legacy")
        shutil.rmtree(d / "model_weights")
        (d / "mp_rank_00").mkdir()
        (d / "mp_rank_00" / "model_weights.ckpt").write_bytes(b"\0")
        return d
    if name == "missing_shard":
        d = _copy_dir(tmp_path, "missing")
        (d / "model_weights" / "__0_1.distcp").unlink()
        return d
    edits = {
        "not_mcore": dict(mcore_gpt=False),
        "activation": dict(activation="geglu"),
        "normalization": dict(normalization="layernorm1p"),
        "positions": dict(position_embedding_type="alibi"),
        "moe": dict(num_moe_experts=8),
        "shapes": dict(ffn_hidden_size=128),
        "missing_tensor": dict(bias=True),
        "tokenizer_escape": dict(
            tokenizer={"library": "sentencepiece", "model": "nemo:../../etc/passwd"}
        ),  # fmt: skip
    }
    return _edit_yaml(tmp_path, **edits[name])


BAD = {
    "tar_without_config": "no model_config.yaml",
    "not_a_tar": "not a .nemo file",
    "truncated_tar": "truncated",
    "nemo2_without_context": "no context/",
    "zarr": "'zarr' dist-ckpt backend",
    "legacy": "legacy NeMo weights",
    "missing_shard": "missing",
    "not_mcore": "mcore_gpt is false",
    "activation": "activation 'geglu'",
    "normalization": "normalization 'layernorm1p'",
    "positions": "position_embedding_type 'alibi'",
    "moe": "mixture-of-experts",
    "shapes": "has shape",
    "missing_tensor": "is missing",
    "tokenizer_escape": "escapes it",
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_nemo_input_is_refused_in_one_line(tmp_path, name):
    path = _bad(tmp_path, name)
    with pytest.raises(ConfigError) as err:
        ckpt = paths.model_config_of(str(path))
        # shard files are only opened when read: load a region of every tensor
        reader = DcpReader(NemoSource(path), "model_weights")
        for key, shape in reader.tensor_shapes().items():
            reader.read(key, (0,) * len(shape), shape)
        raise AssertionError(f"accepted {ckpt}")
    assert BAD[name] in str(err.value)
    assert "\n" not in str(err.value)


def test_cli_refuses_bad_input_in_one_line_and_writes_nothing(tmp_path):
    bad = _bad(tmp_path, "not_mcore")
    out = tmp_path / "out.nemo"
    proc = subprocess.run([sys.executable, "-m", "distill_llm.nemo", "export", str(bad), str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "mcore_gpt is false" in proc.stderr
    assert not out.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())


@pytest.mark.parametrize(
    "output,fmt,message",
    [("x.nemo", "nemo2", "drop the .nemo suffix"), ("x", "nemo1", "is a .nemo file"),
     ("x", "nemo3", "unknown")],
)  # fmt: skip
def test_export_nemo_refuses_bad_targets_before_work(tmp_path, output, fmt, message):
    from distill_llm.formats.nemo.io import export_nemo

    with pytest.raises(ConfigError, match=message):
        export_nemo(str(NEMO1), str(tmp_path / output), format=fmt)
    assert list(tmp_path.iterdir()) == []


def test_export_nemo_refuses_an_existing_output(tmp_path):
    from distill_llm.formats.nemo.io import export_nemo

    (tmp_path / "there.nemo").write_text("keep me")
    with pytest.raises(ConfigError, match="already exists"):
        export_nemo(str(NEMO1), str(tmp_path / "there.nemo"))
    assert (tmp_path / "there.nemo").read_text() == "keep me"


# -- the seed's command, end to end -----------------------------------------------------------
STUDENT = dict(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
               num_query_groups=2, vocab_size=256, max_seq_length=256)  # fmt: skip


def test_seed_command_distils_nemo_files_at_tp2_and_writes_nemo_path(tmp_path):
    """`torchrun --nproc_per_node=2 -m distill_llm.megatron_gpt_distillation` with the keys of
    NeMo's docs: teacher and student .nemo files, TP=2; model.nemo_path reads back as the
    trained student (bitwise) and has NeMo's layout."""
    data = sp_data(tmp_path)
    run_worker(tmp_path, [
        dict(op="init_model", model=STUDENT, output_dir=str(tmp_path / "init"), seed=3),
        dict(op="export_nemo", checkpoint=str(tmp_path / "init"),
             output=str(tmp_path / "student.nemo"), tokenizer=str(SP / "tokenizer.model")),
    ])  # fmt: skip
    out, run_dir = tmp_path / "final_checkpoint.nemo", tmp_path / "exp"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "distill_llm.megatron_gpt_distillation",
           f"model.restore_from_path={tmp_path / 'student.nemo'}",
           f"model.kd_teacher_restore_from_path={NEMO1}",
           "model.tensor_model_parallel_size=2", f"model.tokenizer.model={SP / 'tokenizer.model'}",
           f"model.data.data_prefix=[1.0,{data}]", f"model.nemo_path={out}",
           "trainer.precision=32", "trainer.devices=2",
           "trainer.max_steps=3", "model.micro_batch_size=2", "model.global_batch_size=4",
           "model.encoder_seq_length=32", "model.data.splits_string=90,5,5",
           "model.optim.lr=1e-3", "model.optim.sched.min_lr=1e-4",
           "model.optim.sched.warmup_steps=1", f"exp_manager.exp_dir={run_dir}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
                          start_new_session=True)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert out.is_file()
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(m.get("step", 0) for m in metrics) == 3
    run_worker(tmp_path, [
        dict(op="logits", checkpoint=str(out), out=str(tmp_path / "nemo.pt")),
        dict(op="logits", checkpoint=str(run_dir / "final"), out=str(tmp_path / "final.pt")),
        dict(op="logits", checkpoint=str(tmp_path / "student.nemo"), out=str(tmp_path / "init.pt")),
    ])  # fmt: skip
    trained = torch.load(tmp_path / "final.pt")
    assert torch.equal(torch.load(tmp_path / "nemo.pt"), trained)
    assert not torch.equal(torch.load(tmp_path / "init.pt"), trained)  # it did train
    ours, theirs = NemoCheckpoint(out), NemoCheckpoint(NEMO1)
    assert set(ours.yaml) == set(theirs.yaml)
    assert ours.yaml["tokenizer"]["library"] == "sentencepiece"
    assert set(_entries(ours)) == set(_entries(theirs))  # same names, stacking and prefix
    for key, (_, shape) in _entries(ours).items():
        if ".decoder.layers." in key and shape:
            assert shape[0] == STUDENT["num_layers"], key


def test_nemo_teacher_tokenizer_is_the_default_data_tokenizer(tmp_path):
    """Data without .meta.json and no data.tokenizer: the NeMo teacher's tokenizer is used
    (here, its EOD id), where before the run was refused."""
    from distill_llm import checks
    from distill_llm.data.datasets import DataConfig
    from distill_llm.engine.parallel import ParallelConfig
    from distill_llm.engine.training import OptimConfig, TrainConfig
    from distill_llm.kd.config import KDConfig

    data = DataConfig(paths=[1.0, sp_data(tmp_path)], split="90,5,5")
    plan = checks.check_distill(
        teacher=str(NEMO1), student=None, student_checkpoint=None, kd=KDConfig(), data=data,
        train=TrainConfig(seq_length=32), optim=OptimConfig(), parallel=ParallelConfig(),
        world_size=1,
    )  # fmt: skip
    assert plan.source.eod == 2 and plan.source.vocab_size == 256  # the SentencePiece </s>
    assert plan.student.num_layers == 1  # the default student: half the teacher's depth


def test_nemo2_sentencepiece_tokenizer_named_in_model_yaml_is_found(tmp_path):
    """NeMo's SentencePieceTokenizer may sit at context/<model_path> instead of nemo_tokenizer/."""
    d = tmp_path / "n2"
    shutil.copytree(NEMO2, d)
    shutil.rmtree(d / "context" / "nemo_tokenizer")
    shutil.copy(SP / "tokenizer.model", d / "context" / "tokenizer.model")
    model_yaml = yaml.safe_load((d / "context" / "model.yaml").read_text())
    model_yaml["tokenizer"] = {
        "_target_": "SentencePieceTokenizer",
        "model_path": "tokenizer.model",
    }
    (d / "context" / "model.yaml").write_text(yaml.safe_dump(model_yaml))
    found = NemoCheckpoint(d).tokenizer_path()
    assert Path(found).read_bytes() == (SP / "tokenizer.model").read_bytes()
