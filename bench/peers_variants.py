"""The training steps bench/peers.py times, one per fresh process, on the same two models (HF
directories), the same token batch, the same optimizer settings and the same loss.

Every variant is a `Variant`: a `step()` that does one full step (for training: forward,
backward, gradient clipping, AdamW step, LR schedule) and returns its loss, and a `probe`, a
trainable weight of the student's first layer that must have changed after the steps.

Ours (megatron-core engine, driven through `Trainer.train_step` as `distill` and `pretrain` drive
it, without their validation and saves):
  distill          KDConfig() defaults (forward KL, T=1, KD loss alone, LM loss logged)
  pretrain         the same loop without a teacher: the student's own LM loss
  teacher_forward  the teacher GPTModel's forward under no_grad
Peers (transformers LlamaForCausalLM, SDPA attention, use_cache=False):
  modelopt_hf      ModelOpt `mtd.convert(student, mode=[("kd_loss", ...)])` with
                   `mtd.LogitsDistillationLoss` on the lm_head outputs, per-token mean
  plain_kd         teacher under no_grad, KL(softmax(t) || softmax(s)) summed over the
                   vocabulary, mean over tokens
  hf_student       the student alone on its LM loss (cross entropy, mean over tokens)
  hf_teacher_forward  the teacher's forward under no_grad
The peers' AdamW mirrors the engine's (distill_llm.engine.training.OptimConfig and
megatron-core's optimizer): the same lr, betas, eps, weight decay on matrices only (none on
norms and biases), global-norm clipping at clip_grad, and megatron's linear warm-up from 0 then
cosine decay over the steps run.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from distill_llm.engine.training import OptimConfig

BATCH, SEQ, VOCAB = 8, 256, 8192  # sequences per step, tokens per sequence, vocabulary
DATA_SEED = 1234  # the random token batch every variant trains on


@dataclass
class Variant:
    """One timed step and what to check after the steps."""

    step: Callable[[], Optional[float]]  # one step; returns its loss (None for a forward)
    probe: Optional[torch.Tensor] = None  # a trainable student weight that must change
    info: dict = field(default_factory=dict)  # settings worth recording next to the figures


def token_batch() -> torch.Tensor:
    """The batch every variant sees: `[BATCH, SEQ + 1]` int64 random token ids, fixed seed.
    Inputs are `[:, :-1]`, next-token labels `[:, 1:]`: SEQ scored positions per sequence."""
    gen = torch.Generator().manual_seed(DATA_SEED)
    return torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=gen)


def _first_layer_weight(model: torch.nn.Module) -> torch.Tensor:
    """A trainable matrix of the student's first layer (the teacher's never trains)."""
    for name, p in model.named_parameters():
        if p.requires_grad and p.ndim == 2 and "layers.0." in name and "teacher" not in name:
            return p
    raise RuntimeError("no trainable first-layer weight found")


# -- ours: the engine, as distill / pretrain build it --------------------------------------------
def _ours(teacher_dir: Path, student_dir: Path, role: str, total_steps: int, run_dir: Path):
    from distill_llm.data.datasets import BatchPlan, DataConfig, DataModule
    from distill_llm.engine import parallel
    from distill_llm.engine.model import build_gpt
    from distill_llm.engine.training import TrainConfig, Trainer
    from distill_llm.formats import paths
    from distill_llm.kd.config import KDConfig

    # train.steps sets the LR schedule's length: the warm-up and timed steps, nothing more
    train = TrainConfig(
        steps=total_steps, micro_batch_size=BATCH, global_batch_size=BATCH, seq_length=SEQ
    )
    par = parallel.ParallelConfig()
    parallel.initialize(par, train.seed)

    def load(path: Path, what: str):
        cfg = paths.model_config_of(path)
        model = build_gpt(cfg, params_dtype=par.params_dtype)
        paths.load_model(path, model, cfg, role=what)
        return model, cfg

    x = token_batch()
    batch = {
        "tokens": x[:, :-1].contiguous(),
        "labels": x[:, 1:].contiguous(),
        "loss_mask": torch.ones(BATCH, SEQ),
        "position_ids": torch.arange(SEQ).repeat(BATCH, 1),
    }
    if role == "teacher_forward":
        teacher, _ = load(teacher_dir, "teacher")
        teacher.eval()

        def forward() -> None:
            with torch.no_grad():
                teacher(batch["tokens"], batch["position_ids"], None)

        return Variant(forward)

    # As api.distill: the student first, then the teacher, then ModelOpt's wrapper
    model, student_cfg = load(student_dir, "student")
    teacher_side, kd = None, None
    if role == "distill":
        from distill_llm.kd import wrapper

        kd = KDConfig()
        teacher, _ = load(teacher_dir, "teacher")
        model = wrapper.build_distillation_model(model, teacher, kd)
        teacher_side = wrapper.OnlineTeacher(model)
    data_cfg = DataConfig()  # mock data: only the batch plan is used, batches come from `x`
    data = DataModule(
        data_cfg,
        data_cfg.resolve({"student": student_cfg.vocab_size}, SEQ),
        seq_length=SEQ,
        plan=BatchPlan(BATCH, BATCH, 1),
        train_samples=BATCH,
        valid_samples=BATCH,
        seed=train.seed,
    )
    trainer = Trainer(
        model=model,
        student_cfg=student_cfg,
        data=data,
        train=train,
        optim=OptimConfig(),
        parallel_cfg=par,
        run_dir=run_dir,  # nothing is written: no validation, no saves
        teacher=teacher_side,
    )
    batches = itertools.repeat(batch)
    key = "kd" if role == "distill" else "lm"
    info = {"kd": vars(kd) if kd else None, "optim": vars(OptimConfig())}
    return Variant(lambda: trainer.train_step(batches)[key], _first_layer_weight(model), info)


# -- peers: transformers models ------------------------------------------------------------------
def megatron_lr(step: int, total_steps: int, optim: OptimConfig) -> float:
    """The learning rate megatron-core's OptimizerParamScheduler gives optimizer step `step`
    (0-based) as engine.training.build_optimizer sets it up: linear warm-up from 0 over
    min(warmup_steps, total_steps - 1) steps, then cosine decay to min_lr at total_steps."""
    warmup = min(optim.warmup_steps, max(total_steps - 1, 0))
    if warmup > 0 and step <= warmup:
        return optim.lr * step / warmup
    decay = max(total_steps, 1)
    if step > decay:
        return optim.min_lr
    ratio = (step - warmup) / (decay - warmup)
    return optim.min_lr + 0.5 * (math.cos(math.pi * ratio) + 1.0) * (optim.lr - optim.min_lr)


def _trainer_step(model: torch.nn.Module, total_steps: int, loss_fn) -> Callable[[], float]:
    """One AdamW step on `loss_fn()` with the engine's optimizer settings (see the module
    docstring)."""
    optim = OptimConfig()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    decay = [p for n, p in named if p.ndim > 1 and not n.endswith(".bias")]
    no_decay = [p for n, p in named if not (p.ndim > 1 and not n.endswith(".bias"))]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": optim.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=optim.lr,
        betas=(optim.beta1, optim.beta2),
        eps=optim.eps,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: megatron_lr(k, total_steps, optim) / optim.lr
    )

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        if optim.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(params, optim.clip_grad)
        opt.step()
        sched.step()
        return float(loss.detach())

    return step


def _hf(teacher_dir: Path, student_dir: Path, role: str, total_steps: int, run_dir: Path):
    import transformers

    def load(path: Path):
        return transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)

    x = token_batch()
    inputs, labels = x[:, :-1].contiguous(), x[:, 1:].contiguous()
    kw = {"input_ids": inputs, "use_cache": False}  # training: no KV cache built
    if role == "hf_teacher_forward":
        teacher = load(teacher_dir).eval()

        def forward() -> None:
            with torch.no_grad():
                teacher(**kw)

        return Variant(forward, info={"attn": teacher.config._attn_implementation})

    student = load(student_dir).train()
    info = {"attn": student.config._attn_implementation}
    if role == "hf_student":

        def lm_loss() -> torch.Tensor:  # mean over the BATCH x SEQ positions
            logits = student(**kw).logits
            return F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1))

        return Variant(_trainer_step(student, total_steps, lm_loss), _first_layer_weight(student))

    teacher = load(teacher_dir).eval().requires_grad_(False)
    if role == "modelopt_hf":
        import modelopt.torch.distill as mtd

        config = {
            "teacher_model": teacher,
            # the lm_head outputs are the logits [b, s, V]; "none" sums KL over V -> [b, s]
            "criterion": {
                ("lm_head", "lm_head"): mtd.LogitsDistillationLoss(
                    temperature=1.0, reduction="none"
                )
            },
            "loss_balancer": None,
        }
        model = mtd.convert(student, mode=[("kd_loss", config)])

        def kd_loss() -> torch.Tensor:  # forward runs the teacher (no_grad) then the student
            model(**kw)
            return model.compute_kd_loss(loss_reduction_fn=lambda per_token: per_token.mean())

        step = _trainer_step(model, total_steps, kd_loss)
        return Variant(
            step, _first_layer_weight(model), {**info, "modelopt_class": type(model).__name__}
        )

    def plain_kd_loss() -> torch.Tensor:  # KL(p_t || p_s) per position, mean over positions
        with torch.no_grad():
            log_p_t = F.log_softmax(teacher(**kw).logits, dim=-1)
        log_p_s = F.log_softmax(student(**kw).logits, dim=-1)
        kl = F.kl_div(log_p_s, log_p_t, log_target=True, reduction="sum")
        return kl / (BATCH * SEQ)

    return Variant(
        _trainer_step(student, total_steps, plain_kd_loss), _first_layer_weight(student), info
    )


def in_turns(items: list, rounds: int):
    """(round, item) for `rounds` rounds over `items`, the order reversed every other round, so
    no item always goes first: how the benches interleave variants on a drifting machine."""
    for k in range(rounds):
        for item in items if k % 2 == 0 else items[::-1]:
            yield k, item


OURS = ("distill", "pretrain", "teacher_forward")
PEERS = ("modelopt_hf", "plain_kd", "hf_student", "hf_teacher_forward")


def build(role: str, teacher_dir: Path, student_dir: Path, total_steps: int, run_dir: Path):
    """Set up variant `role` (one of OURS + PEERS) for `total_steps` steps."""
    if role in OURS:
        return _ours(teacher_dir, student_dir, role, total_steps, run_dir)
    if role in PEERS:
        return _hf(teacher_dir, student_dir, role, total_steps, run_dir)
    raise ValueError(f"unknown variant {role!r}; one of {OURS + PEERS}")
