"""Real data: tokenizers, preprocessing to .bin/.idx, the blended resumable data module."""

import json
import random

import numpy as np
import pytest
import sentencepiece

from distill_llm.data.datasets import BatchPlan, DataConfig, DataModule
from distill_llm.data.preprocess import preprocess
from distill_llm.data.tokenizer import load_tokenizer, train_bpe_tokenizer
from distill_llm.engine import parallel
from distill_llm.errors import ConfigError

WORDS = "the quick brown fox jumps over a lazy dog while teacher and student models learn".split()


def _docs(seed: int, n: int, words=WORDS, extra: str = "") -> list[str]:
    rng = random.Random(seed)
    return [
        " ".join(rng.choice(words) for _ in range(rng.randint(3, 60))) + extra for _ in range(n)
    ]


def _write_jsonl(path, docs):
    with open(path, "w") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"id": i, "text": d}) + "\n")
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """HF (byte-level BPE) and SentencePiece tokenizers, each with preprocessed data."""
    tmp = tmp_path_factory.mktemp("data")
    # byte-level BPE round-trips any text: newlines inside documents, accents, emoji
    hf_docs = _docs(1, 300, extra="\nnaïve café ✓") + _docs(2, 100)
    _write_jsonl(tmp / "hf.jsonl", hf_docs)
    hf_tok = train_bpe_tokenizer(str(tmp / "hf.jsonl"), str(tmp / "hf_tok"), vocab_size=400)
    preprocess(str(tmp / "hf.jsonl"), str(tmp / "hf"), hf_tok.path, workers=2, progress=False)

    # SentencePiece from plain text: documents are blank-line-separated paragraphs
    sp_docs = _docs(3, 300)
    (tmp / "sp.txt").write_text("\n\n".join(sp_docs) + "\n")
    sentencepiece.SentencePieceTrainer.Train(
        input=str(tmp / "sp.txt"),
        model_prefix=str(tmp / "sp"),
        vocab_size=60,
        model_type="bpe",
        minloglevel=2,
    )
    preprocess(str(tmp / "sp.txt"), str(tmp / "sp"), str(tmp / "sp.model"), progress=False)

    # two sources told apart by their text: letters only, digits only
    _write_jsonl(tmp / "letters.jsonl", _docs(4, 200))
    _write_jsonl(tmp / "digits.jsonl", _docs(5, 200, words=[str(d) * 3 for d in range(10)]))
    mix_tok = train_bpe_tokenizer(
        [str(tmp / "letters.jsonl"), str(tmp / "digits.jsonl")], str(tmp / "mix_tok"), 400
    )
    for name in ("letters", "digits"):
        preprocess(str(tmp / f"{name}.jsonl"), str(tmp / name), mix_tok.path, progress=False)
    parallel.initialize(parallel.ParallelConfig(), seed=0)  # megatron's builder needs a group
    return {"tmp": tmp, "hf": hf_docs, "sp": sp_docs}


def _module(cfg, seq=16, plan=None, train=64, valid=4, seed=7, vocab=1000, cache=None):
    source = cfg.resolve({"model": vocab}, seq)
    return DataModule(
        cfg,
        source,
        seq_length=seq,
        plan=plan or BatchPlan(2, 4, 1),
        train_samples=train,
        valid_samples=valid,
        seed=seed,
        cache_dir=str(cache),
    )


