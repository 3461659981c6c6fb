"""Peak extra memory of one forward+backward of the KD loss on [2048 positions x 131072 vocab]
float32 logits, in units of one logits-sized tensor (1 GiB here), each variant in a fresh process.

    .venv/bin/python bench/kd_loss_memory.py [--positions 2048 --vocab 131072 --hidden 1024]

Counted: everything allocated on top of the loss's inputs themselves, the gradients of those
inputs included (they are the tensors that must exist; `gradients_logits_sized` in each row is
their size, the floor). Measured as the process's peak resident memory (VmHWM, reset through
/proc/self/clear_refs just before the loss) minus its resident memory at that moment; torch's
CPU allocator returns large blocks to the system at once, so this is the allocation peak.
Variants:
  plain      distill_llm.losses.kd_loss (forward KL), autograd through log-softmax
  modelopt   ModelOpt's megatron LogitsKLLoss (what NeMo and Megatron-Bridge use), TP=1
  chunked    distill_llm.losses.kd_loss(chunk_size=...) with its own backward
  fused      distill_llm.losses.kd_loss_fused(hidden, weight, teacher, chunk_size=...): inputs
             are the student's last hidden states [2048 x 1 x 1024] and output weight
             [131072 x 1024] instead of its logits, so what is counted is the gradients of the
             hidden states and of the weight (0.51 logits-sized: the weight's gradient is half
             the logits' size) plus the temporaries; no student logits or logits gradient
             exist. The other rows leave out the output weight's gradient, which a real model
             also needs (0.5 more), and the student logits (1.0), which they take as given.
Writes runs/bench/kd_loss_memory.json.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

CHUNK = 32  # positions per chunk for the chunked and fused variants


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _variant(name: str, positions: int, vocab: int, hidden_size: int) -> dict:
    import torch

    torch.manual_seed(0)
    teacher = torch.randn(positions, 1, vocab)
    logits_kib = teacher.numel() * 4 / 1024
    if name == "fused":
        from distill_llm.kd.losses import kd_loss_fused

        hidden = torch.randn(positions, 1, hidden_size).requires_grad_()
        weight = (torch.randn(vocab, hidden_size) / hidden_size**0.5).requires_grad_()
        inputs = (hidden, weight)

        def run():
            kd_loss_fused(hidden, weight, teacher, chunk_size=CHUNK).backward()
    else:
        student = torch.randn(positions, 1, vocab).requires_grad_()
        inputs = (student,)
    if name == "modelopt":
        from modelopt.torch.distill.plugins.megatron import LogitsKLLoss

        from distill_llm.engine import parallel
        from distill_llm.engine.model import ModelConfig, transformer_config

        parallel.initialize(parallel.ParallelConfig(), seed=0)
        loss_fn = LogitsKLLoss(transformer_config(ModelConfig()), temperature=1.0)

        def run():
            per_token = loss_fn(student, teacher)[0]
            per_token.sum().backward()
    elif name in ("plain", "chunked"):
        from distill_llm.kd.losses import kd_loss

        chunk = CHUNK if name == "chunked" else None

        def run():
            kd_loss(student, teacher, chunk_size=chunk).backward()

    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    before = _status_kib("VmRSS")
    t0 = time.perf_counter()
    run()
    seconds = time.perf_counter() - t0
    peak = _status_kib("VmHWM")
    assert all(t.grad is not None for t in inputs)
    gradients_kib = sum(t.numel() for t in inputs) * 4 / 1024
    return {
        "extra_logits_sized": (peak - before) / logits_kib,
        "gradients_logits_sized": round(gradients_kib / logits_kib, 3),
        "seconds": seconds,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--positions", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=131072)
    ap.add_argument("--hidden", type=int, default=1024, help="hidden size of the fused variant")
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="runs/bench")
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(_variant(args.variant, args.positions, args.vocab, args.hidden)))
        return
    result = {"positions": args.positions, "vocab": args.vocab, "hidden": args.hidden}
    result["chunk_size"] = CHUNK
    print(
        "extra memory in logits-sized units, the inputs' gradients included (their size: "
        "gradients_logits_sized); fused: the inputs are the hidden states and the output weight, "
        "counted are their gradients and the temporaries, no student logits or their gradient "
        "exist"
    )
    for name in ("plain", "modelopt", "chunked", "fused"):
        proc = subprocess.run(
            [sys.executable, __file__, "--variant", name, "--positions", str(args.positions),
             "--vocab", str(args.vocab), "--hidden", str(args.hidden)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        result[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(name, result[name], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kd_loss_memory.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
