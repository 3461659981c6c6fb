"""Offline teacher logits end to end: cache_teacher, then distill from the cache with no teacher."""

import json

import pytest
import torch
from conftest import OPTIM, STUDENT, TEACHER, run_worker, train_cfg

import distill_llm as dl
from distill_llm.engine.run_dir import read_metrics
from distill_llm.errors import ConfigError
from distill_llm.kd.teacher_cache import TeacherCache

# A teacher with large weights has peaked distributions (top-1 ~0.7, top-32 leaves ~1e-3 of the
# mass at T=1), as trained LMs do; a small-init one would be near uniform.
PEAKED_TEACHER = dict(TEACHER, init_method_std=1.0)
TRAIN = train_cfg(steps=8, val_every=4)
OPTIM_FAST = dict(OPTIM, lr=3e-3)
EXACT = dict(temperature=2.0, skip_lm_loss=False)  # ModelOpt's balancer, T^2 rule


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("offline")
    teacher, student = str(tmp / "teacher"), str(tmp / "student")

    def cache(name, k, temperature, **extra):
        return dict(op="cache_teacher", teacher=teacher, output_dir=str(tmp / name), k=k,
                    temperature=temperature, train=TRAIN, **extra)  # fmt: skip

    def distill(name, kd, **source):
        return dict(op="distill", student_checkpoint=student, kd=kd, train=TRAIN,
                    optim=OPTIM_FAST, output_dir=str(tmp / name), **source)  # fmt: skip

    def evaluate(name, checkpoint):
        return dict(op="evaluate", teacher=teacher, model_checkpoint=checkpoint,
                    train=TRAIN, output_file=str(tmp / f"{name}.json"))  # fmt: skip

    exact = EXACT
    mixed = dict(temperature=1.0, alpha=0.5)
    run_worker(
        tmp,
        [
            dict(op="init_model", model=PEAKED_TEACHER, output_dir=teacher, seed=11),
            dict(op="init_model", model=STUDENT, output_dir=student, seed=12),
            cache("full", k=1000, temperature=2.0, dtype="float32"),
            cache("k32", k=32, temperature=1.0),
            distill("online_exact", exact, teacher=teacher),
            distill("cached_exact", exact, teacher_cache=str(tmp / "full")),
            distill(
                "cached_exact_chunked", dict(exact, chunk_size=5), teacher_cache=str(tmp / "full")
            ),  # fmt: skip
            distill("online_mixed", mixed, teacher=teacher),
            distill(
                "cached_k32",
                dict(mixed, cache_top_k=32),
                teacher_cache=str(tmp / "k32"),
                export_hf=str(tmp / "cached_k32_hf"),
            ),  # fmt: skip
            evaluate("start", student),
            evaluate("online_mixed", str(tmp / "online_mixed/final")),
            evaluate("cached_k32", str(tmp / "cached_k32/final")),
        ],
    )
    run_worker(
        tmp,
        [
            *(
                distill(
                    f"cached_exact_{name}", exact, teacher_cache=str(tmp / "full"), parallel=layout
                )  # fmt: skip
                for name, layout in (
                    ("tp2", dict(tensor_parallel=2)),
                    ("dp2", None),
                    ("pp2", dict(pipeline_parallel=2)),
                )
            ),
            cache("k32_dp2", k=32, temperature=1.0),
            cache("k32_tp2", k=32, temperature=1.0, parallel=dict(tensor_parallel=2)),
        ],
        nproc=2,
    )
    return tmp


def _series(run_dir, kind, keys):
    rows = [[e[k] for k in keys] for e in read_metrics(run_dir, kind)]
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.parametrize(
    "cached",
    [
        "cached_exact",
        "cached_exact_chunked",
        "cached_exact_tp2",
        "cached_exact_dp2",
        "cached_exact_pp2",
    ],
)
def test_cache_of_the_whole_vocabulary_trains_like_the_online_teacher(runs, cached):
    """k = vocabulary, float32: the same per-step losses and gradient norms as online KD
    (T=2, LM + balanced KD), in one process (all positions at once, or 5 at a time) and at
    TP=2, DP=2 and PP=2 (a cache made by one process)."""
    for kind, keys in (
        ("train", ["step", "lm_loss", "kd_loss", "grad_norm"]),
        ("valid", ["step", "val_lm_loss", "val_kd_loss"]),
    ):
        ref, got = _series(runs / "online_exact", kind, keys), _series(runs / cached, kind, keys)
        assert ref.shape == got.shape and ref.shape[0] >= 3
        if kind == "train":  # balancer-amplified float noise in the norm, as in test_parallel
            torch.testing.assert_close(got[:, -1], ref[:, -1], rtol=5e-5, atol=0)
            got, ref = got[:, :-1], ref[:, :-1]
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    kd = [e["val_kd_loss"] for e in read_metrics(runs / "online_exact", "valid")]
    assert kd[-1] < kd[0] - 0.01  # it learned: the equality is not that of a frozen run


def test_small_k_cache_stays_close_to_online_kd(runs):
    """k=32 of 1000 ids (float16): the student gets nearly all of online KD's improvement,
    judged by the true full-vocabulary KL to the teacher on held-out data."""
    start, online, cached = (
        json.loads((runs / f"{n}.json").read_text())
        for n in ("start", "online_mixed", "cached_k32")
    )
    gain_online = start["kl_to_teacher"] - online["kl_to_teacher"]
    gain_cached = start["kl_to_teacher"] - cached["kl_to_teacher"]
    print(f"KL to teacher: start {start['kl_to_teacher']:.4f}, online "
          f"{online['kl_to_teacher']:.4f}, cache k=32 {cached['kl_to_teacher']:.4f}")  # fmt: skip
    # KD moved the student (8 steps against a random teacher: small, but far above float noise)
    assert gain_online > 0.01
    assert gain_cached > 0.9 * gain_online
    assert abs(cached["val_loss"] - online["val_loss"]) < 0.01 * online["val_loss"]
    # a run with no teacher still ends with its Hugging Face export
    assert json.loads((runs / "cached_k32_hf/config.json").read_text())["model_type"] == "llama"