@pytest.mark.parametrize("kind", ["hf", "sp"])
def test_text_to_samples_round_trip(corpus, kind):
    """Samples, put back in stream order, are the documents' tokens with EOD after each, and
    decode to the original text."""
    tmp, docs = corpus["tmp"], corpus[kind]
    tok = load_tokenizer(tmp / ("hf_tok" if kind == "hf" else "sp.model"))
    cfg = DataConfig(paths=[str(tmp / kind)], split="100,0,0")
    source = cfg.resolve({"model": 1000}, 16, splits=("train",))
    assert source.eod == tok.eod and source.vocab_size == tok.vocab_size
    dm = DataModule(
        cfg, source, seq_length=16, plan=BatchPlan(1, 1, 1), train_samples=1,
        valid_samples=1, seed=3, cache_dir=str(tmp / f"cache_{kind}"),
    )  # fmt: skip
    train = dm.train
    order = np.argsort(train.shuffle_index)  # position in the stream -> sample index
    samples = [train[int(i)] for i in order]
    stream = np.concatenate([s["tokens"].numpy() for s in samples] + [samples[-1]["labels"][-1:]])
    expected = np.concatenate([tok.encode(docs[d]) + [tok.eod] for d in train.document_index])
    assert len(stream) > 0.9 * sum(len(tok.encode(d)) + 1 for d in docs)  # one whole epoch
    np.testing.assert_array_equal(stream, expected[: len(stream)])

    ends = np.flatnonzero(stream == tok.eod)
    assert len(ends) > 250  # document boundaries survive
    starts = np.concatenate([[0], ends[:-1] + 1])
    for k, (a, b) in enumerate(zip(starts, ends)):
        assert tok.decode(stream[a:b].tolist()) == docs[train.document_index[k]]


def test_hf_tokenizer_directory_loads_in_transformers(corpus):
    from transformers import AutoTokenizer

    tmp = corpus["tmp"]
    ours, theirs = load_tokenizer(tmp / "hf_tok"), AutoTokenizer.from_pretrained(tmp / "hf_tok")
    text = corpus["hf"][0]
    assert theirs(text, add_special_tokens=False)["input_ids"] == ours.encode(text)
    assert theirs.eos_token_id == ours.eod and theirs.pad_token_id == ours.pad != ours.eod


def test_blend_matches_its_weights(corpus):
    tmp = corpus["tmp"]
    # the seed's string form, as in DATA_PATHS="[w1,prefix1,w2,prefix2]"
    cfg = DataConfig(paths=f"[0.3,{tmp / 'letters'},0.7,{tmp / 'digits'}]", split="90,5,5")
    dm = _module(cfg, train=10_000, cache=tmp / "cache_blend")
    tok = load_tokenizer(tmp / "mix_tok")
    digits = 0
    for i in range(10_000):
        text = tok.decode(dm.train[i]["tokens"].tolist())
        has_digit = any(c.isdigit() for c in text)
        assert has_digit != any(c.isalpha() and c.isascii() for c in text.replace("endoftext", ""))
        digits += has_digit
    assert abs(digits / 10_000 - 0.7) < 0.02


def _batches(dm, consumed, n):
    it = dm.train_batches(consumed)
    return [next(it)["tokens"] for _ in range(n * dm.plan.num_microbatches)]


def test_resumed_stream_continues_exactly(corpus):
    """A data module rebuilt from scratch (as after a restart) and started at the consumed
    count of a checkpoint yields the same batches as the uninterrupted one."""
    tmp = corpus["tmp"]
    cfg = DataConfig(paths=[0.5, str(tmp / "letters"), 0.5, str(tmp / "digits")])
    straight = _batches(_module(cfg, cache=tmp / "cache_a"), 0, 10)
    resumed = _module(cfg, cache=tmp / "cache_b")  # fresh indices, not the same cache
    assert resumed.stream_id == _module(cfg, cache=tmp / "cache_a").stream_id
    after = _batches(resumed, 4 * resumed.plan.global_batch_size, 6)
    for a, b in zip(straight[4 * 2 :], after, strict=True):
        assert torch_equal(a, b)
    assert not torch_equal(straight[0], straight[2])  # batches do differ
    other_seed = _module(cfg, seed=8, cache=tmp / "cache_a")
    assert other_seed.stream_id != resumed.stream_id


def torch_equal(a, b) -> bool:
    return bool((a == b).all())


