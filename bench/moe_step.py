"""KD with a mixture-of-experts teacher vs a dense teacher of the same active size, on the CPU.

    .venv/bin/python bench/moe_step.py [--steps 10]

The MoE teacher has 8 experts, top-2, each expert as wide as half the dense teacher's FFN, so a
token meets the same number of FFN weights in both (same active parameters; the MoE one holds
4x the FFN weights). Both teach the same dense student, with the same batch (8 x 128 tokens),
one process, 2 threads. Prints and writes runs/bench/moe_step.json: the median KD step time
with each teacher, each teacher's forward alone, and, for the MoE teacher, the forward split
into its parts (router, token dispatch/permutation, expert MLPs) measured with forward hooks.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from step_time import STUDENT, _trainer  # the engine's real training step, as step_time.py

from distill_llm.engine import parallel
from distill_llm.engine.model import ModelConfig, build_gpt
from distill_llm.kd import wrapper
from distill_llm.kd.config import KDConfig

BASE = dict(num_layers=4, hidden_size=128, num_attention_heads=4, vocab_size=1024,
            max_seq_length=128)  # fmt: skip
DENSE_TEACHER = ModelConfig(**BASE, ffn_hidden_size=512)
MOE_TEACHER = ModelConfig(**BASE, ffn_hidden_size=512, num_experts=8, moe_topk=2,
                          moe_ffn_hidden_size=256)  # fmt: skip
BATCH, SEQ = 8, 128


def _median(fn, steps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _forward(teacher, tokens, positions) -> None:
    with torch.no_grad():
        teacher(tokens, positions, None)


def _parts(teacher, tokens, positions, steps: int) -> dict:
    """Seconds per forward spent in the MoE layers' router, experts and the rest of the MoE
    layer (token dispatch, permutation, combine), from forward pre/post hooks."""
    spent = {"router": 0.0, "experts": 0.0, "moe_layer": 0.0}
    starts = {}

    def timed(name, module):
        module.register_forward_pre_hook(lambda m, a: starts.__setitem__(name, time.perf_counter()))
        module.register_forward_hook(
            lambda m, a, o: spent.__setitem__(
                name, spent[name] + time.perf_counter() - starts[name]
            )
        )

    for layer in teacher.decoder.layers:
        timed("router", layer.mlp.router)
        timed("experts", layer.mlp.experts)
        timed("moe_layer", layer.mlp)
    with torch.no_grad():
        for _ in range(steps):
            teacher(tokens, positions, None)
    parts = {k: v / steps for k, v in spent.items()}
    parts["dispatch_and_combine"] = parts.pop("moe_layer") - parts["router"] - parts["experts"]
    return parts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", default="runs/bench")
    args = ap.parse_args()
    torch.set_num_threads(2)
    parallel.initialize(parallel.ParallelConfig(), seed=1)
    tokens = torch.randint(0, 1024, (BATCH, SEQ))
    positions = torch.arange(SEQ).expand(BATCH, SEQ)
    result = {"batch": BATCH, "seq": SEQ, "threads": torch.get_num_threads()}
    for name, cfg in (("dense", DENSE_TEACHER), ("moe", MOE_TEACHER)):
        teacher = build_gpt(cfg).eval()
        t_forward = _median(lambda t=teacher: _forward(t, tokens, positions), args.steps)
        wrapped = wrapper.build_distillation_model(build_gpt(STUDENT), teacher, KDConfig())
        trainer = _trainer(wrapped, wrapper.OnlineTeacher(wrapped), Path(args.out))
        it = trainer.data.train_batches(0)
        t_step = _median(lambda tr=trainer, i=it: tr.train_step(i), args.steps)
        entry = {
            "teacher_params": cfg.num_parameters(),
            "teacher_active_params": cfg.num_parameters(active=True),
            "kd_step_s": t_step,
            "teacher_forward_s": t_forward,
        }
        if name == "moe":
            entry["teacher_forward_parts_s"] = _parts(teacher, tokens, positions, args.steps)
        result[name] = entry
    result["kd_step_ratio_moe_over_dense"] = (
        result["moe"]["kd_step_s"] / result["dense"]["kd_step_s"]
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "moe_step.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
