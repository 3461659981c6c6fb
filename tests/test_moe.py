"""Mixture-of-experts teachers and students in KD: MoE -> dense and MoE -> MoE give the same
per-step losses, router losses, gradient norms and validation losses at EP=2 and at DP=2 as in
one process; an MoE teacher's full-vocabulary cache trains like the online teacher; an MoE
student killed after a save resumes bit-identically; bad MoE layouts are refused in one line.
(Hugging Face MoE families in and out: tests/test_hf_moe.py.)"""

import pytest
import torch
from conftest import OPTIM, STUDENT, TEACHER, run_worker, train_cfg

import distill_llm as dl
from distill_llm.engine.run_dir import read_metrics

MOE_TEACHER = dict(TEACHER, num_experts=4, moe_topk=2, moe_ffn_hidden_size=64, init_method_std=0.5)
MOE_STUDENT = dict(STUDENT, num_experts=4, moe_topk=2, moe_ffn_hidden_size=32,
                   moe_aux_loss_coeff=0.01, moe_z_loss_coeff=0.001)  # fmt: skip
# as wide as the teacher, so hidden states pair up without a projection
MOE_STUDENT_WIDE = dict(MOE_STUDENT, hidden_size=64)
PAIRS = [["decoder.layers.1", "decoder.layers.1", "cosine"], ["decoder.final_layernorm"] * 2]
TRAIN = train_cfg(steps=4, val_every=2, save_every=2)
OPTIM_FAST = dict(OPTIM, lr=3e-3)
KD = dict(temperature=2.0, skip_lm_loss=False)  # LM + KD through ModelOpt's balancer, T^2
KD_ONLY = dict(temperature=2.0, kind="reverse_kl")  # the KD loss alone (what fusing needs)
TRAIN_KEYS = ["step", "lm_loss", "kd_loss", "grad_norm"]
VALID_KEYS = ["step", "val_lm_loss", "val_kd_loss"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("moe")
    teacher = str(tmp / "teacher")

    def distill(name, student, **extra):
        # an MoE student starts from a checkpoint: megatron draws each EP rank's experts from
        # its own RNG stream, so a fresh one would differ between EP=1 and EP=2
        checkpoints = {id(MOE_STUDENT): "moe_student", id(MOE_STUDENT_WIDE): "moe_student_wide"}
        start = {}
        if id(student) in checkpoints:
            start = dict(student_checkpoint=str(tmp / checkpoints[id(student)]))
        extra = {"kd": KD, **extra}
        return dict(op="distill", student=None if start else student, train=TRAIN,
                    optim=OPTIM_FAST, output_dir=str(tmp / name), **start, **extra)  # fmt: skip

    run_worker(
        tmp,
        [
            dict(op="init_model", model=MOE_TEACHER, output_dir=teacher, seed=21),
            dict(op="init_model", model=TEACHER, output_dir=str(tmp / "dense_teacher"), seed=24),
            dict(op="init_model", model=MOE_STUDENT, output_dir=str(tmp / "moe_student"), seed=22),
            dict(
                op="init_model",
                model=MOE_STUDENT_WIDE,
                output_dir=str(tmp / "moe_student_wide"),
                seed=23,
            ),  # fmt: skip
            dict(
                op="cache_teacher",
                teacher=teacher,
                output_dir=str(tmp / "cache"),
                k=1000,
                temperature=2.0,
                dtype="float32",
                train=TRAIN,
            ),  # fmt: skip
            distill("dense", STUDENT, teacher=teacher),
            distill("moe", MOE_STUDENT, teacher=teacher),
            distill("moe_cached", MOE_STUDENT, teacher_cache=str(tmp / "cache")),
            distill("moe_kd_only", MOE_STUDENT, teacher=teacher, kd=KD_ONLY),
            distill("dense_to_moe", MOE_STUDENT, teacher=str(tmp / "dense_teacher")),
            distill(
                "moe_fused",
                MOE_STUDENT,
                teacher=teacher,
                kd=dict(KD_ONLY, fused_output_layer=True, chunk_size=7),
            ),  # fmt: skip
            distill(
                "moe_pairs",
                MOE_STUDENT_WIDE,
                teacher=teacher,
                kd=dict(KD, intermediate_pairs=PAIRS),
            ),  # fmt: skip
        ],
    )
    ep2 = dict(expert_parallel=2)
    run_worker(
        tmp,
        [
            distill("dense_ep2", STUDENT, teacher=teacher, parallel=ep2),
            distill("moe_ep2", MOE_STUDENT, teacher=teacher, parallel=ep2),
            distill("moe_dp2", MOE_STUDENT, teacher=teacher),
            distill(
                "moe_pairs_ep2",
                MOE_STUDENT_WIDE,
                teacher=teacher,
                parallel=ep2,
                kd=dict(KD, intermediate_pairs=PAIRS),
            ),  # fmt: skip
        ],
        nproc=2,
    )
    return tmp


def _series(run_dir, kind, keys):
    rows = [[e[k] for k in keys] for e in read_metrics(run_dir, kind)]
    return torch.tensor(rows, dtype=torch.float64)


def _assert_same_run(ref_dir, got_dir, keys=TRAIN_KEYS):
    for kind, names in (("train", keys), ("valid", VALID_KEYS)):
        ref, got = _series(ref_dir, kind, names), _series(got_dir, kind, names)
        assert ref.shape == got.shape and ref.shape[0] >= 3, (ref.shape, got.shape)
        if kind == "train":  # the norm sums squares over differently split buffers
            torch.testing.assert_close(got[:, 3], ref[:, 3], rtol=5e-5, atol=0)
            got, ref = (
                torch.cat([got[:, :3], got[:, 4:]], 1),
                torch.cat([ref[:, :3], ref[:, 4:]], 1),
            )
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "ref,got",
    [("dense", "dense_ep2"), ("moe", "moe_ep2"), ("moe", "moe_dp2")],
)
def test_moe_kd_is_the_same_at_ep2_and_dp2(runs, ref, got):
    """MoE teacher -> dense student and MoE -> MoE, 4 steps: per-step LM, KD and router losses,
    gradient norms and validation losses at EP=2 (2 processes) and at DP=2 equal one process's."""
    keys = TRAIN_KEYS + (["moe_aux_loss", "moe_z_loss"] if ref.startswith("moe") else [])
    _assert_same_run(runs / ref, runs / got, keys)
    kd = [e["val_kd_loss"] for e in read_metrics(runs / ref, "valid")]
    assert kd[-1] < kd[0] - 1e-3  # it learned (>> the 1e-5 tolerance): not a frozen run


