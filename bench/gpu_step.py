"""KD step time, memory and MFU on one GPU: a Llama-3.2-1B-shaped teacher distilled into a
Qwen2.5-0.5B-shaped student, random weights, bf16, mock data (issue 16, item 3).

    bash bench/gpu.sh                        # versions, then this script under `timeout 280`
    python bench/gpu_step.py [--micro-batch 2] [--seq 4096] [--steps 5] [--warmup 2]
    .venv/bin/python bench/gpu_step.py --cpu-smoke --steps 1 --warmup 1   # tiny, fp32, CPU

One process, TP=1, global batch = micro-batch. Three phases, one after another, each the median
of `--steps` timed calls after `--warmup` untimed ones, with torch.cuda.synchronize before and
after each call:
  1. student step: `Trainer.train_step` of the student alone (LM loss, AdamW, clipping);
  2. teacher forward: the teacher's forward pass alone, under no_grad, on one fixed batch;
  3. KD step: `Trainer.train_step` of the ModelOpt-wrapped student + teacher, default KDConfig.
Each phase's peak GPU memory is `torch.cuda.max_memory_allocated` after a reset at its start
(so it includes the weights and optimizer state it holds). MFU counts
6 x student params x tokens + 2 x teacher params x tokens per KD step (parameters from
`ModelConfig.num_parameters`: embeddings included, a tied output layer once; the attention
score FLOPs, which grow with the sequence, are not counted) over `--peak-tflops`.
Writes runs/bench/gpu_step.json (runs/bench/gpu_step_smoke.json with --cpu-smoke).
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from distill_llm.data.datasets import BatchPlan, DataConfig, DataModule
from distill_llm.engine import parallel
from distill_llm.engine.model import ModelConfig, build_gpt
from distill_llm.engine.training import OptimConfig, TrainConfig, Trainer
from distill_llm.kd.config import KDConfig

SEED = 1
GIB = 2**30
# H100 / H200 SXM dense bf16 tensor-core peak; a plain 8192^3 bf16 matmul reaches ~790 on H200.
DEFAULT_PEAK_TFLOPS = 989.0
FLOP_COUNT = (
    "6 x student params x tokens + 2 x teacher params x tokens per KD step "
    "(params = ModelConfig.num_parameters: embeddings included, tied output layer counted once; "
    "attention-score FLOPs (~seq^2) not counted)"
)


def full_shapes(seq: int) -> tuple[ModelConfig, ModelConfig]:
    """Teacher: Llama 3.2 1B (1.236 B params). Student: Qwen2.5 0.5B's body with the teacher's
    128,256-token vocabulary (0.473 B params). The same shapes as recipes/models.py's
    `llama32_1b` / `qwen25_0p5b`, written out because recipes import nemo_run, which the GPU
    image lacks."""
    teacher = ModelConfig(
        num_layers=16,
        hidden_size=2048,
        ffn_hidden_size=8192,  # per SwiGLU branch
        num_attention_heads=32,
        num_query_groups=8,
        kv_channels=64,
        vocab_size=128256,
        max_seq_length=seq,
        rotary_base=500000,
        rope_scaling=True,  # Llama 3.x frequency scaling, factor 32 for 3.2
        rope_scaling_factor=32.0,
        tie_embeddings=True,
    )
    student = ModelConfig(
        num_layers=24,
        hidden_size=896,
        ffn_hidden_size=4864,
        num_attention_heads=14,  # head width 64; 14 % 2 groups = 0, TP=1 divides everything
        num_query_groups=2,
        vocab_size=128256,  # the teacher's vocabulary (Qwen2.5's own is 151,936)
        max_seq_length=seq,
        rotary_base=1000000,
        add_qkv_bias=True,
        norm_epsilon=1e-6,
        tie_embeddings=True,
    )
    return teacher, student


def smoke_shapes(seq: int) -> tuple[ModelConfig, ModelConfig]:
    """CPU-sized models with the same features (GQA, tied, llama3 RoPE, QKV bias)."""
    teacher = ModelConfig(
        num_layers=2,
        hidden_size=64,
        ffn_hidden_size=128,
        num_attention_heads=4,
        num_query_groups=2,
        vocab_size=1024,
        max_seq_length=seq,
        rotary_base=500000,
        rope_scaling=True,
        rope_scaling_factor=32.0,
        tie_embeddings=True,
    )
    student = ModelConfig(
        num_layers=2,
        hidden_size=32,
        ffn_hidden_size=64,
        num_attention_heads=2,
        num_query_groups=1,
        vocab_size=1024,
        max_seq_length=seq,
        add_qkv_bias=True,
        tie_embeddings=True,
    )
    return teacher, student


def versions() -> dict[str, str]:
    """Python, torch (with CUDA and the device), megatron-core, ModelOpt and TransformerEngine
    versions; "absent" for a package that is not installed."""

    def dist(*names: str) -> str:
        for name in names:
            try:
                return importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                pass
        return "absent"

    try:  # what engine.model.layer_spec tests before picking the TE spec
        import transformer_engine

        te = getattr(transformer_engine, "__version__", None) or dist("transformer-engine")
    except Exception as err:  # a broken TE install is worth reporting, not dying on
        te = f"not importable ({type(err).__name__}: {err})"[:200]
    cuda = torch.cuda.is_available()
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "megatron-core": dist("megatron-core"),
        "nvidia-modelopt": dist("nvidia-modelopt"),
        "transformer_engine": te,
    }


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn, steps: int, warmup: int) -> list[float]:
    """Seconds of each of `steps` calls of `fn` after `warmup` untimed ones, the device
    synchronised before and after each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return times


