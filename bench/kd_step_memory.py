"""Peak memory of real KD training steps with a big vocabulary: the logits loss plain, chunked
(`kd.chunk_size`) and fused with the student's output layer (`kd.fused_output_layer`).

    .venv/bin/python bench/kd_step_memory.py [words: run only variants named with them]

Each variant runs `distill` in a fresh process (one rank, CPU, 2 threads): a 2-layer teacher
(hidden 256) and student (hidden 128) with a 131072-token vocabulary, micro-batch 2 x 1024
positions (2048 positions: one float32 logits tensor is 1.0 GiB), 3 steps, mock data, KD
alone (forward KL, T=1); and from a k=32 teacher cache (made in another process, so no
teacher is in memory), plain and chunked. Reported: the process's peak resident memory (VmHWM)
and the median step time; the difference between variants is what the loss path costs.
Writes runs/bench/kd_step_memory.json.
"""

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VOCAB, SEQ, MICRO = 131072, 1024, 2
LOGITS_GIB = MICRO * SEQ * VOCAB * 4 / 2**30
VARIANTS = {  # name: (KDConfig fields, teacher source)
    "plain": ({}, "online"),
    "chunked (256)": ({"chunk_size": 256}, "online"),
    "fused (256)": ({"chunk_size": 256, "fused_output_layer": True}, "online"),
    "from cache k=32": ({}, "cache"),
    "from cache k=32, chunked (256)": ({"chunk_size": 256}, "cache"),
}

CHILD = f"""
import json, sys, torch
torch.set_num_threads(2)
import distill_llm as dl
from distill_llm.engine.run_dir import read_metrics
out, kd, mode = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
arch = dict(num_layers=2, num_attention_heads=4, vocab_size={VOCAB}, max_seq_length={SEQ})
train = dl.TrainConfig(steps=3, micro_batch_size={MICRO}, global_batch_size={MICRO},
                       seq_length={SEQ}, val_every=0, val_batches=1)
if mode in ("online", "make_cache"):
    teacher = dl.ModelConfig(hidden_size=256, ffn_hidden_size=704, **arch)
    dl.init_model(teacher, out + "/teacher")
if mode == "make_cache":  # its own process: the distill process never holds the teacher
    dl.cache_teacher(out + "/teacher", out + "/cache", k=32, train=train)
    sys.exit(0)
source = dict(teacher=out + "/teacher") if mode == "online" else dict(teacher_cache=out + "/cache")
dl.distill(
    student=dl.ModelConfig(hidden_size=128, ffn_hidden_size=352, **arch),
    kd=dl.KDConfig(skip_lm_loss=True, **kd), train=train, output_dir=out + "/run", **source,
)
peak = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
times = [e["step_time_s"] for e in read_metrics(out + "/run", "train")]
print("RESULT", json.dumps({{"peak_gib": peak / 2**20, "step_s": times}}))
"""


def _child(tmp: str, kd: dict, mode: str, name: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, tmp, json.dumps(kd), mode],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"PYTHONWARNINGS": "ignore", "PATH": "/usr/bin:/bin"},
    )
    if proc.returncode:
        sys.exit(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def main() -> None:
    results = {"logits_gib": LOGITS_GIB}
    only = sys.argv[1:]  # optional: run only the variants whose names contain these words
    for name, (kd, source) in VARIANTS.items():
        if only and not any(word in name for word in only):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            if source == "cache":
                _child(tmp, {}, "make_cache", name)
            stdout = _child(tmp, kd, "online" if source == "online" else "from_cache", name)
        line = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
        got = json.loads(line[0][len("RESULT ") :])
        results[name] = {
            "peak_gib": round(got["peak_gib"], 2),
            "median_step_s": round(statistics.median(got["step_s"]), 2),
        }
        print(name, results[name], flush=True)
    plain = results.get("plain", {}).get("peak_gib")
    for name in VARIANTS:
        if plain is None or name not in results:
            continue
        results[name]["saved_vs_plain_logits_sized"] = round(
            (plain - results[name]["peak_gib"]) / LOGITS_GIB, 2
        )
    out = ROOT / "runs/bench/kd_step_memory.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
