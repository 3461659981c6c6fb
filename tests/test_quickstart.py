"""The quickstart's code path at test sizes: every stage runs, results.json and the PNG are
well formed, and a second run reuses the data and the teacher."""

import json
import os
import subprocess
import sys

import pytest


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
    for key in ("teacher", "kd_student", "baseline_student"):
        assert results[key]["params"] > 0 and results[key]["val_loss"] > 0
    assert results["teacher"]["params"] > 3 * results["kd_student"]["params"]
    assert results["kd_student"]["params"] == results["baseline_student"]["params"]
    assert results["teacher"]["kl_to_teacher"] == pytest.approx(0.0, abs=1e-6)
    assert results["kd_student"]["kl_to_teacher"] > 0
    for key in ("kd_student", "baseline_student"):
        curve = results[key]["curve"]
        assert [step for step, _ in curve] == [0, 2, 4]  # val_every=2 over 4 steps
        assert all(loss > 0 for _, loss in curve)
    # same initial weights: the comparison starts from one point
    assert results["kd_student"]["curve"][0] == results["baseline_student"]["curve"][0]
    assert results["steps"] == 4 and results["tokens"] == 4 * 4 * 32
    png = (out / "loss_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert "KL to teacher" in first and "kd_student" in first  # the printed table

    second = _quickstart(out)
    assert "data: reusing" in second and "reusing the teacher" in second
    assert "training tokenizer" not in second
