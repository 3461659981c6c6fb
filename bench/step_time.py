"""Step-time figures of the engine on tiny shapes, on the CPU with 2 threads.

    make bench            # or: .venv/bin/python bench/step_time.py [--steps 20]

Prints (and writes to runs/bench/step_time.json) the median time of
  - a KD training step (teacher forward + student forward/backward + KD loss + optimizer),
  - a student-only training step (the same loop, no teacher),
  - a teacher forward pass alone (no grad),
  - the pieces that KD adds on top: the logits KL loss forward+backward, and the
    student CE that is computed for logging when skip_lm_loss is set,
and the ratio KD / (student-only + teacher forward); 1.0 would be free distillation.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from distill_llm.data.datasets import BatchPlan, DataConfig, DataModule
from distill_llm.engine import parallel
from distill_llm.engine.model import ModelConfig, build_gpt
from distill_llm.engine.training import OptimConfig, TrainConfig, Trainer
from distill_llm.kd import wrapper
from distill_llm.kd.config import KDConfig

TEACHER = ModelConfig(
    num_layers=4,
    hidden_size=128,
    ffn_hidden_size=352,
    num_attention_heads=4,
    vocab_size=1024,
    max_seq_length=128,
)
STUDENT = ModelConfig(
    num_layers=2,
    hidden_size=64,
    ffn_hidden_size=176,
    num_attention_heads=4,
    vocab_size=1024,
    max_seq_length=128,
)
BATCH, SEQ = 8, 128


def _median_time(fn, steps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _trainer(model, teacher, out: Path) -> Trainer:
    train = TrainConfig(steps=1000, micro_batch_size=BATCH, global_batch_size=BATCH, seq_length=SEQ)
    data = DataModule(
        DataConfig(),
        DataConfig().resolve({"student": STUDENT.vocab_size}, SEQ),
        seq_length=SEQ,
        plan=BatchPlan(BATCH, BATCH, 1),
        train_samples=BATCH * 200,
        valid_samples=BATCH,
        seed=1,
    )
    return Trainer(
        model=model,
        student_cfg=STUDENT,
        data=data,
        train=train,
        optim=OptimConfig(),
        parallel_cfg=parallel.ParallelConfig(),
        run_dir=out,
        teacher=teacher,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default="runs/bench")
    args = ap.parse_args()
    torch.set_num_threads(2)
    out = Path(args.out)
    parallel.initialize(parallel.ParallelConfig(), seed=1)

    student_only = _trainer(build_gpt(STUDENT), None, out)
    it = student_only.data.train_batches(0)
    t_student = _median_time(lambda: student_only.train_step(it), args.steps)

    teacher = build_gpt(TEACHER).eval()
    batch = next(student_only.data.train_batches(0))

    def teacher_forward():
        with torch.no_grad():
            teacher(batch["tokens"], batch["position_ids"], None)

    t_teacher = _median_time(teacher_forward, args.steps)

    wrapped = wrapper.build_distillation_model(build_gpt(STUDENT), teacher, KDConfig())
    distill = _trainer(wrapped, wrapper.OnlineTeacher(wrapped), out)
    it = distill.data.train_batches(0)
    t_kd = _median_time(lambda: distill.train_step(it), args.steps)

    # The pieces KD adds, timed alone on logits of the same shape.
    from modelopt.torch.distill.plugins.megatron import LogitsKLLoss

    vocab = STUDENT.padded_vocab_size()
    s_logits = torch.randn(SEQ, BATCH, vocab, requires_grad=True)
    t_logits = torch.randn(SEQ, BATCH, vocab)
    kl = LogitsKLLoss(distill.inner.config)

    def kl_step():
        kl(s_logits, t_logits)[0].sum().backward()

    t_kl = _median_time(kl_step, args.steps)
    labels = torch.randint(0, vocab, (BATCH, SEQ))

    def logging_ce():
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        with torch.no_grad():
            vocab_parallel_cross_entropy(s_logits.detach().clone(), labels.t().contiguous())

    t_ce = _median_time(logging_ce, args.steps)

    ideal = t_student + t_teacher
    result = {
        "shapes": {
            "batch": BATCH,
            "seq": SEQ,
            "vocab": vocab,
            "teacher_params": TEACHER.num_parameters(),
            "student_params": STUDENT.num_parameters(),
        },
        "threads": torch.get_num_threads(),
        "kd_step_s": t_kd,
        "student_only_step_s": t_student,
        "teacher_forward_s": t_teacher,
        "kd_ratio": t_kd / ideal,
        "kl_loss_fwd_bwd_s": t_kl,
        "logging_ce_s": t_ce,
        "unexplained_s": t_kd - ideal - t_kl - t_ce,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "step_time.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