def test_fused_kd_and_intermediate_pairs_work_with_moe(runs):
    """KD fused with the output layer equals the plain chunked KD for an MoE student and
    teacher; a layer's output and the final layernorm as intermediate pairs train, the same
    at EP=2 as in one process."""
    keys = TRAIN_KEYS + ["moe_aux_loss", "moe_z_loss"]
    _assert_same_run(runs / "moe_kd_only", runs / "moe_fused", keys)
    keys = TRAIN_KEYS + ["intermediate_loss", "moe_aux_loss", "moe_z_loss"]
    _assert_same_run(runs / "moe_pairs", runs / "moe_pairs_ep2", keys)
    inter = [e["intermediate_loss"] for e in read_metrics(runs / "moe_pairs", "train")]
    assert all(x > 0 for x in inter) and inter[-1] < inter[0]


def test_a_dense_teacher_distils_into_an_moe_student(runs):
    train = read_metrics(runs / "dense_to_moe", "train")
    assert all(e["moe_aux_loss"] > 0 for e in train)
    kd = [e["val_kd_loss"] for e in read_metrics(runs / "dense_to_moe", "valid")]
    assert kd[-1] < kd[0]


def test_an_moe_students_router_losses_are_logged_and_in_its_gradient(runs):
    """moe_aux_loss / moe_z_loss are logged for an MoE student (the load-balancing loss near
    1, its value for evenly spread tokens), not for a dense one."""
    moe = read_metrics(runs / "moe", "train")
    assert all(e["moe_aux_loss"] > 0 and e["moe_z_loss"] > 0 for e in moe)
    assert all(0.99 <= e["moe_aux_loss"] < 2.0 for e in moe)
    assert all("moe_aux_loss" not in e for e in read_metrics(runs / "dense", "train"))


