"""TP=2 and DP=2 under torchrun (gloo) against TP=1/DP=1, and checkpoints across TP sizes."""

import pytest
import torch
from conftest import OPTIM, STUDENT, TEACHER, run_worker, train_cfg

from distill_llm.engine.run_dir import read_metrics


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One teacher; the same 4-step distillation at TP=1, TP=2 and DP=2 (same global batch)."""
    tmp = tmp_path_factory.mktemp("parallel")
    teacher = str(tmp / "teacher")
    common = dict(
        op="distill",
        teacher=teacher,
        student=STUDENT,
        optim=OPTIM,
        kd=dict(skip_lm_loss=False, temperature=2.0),
        train=train_cfg(steps=4, val_every=2),
    )
    # another loss kind through the chunked vocabulary-parallel path
    jsd = dict(
        common, kd=dict(skip_lm_loss=True, kind="jsd", beta=0.3, temperature=2.0, chunk_size=5)
    )
    # a teacher with 100 more vocabulary rows (padded 1152 at TP=1, 1280 at TP=2; the student
    # 1024 at both): the TP shards cover different ids, so the loss aligns them
    wide = dict(common, teacher=str(tmp / "wide_teacher"))
    # reverse KL with that teacher: plain at TP=1, fused with the output layer at TP=2
    rkl = dict(wide, kd=dict(skip_lm_loss=True, kind="reverse_kl", temperature=2.0))
    rkl_fused = dict(rkl, kd=dict(rkl["kd"], fused_output_layer=True, chunk_size=7))
    run_worker(
        tmp,
        [
            dict(op="init_model", model=TEACHER, output_dir=teacher, seed=11),
            dict(common, output_dir=str(tmp / "tp1")),
            dict(op="logits", checkpoint=str(tmp / "tp1/final"), out=str(tmp / "tp1_at_tp1.pt")),
            dict(jsd, output_dir=str(tmp / "tp1_jsd")),
            dict(
                op="init_model",
                model=dict(TEACHER, vocab_size=1100),
                output_dir=str(tmp / "wide_teacher"),
                seed=11,
            ),  # fmt: skip
            dict(wide, output_dir=str(tmp / "tp1_wide")),
            dict(rkl, output_dir=str(tmp / "tp1_rkl")),
        ],
    )
    run_worker(
        tmp,
        [
            dict(common, output_dir=str(tmp / "tp2"), parallel=dict(tensor_parallel=2)),
            dict(jsd, output_dir=str(tmp / "tp2_jsd"), parallel=dict(tensor_parallel=2)),
            dict(wide, output_dir=str(tmp / "tp2_wide"), parallel=dict(tensor_parallel=2)),
            dict(
                rkl_fused, output_dir=str(tmp / "tp2_rkl_fused"), parallel=dict(tensor_parallel=2)
            ),
            dict(
                op="logits",
                checkpoint=str(tmp / "tp2/final"),
                tensor_parallel=2,
                out=str(tmp / "tp2_at_tp2.pt"),
            ),
            dict(
                op="logits",
                checkpoint=str(tmp / "tp1/final"),
                tensor_parallel=2,
                out=str(tmp / "tp1_at_tp2.pt"),
            ),
            dict(
                op="logits",
                checkpoint=str(tmp / "tp2/final"),
                tensor_parallel=1,
                out=str(tmp / "tp2_at_tp1.pt"),
            ),
        ],
        nproc=2,
    )
    run_worker(tmp, [dict(common, output_dir=str(tmp / "dp2"))], nproc=2)
    return tmp


def _series(run_dir, kind, keys):
    return [[e[k] for k in keys] for e in read_metrics(run_dir, kind)]


TRAIN_KEYS = ["step", "lm_loss", "kd_loss", "grad_norm"]
VALID_KEYS = ["step", "val_lm_loss", "val_kd_loss"]


@pytest.mark.parametrize(
    "other, base",
    [
        ("tp2", "tp1"),
        ("dp2", "tp1"),
        ("tp2_jsd", "tp1_jsd"),
        ("tp2_wide", "tp1_wide"),
        ("tp2_rkl_fused", "tp1_rkl"),
    ],
)
def test_losses_match_single_process(runs, other, base):
    for kind, keys in (("train", TRAIN_KEYS), ("valid", VALID_KEYS)):
        ref = torch.tensor(_series(runs / base, kind, keys), dtype=torch.float64)
        got = torch.tensor(_series(runs / other, kind, keys), dtype=torch.float64)
        assert ref.shape == got.shape and ref.shape[0] >= (4 if kind == "train" else 2)
        if kind == "train":
            # ModelOpt's balancer scales the KD gradient by LM/KD (~370 here), which magnifies
            # float32 summation-order noise in the gradient norm: 5e-5 relative (seen: 1.1e-5)
            torch.testing.assert_close(got[:, -1], ref[:, -1], rtol=5e-5, atol=0)
            got, ref = got[:, :-1], ref[:, :-1]
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    # The losses moved: equality is not the trivial kind.
    kd = [e["kd_loss"] for e in read_metrics(runs / base, "train")]
    assert kd[-1] < kd[0]


def test_checkpoints_reload_across_tp_sizes(runs):
    tp1, tp2 = torch.load(runs / "tp1_at_tp1.pt"), torch.load(runs / "tp2_at_tp2.pt")
    torch.testing.assert_close(torch.load(runs / "tp1_at_tp2.pt"), tp1, rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.load(runs / "tp2_at_tp1.pt"), tp2, rtol=0, atol=1e-5)
    assert tp1.shape == (2, 16, 1000)