def test_data_parallel_ranks_split_each_global_batch(corpus):
    tmp = corpus["tmp"]
    cfg = DataConfig(paths=[str(tmp / "hf")])
    one = _module(cfg, plan=BatchPlan(2, 8, 1), cache=tmp / "cache_dp")
    ranks = [
        _module(cfg, plan=BatchPlan(2, 8, 2, r), cache=tmp / "cache_dp").plan for r in range(2)
    ]
    for step in range(5):
        consumed = step * 8
        idx = [sum(p.indices(consumed), []) for p in ranks]
        assert not set(idx[0]) & set(idx[1])
        assert sorted(idx[0] + idx[1]) == sum(one.plan.indices(consumed), [])
        # and the token rows: rank batches together are the DP=1 global batch
        rows = lambda ids: sorted(tuple(one.train[i]["tokens"].tolist()) for i in ids)  # noqa: E731
        assert rows(idx[0] + idx[1]) == rows(sum(one.plan.indices(consumed), []))
    it = [_module(cfg, plan=p, cache=tmp / "cache_dp").train_batches(0) for p in ranks]
    for _ in range(3 * ranks[0].num_microbatches):
        a, b = next(it[0])["tokens"], next(it[1])["tokens"]
        assert not any(torch_equal(x, y) for x in a for y in b)


# -- bad inputs: one line each, naming the fix ------------------------------------------------
def _one_line_error(fn, match):
    with pytest.raises(ConfigError, match=match) as err:
        fn()
    assert "\n" not in str(err.value)
    return str(err.value)


def _copy_prefix(src, dst):
    for ext in (".bin", ".idx", ".meta.json"):
        dst.with_name(dst.name + ext).write_bytes(src.with_name(src.name + ext).read_bytes())
    return dst


def test_missing_and_corrupt_files(corpus, tmp_path):
    tmp = corpus["tmp"]

    def check(prefix):
        return lambda: DataConfig(paths=[str(prefix)]).resolve({"model": 1000}, 16)

    _one_line_error(check(tmp_path / "nope"), r"nope\.bin is missing; run")
    p = _copy_prefix(tmp / "hf", tmp_path / "a")
    (tmp_path / "a.idx").unlink()
    _one_line_error(check(p), r"a\.idx is missing \(a\.bin is there\)")

    p = _copy_prefix(tmp / "hf", tmp_path / "b")
    idx = (tmp_path / "b.idx").read_bytes()
    (tmp_path / "b.idx").write_bytes(idx[: len(idx) - 100])
    _one_line_error(check(p), r"b\.idx is truncated or corrupt .*preprocess the data again")
    (tmp_path / "b.idx").write_bytes(b"garbage!" + idx[8:])
    _one_line_error(check(p), r"truncated or corrupt \(not a Megatron index header\)")
    (tmp_path / "b.idx").write_bytes(idx)
    bin_bytes = (tmp_path / "b.bin").read_bytes()
    (tmp_path / "b.bin").write_bytes(bin_bytes[:-10])
    _one_line_error(check(p), r"b\.bin has \d+ bytes but b\.idx describes \d+")


@pytest.mark.parametrize(
    "paths, match",
    [
        ([0.0, "a", 1.0, "b"], "weight 0.0 of a is not a positive number"),
        ([-1, "a", 1.0, "b"], "weight -1 of a is not a positive number"),
        (["x", "a", "1.0", "b"], "weight 'x' of a is not a positive number"),
        ([0.5, "a", "b"], "data.paths has 3 entries; give weight/prefix pairs"),
        ("[0.5, a, 0.5]", "data.paths has 3 entries"),
    ],
)
def test_bad_blends(paths, match):
    _one_line_error(lambda: DataConfig(paths=paths).resolve({"model": 1000}, 16), match)


