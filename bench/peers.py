"""Our KD step side by side with its peers, on the same models, batch, optimizer and loss.

    make bench        # or: .venv/bin/python bench/peers.py [--steps 10] [--passes 2]

Builds two Llamas with transformers (fixed seeds, float32) and saves them as Hugging Face
directories in runs/bench/peers/{teacher,student}: the teacher 8 layers x 512, 8 heads / 4 KV
heads, FFN 1536; the student 4 x 256, 4 / 2 heads, FFN 768; vocabulary 8192. Then times, each
in its own fresh process, on one batch of 8 x 256 random tokens (2 threads, fp32):
  distill          distill_llm `distill` with its default KDConfig (forward KL, T=1), the
                   teacher and student loaded from the HF directories (excluding validation
                   and saves, as the peers' figures do)
  pretrain         distill_llm's student-only step (the `pretrain` path, no teacher)
  teacher_forward  distill_llm's teacher forward alone (no grad)
  modelopt_hf      ModelOpt's Hugging Face path: `mtd.convert` on the transformers models with
                   `mtd.LogitsDistillationLoss` (forward KL), per-token mean
  plain_kd         a plain PyTorch KD loop on the transformers models
and, with `--variants all`, transformers' own student-only step and teacher forward. Every
training variant uses AdamW with the engine's settings (bench/peers_variants.py says exactly
what each does).

The processes take turns: all are set up, the machine is checked to be quiet, then each runs
one step while the others are stopped (SIGSTOP), round after round, the order reversed every
round. Only one runs at any moment, and the steps of every variant are spread over the same
minutes: on a shared machine whose speed drifts by 20% from one minute to the next (measured
here), timing the variants one after another compared the minutes as much as the code.
Each reports the median of `--steps` steps after `--warmup` steps, its kernel time and page
faults per step, and its peak resident memory (ru_maxrss); `--passes 2` does it all again with
fresh processes. Writes runs/bench/peers/peers.json and prints the table and the ratios issue 16
sets targets for.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import peers_variants as pv  # bench/ is this script's directory, hence on sys.path

DEFAULT_VARIANTS = ("distill", "pretrain", "teacher_forward", "modelopt_hf", "plain_kd")
EXTRA_VARIANTS = ("hf_student", "hf_teacher_forward")
LABELS = {
    "distill": "distill_llm `distill`, default",
    "pretrain": "distill_llm student-only step (pretrain)",
    "teacher_forward": "distill_llm teacher forward alone",
    "modelopt_hf": "ModelOpt mtd.convert on transformers",
    "plain_kd": "plain PyTorch KD loop on transformers",
    "hf_student": "transformers student-only step",
    "hf_teacher_forward": "transformers teacher forward",
}
LLAMA = dict(
    vocab_size=pv.VOCAB,
    max_position_embeddings=pv.SEQ,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    use_cache=False,
    attention_dropout=0.0,
)
TEACHER = dict(
    num_hidden_layers=8,
    hidden_size=512,
    num_attention_heads=8,
    num_key_value_heads=4,
    intermediate_size=1536,
)
STUDENT = dict(
    num_hidden_layers=4,
    hidden_size=256,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=768,
)
TAG = "PEERS "  # the child's protocol lines on stdout, among library prints


# -- one variant, in this (fresh) process, stepping when told -----------------------------------
def _rss_now_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reply(tag: str, payload: dict) -> None:
    print(f"{TAG}{tag} {json.dumps(payload)}", flush=True)


def _usage() -> tuple[float, float, int]:
    """(user + system CPU seconds, system CPU seconds, minor page faults) of this process."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime, r.ru_stime, r.ru_minflt