class Phase:
    """One timed phase: frees what earlier phases left, resets the peak-memory counter, and
    records the median time, the tokens/s and the peak memory."""

    def __init__(self, tokens: int):
        self.tokens = tokens
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.left_over = torch.cuda.memory_allocated() / GIB  # earlier phases' leftovers
        else:
            self.left_over = None

    def run(self, fn, steps: int, warmup: int) -> dict:
        """Times `fn` and returns this phase's figures."""
        times = _timed(fn, steps, warmup)
        median = statistics.median(times)
        peak = torch.cuda.max_memory_allocated() / GIB if torch.cuda.is_available() else None
        return {
            "median_s": median,
            "times_s": times,
            "tokens_per_s": self.tokens / median,
            "peak_memory_gib": peak,
            "allocated_at_start_gib": self.left_over,
        }


def _trainer(model, student: ModelConfig, data: DataModule, args, prec, teacher=None) -> Trainer:
    train = TrainConfig(
        steps=1000,  # only sets the LR schedule's length
        micro_batch_size=args.micro_batch,
        global_batch_size=args.micro_batch,
        seq_length=args.seq,
    )
    return Trainer(
        model=model,
        student_cfg=student,
        data=data,
        train=train,
        optim=OptimConfig(),
        parallel_cfg=prec,
        run_dir=Path(args.out),  # nothing is written there by train_step
        teacher=teacher,
    )


def _core_attention(model) -> str:
    """The class of the first layer's core attention: which attention kernel was timed."""
    layer = model.decoder.layers[0]
    return type(layer.self_attention.core_attention).__name__


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def run(args) -> dict:
    """Builds the models, times the three phases and returns every figure."""
    smoke = args.cpu_smoke
    teacher_cfg, student_cfg = (smoke_shapes if smoke else full_shapes)(args.seq)
    for role, cfg in (("teacher", teacher_cfg), ("student", student_cfg)):
        cfg.validate(role=role)
    prec = parallel.ParallelConfig(precision="fp32" if smoke else "bf16")
    parallel.initialize(prec, seed=SEED)
    tokens = args.micro_batch * args.seq
    steps_needed = args.warmup + args.steps + 1  # per trainer; each reads from sample 0
    data = DataModule(
        DataConfig(),  # megatron-core's mock GPT data
        DataConfig().resolve({"student": student_cfg.vocab_size}, args.seq),
        seq_length=args.seq,
        plan=BatchPlan(args.micro_batch, args.micro_batch, 1),
        train_samples=args.micro_batch * steps_needed,
        valid_samples=args.micro_batch,
        seed=SEED,
    )
    dtype = prec.params_dtype
    out: dict = {"phases": {}}

    # 1. the student alone
    phase = Phase(tokens)
    student = build_gpt(student_cfg, params_dtype=dtype)
    out["core_attention"] = {"student": _core_attention(student)}
    out["built_params"] = {"student": _count(student)}
    trainer = _trainer(student, student_cfg, data, args, prec)
    batches = data.train_batches(0)
    out["phases"]["student_step"] = phase.run(
        lambda: trainer.train_step(batches), args.steps, args.warmup
    )
    out["student_losses"] = trainer.train_step(batches)
    del trainer, student, batches

    # 2. the teacher's forward pass alone, as the KD step runs it (no grad, eval mode)
    phase = Phase(tokens)
    teacher = build_gpt(teacher_cfg, params_dtype=dtype).eval()
    out["core_attention"]["teacher"] = _core_attention(teacher)
    out["built_params"]["teacher"] = _count(teacher)
    batch = next(data.train_batches(0))
    if torch.cuda.is_available():
        batch = {k: v.cuda() for k, v in batch.items()}

    def teacher_forward():
        with torch.no_grad():
            teacher(batch["tokens"], batch["position_ids"], None)

    out["phases"]["teacher_forward"] = phase.run(teacher_forward, args.steps, args.warmup)

    # 3. the KD step: a fresh student (same seed, same initial weights) wrapped with the teacher
    from distill_llm.kd import wrapper  # ModelOpt: imported only once it is needed

    phase = Phase(tokens)
    parallel.seed_everything(SEED)
    student = build_gpt(student_cfg, params_dtype=dtype)
    wrapped = wrapper.build_distillation_model(student, teacher, KDConfig())
    trainer = _trainer(wrapped, student_cfg, data, args, prec, wrapper.OnlineTeacher(wrapped))
    batches = data.train_batches(0)
    out["phases"]["kd_step"] = phase.run(
        lambda: trainer.train_step(batches), args.steps, args.warmup
    )
    out["kd_losses"] = trainer.train_step(batches)

    t = {name: p["median_s"] for name, p in out["phases"].items()}
    n_s, n_t = student_cfg.num_parameters(), teacher_cfg.num_parameters()
    peak = args.peak_tflops * 1e12
    flops = {
        "kd_step": (6 * n_s + 2 * n_t) * tokens,
        "student_step": 6 * n_s * tokens,
        "teacher_forward": 2 * n_t * tokens,
    }
    out.update(
        versions=versions(),
        precision=prec.precision,
        cpu_smoke=smoke,
        micro_batch=args.micro_batch,
        seq_length=args.seq,
        tokens_per_step=tokens,
        steps=args.steps,
        warmup=args.warmup,
        teacher=dict(teacher_cfg.to_dict(), params=n_t),
        student=dict(student_cfg.to_dict(), params=n_s),
        kd_over_ideal=t["kd_step"] / (t["student_step"] + t["teacher_forward"]),
        flop_count=FLOP_COUNT,
        peak_tflops=args.peak_tflops,
        model_flops=flops,
        mfu={name: flops[name] / t[name] / peak for name in flops},
    )
    return out


