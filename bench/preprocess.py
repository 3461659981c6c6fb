"""Preprocessing throughput and peak memory: ~50 MB of JSONL text with 1 and 2 workers.

    .venv/bin/python bench/preprocess.py [--mb 50] [--workers 1 2]

Generates the text (Zipf-distributed pseudo-words, documents of 50-2000 words; seeded), trains
a byte-level BPE tokenizer (8192 tokens) on its first 5 MB, then runs `distill_llm.preprocess`
in a fresh process per worker count, sampling the resident memory of that process and its
workers every 100 ms. Peak memory is the largest sum of proportional set sizes (PSS) over the
process tree: pages the forked workers share with their parent count once, not per process.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

RUN = """
import json, sys
from distill_llm.data.preprocess import preprocess
s = preprocess(sys.argv[1], sys.argv[2], sys.argv[3], workers=int(sys.argv[4]), progress=False)
print(json.dumps(dict(tokens=s.tokens, text_bytes=s.text_bytes, seconds=s.seconds,
                      documents=s.documents)))
"""


def make_corpus(path: Path, megabytes: float, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    freq = 1.0 / np.arange(1, 27) ** 0.9
    vocab = [
        "".join(rng.choice(letters, size=rng.integers(2, 10), p=freq / freq.sum()))
        for _ in range(20_000)
    ]
    zipf = 1.0 / np.arange(1, len(vocab) + 1)
    zipf /= zipf.sum()
    target = int(megabytes * 1e6)
    written = 0
    with open(path, "w") as f:
        while written < target:
            words = rng.choice(len(vocab), size=int(rng.integers(50, 2000)), p=zipf)
            text = " ".join(vocab[w] for w in words)
            text = ". ".join(s.capitalize() for s in text.split(" , "))
            line = json.dumps({"text": text}) + "\n"
            f.write(line)
            written += len(line)


def measure(cmd: list[str]) -> tuple[dict, float]:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    root = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_full_info().pss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.1)
    out = proc.stdout.read()
    if proc.returncode:
        sys.exit(f"preprocess failed ({proc.returncode})")
    return json.loads(out.strip().splitlines()[-1]), peak / 2**20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=float, default=50.0)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    from distill_llm.data.tokenizer import train_bpe_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        make_corpus(tmp / "corpus.jsonl", args.mb)
        sample = tmp / "sample.jsonl"
        with open(tmp / "corpus.jsonl") as src, open(sample, "w") as dst:
            size = 0
            for line in src:
                dst.write(line)
                size += len(line)
                if size > 5e6:
                    break
        tok = train_bpe_tokenizer(str(sample), str(tmp / "tok"), vocab_size=8192)
        mb = (tmp / "corpus.jsonl").stat().st_size / 1e6
        print(
            f"corpus {mb:.1f} MB, tokenizer {tok.vocab_size} tokens, "
            f"set-up {time.perf_counter() - t0:.0f} s; CPU cores: {psutil.cpu_count()}"
        )
        print(
            f"{'workers':>7} {'tokens':>12} {'seconds':>8} {'tokens/s':>11} {'MB/s':>6} "
            f"{'peak PSS MiB':>12}"
        )
        for w in args.workers:
            cmd = [sys.executable, "-c", RUN, str(tmp / "corpus.jsonl"), str(tmp / f"out{w}"),
                   str(tmp / "tok"), str(w)]  # fmt: skip
            res, peak = measure(cmd)
            tps = res["tokens"] / res["seconds"]
            mbs = res["text_bytes"] / 1e6 / res["seconds"]
            print(
                f"{w:>7} {res['tokens']:>12,} {res['seconds']:>8.1f} {tps:>11,.0f} "
                f"{mbs:>6.2f} {peak:>12.0f}"
            )


if __name__ == "__main__":
    main()
