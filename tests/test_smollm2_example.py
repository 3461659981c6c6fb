"""`make example`'s code path at test sizes, on the real SmolLM2 teacher: every stage of the
experiment runs (top-k cache, pruning, KD from the cache, the baseline, evaluation, HF export,
greedy continuations) and the report is well formed. Uses the dequantized teacher that
tests/test_smollm2.py (which runs first) caches; skipped, with the reason, when it is absent."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

from distill_llm import smollm2

SHORT = [
    "--steps", "4", "--val-every", "2", "--val-batches", "1", "--seq-length", "64",
    "--micro-batch-size", "1", "--global-batch-size", "2", "--calibration-batches", "1",
    "--top-k", "4", "--max-new-tokens", "4", "--student-num-layers", "2",
    "--student-hidden-size", "192", "--student-ffn-hidden-size", "256",
    "--student-num-attention-heads", "3", "--student-num-query-groups", "1",
    "--prompt", "What is the capital of France?", "--train-documents", "3",
]  # fmt: skip


def test_a_shortened_example_run(tmp_path):
    cache = os.environ.get(smollm2.CACHE_ENV) or ROOT / smollm2.DEFAULT_CACHE
    if not smollm2.is_cached(cache):
        pytest.skip(f"SmolLM2 is not cached in {cache} (tests/test_smollm2.py fetches it)")
    out = tmp_path / "example"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "distill_llm.example", "--output-dir", str(out),
         "--cache-dir", str(cache), *SHORT],
        env=env, capture_output=True, text=True, timeout=1500, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    for key in ("teacher", "pruned_start", "kd_student", "baseline_student"):
        assert results[key]["val_loss"] > 0 and results[key]["params"] > 0
    assert results["teacher"]["params"] > 2 * results["kd_student"]["params"]
    assert results["data"]["train"] == 3  # --train-documents
    assert results["kd_student"]["params"] == results["baseline_student"]["params"]
    for key in ("kd_student", "baseline_student"):
        assert [step for step, _ in results[key]["curve"]] == [0, 2, 4]
    # both students start from the same pruned weights: the same loss before any step, and
    # the pruned start's own evaluation on the same held-out tokens
    kd0, base0 = results["kd_student"]["curve"][0][1], results["baseline_student"]["curve"][0][1]
    assert kd0 == base0 == pytest.approx(results["pruned_start"]["val_loss"], rel=1e-5)
    # our teacher's perplexity against transformers' on the same tokens
    assert results["teacher_ppl_relative_difference"] < 1e-4
    assert results["teacher"]["kl_to_teacher"] == pytest.approx(0.0, abs=1e-5)
    cont = results["continuations"]
    assert set(cont) == {"teacher", "kd_student", "baseline_student"}
    assert all(len(answers) == 1 for answers in cont.values())
    assert cont["teacher"][0].strip()  # the real teacher says something
    for name in ("kd_student_hf", "baseline_student_hf"):
        config = json.loads((out / name / "config.json").read_text())
        assert config["num_hidden_layers"] == 2 and config["hidden_size"] == 192
    report = (out / "report.md").read_text()
    assert "| KD student |" in report and "What is the capital of France?" in report
    assert "Wall time per stage" in report
    png = (out / "loss_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
