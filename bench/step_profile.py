"""Where each millisecond of a KD step goes: torch.profiler over bench/peers.py's steps, the
operators' own CPU time grouped by kind, for our `distill` and for the peers.

    .venv/bin/python bench/step_profile.py [--variants distill modelopt_hf plain_kd] [--steps 4]
                                           [--shapes] [--one-process]

Runs after bench/peers.py has written its HF models (runs/bench/peers/{teacher,student}); each
variant in a fresh process, one at a time, 2 threads, `--warmup` untimed steps then `--steps`
profiled ones. Operators are grouped by their own ("self") CPU time:
  gemm         matrix products (mm, addmm, bmm, linear's kernels): the floor every
               implementation of the same models pays with the same BLAS
  attention    scaled_dot_product_attention (flash / math kernels) and the unfused path's softmax
  softmax/exp  log_softmax, softmax, exp, logsumexp and their backwards outside attention
  elementwise  the remaining pointwise and reduction kernels (norms, SwiGLU, RoPE, KL terms)
  copy/alloc   copies, casts, cat, empty/zeros, contiguous
  optimizer    AdamW's foreach kernels and the gradient-norm clipping
  other        everything else
Writes runs/bench/peers/profile.json and prints a table of ms per step per group, plus each
peer's ceiling: its step's operator time over the least matrix-product-and-attention time of
the KD columns (`ceilings`), the most any KD step of these FLOPs could gain over that peer if
everything but its matrix products and attention cost nothing. Below 1.2, issue 16's 1.2x
target is out of reach for float32 operators on this machine. `--shapes` adds the matrix
products by operand shapes with their GFLOP/s (the same shapes at different rates: a layout
difference, or noise). `--one-process` instead builds every variant in this one process and
profiles one step of each in turn: the comparison between implementations then does not depend
on which minutes each ran in (this machine's speed drifts by up to 20%), and all run under the
engine's allocator settings, so the table compares the operators' work alone; it then times as
many unprofiled steps of each, in turns, by the clock (the "wall clock" row). With `distill`,
`pretrain` and `teacher_forward` among the variants it prints the KD step over their sum (issue
16's "ideal") by operators' time and by wall clock, all in one process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import peers_variants as pv  # bench/ is this script's directory, hence on sys.path

GROUPS = ("gemm", "attention", "softmax/exp", "elementwise", "copy/alloc", "optimizer", "other")
TAG = "PROFILE_RESULT "


def group_of(name: str) -> str:
    """The group of an aten operator name (see the module docstring)."""
    n = name.removeprefix("aten::")
    if n in ("mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "dot", "mv", "addmv"):
        return "gemm"
    if "scaled_dot_product" in n or "flash_attention" in n or "efficient_attention" in n:
        return "attention"
    if "foreach" in n or "adam" in n or "clip_grad" in n or "norm_" in n and "multi" in n:
        return "optimizer"
    if any(k in n for k in ("softmax", "logsumexp", "exp")) and "expand" not in n:
        return "softmax/exp"
    if any(
        k in n for k in ("copy", "clone", "to_copy", "cat", "empty", "zeros", "contiguous", "fill_")
    ):
        return "copy/alloc"
    if any(
        k in n
        for k in (
            "mul", "add", "sub", "div", "neg", "pow", "rsqrt", "sqrt", "mean", "sum", "silu",
            "sigmoid", "where", "gather", "scatter", "xlogy", "log", "max", "min", "masked",
            "cos", "sin", "clamp", "abs", "norm", "lerp", "index", "embedding", "nll",
            "cross_entropy",
        )
    ):  # fmt: skip
        return "elementwise"
    return "other"


def gemm_shapes(prof, steps: int) -> list:
    """The matrix products by operand shapes: ms per step, calls per step and GFLOP/s (2 m n k
    per product), slowest first. A product of the same shapes costs every implementation the
    same FLOPs; its rate says how well the BLAS ran it."""
    rows = []
    for event in prof.key_averages(group_by_input_shape=True):
        if group_of(event.key) != "gemm" or event.key in ("aten::linear", "aten::matmul"):
            continue
        shapes = [list(s) for s in event.input_shapes if s]
        a, b = (shapes[-2], shapes[-1]) if event.key == "aten::addmm" else (shapes[0], shapes[1])
        if len(a) != 2 or len(b) != 2:
            continue
        flops = 2 * a[0] * a[1] * b[1] * event.count
        ms = event.self_cpu_time_total / 1e3
        rows.append({"op": event.key, "a": a, "b": b, "ms_per_step": ms / steps,
                     "calls_per_step": event.count / steps,
                     "gflops": flops / max(ms, 1e-9) / 1e6})  # fmt: skip
    return sorted(rows, key=lambda r: -r["ms_per_step"])


class Tally:
    """Operators' own CPU time over profiled steps, by group and by operator."""

    def __init__(self, name: str):
        self.name, self.steps = name, 0
        self.by_group, self.by_op = defaultdict(float), defaultdict(float)

    def add(self, prof, steps: int) -> None:
        self.steps += steps
        for event in prof.key_averages():
            own = event.self_cpu_time_total  # microseconds, all profiled steps
            self.by_group[group_of(event.key)] += own
            self.by_op[event.key] += own

    def result(self, gemm_shapes=None) -> dict:
        top = sorted(self.by_op.items(), key=lambda kv: -kv[1])[:15]
        per_step = 1e3 * self.steps
        return {
            "variant": self.name,
            "steps": self.steps,
            "ms_per_step": {g: self.by_group[g] / per_step for g in GROUPS},
            "total_ms_per_step": sum(self.by_op.values()) / per_step,
            "top_ops_ms_per_step": {k: v / per_step for k, v in top},
            "gemm_shapes": gemm_shapes,
        }


