"""distill_llm.teacher_cache: top-k teacher log-probabilities against float64 references, the
(k + 1)-bucket loss against the full-vocabulary one and against an independent float64 formula,
the same results over two tensor-parallel ranks, and the on-disk cache's round trip and refusals.
"""

import gc
import json
import math
import socket
import zlib

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distill_llm.errors import ConfigError
from distill_llm.kd import losses
from distill_llm.kd.losses import KINDS, LOG_PROB_FLOOR
from distill_llm.kd.teacher_cache import (
    FIX,
    CacheWriter,
    TeacherCache,
    cached_per_position,
    token_checksums,
    topk_log_probs,
)

V = 512


def _logits(shape=(3, 4), vocab=V, seed=0, masked=True):
    """(teacher, student) logits [*shape, vocab]: random, with a peaked teacher row (at T = 1 the
    rest of its top-1 is ~e^-49), a row of magnitude 1e4 on both sides and, if `masked`, a
    teacher row with -inf (probability 0) on a third of the vocabulary."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(*shape, vocab, generator=g) * 3
    student = teacher * 0.5 + torch.randn(*shape, vocab, generator=g) * 2
    teacher[0, 0, 7] += 60.0
    teacher[0, 1] *= 1e4 / 3
    student[0, 1] *= 1e4 / 3
    if masked:
        teacher[1, 2, : vocab // 3] = -math.inf
    return teacher, student


def _reference_topk(teacher, k, temperature, vocab_limit=None):
    """float64: log-probs and ids of the k most probable ids, and log of the mass of the rest."""
    x = teacher.double()[..., :vocab_limit] / temperature
    log_p = torch.log_softmax(x, -1)
    values, ids = log_p.topk(k, -1)
    others = log_p.scatter(-1, ids, -math.inf)
    return values, ids, torch.logsumexp(others, -1)


def _reference_buckets(kind, student, teacher, k, temperature, beta=0.5):
    """float64, independently: the divergence over the teacher's top-k ids plus one rest bucket
    each side (rests as direct sums over the other ids), in log space so that probabilities
    below float64's range (the 1e4 row) stay exact."""
    log_pt = torch.log_softmax(teacher.double() / temperature, -1)
    log_ps = torch.log_softmax(student.double() / temperature, -1)
    _, ids = log_pt.topk(k, -1)

    def buckets(log_p):
        rest = torch.logsumexp(log_p.scatter(-1, ids, -math.inf), -1, keepdim=True)
        return torch.cat([log_p.gather(-1, ids), rest], -1)

    t, s = buckets(log_pt), buckets(log_ps)
    pt, ps = t.exp(), s.exp()

    def kl(p, log_p, log_q):  # sum p (log p - log q), 0 where p == 0
        return torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1)

    if kind == "forward_kl":
        return kl(pt, t, s)
    if kind == "reverse_kl":
        return kl(ps, s, t.clamp(min=LOG_PROB_FLOOR))
    if kind == "jsd":
        m = torch.logaddexp(t + math.log(beta), s + math.log(1 - beta))
        return beta * kl(pt, t, m) + (1 - beta) * kl(ps, s, m)
    return 0.5 * (pt - ps).abs().sum(-1)


# --- topk_log_probs ---------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
@pytest.mark.parametrize("k", [1, 8, V])
def test_topk_log_probs_match_float64(k, temperature):
    teacher, _ = _logits()
    log_probs, ids, rest = topk_log_probs(teacher, k, temperature)
    want_values, want_ids, want_rest = _reference_topk(teacher, k, temperature)
    assert log_probs.dtype == rest.dtype == torch.float32 and ids.dtype == torch.int64
    assert log_probs.shape == ids.shape == (3, 4, k) and rest.shape == (3, 4)
    torch.testing.assert_close(log_probs.double(), want_values, rtol=1e-6, atol=1e-5)
    finite = torch.isfinite(want_values)  # ids of probability 0 tie, in any order
    assert torch.equal(ids[finite], want_ids[finite])
    assert (log_probs[..., :-1] >= log_probs[..., 1:]).all()
    torch.testing.assert_close(rest.double(), want_rest, rtol=1e-5, atol=1e-5)
    if k == V:
        assert torch.isneginf(rest).all()
        assert torch.equal(ids.sort(-1).values, torch.arange(V).expand(3, 4, V))
    elif temperature <= 1:  # the peaked row: 1 - sum(top k) in float32 can't go below ~-16
        assert rest[0, 0].item() < -40