def test_bad_split_vocab_and_tokenizer(corpus, tmp_path):
    tmp = corpus["tmp"]
    hf, n = str(tmp / "hf"), load_tokenizer(tmp / "hf_tok").vocab_size
    _one_line_error(
        lambda: DataConfig(paths=[hf]).resolve({"student": n - 1}, 16),
        rf"has {n} tokens but the student's vocabulary is {n - 1}; use a model with",
    )
    _one_line_error(
        lambda: DataConfig(paths=[hf], split="99.9,0.1,0").resolve({"model": 1000}, 16),
        r"leaves the valid split of .*hf empty \(400 documents, 0.1% for valid\)",
    )
    _one_line_error(
        lambda: DataConfig(paths=[hf], split="a,b").resolve({"model": 1000}, 16),
        "data.split 'a,b' is not 1-3 non-negative",
    )
    _one_line_error(
        lambda: DataConfig(paths=[hf], tokenizer=str(tmp / "sp.model")).resolve({"m": 1000}, 16),
        r"hf was tokenized with .*hf_tok .*not with data.tokenizer .*sp.model",
    )
    p = _copy_prefix(tmp / "sp", tmp_path / "nometa")
    (tmp_path / "nometa.meta.json").unlink()
    _one_line_error(
        lambda: DataConfig(paths=[str(p)]).resolve({"model": 1000}, 16),
        "data.tokenizer is not set and .*nometa has no .meta.json",
    )
    # with the tokenizer named, the same data is fine
    src = DataConfig(paths=[str(p)], tokenizer=str(tmp / "sp.model")).resolve({"m": 1000}, 16)
    assert src.eod == load_tokenizer(tmp / "sp.model").eod


def test_entry_point_refuses_before_writing_anything(corpus, tmp_path):
    import distill_llm as dl

    tmp = corpus["tmp"]
    model = dl.ModelConfig(num_layers=1, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
                           vocab_size=300, max_seq_length=32)  # fmt: skip
    run = tmp_path / "run"
    _one_line_error(
        lambda: dl.pretrain(
            model,
            data=DataConfig(paths=[str(tmp / "hf")]),
            train=dl.TrainConfig(seq_length=16),
            output_dir=str(run),
        ),
        r"has \d+ tokens but the model's vocabulary is 300",
    )
    _one_line_error(
        lambda: dl.pretrain(
            model,
            data=DataConfig(paths=[str(tmp / "sp")]),
            train=dl.TrainConfig(seq_length=64),
            output_dir=str(run),
        ),
        "seq_length 64 .*32",
    )
    assert not run.exists()


# -- preprocessing: errors, atomic outputs --------------------------------------------------
def test_preprocess_errors_leave_nothing_behind(corpus, tmp_path):
    tmp = corpus["tmp"]
    tok = str(tmp / "hf_tok")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"text": broken\n')
    out = tmp_path / "out"
    _one_line_error(
        lambda: preprocess(str(bad), str(out), tok, progress=False), "bad.jsonl:3: not valid JSON"
    )
    _one_line_error(
        lambda: preprocess(str(bad), str(out), tok, text_key="body", workers=2, progress=False),
        r"bad.jsonl:1: no 'body' field \(found: text\); pass text_key=<field>",
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]
    _one_line_error(lambda: preprocess(str(tmp_path / "x.jsonl"), str(out), tok), "does not exist")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    _one_line_error(lambda: preprocess(str(empty), str(out), tok, progress=False), "no non-empty")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "empty.txt"]

    good = _write_jsonl(tmp_path / "good.jsonl", ["one doc", "two docs"])
    summary = preprocess(str(good), str(out), tok, progress=False)
    encode = load_tokenizer(tok).encode
    assert (summary.documents, summary.tokens) == (
        2,
        len(encode("one doc") + encode("two docs")) + 2,
    )
    before = (tmp_path / "out.bin").read_bytes()
    _one_line_error(lambda: preprocess(str(good), str(out), tok), "out.bin already exists; pass")
    assert (tmp_path / "out.bin").read_bytes() == before


CRASH = """
import os, signal, sys
import distill_llm.preprocess as pp
real = os.replace
def replace(src, dst):
    if str(dst).endswith(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)
    real(src, dst)
pp.os.replace = replace
pp.preprocess(sys.argv[1], sys.argv[2], sys.argv[4], overwrite=True, progress=False)
"""


