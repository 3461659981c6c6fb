"""Wall time and peak memory of checkpoint conversion for a ~100M-parameter Llama: Hugging Face
import and export, NeMo 1 (.nemo) and NeMo 2 export, and loading each format into a model.

    .venv/bin/python bench/hf_convert.py [--out runs/bench/hf]

Builds a random Llama (12 layers, hidden 768, GQA 12/4 heads, FFN 2048, vocab 16384; float32)
with transformers and saves it, then, each in a fresh process (one process, TP=1, this
machine's CPU threads): `import_hf` (HF -> ours), `export_hf` (ours -> HF), `export_nemo` to a
NeMo 1 .nemo file and to a NeMo 2 directory (ours -> NeMo), and `load` (any path -> a built
GPTModel, what a teacher or student path costs at start-up) for ours, HF, NeMo 1 and NeMo 2.
For each it reports the step's wall time, the process's wall time (interpreter, imports and
set-up included) and the peak resident memory (ru_maxrss) next to the resident memory after
the imports, before converting. Writes runs/bench/hf/hf_convert.json and prints a table.
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
    from distill_llm.engine.model import build_gpt
    from distill_llm.formats import paths
    from distill_llm.formats.hf import io as hf
    from distill_llm.formats.nemo import io as nemo

    parallel.initialize(parallel.ParallelConfig(), seed=0)  # megatron imported too
    before = _rss_mib()
    t0 = time.perf_counter()
    if kind == "import_hf":
        hf.import_hf(src, dst)
    elif kind == "export_hf":
        hf.export_hf(src, dst)
    elif kind.startswith("export_nemo"):
        nemo.export_nemo(src, dst)
    else:  # load: architecture read, model built, weights filled (the start-up cost of a path)
        cfg = paths.model_config_of(src)
        model = build_gpt(cfg)
        paths.load_model(src, model, cfg, role="model")
    print(json.dumps({"seconds": time.perf_counter() - t0, "rss_after_imports_mib": before,
                      "peak_rss_mib": _rss_mib()}))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench/hf")
    ap.add_argument("--stage", help=argparse.SUPPRESS)
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
        ("import_hf", out / "hf", out / "ckpt"),
        ("export_hf", out / "ckpt", out / "hf_out"),
        ("export_nemo1", out / "ckpt", out / "model.nemo"),
        ("export_nemo2", out / "ckpt", out / "nemo2"),
        ("load_ours", out / "ckpt", None),
        ("load_hf", out / "hf", None),
        ("load_nemo1", out / "model.nemo", None),
        ("load_nemo2", out / "nemo2", None),
    ):
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, __file__, "--stage", kind, str(src), str(dst or "-")],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        stage = json.loads(proc.stdout.strip().splitlines()[-1])
        stage["process_seconds"] = time.perf_counter() - t0
        result[kind] = stage
    (out / "hf_convert.json").write_text(json.dumps(result, indent=2))
    print(f"{params / 1e6:.1f}M parameters, float32 ({result['weights_mib']:.0f} MiB of weights)")
    head = ("step", "seconds", "process s", "RSS after imports", "peak RSS")
    print(f"{head[0]:<14} {head[1]:>8} {head[2]:>10} {head[3]:>18} {head[4]:>9}")
    for kind in [k for k in result if isinstance(result[k], dict)]:
        r = result[kind]
        print(f"{kind:<14} {r['seconds']:>8.2f} {r['process_seconds']:>10.1f} "
              f"{r['rss_after_imports_mib']:>14.0f} MiB {r['peak_rss_mib']:>5.0f} MiB")  # fmt: skip


if __name__ == "__main__":
    main()
