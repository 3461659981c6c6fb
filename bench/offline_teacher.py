"""Offline teacher logits: cache size per position and KD step time online vs from a cache vs
student-only, on the quickstart's trained teacher and data (run `make quickstart` first).

    .venv/bin/python bench/offline_teacher.py [--steps 30] [--quickstart runs/quickstart]

One process, 2 threads, the quickstart's shapes (teacher 4.0M, student 0.35M, vocabulary 2048,
batch 16 x 128). Prints and writes runs/bench/offline_teacher.json:
  - for k = 8, 32, 128 (float16): bytes per position of the train cache (compressed shards,
    what lies on disk), the share of the teacher's probability in the top k, cache_teacher's time;
  - median train step time (s) of `distill` with the teacher online, of `distill` from the k=32
    cache, and of `pretrain` of the same student (no teacher), from each run's metrics.jsonl.
"""

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import distill_llm as dl  # noqa: E402
from distill_llm.engine.run_dir import read_metrics  # noqa: E402
from distill_llm.kd.teacher_cache import TeacherCache  # noqa: E402
from distill_llm.quickstart import QuickstartConfig, _configs  # noqa: E402

KS = (8, 32, 128)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--quickstart", default=str(ROOT / "runs/quickstart"))
    parser.add_argument("--out", default=str(ROOT / "runs/bench/offline_teacher"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    qs = Path(args.quickstart)
    teacher = qs / "seed1234/teacher/final"
    info_file = qs / "data/info.json"
    if not teacher.is_dir() or not info_file.is_file():
        sys.exit(f"no quickstart teacher under {qs}: run `make quickstart` first")
    cfg = QuickstartConfig(output_dir=str(qs))
    parts = _configs(cfg, json.loads(info_file.read_text()), seed=1234)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    train = parts["train"](args.steps, val_every=0)
    train.log_every = 1
    common = dict(data=parts["data"], train=train, optim=parts["optim"](3e-3, args.steps))
    results = {"steps": args.steps, "batch": [train.global_batch_size, train.seq_length]}

    for k in KS:
        t0 = time.perf_counter()
        dl.cache_teacher(str(teacher), str(out / f"cache_k{k}"), k=k, data=parts["data"],
                         train=train)  # fmt: skip
        seconds = time.perf_counter() - t0
        cache = TeacherCache(out / f"cache_k{k}" / "train")
        log_probs, _, _ = cache.lookup(list(range(min(len(cache), 64))))
        results[f"k{k}"] = {
            "bytes_per_position": cache.bytes_per_position,
            "top_k_mass": float(log_probs.float().exp().sum(-1).mean()),
            "cache_seconds": seconds,
            "samples": len(cache),
        }

    runs = {
        "online": lambda d: dl.distill(
            str(teacher), student=parts["student"], output_dir=d, **common
        ),  # fmt: skip
        "from_cache_k32": lambda d: dl.distill(
            teacher_cache=str(out / "cache_k32"), student=parts["student"], output_dir=d, **common
        ),
        "student_only": lambda d: dl.pretrain(parts["student"], output_dir=d, **common),
    }
    for name, run in runs.items():
        run(str(out / name))
        times = [e["step_time_s"] for e in read_metrics(out / name, "train")][2:]  # warm
        results[name] = {"median_step_s": statistics.median(times)}

    (out.parent / "offline_teacher.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