def test_moe_teacher_cache_of_the_whole_vocabulary_trains_like_the_online_teacher(runs):
    keys = TRAIN_KEYS + ["moe_aux_loss", "moe_z_loss"]
    _assert_same_run(runs / "moe", runs / "moe_cached", keys)


def test_an_moe_student_killed_after_a_save_resumes_exactly(runs):
    job = dict(op="distill", teacher=str(runs / "teacher"), kd=KD, train=TRAIN,
               student_checkpoint=str(runs / "moe_student"), optim=OPTIM_FAST,
               output_dir=str(runs / "moe_resumed"))  # fmt: skip
    killed = run_worker(runs, [job], kill={"after_save": 1}, expect_ok=False)
    assert killed.returncode != 0
    assert [e["step"] for e in read_metrics(runs / "moe_resumed", "train")] == [1, 2]
    out = run_worker(runs, [job])
    assert "resumed from" in out.stdout
    keys = TRAIN_KEYS + ["moe_aux_loss", "moe_z_loss", "lr"]
    straight = [[e[k] for k in keys] for e in read_metrics(runs / "moe", "train")]
    resumed = [[e[k] for k in keys] for e in read_metrics(runs / "moe_resumed", "train")]
    assert resumed == straight  # bit-identical floats, step by step
    from megatron.core import dist_checkpointing

    from distill_llm.engine import parallel

    parallel.initialize(parallel.ParallelConfig(), seed=0)
    a = dist_checkpointing.load_plain_tensors(str(runs / "moe/final"))
    b = dist_checkpointing.load_plain_tensors(str(runs / "moe_resumed/final"))
    assert a.keys() == b.keys() and any("local_experts" in k or "experts" in k for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key


BAD = [
    (dict(num_experts=6), dict(expert_parallel=4), 8,
     "num_experts 6 is not divisible by expert_parallel 4"),
    (dict(), dict(expert_parallel=4), 2, "world size 2 is not divisible by expert_parallel x"),
    (dict(moe_topk=5), dict(), 1, "moe_topk must be between 1 and num_experts 4"),
    (dict(moe_layers=[1]), dict(), 1, "moe_layers must list 0 (dense) or 1 (MoE)"),
    (dict(moe_shared_expert_gate=True), dict(), 1, "moe_shared_expert_gate needs"),
    (dict(moe_aux_loss_coeff=-1.0), dict(), 1, "coefficients must be >= 0"),
    (dict(), dict(expert_parallel=0), 1, "expert_parallel must be at least 1"),
]  # fmt: skip


@pytest.mark.parametrize("student,layout,world,message", BAD)
def test_bad_moe_layouts_are_refused_in_one_line(runs, tmp_path, student, layout, world, message):
    from distill_llm import checks

    with pytest.raises(dl.ConfigError) as err:
        checks.check_distill(
            teacher=str(runs / "teacher"), student=dl.ModelConfig(**{**MOE_STUDENT, **student}),
            student_checkpoint=None, kd=dl.KDConfig(), data=dl.DataConfig(),
            train=dl.TrainConfig(**dict(TRAIN, global_batch_size=16)), optim=dl.OptimConfig(),
            parallel=dl.ParallelConfig(**layout), world_size=world,
            output_dir=str(tmp_path / "run"),
        )  # fmt: skip
    assert message in str(err.value) and "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_expert_parallel_without_an_moe_model_is_refused(tmp_path):
    from distill_llm import checks

    with pytest.raises(dl.ConfigError, match="needs a mixture-of-experts model") as err:
        checks.check_pretrain(
            model=dl.ModelConfig(**STUDENT), init_checkpoint=None, data=dl.DataConfig(),
            train=dl.TrainConfig(**TRAIN), optim=dl.OptimConfig(),
            parallel=dl.ParallelConfig(expert_parallel=2), world_size=2,
        )  # fmt: skip
    assert "\n" not in str(err.value) and list(tmp_path.iterdir()) == []