def serve(name: str, out: Path, total_steps: int, warmup: int, threads: int) -> None:
    """Set up variant `name`, say READY, then run one step per "step" line on stdin and report
    it; on "end", check the student trained and report the figures of the steps after
    `warmup`."""
    import torch

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    variant = pv.build(name, out / "teacher", out / "student", total_steps, out / "engine")
    setup_s = time.perf_counter() - t0
    before = variant.probe.detach().clone() if variant.probe is not None else None
    rss_setup = _rss_now_mib()
    _reply("READY", {"setup_s": setup_s})
    steps = []
    for line in sys.stdin:
        if line.strip() != "step":
            break
        cpu0, sys0, flt0 = _usage()
        t0 = time.perf_counter()
        loss = variant.step()
        dt = time.perf_counter() - t0
        cpu1, sys1, flt1 = _usage()
        step = {"s": dt, "loss": loss, "cpu_s": cpu1 - cpu0, "sys_s": sys1 - sys0}
        steps.append({**step, "faults": flt1 - flt0})
        _reply("STEP", step)
    trained = None
    if before is not None:  # the steps really updated the student
        trained = not torch.equal(before, variant.probe.detach())
        if not trained:
            raise RuntimeError(
                f"{name}: the student's weights did not change in {len(steps)} steps"
            )
    timed = steps[warmup:]
    ms = statistics.median(x["s"] for x in timed) * 1e3
    _reply(
        "RESULT",
        {
            "variant": name,
            "ms_per_step": ms,
            "tokens_per_s": pv.BATCH * pv.SEQ / (ms / 1e3),
            "step_ms": [x["s"] * 1e3 for x in timed],
            # kernel time and page faults per step: memory the allocator hands back and faults in
            "sys_ms_per_step": statistics.median(x["sys_s"] for x in timed) * 1e3,
            "faults_per_step": statistics.median(x["faults"] for x in timed),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_after_setup_mib": rss_setup,
            "setup_s": setup_s,
            "losses": [x["loss"] for x in steps],
            "weights_changed": trained,
            "threads": torch.get_num_threads(),
            **variant.info,
        },
    )


# -- the quiet-CPU check --------------------------------------------------------------------------
def _cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot; steal counts as busy (someone else ran)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    busy = user + nice + system + irq + softirq + steal
    return busy, busy + idle + iowait


def busy_cpus(window_s: float = 1.0) -> float:
    """How many CPUs' worth of work the whole machine did over the next `window_s` seconds."""
    b0, t0 = _cpu_jiffies()
    time.sleep(window_s)
    b1, t1 = _cpu_jiffies()
    return (b1 - b0) / max(t1 - t0, 1) * os.cpu_count()


def wait_quiet(threshold: float, max_wait_s: float) -> dict:
    """Wait until the machine does less than `threshold` CPUs of work (measured over 1 s), for
    at most `max_wait_s`; says whether it got quiet, how busy it was and the 1-minute load."""
    start = time.monotonic()
    while True:
        busy = busy_cpus()
        waited = time.monotonic() - start
        if busy < threshold or waited >= max_wait_s:
            load1 = float(Path("/proc/loadavg").read_text().split()[0])
            return {
                "quiet": busy < threshold,
                "busy_cpus_before": busy,
                "load1": load1,
                "waited_s": waited,
            }
        time.sleep(2.0)


def _cpu_seconds(jiffies: int) -> float:
    return jiffies / os.sysconf("SC_CLK_TCK")


class Child:
    """One variant's fresh process, driven step by step over its stdin/stdout."""

    def __init__(self, name: str, args, log_dir: Path):
        cmd = [sys.executable, __file__, "--variant", name, "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--threads", str(args.threads),
               "--out", args.out]  # fmt: skip
        threads = str(args.threads)
        env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        self.name = name
        self.log = log_dir / f"{name}.stderr"
        with self.log.open("w") as err:  # the child holds its own copy of the descriptor
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True,
                env=env,
            )  # fmt: skip

    def expect(self, tag: str) -> dict:
        """The payload of the child's next `tag` line (library prints in between are skipped)."""
        for line in self.proc.stdout:
            if line.startswith(TAG):
                got, payload = line[len(TAG) :].split(" ", 1)
                if got != tag:
                    raise RuntimeError(f"{self.name}: expected {tag}, got {got}")
                return json.loads(payload)
        self.proc.wait()
        tail = self.log.read_text()[-4000:]
        raise RuntimeError(f"variant {self.name} failed (exit {self.proc.returncode}):\n{tail}")

    def send(self, word: str) -> None:
        self.proc.stdin.write(word + "\n")
        self.proc.stdin.flush()

    def pause(self) -> None:
        """Stop every thread of the child (SIGSTOP): an idle process still wakes (the engine's
        gloo I/O threads poll every 10 ms) and would steal time from the one being timed."""
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def step(self) -> dict:
        self.resume()
        self.send("step")
        got = self.expect("STEP")
        self.pause()
        return got