KD_VARIANTS = ("distill", "modelopt_hf", "plain_kd")  # the columns that run a full KD step


def ceilings(results: list[dict]) -> tuple[list[str], dict[str, float]]:
    """The KD columns among `results` and, for each peer among them, its step's operator time
    over the least (gemm + attention) time of those columns: every KD step of these models does
    those matrix products and that attention, so no step can be shorter than the least of them
    (a generous floor: it counts the cheapest column's, and nothing else at all)."""
    by = {r["variant"]: r for r in results}
    kd = [n for n in KD_VARIANTS if n in by]
    if "distill" not in kd or len(kd) < 2:
        return kd, {}
    floor = min(by[n]["ms_per_step"]["gemm"] + by[n]["ms_per_step"]["attention"] for n in kd)
    return kd, {n: by[n]["total_ms_per_step"] / floor for n in kd if n != "distill"}


def _build(name: str, out: Path, total_steps: int, threads: int):
    import torch

    torch.set_num_threads(threads)
    return pv.build(name, out / "teacher", out / "student", total_steps, out / "engine")


def profile_variant(
    name: str, out: Path, steps: int, warmup: int, threads: int, shapes: bool = False
) -> dict:
    """Build variant `name` in this process, run `warmup` steps, profile `steps` more."""
    from torch.profiler import ProfilerActivity, profile

    variant = _build(name, out, warmup + steps, threads)
    for _ in range(warmup):
        variant.step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=shapes) as prof:
        for _ in range(steps):
            variant.step()
    tally = Tally(name)
    tally.add(prof, steps)
    return tally.result(gemm_shapes(prof, steps) if shapes else None)


def profile_together(names: list[str], out: Path, steps: int, warmup: int, threads: int):
    """All variants in this one process, one profiled step each in turn (the order reversed
    every round): the same minutes of a drifting machine and the same allocator for all (the
    engine's, `engine/host_memory.py`, set here before any variant is built)."""
    from torch.profiler import ProfilerActivity, profile

    from distill_llm.engine import host_memory

    host_memory.keep_freed_memory()
    variants = {n: _build(n, out, warmup + steps, threads) for n in names}
    for _ in range(warmup):
        for v in variants.values():
            v.step()
    tallies = {n: Tally(n) for n in names}
    for _, name in pv.in_turns(names, steps):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            variants[name].step()
        tallies[name].add(prof, 1)
    # Then the same number of steps unprofiled, in turns, timed by the clock: the wall time of
    # each variant with every variant's models resident in the one process
    walls: dict[str, list[float]] = {n: [] for n in names}
    for _, name in pv.in_turns(names, steps):
        start = time.perf_counter()
        variants[name].step()
        walls[name].append(time.perf_counter() - start)
    results = [tallies[n].result() for n in names]
    for r in results:
        r["wall_ms_per_step"] = 1e3 * statistics.median(walls[r["variant"]])
    return results