def report(res: dict) -> str:
    """The figures as a few readable lines."""
    lines = [
        f"device {res['versions']['device']}, {res['precision']}, micro-batch "
        f"{res['micro_batch']} x seq {res['seq_length']} = {res['tokens_per_step']} tokens/step, "
        f"median of {res['steps']} after {res['warmup']} warm-up",
        f"teacher {res['teacher']['params'] / 1e6:,.1f} M params "
        f"({res['core_attention']['teacher']}), student {res['student']['params'] / 1e6:,.1f} M "
        f"({res['core_attention']['student']})",
        f"{'phase':<16}{'ms':>10}{'tokens/s':>12}{'peak GiB':>10}{'MFU':>8}",
    ]
    for name, p in res["phases"].items():
        peak = f"{p['peak_memory_gib']:.1f}" if p["peak_memory_gib"] is not None else "-"
        lines.append(
            f"{name:<16}{p['median_s'] * 1e3:>10.1f}{p['tokens_per_s']:>12.0f}{peak:>10}"
            f"{res['mfu'][name]:>8.1%}"
        )
    lines += [
        f"KD step / (student step + teacher forward) = {res['kd_over_ideal']:.3f}",
        f"MFU = {res['flop_count']}, over {res['peak_tflops']:g} TFLOP/s",
        "last KD step: " + ", ".join(f"{k} {v:.4g}" for k, v in res["kd_losses"].items()),
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--micro-batch", type=int, default=2, help="sequences per step (= global)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per sequence (4096; smoke 64)")
    ap.add_argument("--steps", type=int, default=5, help="timed calls per phase")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls before them")
    ap.add_argument(
        "--peak-tflops",
        type=float,
        default=DEFAULT_PEAK_TFLOPS,
        help="the device's dense bf16 peak, for MFU (989: H100/H200 SXM)",
    )
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny fp32 models on the CPU")
    ap.add_argument("--out", default="runs/bench")
    ap.add_argument("--versions", action="store_true", help="print the versions and exit")
    args = ap.parse_args()
    if args.versions:
        for name, version in versions().items():
            print(f"{name}: {version}")
        return
    if args.seq is None:
        args.seq = 64 if args.cpu_smoke else 4096
    if args.cpu_smoke:
        torch.set_num_threads(2)
    elif not torch.cuda.is_available():
        raise SystemExit("no CUDA device visible: run on a GPU, or pass --cpu-smoke")
    try:
        res = run(args)
    except torch.cuda.OutOfMemoryError:
        raise SystemExit(
            f"out of GPU memory at micro-batch {args.micro_batch} x seq {args.seq}: rerun with "
            "--micro-batch 1 (or --seq 2048)"
        ) from None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / ("gpu_step_smoke.json" if args.cpu_smoke else "gpu_step.json")
    path.write_text(json.dumps(res, indent=2))
    print(report(res))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