def run_pass(names: list[str], args) -> dict[str, dict]:
    """One pass: a fresh process per variant, all set up first; then they take turns, one step
    at a time (only one runs at any moment; the order reverses every round), so a machine that
    speeds up or slows down over the minutes affects every variant alike. Each step also
    records how much CPU other processes used meanwhile (`others_cpus`, in CPUs)."""
    log_dir = Path(args.out) / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    children = [Child(n, args, log_dir) for n in names]
    try:
        for c in children:
            c.expect("READY")
            c.pause()
        quiet = wait_quiet(args.quiet_cpus, args.quiet_wait)
        if not quiet["quiet"]:
            print(f"  warning: the CPUs are busy ({quiet['busy_cpus_before']:.2f} CPUs of work, "
                  f"load {quiet['load1']:.2f}) before the steps", flush=True)  # fmt: skip
        others: dict[str, list[float]] = {n: [] for n in names}
        for k, c in pv.in_turns(children, args.warmup + args.steps):
            b0, _ = _cpu_jiffies()
            step = c.step()
            b1, _ = _cpu_jiffies()
            if k >= args.warmup:
                busy = _cpu_seconds(b1 - b0) - step["cpu_s"]
                others[c.name].append(max(busy, 0.0) / step["s"])
        results = {}
        for c in children:
            c.resume()
            c.send("end")
            results[c.name] = c.expect("RESULT")
            c.proc.wait()
            results[c.name].update(quiet, others_cpus=statistics.median(others[c.name]))
        return results
    finally:
        for c in children:
            if c.proc.poll() is None:
                c.resume()
                c.proc.kill()


# -- models, table, ratios ------------------------------------------------------------------------
def build_models(out: Path) -> dict:
    """Save the teacher and the student as HF directories under `out`; their parameter counts."""
    import torch
    import transformers

    counts = {}
    for name, shape, seed in (("teacher", TEACHER, 0), ("student", STUDENT, 1)):
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA, **shape))
        model.save_pretrained(out / name)
        counts[name] = sum(p.numel() for p in model.parameters())
    return counts


def _median(results: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in results)


def _target(value: float, op: str, bound: float, what: str) -> dict:
    met = value <= bound if op == "<=" else value >= bound
    return {"value": value, "target": f"{op} {bound:.2f}", "met": met, "what": what}


def ratios(by_name: dict[str, list[dict]]) -> dict:
    """The ratios issue 16's targets name, from the median over passes of each variant."""
    have = set(by_name)
    ms = {k: _median(v, "ms_per_step") for k, v in by_name.items()}
    tps = {k: _median(v, "tokens_per_s") for k, v in by_name.items()}
    rss = {k: _median(v, "peak_rss_mib") for k, v in by_name.items()}
    out = {}
    if {"distill", "pretrain", "teacher_forward"} <= have:
        ideal = ms["pretrain"] + ms["teacher_forward"]
        what = "our KD step / (our student step + our teacher forward)"
        out["kd_step_over_ideal"] = _target(ms["distill"] / ideal, "<=", 1.0, what)
    for peer in ("modelopt_hf", "plain_kd"):
        if {"distill", peer} <= have:
            what = f"our default distill's tokens/s / {peer}'s"
            out[f"tokens_per_s_over_{peer}"] = _target(tps["distill"] / tps[peer], ">=", 1.2, what)
    if {"distill", "modelopt_hf"} <= have:
        what = f"our peak RSS {rss['distill']:.0f} MiB / ModelOpt-HF's {rss['modelopt_hf']:.0f} MiB"
        out["peak_rss_over_modelopt_hf"] = _target(
            rss["distill"] / rss["modelopt_hf"], "<=", 1.0, what
        )
    return out


def loss_agreement(by_name: dict[str, list[dict]]) -> dict:
    """Max |loss difference| over the steps of each pair of variants that should compute the
    same loss from the same weights, batch and optimizer (a check of the set-up, first pass)."""
    out = {}
    for a, b in (("distill", "modelopt_hf"), ("distill", "plain_kd"), ("pretrain", "hf_student")):
        if a in by_name and b in by_name:
            la, lb = by_name[a][0]["losses"], by_name[b][0]["losses"]
            out[f"{a}_vs_{b}"] = max(abs(x - y) for x, y in zip(la, lb))
    return out


