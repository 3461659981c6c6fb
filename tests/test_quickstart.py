"""The quickstart's code path at test sizes: every stage runs, results.json and the PNG are
well formed, and a second run reuses the data and the teacher."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from distill_llm import quickstart


def _quickstart(out):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "distill_llm.quickstart", "--small", "--output-dir", str(out)],
        env=env, capture_output=True, text=True, timeout=1200, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_small_quickstart_end_to_end(tmp_path):
    out = tmp_path / "qs"
    first = _quickstart(out)
    assert "training tokenizer" in first
    results = json.loads((out / "results.json").read_text())
    for key in ("teacher", "kd_student", "baseline_student", "pruned_kd_student"):
        assert results[key]["params"] > 0 and results[key]["val_loss"] > 0
    assert results["teacher"]["params"] > 3 * results["kd_student"]["params"]
    assert results["kd_student"]["params"] == results["baseline_student"]["params"]
    assert results["teacher"]["kl_to_teacher"] == pytest.approx(0.0, abs=1e-6)
    assert results["kd_student"]["kl_to_teacher"] > 0
    for key in ("kd_student", "baseline_student", "pruned_kd_student"):
        curve = results[key]["curve"]
        assert [step for step, _ in curve] == [0, 2, 4]  # val_every=2 over 4 steps
        assert all(loss > 0 for _, loss in curve)
    # same initial weights: the comparison starts from one point
    assert results["kd_student"]["curve"][0] == results["baseline_student"]["curve"][0]
    assert results["steps"] == 4 and results["tokens"] == 4 * 4 * 32
    # the pruned student: the students' shape (heads keep the teacher's width), cut from the
    # teacher, so it starts elsewhere than the random students
    pruned = results["pruned_kd_student"]["curve"]
    assert results["pruned_val_loss_before_training"] == pruned[0][1]
    assert pruned[0] != results["kd_student"]["curve"][0]
    record = json.loads((out / "seed1234" / "pruned" / "prune.json").read_text())
    assert len(record["kept"]["layers"]) == 1  # small(): the teacher's 2 layers -> 1
    config = yaml.safe_load((out / "seed1234" / "pruned_kd_student" / "config.yaml").read_text())
    assert config["student_checkpoint"] == str(out / "seed1234" / "pruned")
    small = quickstart.small()
    wanted = quickstart.pruned_shape(small.teacher, small.student)
    assert wanted["num_attention_heads"] == 2 and wanted["num_query_groups"] == 1
    for key, value in wanted.items():
        assert config["student_model"][key] == value, key
    png = (out / "loss_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert "KL to teacher" in first and "pruned_kd_student" in first  # the printed table

    second = _quickstart(out)
    assert "data: reusing" in second and "reusing the teacher" in second
    assert "training tokenizer" not in second
