"""The SmolLM2-135M-Instruct teacher's forward: our engine against transformers, same weights.

    .venv/bin/python bench/smollm2_teacher.py [--rounds 6] [--threads 2]

Makes (or reuses) the dequantized teacher directory (`distill_llm.smollm2.teacher_dir`) and
loads it twice in this one process: ours (the HF directory loaded as any HF teacher is,
`formats.paths.load_model`) and transformers' LlamaForCausalLM (SDPA, no KV cache). Then times
the forward of one batch of 8 x 256 tokens of real text (Python's reference manual, the
teacher's own tokenizer) under no_grad, float32, `--threads` threads, the two alternating for
`--rounds` rounds after one warm-up each, so that other processes on a shared machine slow
both alike. Reports the fastest and the median round (wall and CPU seconds), tokens/s at the
fastest, and the largest logit difference between the two. Writes
runs/bench/smollm2_teacher.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

BATCH, SEQ = 8, 256


def token_batch(teacher: Path) -> torch.Tensor:
    """[BATCH, SEQ] token ids: consecutive windows of Python's reference manual."""
    import pydoc_data.topics

    from distill_llm.data.tokenizer import load_tokenizer

    text = "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    ids = load_tokenizer(teacher).encode(text)[: BATCH * SEQ]
    return torch.tensor(ids).view(BATCH, SEQ)


def forwards(teacher: Path, tokens: torch.Tensor) -> dict:
    """name -> a no-argument forward returning logits [BATCH, SEQ, V], for ours and
    transformers', both loaded from `teacher`."""
    import transformers

    from distill_llm.engine import parallel
    from distill_llm.engine.model import build_gpt
    from distill_llm.formats import paths

    parallel.initialize(parallel.ParallelConfig(), seed=0)
    cfg = paths.model_config_of(teacher)
    ours = build_gpt(cfg).eval()
    paths.load_model(teacher, ours, cfg, role="teacher")
    theirs = transformers.LlamaForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    positions = torch.arange(SEQ).expand(BATCH, SEQ)
    return {
        "ours": lambda: ours(tokens, positions, None)[..., : cfg.vocab_size],
        "transformers": lambda: theirs(input_ids=tokens, use_cache=False).logits,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from distill_llm import smollm2

    teacher = smollm2.teacher_dir()
    tokens = token_batch(teacher)
    runs = forwards(teacher, tokens)
    wall = {name: [] for name in runs}
    cpu = {name: [] for name in runs}
    logits = {}
    with torch.no_grad():
        for name, run in runs.items():  # warm-up, and the logits compared below
            logits[name] = run()[0].clone()  # the first sequence's [SEQ, V]
        for _ in range(args.rounds):
            for name, run in runs.items():
                t0, c0 = time.perf_counter(), time.process_time()
                run()
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    result = {
        name: {
            "fastest_s": min(wall[name]),
            "median_s": statistics.median(wall[name]),
            "fastest_cpu_s": min(cpu[name]),
            "median_cpu_s": statistics.median(cpu[name]),
            "tokens_per_s": BATCH * SEQ / min(wall[name]),
            "wall_s": wall[name],
        }
        for name in runs
    }
    result["ours_over_transformers"] = (
        result["ours"]["tokens_per_s"] / result["transformers"]["tokens_per_s"]
    )
    result["max_abs_logit_diff"] = (logits["ours"] - logits["transformers"]).abs().max().item()
    result["logit_scale"] = logits["transformers"].abs().max().item()
    result["load1_after"] = float(Path("/proc/loadavg").read_text().split()[0])
    Path("runs/bench").mkdir(parents=True, exist_ok=True)
    Path("runs/bench/smollm2_teacher.json").write_text(json.dumps(result, indent=2))
    for name in runs:
        r = result[name]
        print(f"{name:12s} fastest {r['fastest_s']:6.2f} s ({r['tokens_per_s']:5.0f} tokens/s), "
              f"median {r['median_s']:6.2f} s; CPU s fastest {r['fastest_cpu_s']:.2f}, "
              f"median {r['median_cpu_s']:.2f}")  # fmt: skip
    ratio, diff = result["ours_over_transformers"], result["max_abs_logit_diff"]
    scale, load = result["logit_scale"], result["load1_after"]
    print(f"ours / transformers: {ratio:.3f}x tokens/s; max |logit diff| {diff:.2e} at logit "
          f"scale {scale:.1f}; load average after: {load}")  # fmt: skip


if __name__ == "__main__":
    main()