def profile_in_child(name: str, args) -> dict:
    """Profile variant `name` in a fresh process (this script with `--variant`)."""
    print(f"profiling {name} ...", flush=True)
    cmd = [sys.executable, __file__, "--variant", name, "--out", args.out]
    cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    cmd += ["--threads", str(args.threads)] + (["--shapes"] if args.shapes else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(TAG)]
    if proc.returncode or not lines:
        sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len(TAG) :])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="+", default=["distill", "modelopt_hf", "plain_kd"])
    ap.add_argument("--steps", type=int, default=4, help="profiled steps per variant")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="runs/bench/peers")
    ap.add_argument("--shapes", action="store_true", help="also the GEMMs by operand shapes")
    ap.add_argument(
        "--one-process",
        action="store_true",
        help="all variants in this process, profiled in turns (same minutes, same allocator)",
    )
    ap.add_argument("--variant", help=argparse.SUPPRESS)  # a child process: profile this one
    args = ap.parse_args()
    out = Path(args.out)
    if args.variant:
        result = profile_variant(
            args.variant, out, args.steps, args.warmup, args.threads, args.shapes
        )
        print(TAG + json.dumps(result), flush=True)
        return
    if not (out / "teacher").is_dir():
        sys.exit(f"no models in {out}: run `.venv/bin/python bench/peers.py` first")
    if args.one_process:
        results = profile_together(args.variants, out, args.steps, args.warmup, args.threads)
    else:
        results = [profile_in_child(name, args) for name in args.variants]
    (out / "profile.json").write_text(json.dumps(results, indent=1))
    head = f"{'ms/step':<14}" + "".join(f"{r['variant']:>14}" for r in results)
    print(head)
    for g in GROUPS + ("total",):
        cells = [r["total_ms_per_step"] if g == "total" else r["ms_per_step"][g] for r in results]
        print(f"{g:<14}" + "".join(f"{c:>14.1f}" for c in cells))
    if all("wall_ms_per_step" in r for r in results):
        print(f"{'wall clock':<14}" + "".join(f"{r['wall_ms_per_step']:>14.1f}" for r in results))
    by = {r["variant"]: r for r in results}
    ideal = ("distill", "pretrain", "teacher_forward")
    if all(n in by for n in ideal):
        for key, what in (("total_ms_per_step", "operators' time"), ("wall_ms_per_step", "wall")):
            if key in by["distill"]:
                ratio = by["distill"][key] / (by["pretrain"][key] + by["teacher_forward"][key])
                print(f"KD step / (student step + teacher forward), {what}: {ratio:.3f}")
    floor, ceiling = ceilings(results)
    for peer, ratio in ceiling.items():
        print(f"{peer} step / least (gemm + attention) of {', '.join(floor)}: {ratio:.3f} "
              f"(the most a KD step could gain over it)")  # fmt: skip
    for r in results:
        print(f"\n{r['variant']}: top operators (ms/step)")
        for k, v in r["top_ops_ms_per_step"].items():
            print(f"  {v:8.1f}  {k}")
    for r in results:
        if r["gemm_shapes"]:
            print(f"\n{r['variant']}: matrix products by shape (ms/step, calls/step, GFLOP/s)")
            for g in r["gemm_shapes"][:20]:
                print(f"  {g['ms_per_step']:8.1f} {g['calls_per_step']:5.0f}x "
                      f"{g['gflops']:6.1f}  {g['op']} {g['a']} @ {g['b']}")  # fmt: skip
    print(f"wrote {out / 'profile.json'}")


if __name__ == "__main__":
    main()