@pytest.mark.parametrize("k", [8, 500])
def test_topk_log_probs_exclude_ids_past_the_vocab_limit(k):
    teacher, _ = _logits()
    teacher[..., 500:] = 50.0  # padding rows that would dominate if they were counted
    log_probs, ids, rest = topk_log_probs(teacher, k, 1.0, vocab_limit=500)
    want_values, want_ids, want_rest = _reference_topk(teacher, k, 1.0, vocab_limit=500)
    assert ids.max() < 500  # also where ids of probability 0 (the masked row) are chosen
    finite = torch.isfinite(want_values)
    assert torch.equal(ids[finite], want_ids[finite])
    torch.testing.assert_close(log_probs.double(), want_values, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(rest.double(), want_rest, rtol=1e-5, atol=1e-5)
    if k == 500:
        assert torch.isneginf(rest).all()
    with pytest.raises(ConfigError, match="k must be in 1..500"):
        topk_log_probs(teacher, 501, vocab_limit=500)


# --- cached_per_position ------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
@pytest.mark.parametrize("kind", KINDS)
def test_cached_loss_with_whole_vocabulary_is_the_full_loss(kind, temperature):
    teacher, student = _logits()
    cache = topk_log_probs(teacher, V, temperature)
    ours_in = student.clone().requires_grad_()
    ours = cached_per_position(ours_in, *cache, kind=kind, temperature=temperature, beta=0.3)
    ours.sum().backward()
    full_in = student.clone().requires_grad_()
    full = losses.per_position(kind, full_in, teacher, temperature, 0.3)
    full.sum().backward()
    assert ours.dtype == torch.float32 and ours.shape == (3, 4)
    assert torch.isfinite(ours).all() and torch.isfinite(ours_in.grad).all()
    torch.testing.assert_close(ours, full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours_in.grad, full_in.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", KINDS)
def test_cached_loss_with_small_k_is_the_bucket_formula(kind):
    teacher, student = _logits(masked=False)
    cache = topk_log_probs(teacher, 8, 2.0)
    ours_in = student.clone().requires_grad_()
    ours = cached_per_position(ours_in, *cache, kind=kind, temperature=2.0, beta=0.5)
    ours.sum().backward()
    want_in = student.double().requires_grad_()
    want = _reference_buckets(kind, want_in, teacher, 8, 2.0)
    want.sum().backward()
    torch.testing.assert_close(ours.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours_in.grad.double(), want_in.grad, rtol=1e-4, atol=1e-7)
    # f-divergences only shrink when ids are merged into one bucket
    full = losses.per_position(kind, student, teacher, 2.0, 0.5)
    assert (ours <= full + 1e-5).all()


def test_cached_loss_is_close_to_the_full_loss_for_a_peaked_teacher():
    """The forward KL misses exactly p_t(rest) KL(p_t(.|rest) || p_s(.|rest)), the chain rule;
    with the top 8 of 512 holding > 99.9% of a peaked teacher's mass, that was <= 4.3e-4 nats
    per position and 0.6% of the mean loss here (asserted: < 1e-3 nats, < 3%)."""
    g = torch.Generator().manual_seed(4)
    teacher, student = torch.randn(2, 64, V, generator=g)
    top = torch.randint(0, V, (64,), generator=g)
    teacher[torch.arange(64), top] += 16.0
    student[torch.arange(64), top] += 11.0  # a less confident student
    log_probs, ids, rest = topk_log_probs(teacher, 8)
    ours = cached_per_position(student, log_probs, ids, rest, kind="forward_kl", temperature=1.0)
    full = losses.per_position("forward_kl", student, teacher, 1.0, 0.5)
    log_pt = torch.log_softmax(teacher.double(), -1)
    log_ps = torch.log_softmax(student.double(), -1)
    tail_t, tail_s = log_pt.scatter(-1, ids, -math.inf), log_ps.scatter(-1, ids, -math.inf)
    tail_t = tail_t - torch.logsumexp(tail_t, -1, keepdim=True)  # p_t(. | rest)
    tail_s = tail_s - torch.logsumexp(tail_s, -1, keepdim=True)
    tail_kl = torch.where(torch.isfinite(tail_t), tail_t.exp() * (tail_t - tail_s), 0.0).sum(-1)
    missed = rest.double().exp() * tail_kl
    torch.testing.assert_close((full - ours).double(), missed, rtol=0, atol=2e-6)
    gap, mass = full - ours, rest.exp()
    print(
        f"\npeaked teacher, k=8 of {V}: teacher rest mass <= {mass.max():.1e}, gap to the full "
        f"forward KL <= {gap.max():.1e} nats, mean loss {ours.mean():.4f} vs {full.mean():.4f}"
    )
    assert mass.max() < 1e-3 and gap.max() < 1e-3 and gap.mean() < 0.03 * full.mean()


def test_cached_loss_floats_and_vocab_limit():
    """A float16 cache gives nearly the float32 value; padding ids count on neither side."""
    teacher, student = _logits(masked=False)
    student[..., 500:] = 40.0  # the student's padding rows: excluded, so never paid for
    log_probs, ids, rest = topk_log_probs(teacher, 16, 1.0, vocab_limit=500)
    exact = cached_per_position(
        student, log_probs, ids, rest, kind="jsd", temperature=1.0, vocab_limit=500
    )
    want = _reference_buckets("jsd", student[..., :500], teacher[..., :500], 16, 1.0)
    torch.testing.assert_close(exact.double(), want, rtol=1e-5, atol=1e-6)
    half = cached_per_position(
        student, log_probs.half(), ids, rest.half(), kind="jsd", temperature=1.0, vocab_limit=500
    )
    torch.testing.assert_close(half, exact, rtol=5e-3, atol=1e-4)


def test_cached_loss_refuses_mismatched_shapes():
    teacher, student = _logits()
    log_probs, ids, rest = topk_log_probs(teacher, 8)
    with pytest.raises(ConfigError, match="do not match the student logits"):
        cached_per_position(student[:, :2], log_probs, ids, rest, kind="tvd", temperature=1.0)
    with pytest.raises(ConfigError, match="unknown"):
        cached_per_position(student, log_probs, ids, rest, kind="kl", temperature=1.0)


# --- two tensor-parallel ranks ------------------------------------------------------------------

TP_CASES = {"k8": (8, None), "full": (V, None), "limit": (8, 500), "limit_full": (500, 500)}


def _tp_results(student, teacher, group, rank, size, scale_grad):
    """Every TP-compared quantity, computed on this rank's vocabulary shard."""
    v_local = V // size
    shard = slice(rank * v_local, (rank + 1) * v_local)
    out = {}
    for name, (k, limit) in TP_CASES.items():
        cache = topk_log_probs(teacher[..., shard], k, 2.0, group, limit)
        out[f"topk/{name}"] = cache
        for kind in KINDS:
            x = student[..., shard].clone().requires_grad_()
            value = cached_per_position(
                x, *cache, kind=kind, temperature=2.0, beta=0.5, group=group, vocab_limit=limit
            )
            (value.sum() / scale_grad).backward()
            out[f"{kind}/{name}"] = (value.detach(), x.grad)
    x = student[..., shard].clone().requires_grad_()  # no division: the gradient TP times over
    value = cached_per_position(x, *out["topk/k8"], kind="forward_kl", temperature=2.0, group=group)
    value.sum().backward()
    out["undivided"] = x.grad
    return out


def _tp_worker(rank, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        teacher, student = _logits()
        group = dist.new_group([0, 1])
        torch.save(_tp_results(student, teacher, group, rank, 2, 2.0), f"{out_dir}/rank{rank}.pt")
        dist.barrier()  # both ranks done before either tears its gloo connections down
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_tensor_parallel_ranks_equal_one(tmp_path):
    """Each rank holds half of the vocabulary; every rank backpropagates its value / TP."""
    mp.spawn(_tp_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    teacher, student = _logits()
    want = _tp_results(student, teacher, None, 0, 1, 1.0)
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for rank, ranks in enumerate(got):
        shard = slice(rank * V // 2, (rank + 1) * V // 2)
        for key, value in want.items():
            if key.startswith("topk/"):
                (log_probs, ids, rest), (w_log_probs, w_ids, w_rest) = ranks[key], value
                torch.testing.assert_close(log_probs, w_log_probs, rtol=1e-6, atol=1e-6)
                finite = torch.isfinite(w_log_probs)
                assert torch.equal(ids[finite], w_ids[finite]), key
                limit = TP_CASES[key[5:]][1] or V  # ids of probability 0 may tie, padding never
                assert ids.max() < limit and w_ids.max() < limit, key
                torch.testing.assert_close(rest, w_rest, rtol=1e-5, atol=1e-6)
            elif key == "undivided":
                torch.testing.assert_close(ranks[key], 2 * value[..., shard], rtol=1e-5, atol=1e-7)
            else:
                torch.testing.assert_close(ranks[key][0], value[0], rtol=1e-5, atol=1e-6)
                assert torch.equal(ranks[key][0], got[0][key][0]), f"{key}: ranks disagree"
                grad = ranks[key][1]
                assert torch.isfinite(grad).all(), key
                torch.testing.assert_close(grad, value[1][..., shard], rtol=1e-5, atol=1e-7)


# --- the cache on disk --------------------------------------------------------------------------

PROVENANCE = {
    "teacher": "ckpt/teacher",
    "teacher_fingerprint": "abc123",
    "data": ["d/train"],
    "split": "train",
    "data_fingerprint": "f00d",
    "tokenizer_fingerprint": "7e57",
    "seed": 1234,
}


def _samples(n, seq=6, k=4, vocab=V, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, seq, vocab, generator=g) * 3
    log_probs, ids, rest = topk_log_probs(logits, k)
    tokens = torch.randint(0, vocab, (n, seq), generator=g)
    return log_probs, ids, rest, tokens


def _write(path, n=10, batch=3, dtype="float32", per_shard=4, vocab=V, **kw):
    data = _samples(n, vocab=vocab)
    with CacheWriter(
        path,
        k=4,
        temperature=1.0,
        vocab_size=vocab,
        seq_length=6,
        provenance=PROVENANCE,
        dtype=dtype,
        samples_per_shard=per_shard,
        **kw,
    ) as w:
        for start in range(0, n, batch):
            part = slice(start, start + batch)
            w.add(torch.arange(n)[part] + 100, *(x[part] for x in data))
    return data


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_round_trip_across_shards_in_any_order(tmp_path, dtype):
    log_probs, ids, rest, tokens = _write(tmp_path / "cache", dtype=dtype)
    cache = TeacherCache(tmp_path / "cache")
    meta = cache.meta
    assert [s["samples"] for s in meta["shards"]] == [4, 4, 2] and len(cache) == 10
    assert [s["ranges"] for s in meta["shards"]] == [[[100, 104]], [[104, 108]], [[108, 110]]]
    sizes = [(tmp_path / "cache" / s["file"]).stat().st_size for s in meta["shards"]]
    assert [s["bytes"] for s in meta["shards"]] == sizes
    assert cache.bytes_per_position == pytest.approx(sum(sizes) / (10 * 6))
    assert meta["provenance"] == PROVENANCE and meta["dtype"] == dtype
    order = torch.tensor([7, 0, 9, 3, 4, 8, 3])  # across all shards, one twice
    got_lp, got_ids, got_rest = cache.lookup(order + 100, tokens[order])
    assert got_lp.dtype == got_rest.dtype == torch.float32 and got_ids.dtype == torch.int64
    assert torch.equal(got_ids, ids[order])
    if dtype == "float32":
        assert torch.equal(got_lp, log_probs[order]) and torch.equal(got_rest, rest[order])
    else:  # exactly the float16 rounding, i.e. within 2^-11 relative
        assert torch.equal(got_lp, log_probs[order].half().float())
        assert torch.equal(got_rest, rest[order].half().float())
        torch.testing.assert_close(got_lp, log_probs[order], rtol=2**-11, atol=1e-7)


@pytest.mark.parametrize(("vocab", "dtype"), [(65536, np.uint16), (65537, np.uint32)])
def test_index_dtype_is_the_smallest_that_holds_the_vocabulary(tmp_path, vocab, dtype):
    ids = torch.full((1, 6, 4), vocab - 1)
    with CacheWriter(
        tmp_path / "c", k=4, temperature=1.0, vocab_size=vocab, seq_length=6, provenance={}
    ) as writer:
        writer.add([0], torch.zeros(1, 6, 4), ids, torch.zeros(1, 6), torch.zeros(1, 6))
    cache = TeacherCache(tmp_path / "c")
    assert cache.meta["index_dtype"] == np.dtype(dtype).name
    with np.load(tmp_path / "c" / "shard_00000.npz") as npz:
        assert npz["indices"].dtype == dtype
    assert torch.equal(cache.lookup([0])[1], ids)
    with pytest.raises(ConfigError, match="outside 0..511"):
        with CacheWriter(
            tmp_path / "d", k=4, temperature=1.0, vocab_size=512, seq_length=6, provenance={}
        ) as writer:
            writer.add([0], torch.zeros(1, 6, 4), ids, torch.zeros(1, 6), torch.zeros(1, 6))
    assert not (tmp_path / "d").exists()


def test_check_names_the_first_differing_field(tmp_path):
    _write(tmp_path / "cache")
    cache = TeacherCache(tmp_path / "cache")
    expected = dict(PROVENANCE, k=4, seq_length=6, temperature=1.0, vocab_size=V)
    cache.check(expected)
    cache.check({"temperature": 1, "data": ("d/train",)})  # equal after JSON, as stored
    changes = dict(
        k=8,
        seq_length=7,
        temperature=2.0,
        vocab_size=1000,
        teacher="other",
        teacher_fingerprint="zzz",
        data=["e"],
        split="val",
        data_fingerprint="0",
        tokenizer_fingerprint="1",
        seed=1,
    )
    for field, value in changes.items():
        with pytest.raises(ConfigError) as err:
            cache.check(dict(expected, **{field: value}))
        message = str(err.value)
        assert f"{field}={expected[field]!r}" in message and f"{field}={value!r}" in message
        assert FIX in message and "\n" not in message
    with pytest.raises(ConfigError, match="made with student='<not recorded>'"):
        cache.check({"student": "s"})


def test_unreadable_caches_are_refused_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match="is not a teacher cache directory"):
        TeacherCache(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="is not a teacher cache directory"):
        TeacherCache(tmp_path / "empty")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "cache.json").write_text('{"hello": 1}')
    with pytest.raises(ConfigError, match="is not a teacher cache directory"):
        TeacherCache(tmp_path / "other")

    path = tmp_path / "cache"
    _write(path)
    meta = json.loads((path / "cache.json").read_text())
    (path / "cache.json").write_text(json.dumps(dict(meta, format_version=99)))
    with pytest.raises(ConfigError, match="format version 99, this distill_llm reads 1"):
        TeacherCache(path)
    (path / "cache.json").write_text(json.dumps(meta))

    shard = path / "shard_00001.npz"
    blob = shard.read_bytes()
    shard.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ConfigError, match="shard_00001.npz is truncated or corrupt"):
        TeacherCache(path)
    middle = len(blob) // 2  # same size, flipped bits: found when the shard is read
    shard.write_bytes(
        blob[:middle] + bytes(b ^ 0xFF for b in blob[middle : middle + 8]) + blob[middle + 8 :]
    )
    cache = TeacherCache(path)
    cache.lookup([100, 101])  # shard 0 is fine
    with pytest.raises(ConfigError, match="shard_00001.npz is corrupt"):
        cache.lookup([105])
    shard.unlink()
    with pytest.raises(ConfigError, match="shard_00001.npz is missing"):
        TeacherCache(path)


def test_lookup_refuses_changed_tokens_and_unknown_samples(tmp_path):
    *_, tokens = _write(tmp_path / "cache")
    cache = TeacherCache(tmp_path / "cache")
    changed = tokens[[2, 5]].clone()
    changed[1, 3] += 1
    with pytest.raises(
        ConfigError,
        match="sample 105's tokens differ from those the cache was "
        "made from: the data changed; rebuild the cache",
    ):
        cache.lookup([102, 105], changed)
    assert token_checksums(tokens[:1])[0] == zlib.crc32(tokens[0].numpy().astype("<i8").tobytes())
    for missing in (99, 110, -1):
        with pytest.raises(ConfigError, match=f"sample {missing} is not in the teacher cache"):
            cache.lookup([100, missing])


def test_nothing_half_written_is_ever_visible(tmp_path):
    path = tmp_path / "cache"
    log_probs, ids, rest, tokens = _samples(5)
    writer = CacheWriter(
        path, k=4, temperature=1.0, vocab_size=V, seq_length=6, provenance={}, samples_per_shard=2
    )
    writer.add(torch.arange(5), log_probs, ids, rest, tokens)  # two shards already written
    assert not path.exists()
    del writer  # abandoned without close(): its temporary directory goes too
    gc.collect()
    assert not path.exists() and list(tmp_path.iterdir()) == []

    with pytest.raises(RuntimeError):
        with CacheWriter(
            path, k=4, temperature=1.0, vocab_size=V, seq_length=6, provenance={}
        ) as writer:
            writer.add(torch.arange(5), log_probs, ids, rest, tokens)
            raise RuntimeError("the teacher crashed")
    assert list(tmp_path.iterdir()) == []

    with pytest.raises(ConfigError, match="added to the teacher cache twice"):
        with CacheWriter(
            path, k=4, temperature=1.0, vocab_size=V, seq_length=6, provenance={}
        ) as writer:
            writer.add(torch.arange(5), log_probs, ids, rest, tokens)
            writer.add(torch.tensor([9, 3]), log_probs[:2], ids[:2], rest[:2], tokens[:2])
    assert list(tmp_path.iterdir()) == []

    _write(path, n=4)
    with pytest.raises(ConfigError, match="already exists; pass overwrite=True"):
        CacheWriter(path, k=4, temperature=1.0, vocab_size=V, seq_length=6, provenance={})
    _write(path, n=6, overwrite=True)
    assert len(TeacherCache(path)) == 6 and [p.name for p in tmp_path.iterdir()] == ["cache"]


def test_report_bytes_per_position(tmp_path):
    """Compressed bytes per position of a float16 cache for a peaked random teacher, V = 2048,
    seq 128 (print with -s; a real teacher's figure is measured where one runs)."""
    vocab, seq, n = 2048, 128, 8
    g = torch.Generator().manual_seed(0)
    zipf = -1.2 * torch.log1p(torch.randperm(vocab, generator=g).float())  # a fixed unigram
    logits = zipf * 3 + torch.randn(n, seq, vocab, generator=g) * 1.5
    logits[torch.arange(n)[:, None], torch.arange(seq), torch.randint(0, vocab, (n, seq))] += 8
    tokens = torch.randint(0, vocab, (n, seq), generator=g)
    report = []
    for k in (8, 32, 128):
        cache = topk_log_probs(logits, k)
        with CacheWriter(
            tmp_path / f"k{k}",
            k=k,
            temperature=1.0,
            vocab_size=vocab,
            seq_length=seq,
            provenance={},
        ) as writer:
            writer.add(torch.arange(n), *cache, tokens)
        got = TeacherCache(tmp_path / f"k{k}").bytes_per_position
        raw = k * (2 + 2) + 2  # float16 log-prob + uint16 id per entry, float16 rest
        report.append(
            f"k={k}: {got:.1f} B/position (raw {raw}, top-k mass {1 - cache[2].exp().mean():.3f})"
        )
        assert 0.3 * raw < got < raw
    print("\nteacher cache, float16, V=2048, seq 128: " + "; ".join(report))