def test_cache_is_the_same_when_made_by_two_data_parallel_ranks(runs):
    one, two = TeacherCache(runs / "k32" / "train"), TeacherCache(runs / "k32_dp2" / "train")
    ids = list(range(len(one)))
    assert len(one) == len(two) == TRAIN["steps"] * TRAIN["global_batch_size"]
    for a, b in zip(one.lookup(ids), two.lookup(ids)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    bpp = one.bytes_per_position
    assert 0 < bpp < 32 * 4 + 2  # float16 log-probs + uint16 ids, compressed
    print(f"k=32 cache: {bpp:.1f} bytes per position")


def test_cache_made_at_tp2_matches_one_process(runs):
    """Top-k over two vocabulary shards: the same ids and log-probs (float16 storage; the
    normaliser is summed in another order, so ties aside, equal to fp16 rounding)."""
    one, two = TeacherCache(runs / "k32" / "train"), TeacherCache(runs / "k32_tp2" / "train")
    ids = list(range(len(one)))
    (lp1, idx1, rest1), (lp2, idx2, rest2) = one.lookup(ids), two.lookup(ids)
    # one float16 step apart at most: a step is 2^-10 of the value (10 mantissa bits), e.g.
    # 0.0078 for log-probs in [-16, -8) and 0.0156 in [-32, -16) (both seen)
    one_step = dict(rtol=2**-10, atol=2**-14)
    torch.testing.assert_close(lp2, lp1, **one_step)
    torch.testing.assert_close(rest2, rest1, **one_step)
    assert (idx1 == idx2).float().mean() > 0.999
    assert set(idx2[..., 0].unique().tolist()) - set(range(500, 1000))  # ids from both shards
    assert set(idx2[..., 0].unique().tolist()) & set(range(500, 1000))


def test_a_cache_fed_run_killed_after_a_save_resumes_exactly(runs):
    job = dict(
        op="distill", student_checkpoint=str(runs / "student"), kd=EXACT,
        train=dict(TRAIN, save_every=4), optim=OPTIM_FAST, output_dir=str(runs / "resumed"),
        teacher_cache=str(runs / "full"),
    )  # fmt: skip
    killed = run_worker(runs, [job], kill={"after_save": 1}, expect_ok=False)
    assert killed.returncode != 0 and not (runs / "resumed/final").exists()
    assert "at step 4" in run_worker(runs, [job]).stdout
    keys = ["step", "lm_loss", "kd_loss", "lr", "grad_norm"]
    straight = _series(runs / "cached_exact", "train", keys)
    resumed = _series(runs / "resumed", "train", keys)
    assert resumed.shape == (8, 5)
    torch.testing.assert_close(resumed, straight, rtol=0, atol=0)


def _refusal(runs, tmp_path, **overrides) -> str:
    args = dict(
        teacher_cache=str(runs / "full"),
        student_checkpoint=str(runs / "student"),
        kd=dl.KDConfig(temperature=2.0),
        train=dl.TrainConfig(**TRAIN),
        output_dir=str(tmp_path / "run"),
    )
    args.update(overrides)
    with pytest.raises(ConfigError) as err:
        dl.distill(**args)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()
    return str(err.value)


def test_a_cache_made_differently_is_refused(runs, tmp_path):
    def msg(**overrides):
        return _refusal(runs, tmp_path, **overrides)

    assert "temperature=2.0 but this run has temperature=1.0" in msg(
        kd=dl.KDConfig(temperature=1.0)
    )
    assert "k=1000 but this run has k=16" in msg(kd=dl.KDConfig(temperature=2.0, cache_top_k=16))
    assert "seq_length=32 but this run has seq_length=16" in msg(
        train=dl.TrainConfig(**dict(TRAIN, seq_length=16))
    )
    assert "samples=" in msg(train=dl.TrainConfig(**dict(TRAIN, steps=9)))
    # another teacher checkpoint than the one the cache was made from
    assert "teacher=" in msg(teacher=str(runs / "student"))
    assert "rebuild it with cache_teacher" in msg(kd=dl.KDConfig(temperature=1.0))


def test_bad_offline_settings_are_refused(runs, tmp_path):
    pairs = [["decoder.final_layernorm", "decoder.final_layernorm"]]
    assert "intermediate_pairs need the teacher's hidden states" in _refusal(
        runs, tmp_path, kd=dl.KDConfig(temperature=2.0, intermediate_pairs=pairs)
    )
    assert "is not a teacher cache" in _refusal(runs, tmp_path, teacher_cache=str(runs / "student"))
    assert "needs teacher= (a checkpoint" in _refusal(runs, tmp_path, teacher_cache=None)
    teacher = str(runs / "teacher")
    for kwargs, words in (
        (dict(k=1001), "k must be between 1 and the vocabulary size 1000"),
        (dict(dtype="int8"), "dtype 'int8' is not supported"),
        (dict(output_dir=str(runs / "full")), "exists; choose a new directory"),
        (dict(vocab_limit=5000), "vocab_limit must be between 1 and the teacher's vocabulary"),
    ):
        args = {**dict(teacher=teacher, output_dir=str(tmp_path / "c"), k=8), **kwargs}
        with pytest.raises(ConfigError, match=words):
            dl.cache_teacher(**args)
        assert not (tmp_path / "c").exists()