def print_table(by_name: dict[str, list[dict]], result: dict) -> None:
    """The figures per variant (pass 1 / pass 2 / ...), then the ratios."""

    def cells(runs: list[dict], key: str, fmt: str) -> str:
        return " / ".join(format(r[key], fmt) for r in runs)

    print(
        f"{'implementation':<42} {'ms/step':>15} {'tokens/s':>13} {'peak RSS MiB':>13} "
        f"{'kernel ms':>11} {'others CPUs':>11}"
    )
    for name, runs in by_name.items():
        print(
            f"{LABELS[name]:<42} {cells(runs, 'ms_per_step', '.0f'):>15} "
            f"{cells(runs, 'tokens_per_s', '.0f'):>13} {cells(runs, 'peak_rss_mib', '.0f'):>13} "
            f"{cells(runs, 'sys_ms_per_step', '.0f'):>11} {cells(runs, 'others_cpus', '.2f'):>11}"
        )
    print("\nratios (median over passes):")
    for r in result["ratios"].values():
        print(
            f"  {r['value']:6.3f}  target {r['target']:<8} {'met' if r['met'] else 'NOT met':<8}"
            f" {r['what']}"
        )
    steps = len(next(iter(by_name.values()))[0]["losses"])
    for pair, diff in result["loss_agreement"].items():
        print(f"  same loss: max |{pair.replace('_vs_', ' - ')}| = {diff:.1e} over {steps} steps")
    busy = [r for runs in by_name.values() for r in runs if not r["quiet"]]
    if busy:
        print(f"\nwarning: {len(busy)} run(s) started on a busy machine; see 'quiet' in the JSON")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10, help="timed steps per variant (median)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--passes", type=int, default=2, help="2: all again in fresh processes")
    ap.add_argument("--threads", type=int, default=2, help="torch threads per process")
    ap.add_argument(
        "--variants",
        default=",".join(DEFAULT_VARIANTS),
        help=f"comma-separated, or 'all' (adds {', '.join(EXTRA_VARIANTS)})",
    )
    ap.add_argument(
        "--quiet-cpus",
        type=float,
        default=0.3,
        help="start the steps once the machine does under this many CPUs of work",
    )
    ap.add_argument("--quiet-wait", type=float, default=60.0, help="longest wait for quiet (s)")
    ap.add_argument("--out", default="runs/bench/peers")
    ap.add_argument("--variant", help=argparse.SUPPRESS)  # a child process: time this one
    args = ap.parse_args()
    out = Path(args.out)
    if args.variant:
        serve(args.variant, out, args.warmup + args.steps, args.warmup, args.threads)
        return

    names = (
        DEFAULT_VARIANTS + EXTRA_VARIANTS if args.variants == "all" else args.variants.split(",")
    )
    unknown = set(names) - set(LABELS)
    if unknown:
        ap.error(f"unknown variants {sorted(unknown)}; choose from {list(LABELS)}")
    out.mkdir(parents=True, exist_ok=True)
    params = build_models(out)
    by_name: dict[str, list[dict]] = {n: [] for n in names}
    for p in range(args.passes):
        print(f"pass {p + 1}: {', '.join(names)} in turns", flush=True)
        for name, result in run_pass(names, args).items():
            by_name[name].append(result)
    import torch
    import transformers

    result = {
        "shapes": {
            "batch": pv.BATCH,
            "seq": pv.SEQ,
            "vocab": pv.VOCAB,
            "teacher": TEACHER,
            "student": STUDENT,
            "params": params,
        },
        "settings": {
            "dtype": "float32",
            "threads": args.threads,
            "steps": args.steps,
            "warmup": args.warmup,
            "passes": args.passes,
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "variants": by_name,
    }
    result["ratios"] = ratios(by_name)
    result["loss_agreement"] = loss_agreement(by_name)
    (out / "peers.json").write_text(json.dumps(result, indent=2))
    print()
    print_table(by_name, result)
    print(f"\nwrote {out / 'peers.json'}")


if __name__ == "__main__":
    main()
