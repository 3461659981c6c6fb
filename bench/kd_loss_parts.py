"""What the KD step's loss costs beyond the student step's: the parts that make issue 16's ratio
"KD step / (student step + teacher forward)" differ from 1, timed alone on bench/peers.py's
shapes (8 x 256 positions, vocabulary 8192, float32, 2 threads, the engine's allocator settings).

    .venv/bin/python bench/kd_loss_parts.py [--reps 15]

The KD step runs the student's forward and backward and the teacher's forward, as the two halves
of the "ideal" do; only the loss differs. The student step's loss is megatron's cross entropy
(forward and backward); the KD step's is the default criterion (forward KL at T=1, 256
positions a chunk, forward and backward), which also writes the LM loss the step logs, read off
the student's log-probabilities it forms anyway (`KDCriterion.defer_lm`). Their difference is
the KD step's excess over the ideal, to within the step's noise. Also timed: the KD loss alone
and the LM loss as its own pass (a chunked cross entropy without gradient), as they ran before
the LM loss rode along.
Also timed: the teacher's softmax alone, the least any logits KD loss adds to a cross entropy
(it needs the teacher's distribution, which a cross entropy never forms), so the floor of the
ratio for any implementation. The parts run in turns, `--reps` rounds after two untimed ones;
each part's figure is its median.
Writes runs/bench/kd_loss_parts.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

import peers_variants as pv  # noqa: E402  bench/ is this script's directory

from distill_llm.engine import host_memory, parallel  # noqa: E402
from distill_llm.kd import losses  # noqa: E402
from distill_llm.kd.config import KDConfig  # noqa: E402
from distill_llm.kd.criterion import KDCriterion, LiveLogits  # noqa: E402


def median_ms(fns: dict, reps: int) -> dict:
    """Each of `fns` run in turns (one round after another, so every part sees the same
    minutes of a machine whose speed drifts): its median time in ms after two untimed rounds."""
    times = {name: [] for name in fns}
    for i in range(reps + 2):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if i >= 2:
                times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=15, help="timed runs per part (median)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="runs/bench/kd_loss_parts.json")
    args = ap.parse_args()
    host_memory.keep_freed_memory()
    torch.set_num_threads(args.threads)
    parallel.initialize(parallel.ParallelConfig(), 1234)  # megatron's CE reads the TP group
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    torch.manual_seed(0)
    shape = (pv.SEQ, pv.BATCH, pv.VOCAB)  # megatron's [s, b, V] logits layout
    student, teacher = torch.randn(shape) * 2, torch.randn(shape) * 2
    labels = torch.randint(0, pv.VOCAB, shape[:2])
    criterion = KDCriterion(KDConfig(), shared_vocab=pv.VOCAB)
    chunk = KDConfig().chunk_size

    def student_ce():  # the student step's loss; megatron's CE overwrites its input: a copy
        logits = student.clone().requires_grad_()
        vocab_parallel_cross_entropy(logits, labels).sum().backward()

    def kd_loss():
        logits = student.clone().requires_grad_()
        criterion.per_token(logits, LiveLogits(teacher)).sum().backward()

    def logged_ce():
        losses.logits_cross_entropy(student, labels)

    flat_labels = labels.reshape(-1)  # [s, b] flattened as the logits' positions are
    lm_out = torch.empty(flat_labels.shape)

    def kd_loss_writing_lm():  # what a training step does by default: the LM loss rides along
        logits = student.clone().requires_grad_()
        criterion.defer_lm(flat_labels, lm_out)
        criterion.per_token(logits, LiveLogits(teacher)).sum().backward()

    def teacher_softmax():
        flat = teacher.reshape(-1, pv.VOCAB)
        for i in range(0, flat.shape[0], chunk):
            torch.softmax(flat[i : i + chunk], dim=-1)

    def copy():  # the clone both losses above start from, to subtract
        student.clone().requires_grad_()

    parts = median_ms({"copy": copy, "student_ce": student_ce, "kd_loss": kd_loss,
                       "logged_ce": logged_ce, "kd_loss_writing_lm": kd_loss_writing_lm,
                       "teacher_softmax": teacher_softmax}, args.reps)  # fmt: skip
    for name in ("student_ce", "kd_loss", "kd_loss_writing_lm"):
        parts[name] -= parts["copy"]
    want = losses.logits_cross_entropy(student, labels).reshape(-1)
    lm_error = float((lm_out - want).abs().max())  # the ridden LM loss is the same CE
    excess = parts["kd_loss_writing_lm"] - parts["student_ce"]
    separate = parts["kd_loss"] + parts["logged_ce"] - parts["student_ce"]
    result = {"shape": list(shape), "threads": args.threads, "reps": args.reps, "ms": parts,
              "excess_ms": excess, "excess_with_a_separate_lm_pass_ms": separate,
              "lm_max_abs_difference": lm_error}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"logits {list(shape)} float32, {args.threads} threads, median of {args.reps} (ms):")
    labels_of = {
        "student_ce": "student step's loss: megatron cross entropy, forward + backward",
        "kd_loss": "KD step's loss: forward KL, chunked, forward + backward",
        "logged_ce": "the LM loss as a separate pass (no gradient)",
        "kd_loss_writing_lm": "KD step's loss with the logged LM loss riding along (default)",
        "teacher_softmax": "the teacher's softmax alone (the floor of any KD loss's extra)",
    }
    for name, label in labels_of.items():
        print(f"  {parts[name]:7.1f}  {label}")
    print(f"  {excess:7.1f}  KD step's excess over the ideal: kd_loss_writing_lm - student_ce")
    print(f"  {separate:7.1f}  the same with the LM loss's own pass: kd_loss + logged_ce - "
          f"student_ce")  # fmt: skip
    print(f"  the ridden LM loss equals the separate pass's to {lm_error:.1e}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
