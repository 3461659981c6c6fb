"""Resume after a kill gives the uninterrupted run exactly; a kill mid-save loses nothing."""

import hashlib

import pytest
import torch
from conftest import OPTIM, STUDENT, TEACHER, run_worker, train_cfg

from distill_llm.engine.run_dir import read_metrics

KEYS = ["step", "lm_loss", "kd_loss", "lr", "grad_norm"]


def _job(tmp, run_dir, save_every):
    return dict(
        op="distill",
        teacher=str(tmp / "teacher"),
        student=STUDENT,
        optim=OPTIM,
        kd=dict(skip_lm_loss=False),
        output_dir=str(tmp / run_dir),
        train=train_cfg(steps=6, save_every=save_every, val_every=3),
    )


def _final_weights(path):
    from megatron.core import dist_checkpointing

    from distill_llm.engine import parallel

    parallel.initialize(parallel.ParallelConfig(), seed=0)
    return dist_checkpointing.load_plain_tensors(str(path))


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    run_worker(
        tmp,
        [
            dict(op="init_model", model=TEACHER, output_dir=str(tmp / "teacher"), seed=3),
            _job(tmp, "straight", save_every=3),
        ],
    )
    return tmp


def test_kill_and_resume_matches_uninterrupted_run(tmp):
    killed = run_worker(
        tmp, [_job(tmp, "resumed", save_every=3)], kill={"after_save": 1}, expect_ok=False
    )
    assert killed.returncode != 0
    assert [e["step"] for e in read_metrics(tmp / "resumed", "train")] == [1, 2, 3]
    assert (tmp / "resumed/checkpoints/latest").read_text() == "iter_0000003"
    assert not (tmp / "resumed/final").exists()

    out = run_worker(tmp, [_job(tmp, "resumed", save_every=3)])
    assert "resumed from" in out.stdout and "at step 3" in out.stdout
    straight = [[e[k] for k in KEYS] for e in read_metrics(tmp / "straight", "train")]
    resumed = [[e[k] for k in KEYS] for e in read_metrics(tmp / "resumed", "train")]
    assert len(straight) == 6
    assert resumed == straight  # bit-identical floats, step by step
    a, b = _final_weights(tmp / "straight/final"), _final_weights(tmp / "resumed/final")
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_kill_during_save_keeps_previous_checkpoint(tmp):
    killed = run_worker(
        tmp, [_job(tmp, "midsave", save_every=2)], kill={"during_save": 2}, expect_ok=False
    )
    assert killed.returncode != 0
    ckpts = tmp / "midsave/checkpoints"
    assert ckpts.is_dir(), killed.stdout + killed.stderr[-3000:]
    assert (ckpts / "latest").read_text() == "iter_0000002"
    assert (ckpts / "iter_0000004.tmp").is_dir()  # the half-written save, never committed
    assert not (ckpts / "iter_0000004").exists()

    out = run_worker(tmp, [_job(tmp, "midsave", save_every=2)])
    assert "at step 2" in out.stdout
    assert not (ckpts / "iter_0000004.tmp").exists()
    straight = [[e[k] for k in KEYS] for e in read_metrics(tmp / "straight", "train")]
    got = {e["step"]: [e[k] for k in KEYS] for e in read_metrics(tmp / "midsave", "train")}
    assert [got[s] for s in range(1, 7)] == straight


def test_teacher_checkpoint_is_only_read(tmp):
    digest = {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted((tmp / "teacher").rglob("*"))
        if p.is_file()
    }
    assert digest  # compared with the state after the two runs above and one more
    run_worker(tmp, [_job(tmp, "again", save_every=0)])
    after = {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted((tmp / "teacher").rglob("*"))
        if p.is_file()
    }
    assert after == digest


def test_distributed_optimizer_resume_at_dp2(tmp):
    """DP=2 with megatron's distributed optimizer (sharded Adam states) resumes exactly too."""

    def job(run_dir):
        return dict(
            _job(tmp, run_dir, save_every=2),
            train=train_cfg(steps=4, save_every=2),
            parallel=dict(use_distributed_optimizer=True),
        )

    run_worker(tmp, [job("dist_straight")], nproc=2)
    run_worker(tmp, [job("dist_resumed")], nproc=2, kill={"after_save": 1}, expect_ok=False)
    assert (tmp / "dist_resumed/checkpoints/latest").read_text() == "iter_0000002"
    run_worker(tmp, [job("dist_resumed")], nproc=2)
    straight = [[e[k] for k in KEYS] for e in read_metrics(tmp / "dist_straight", "train")]
    resumed = [[e[k] for k in KEYS] for e in read_metrics(tmp / "dist_resumed", "train")]
    assert len(straight) == 4 and resumed == straight
    a, b = _final_weights(tmp / "dist_straight/final"), _final_weights(tmp / "dist_resumed/final")
    assert all(torch.equal(a[k], b[k]) for k in a)


class _Payload:
    """Unpickling this creates the file `marker`: what a hostile RNG file could do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_crafted_rng_file_is_refused_not_executed(tmp):
    import shutil

    crafted = tmp / "crafted" / "checkpoints"
    crafted.mkdir(parents=True)
    shutil.copytree(tmp / "straight/checkpoints/iter_0000003", crafted / "iter_0000003")
    (crafted / "latest").write_text("iter_0000003")
    marker = tmp / "code_ran"
    rng = crafted / "iter_0000003/rng/rank_0.pt"
    # the checkpoint as written loads weights-only (no pickled objects in our RNG files)
    assert set(torch.load(rng, weights_only=True)) >= {"python", "numpy", "torch", "tracker"}
    torch.save({"python": _Payload(str(marker))}, rng)
    out = run_worker(tmp, [_job(tmp, "crafted", save_every=3)], expect_ok=False)
    assert out.returncode != 0
    assert "is not an RNG state file distill_llm wrote" in out.stderr
    assert not marker.exists()
