"""Wall time and peak memory of Hugging Face import and export for a ~100M-parameter Llama.

    .venv/bin/python bench/hf_convert.py [--out runs/bench/hf]

Builds a random Llama (12 layers, hidden 768, GQA 12/4 heads, FFN 2048, vocab 16384; float32)
with transformers and saves it, then runs `import_hf` and `export_hf` each in a fresh process
(one process, TP=1, this machine's CPU threads). For each it reports the conversion's wall time,
the process's wall time (interpreter, imports and set-up included) and the peak resident memory
(ru_maxrss) next to the resident memory after the imports, before converting. Writes
runs/bench/hf/hf_convert.json.
"""

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

CONFIG = dict(
    hidden_size=768,
    intermediate_size=2048,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_key_value_heads=4,
    vocab_size=16384,
    max_position_embeddings=2048,
    rope_theta=500000.0,
)


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _stage(kind: str, src: str, dst: str) -> None:
    import torch  # noqa: F401  (imports counted before the conversion starts)

    from distill_llm.engine import parallel
    from distill_llm.formats.hf import io as hf

    parallel.initialize(parallel.ParallelConfig(), seed=0)  # megatron imported too
    before = _rss_mib()
    t0 = time.perf_counter()
    if kind == "import":
        hf.import_hf(src, dst)
    else:
        hf.export_hf(src, dst)
    print(json.dumps({"seconds": time.perf_counter() - t0, "rss_after_imports_mib": before,
                      "peak_rss_mib": _rss_mib()}))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench/hf")
    ap.add_argument("--stage", choices=["import", "export"], help=argparse.SUPPRESS)
    ap.add_argument("src", nargs="?", help=argparse.SUPPRESS)
    ap.add_argument("dst", nargs="?", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.stage:
        return _stage(args.stage, args.src, args.dst)

    import torch
    import transformers

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cfg = transformers.LlamaConfig(**CONFIG)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out / "hf")
    del model
    weights = sum(f.stat().st_size for f in (out / "hf").glob("*.safetensors"))
    result = {"params": params, "dtype": "float32", "weights_mib": weights / 2**20}
    for kind, src, dst in (
        ("import", out / "hf", out / "ckpt"),
        ("export", out / "ckpt", out / "hf_out"),
    ):
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, __file__, "--stage", kind, str(src), str(dst)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        stage = json.loads(proc.stdout.strip().splitlines()[-1])
        stage["process_seconds"] = time.perf_counter() - t0
        result[kind] = stage
    (out / "hf_convert.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
