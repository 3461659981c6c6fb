"""`make example`'s code path at test sizes, on the real SmolLM2 teacher: every stage of the
experiment runs (top-k cache, pruning, KD from the cache, the baseline, evaluation, HF export,
greedy continuations) and the report is well formed. Uses the dequantized teacher that
tests/test_smollm2.py (which runs first) caches; skipped, with the reason, when it is absent."""

import argparse
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
    # the baseline stopped at its best validation, and the passes over the training tokens
    best_step, best = min(results["baseline_student"]["curve"], key=lambda p: (p[1], p[0]))
    assert (results["baseline_best_step"], results["baseline_best_val_loss"]) == (best_step, best)
    train_tokens = results["data"]["train_tokens"]
    assert 0 < train_tokens < results["data"]["tokens"]
    assert results["passes_over_train"] == pytest.approx(4 * 2 * 64 / train_tokens)
    report = (out / "report.md").read_text()
    assert "| KD student |" in report and "What is the capital of France?" in report
    assert "Baseline's best val loss (early stopping)" in report
    assert "Wall time per stage" in report
    png = (out / "loss_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "baseline, kd, expected",
    [
        # the baseline overfits after step 4: its best is 3.9 at step 4, reached by KD at step 4
        ([[0, 4.5], [2, 4.0], [4, 3.9], [6, 4.1]], [[0, 4.5], [2, 3.95], [4, 3.85], [6, 3.8]],
         (3.9, 4, 4)),
        # a tie keeps the earlier step; KD never gets there
        ([[0, 4.5], [2, 3.7], [4, 3.7]], [[0, 4.5], [2, 3.8], [4, 3.71]], (3.7, 2, None)),
    ],
)  # fmt: skip
def test_the_baseline_stopped_at_its_best(baseline, kd, expected):
    from distill_llm.example import early_stopped, early_stopped_line

    got = early_stopped(baseline, kd)
    assert (got["baseline_best_val_loss"], got["baseline_best_step"],
            got["kd_step_reaching_baseline_best"]) == expected  # fmt: skip
    line = early_stopped_line(got)
    assert f"{expected[0]:.4f} at step {expected[1]}" in line
    assert ("did not reach" in line) == (expected[2] is None)


def test_train_documents_takes_a_count_or_all():
    from distill_llm.example import _documents

    assert _documents("16") == 16 and _documents("all") is None and _documents(" ALL ") is None
    with pytest.raises(argparse.ArgumentTypeError, match="a number of documents or 'all', got 'x'"):
        _documents("x")