@pytest.mark.parametrize("die_at", [".bin", ".idx"])
def test_crash_while_publishing_leaves_no_mismatched_pair(corpus, tmp_path, die_at):
    """SIGKILL between the renames: never a .idx beside a .bin it does not describe; the next
    run cleans the dead run's temporaries."""
    import subprocess
    import sys

    tmp = corpus["tmp"]
    tok = str(tmp / "hf_tok")
    old = _write_jsonl(tmp_path / "old.jsonl", ["old"] * 3)
    new = _write_jsonl(tmp_path / "new.jsonl", corpus["hf"][:50])
    out = tmp_path / "out"
    preprocess(str(old), str(out), tok, progress=False)
    script = tmp_path / "crash.py"
    script.write_text(CRASH)
    proc = subprocess.run([sys.executable, str(script), str(new), str(out), die_at, tok])
    assert proc.returncode == -9
    assert list(tmp_path.glob("out.*.tmp.*"))  # the dead run's temporaries
    # the old .idx goes first, the new one last: the prefix is unusable, never mismatched
    cfg = DataConfig(paths=[str(out)])
    _one_line_error(lambda: cfg.resolve({"m": 1000}, 8), r"out\.idx is missing \(out\.bin")
    preprocess(str(new), str(out), tok, overwrite=True, progress=False)
    assert not list(tmp_path.glob("out.*.tmp.*"))
    assert DataConfig(paths=[str(out)]).resolve({"m": 1000}, 8)


# -- end to end: distillation on real data under torchrun -------------------------------------
def test_distill_on_real_data_resumes_exactly_and_matches_dp2(corpus):
    from conftest import OPTIM, STUDENT, TEACHER, run_worker, train_cfg

    from distill_llm.engine.run_dir import read_metrics

    tmp = corpus["tmp"]
    keys = ["step", "lm_loss", "kd_loss", "grad_norm"]

    def job(run_dir, **data):
        return dict(
            op="distill",
            teacher=str(tmp / "teacher"),
            student=STUDENT,
            optim=OPTIM,
            kd=dict(skip_lm_loss=False),
            # the tokenizer comes from the prefixes' .meta.json
            data=dict(paths=[0.4, str(tmp / "letters"), 0.6, str(tmp / "digits")], **data),
            output_dir=str(tmp / run_dir),
            train=train_cfg(steps=4, save_every=2, val_every=2),
        )

    import distill_llm as dl

    dl.init_model(dl.ModelConfig(**TEACHER), str(tmp / "teacher"), seed=3)  # in this process
    run_worker(tmp, [job("straight")])
    run_worker(tmp, [job("resumed")], kill={"after_save": 1}, expect_ok=False)
    assert (tmp / "resumed/checkpoints/latest").read_text() == "iter_0000002"
    out = run_worker(tmp, [job("resumed")])
    assert "at step 2" in out.stdout
    straight = [[e[k] for k in keys] for e in read_metrics(tmp / "straight", "train")]
    resumed = [[e[k] for k in keys] for e in read_metrics(tmp / "resumed", "train")]
    assert len(straight) == 4 and resumed == straight  # same samples, bit for bit
    assert (tmp / "straight/data_cache").is_dir()

    # two data-parallel ranks: rank 0 builds the index caches, rank 1 loads them; together
    # they read the same global batches
    run_worker(tmp, [job("dp2")], nproc=2)
    for a, b in zip(straight, [[e[k] for k in keys] for e in read_metrics(tmp / "dp2", "train")]):
        assert a[0] == b[0] and a[1:] == pytest.approx(b[1:], rel=1e-5, abs=1e-6)

    # a resume onto a different sample stream is refused, not silently continued
    spec = job("resumed", split="90,5,5")
    kwargs = dict(
        teacher=spec["teacher"],
        student=dl.ModelConfig(**spec["student"]),
        kd=dl.KDConfig(**spec["kd"]),
        data=dl.DataConfig(**spec["data"]),
        train=dl.TrainConfig(**spec["train"]),
        optim=dl.OptimConfig(**spec["optim"]),
        output_dir=spec["output_dir"],
    )
    _one_line_error(lambda: dl.distill(**kwargs), "trained on a different sample stream")
