"""Distillation behaviour: the student learns, the teacher is untouched, final/ is student-only,
and every bad input is refused up front with one line."""

import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import OPTIM, STUDENT, TEACHER, run_worker, train_cfg

from distill_llm import KDConfig, ModelConfig, ParallelConfig, TrainConfig, distill, pretrain
from distill_llm.engine.run_dir import read_metrics
from distill_llm.errors import ConfigError

# A random teacher with larger weights makes peaked, input-dependent predictions worth imitating;
# a 128-token vocabulary lets 50 steps show each token often. The student has half the layers.
SHARP_TEACHER = dict(TEACHER, init_method_std=0.1, vocab_size=128)
SMALL_STUDENT = dict(TEACHER, num_layers=1, vocab_size=128)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("distill")
    run_worker(
        tmp,
        [
            dict(op="init_model", model=SHARP_TEACHER, output_dir=str(tmp / "teacher"), seed=9),
            dict(
                op="distill",
                teacher=str(tmp / "teacher"),
                student=SMALL_STUDENT,
                output_dir=str(tmp / "run"),
                optim=dict(OPTIM, lr=1e-2, warmup_steps=5),
                kd=dict(skip_lm_loss=True),
                train=train_cfg(
                    steps=50, val_every=25, val_batches=2, micro_batch_size=4, global_batch_size=8
                ),
            ),
            dict(op="logits", checkpoint=str(tmp / "teacher"), out=str(tmp / "teacher_logits.pt")),
        ],
        teacher_out=str(tmp / "teacher_after.pt"),
    )
    return tmp


def test_distillation_halves_held_out_kd_loss(run):
    valid = read_metrics(run / "run", "valid")
    assert [v["step"] for v in valid] == [0, 25, 50]
    assert valid[-1]["val_kd_loss"] <= 0.5 * valid[0]["val_kd_loss"], valid


def test_metrics_contract(run):
    train = read_metrics(run / "run", "train")
    assert [e["step"] for e in train] == list(range(1, 51))
    for key in (
        "lm_loss",
        "kd_loss",
        "intermediate_loss",
        "lr",
        "grad_norm",
        "tokens_per_s",
        "eta_s",
    ):
        assert all(isinstance(e[key], float) for e in train), key
    assert train[0]["lr"] < train[4]["lr"] and train[-1]["lr"] < train[4]["lr"]  # warm-up, decay
    valid = read_metrics(run / "run", "valid")[-1]
    assert valid["val_ppl"] == pytest.approx(torch.tensor(valid["val_lm_loss"]).exp().item())
    assert (run / "run/config.yaml").read_text().startswith("entry_point: distill")
    assert list((run / "run/tb").glob("events.out.tfevents.*"))
    assert (run / "run/checkpoints/latest").read_text() == "iter_0000050"


def test_teacher_weights_bitwise_unchanged(run):
    from distill_llm.engine import parallel
    from distill_llm.engine.model import build_gpt
    from distill_llm.formats import paths

    parallel.initialize(ParallelConfig(), seed=0)
    after = torch.load(run / "teacher_after.pt")  # the in-memory teacher when training ended
    cfg = ModelConfig(**SHARP_TEACHER)
    stored = build_gpt(cfg)
    paths.load_model(run / "teacher", stored, cfg, role="teacher")
    stored = stored.state_dict()
    names = [k for k in after if not k.endswith("_extra_state")]
    assert len(names) == len([k for k in stored if not k.endswith("_extra_state")]) > 0
    for name in names:
        assert torch.equal(after[name], stored[name]), name


def test_final_holds_the_student_alone(run):
    from megatron.core import dist_checkpointing

    from distill_llm.engine import checkpoint, parallel
    from distill_llm.engine.model import build_gpt

    parallel.initialize(ParallelConfig(), seed=0)
    final = dist_checkpointing.load_plain_tensors(str(run / "run/final"))
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    student = build_gpt(ModelConfig(**SMALL_STUDENT)).sharded_state_dict().values()
    keys = {sh.key for sh in student if isinstance(sh, (ShardedTensor, ShardedTensorFactory))}
    assert set(final) == keys
    assert not [k for k in final if "teacher" in k]
    # Layers are stacked on a leading axis: a 2-layer teacher tensor cannot pass for the
    # 1-layer student's.
    assert {k: v.shape[0] for k, v in final.items() if k.startswith("decoder.layers.")} == {
        k: 1 for k in keys if k.startswith("decoder.layers.")
    }
    assert checkpoint.model_config_of(run / "run/final") == ModelConfig(**SMALL_STUDENT)


# -- bad inputs: one line each, raised before any process group or model exists -----------------


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    run_worker(tmp, [dict(op="init_model", model=TEACHER, output_dir=str(tmp / "teacher"))])
    return str(tmp / "teacher")


def _error(**kwargs) -> str:
    with pytest.raises(ConfigError) as err:
        distill(**kwargs)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_sequence_length_beyond_either_model_is_refused(teacher_dir, tmp_path):
    long_student = ModelConfig(**dict(STUDENT, max_seq_length=512))
    msg = _error(
        teacher=teacher_dir,
        student=long_student,
        train=TrainConfig(seq_length=128),
        output_dir=str(tmp_path / "r"),
    )
    assert "seq_length 128" in msg and "teacher's max_seq_length 64" in msg
    msg = _error(
        teacher=teacher_dir,
        student=ModelConfig(**dict(STUDENT, max_seq_length=32)),
        train=TrainConfig(seq_length=48),
        output_dir=str(tmp_path / "r"),
    )
    assert "student's max_seq_length 32" in msg


