"""Pipeline parallel: KD at PP=2 and PP=2 x TP=2 (torchrun, gloo) against PP=1, same weights."""

import pytest
import torch
from conftest import OPTIM, STUDENT, TEACHER, run_worker, train_cfg

from distill_llm.engine.run_dir import read_metrics

# Four layers each, so every stage holds two; the student is narrower than the teacher, so the
# intermediate pair goes through ModelOpt's learned projection.
TEACHER4 = dict(TEACHER, num_layers=4)
STUDENT4 = dict(STUDENT, num_layers=4)
PAIRS = [["decoder.layers.3", "decoder.layers.3", "mse"], ["decoder.final_layernorm"] * 2]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One teacher and one student checkpoint (written at PP=1); the same 4 KD steps at PP=1,
    PP=2 and PP=2 x TP=2, starting from them."""
    tmp = tmp_path_factory.mktemp("pipeline")
    teacher, student = str(tmp / "teacher"), str(tmp / "student")
    common = dict(
        op="distill",
        teacher=teacher,
        student_checkpoint=student,
        # Adam's eps sets how much rounding noise in near-zero gradients moves a weight: with
        # |g| ~ eps the update is ~lr * g / eps, and the layouts' float32 sums of such a g differ
        # by rounding (measured: an embedding entry with |g| ~ 1e-8, 20% apart between PP=1 and
        # PP=2 x TP=2, moved 1.5e-5 apart in 4 steps at eps=1e-8). At eps=1e-4 a rounding-sized
        # gradient difference moves a weight by at most lr / eps x that, far below 1e-5.
        optim=dict(OPTIM, eps=1e-4),
        kd=dict(skip_lm_loss=False, temperature=2.0, intermediate_pairs=PAIRS),
        train=train_cfg(steps=4, val_every=2, global_batch_size=8),
    )
    run_worker(
        tmp,
        [
            dict(op="init_model", model=TEACHER4, output_dir=teacher, seed=11),
            dict(op="init_model", model=STUDENT4, output_dir=student, seed=12),
            dict(common, output_dir=str(tmp / "pp1")),
        ],
    )
    run_worker(
        tmp,
        [dict(common, output_dir=str(tmp / "pp2"), parallel=dict(pipeline_parallel=2))],
        nproc=2,
    )
    both = dict(pipeline_parallel=2, tensor_parallel=2)
    run_worker(tmp, [dict(common, output_dir=str(tmp / "pp2tp2"), parallel=both)], nproc=4)
    run_worker(
        tmp,
        [
            dict(op="logits", checkpoint=str(tmp / f"{run}/final"), out=str(tmp / f"{run}.pt"))
            for run in ("pp1", "pp2", "pp2tp2")
        ],
    )
    return tmp


def _series(run_dir, kind, keys):
    return torch.tensor(
        [[e[k] for k in keys] for e in read_metrics(run_dir, kind)], dtype=torch.float64
    )


@pytest.mark.parametrize("layout", ["pp2", "pp2tp2"])
def test_kd_losses_match_pp1(runs, layout):
    keys = {
        "train": ["step", "lm_loss", "kd_loss", "intermediate_loss", "grad_norm"],
        "valid": ["step", "val_lm_loss", "val_kd_loss", "val_intermediate_loss"],
    }
    for kind, names in keys.items():
        ref, got = _series(runs / "pp1", kind, names), _series(runs / layout, kind, names)
        assert ref.shape == got.shape and ref.shape[0] >= (4 if kind == "train" else 3)
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    train = read_metrics(runs / "pp1", "train")
    assert train[-1]["kd_loss"] < train[0]["kd_loss"]  # it learned: not a trivial equality
    assert all(e["intermediate_loss"] > 0 for e in train)


@pytest.mark.parametrize("layout", ["pp2", "pp2tp2"])
def test_final_students_match_pp1(runs, layout):
    """Each run's final student, reloaded in one process, gives the PP=1 run's logits."""
    ref = torch.load(runs / "pp1.pt")
    torch.testing.assert_close(torch.load(runs / f"{layout}.pt"), ref, rtol=0, atol=1e-5)
    assert ref.shape == (2, 16, 1000)


def test_pair_off_the_last_stage_is_refused(tmp_path):
    from distill_llm import KDConfig, ModelConfig, checks
    from distill_llm.errors import ConfigError

    cfg = KDConfig(intermediate_pairs=[["decoder.layers.1", "decoder.layers.3"]])
    with pytest.raises(ConfigError, match="not on the last pipeline stage") as err:
        checks.check_pipeline_pairs(cfg, ModelConfig(**STUDENT4), ModelConfig(**TEACHER4), 2)
    assert "decoder.layers.2-3" in str(err.value)
    checks.check_pipeline_pairs(cfg, ModelConfig(**STUDENT4), ModelConfig(**TEACHER4), 1)
