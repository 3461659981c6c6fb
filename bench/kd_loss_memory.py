"""Peak extra memory of one forward+backward of the KD loss on [2048 positions x 131072 vocab]
float32 logits, in units of one logits-sized tensor (1 GiB here), each variant in a fresh process.

    .venv/bin/python bench/kd_loss_memory.py [--positions 2048 --vocab 131072]

Counted: everything allocated on top of the student and teacher logits themselves, the
gradient of the student logits included (it is the one tensor that must exist). Measured as the
process's peak resident memory (VmHWM, reset through /proc/self/clear_refs just before the
loss) minus its resident memory at that moment; torch's CPU allocator returns large blocks to
the system at once, so this is the allocation peak. Variants:
  plain      distill_llm.losses.kd_loss (forward KL), autograd through log-softmax
  modelopt   ModelOpt's megatron LogitsKLLoss (what NeMo and Megatron-Bridge use), TP=1
  chunked    distill_llm.losses.kd_loss(chunk_size=...) with its own backward
Writes runs/bench/kd_loss_memory.json.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

CHUNK = 32  # positions per chunk for the chunked variant


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _variant(name: str, positions: int, vocab: int) -> dict:
    import torch

    torch.manual_seed(0)
    student = torch.randn(positions, 1, vocab).requires_grad_()
    teacher = torch.randn(positions, 1, vocab)
    logits_kib = student.numel() * 4 / 1024
    if name == "modelopt":
        from modelopt.torch.distill.plugins.megatron import LogitsKLLoss

        from distill_llm import parallel
        from distill_llm.model import ModelConfig, transformer_config

        parallel.initialize(parallel.ParallelConfig(), seed=0)
        loss_fn = LogitsKLLoss(transformer_config(ModelConfig()), temperature=1.0)

        def run():
            per_token = loss_fn(student, teacher)[0]
            per_token.sum().backward()
    else:
        from distill_llm.losses import kd_loss

        chunk = CHUNK if name == "chunked" else None

        def run():
            kd_loss(student, teacher, chunk_size=chunk).backward()

    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    before = _status_kib("VmRSS")
    t0 = time.perf_counter()
    run()
    seconds = time.perf_counter() - t0
    peak = _status_kib("VmHWM")
    assert student.grad is not None
    return {"extra_logits_sized": (peak - before) / logits_kib, "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--positions", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=131072)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="runs/bench")
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(_variant(args.variant, args.positions, args.vocab)))
        return
    result = {"positions": args.positions, "vocab": args.vocab, "chunk_size": CHUNK}
    for name in ("plain", "modelopt", "chunked"):
        proc = subprocess.run(
            [sys.executable, __file__, "--variant", name, "--positions", str(args.positions),
             "--vocab", str(args.vocab)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        result[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(name, result[name], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kd_loss_memory.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