def test_impossible_parallel_layout_is_refused(teacher_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    msg = _error(
        teacher=teacher_dir,
        student=ModelConfig(**STUDENT),
        parallel=ParallelConfig(tensor_parallel=3),
        output_dir=str(tmp_path / "r"),
    )
    assert "student: num_attention_heads 4 is not divisible by tensor_parallel 3" in msg
    monkeypatch.setenv("WORLD_SIZE", "4")
    student = ModelConfig(**dict(STUDENT, num_attention_heads=8, num_query_groups=2))
    teacher_msg = _error(
        teacher=teacher_dir,
        student=student,
        parallel=ParallelConfig(tensor_parallel=4),
        output_dir=str(tmp_path / "r"),
    )
    assert "num_query_groups 2 is not divisible by tensor_parallel 4" in teacher_msg
    monkeypatch.setenv("WORLD_SIZE", "3")
    msg = _error(
        teacher=teacher_dir,
        parallel=ParallelConfig(tensor_parallel=2),
        output_dir=str(tmp_path / "r"),
    )
    assert "world size 3 is not divisible by tensor_parallel x pipeline_parallel = 2" in msg


def test_missing_checkpoint_directory_is_refused(teacher_dir, tmp_path):
    msg = _error(teacher=str(tmp_path / "nope"), output_dir=str(tmp_path / "r"))
    assert msg.startswith(
        f"{str(tmp_path / 'nope')!r} does not exist; give a distill_llm checkpoint"
    )
    msg = _error(
        teacher=teacher_dir,
        student_checkpoint=str(tmp_path / "gone"),
        output_dir=str(tmp_path / "r"),
    )
    assert "does not exist" in msg and "gone" in msg
    (tmp_path / "empty").mkdir()
    msg = _error(teacher=str(tmp_path / "empty"), output_dir=str(tmp_path / "r"))
    assert "is not a distill_llm checkpoint" in msg
    with pytest.raises(ConfigError, match="does not exist"):
        pretrain(init_checkpoint=str(tmp_path / "nope"), output_dir=str(tmp_path / "r"))


def test_bad_kd_and_batch_settings_are_refused(teacher_dir, tmp_path):
    msg = _error(teacher=teacher_dir, kd=KDConfig(temperature=0.0), output_dir=str(tmp_path / "r"))
    assert "kd.temperature must be > 0" in msg
    for kd, expected in (
        (KDConfig(kind="kl"), "kd: KD loss kind 'kl' is unknown; choose one of forward_kl"),
        (KDConfig(kind="jsd", beta=0.0), "kd: jsd needs 0 < beta < 1, got 0.0"),
        (KDConfig(alpha=1.5), "kd.alpha must be in [0, 1] (or None), got 1.5"),
        (KDConfig(chunk_size=0), "kd.chunk_size must be >= 1 (or None), got 0"),
        (
            KDConfig(fused_output_layer=True, alpha=0.5),
            "kd.fused_output_layer trains on the KD loss alone",
        ),
    ):
        assert expected in _error(teacher=teacher_dir, kd=kd, output_dir=str(tmp_path / "r"))
    msg = _error(
        teacher=teacher_dir,
        train=TrainConfig(micro_batch_size=3, global_batch_size=8),
        output_dir=str(tmp_path / "r"),
    )
    assert "global_batch_size 8 is not divisible by micro_batch_size 3" in msg


def test_bf16_training_runs_and_tracks_fp32(tmp_path):
    teacher = str(tmp_path / "teacher")
    job = dict(
        op="distill", teacher=teacher, student=STUDENT, optim=OPTIM, train=train_cfg(steps=3)
    )
    run_worker(
        tmp_path,
        [
            dict(op="init_model", model=TEACHER, output_dir=teacher, seed=4),
            dict(job, output_dir=str(tmp_path / "fp32")),
            dict(job, output_dir=str(tmp_path / "bf16"), parallel=dict(precision="bf16")),
        ],
    )
    fp32, bf16 = read_metrics(tmp_path / "fp32", "train"), read_metrics(tmp_path / "bf16", "train")
    assert len(bf16) == 3
    for a, b in zip(fp32, bf16):
        assert b["lm_loss"] == pytest.approx(a["lm_loss"], abs=0.05)
        assert b["kd_loss"] == pytest.approx(a["kd_loss"], rel=0.2)
        assert b["lm_loss"] != a["lm_loss"]  # it really ran in another precision


def test_script_without_main_guard_saves_and_exits(tmp_path):
    """A user script calling `pretrain` at top level, launched by torchrun, runs once and ends.

    megatron's checkpoint writer starts a `spawn` Manager that re-imports the script; without
    our fork-started queue the copy re-runs training and joins the rendezvous, and this hangs."""
    script = tmp_path / "unguarded.py"
    script.write_text(
        "print('SCRIPT-START', flush=True)\n"
        "from distill_llm import ModelConfig, TrainConfig, pretrain\n"
        f"pretrain(model=ModelConfig(**{STUDENT!r}), train=TrainConfig(**{train_cfg(steps=1)!r}),\n"
        f"         output_dir={str(tmp_path / 'run')!r})\n"
        "print('SCRIPT-END', flush=True)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    proc = subprocess.Popen(
        [*cmd, str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and the workers it started
        proc.communicate()
        pytest.fail("an unguarded script hung at its first checkpoint save")
    assert proc.returncode == 0, err[-3000:]
    assert out.count("SCRIPT-START") == 1 and "SCRIPT-END" in out
    assert (tmp_path / "run/final/distill_llm.json").is_file()
