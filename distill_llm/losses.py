"""Logit-distillation losses over full logits `[..., vocab]`, plain or chunked over positions.

    kd_loss(student_logits, teacher_logits, kind="forward_kl", temperature=1.0,
            temperature_squared=True, beta=0.5, mask=None, chunk_size=None)

With p_t = softmax(teacher / T) and p_s = softmax(student / T) over the vocabulary, per position:
  forward_kl  sum p_t (log p_t - log p_s)
  reverse_kl  sum p_s (log p_s - log p_t)
  jsd         beta KL(p_t || m) + (1 - beta) KL(p_s || m),  m = beta p_t + (1 - beta) p_s
  tvd         0.5 sum |p_t - p_s|
times T^2 when `temperature_squared` (the default, as in Hinton et al. 2015, so gradients keep
their scale as T changes; NVIDIA ModelOpt's LogitsKLLoss does not multiply by T^2). The result
is the mean over the positions where `mask` is 1 (all positions without a mask; 0 when none).

Numerics: everything is computed in float32 from log-softmax (max-subtracted), so logits of
magnitude 1e4 are fine. Where the teacher gives a token probability exactly 0 (logit -inf), the
term p_t log p_t is 0; in `reverse_kl` log p_t is floored at LOG_PROB_FLOOR (-100 nats, below
any float32 probability), so a student putting mass there pays a large finite price instead of
an infinite one.

`chunk_size=N` computes the same value and gradient N positions at a time with its own
backward: the gradient for the student's logits is written into one buffer during the forward
pass, so peak extra memory is that buffer plus one chunk's temporaries instead of several
full-vocabulary float32 copies.
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F

from distill_llm.errors import ConfigError

KINDS = ("forward_kl", "reverse_kl", "jsd", "tvd")
LOG_PROB_FLOOR = -100.0


def _xlogy_ratio(p: torch.Tensor, log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """sum p (log p - log q) over the last dim, with 0 where p == 0."""
    terms = p * (log_p - log_q)
    return torch.where(p > 0, terms, torch.zeros_like(terms)).sum(-1)


def log_softmax(x: torch.Tensor, group=None) -> torch.Tensor:
    """Log-softmax over the last dim; with a tensor-parallel `group`, over the whole vocabulary
    of which `x` is this rank's shard (max and normaliser all-reduced, differentiably)."""
    if group is None or torch.distributed.get_world_size(group) == 1:
        return F.log_softmax(x, dim=-1)
    from torch.distributed import nn as dist_nn

    peak = x.detach().max(dim=-1, keepdim=True).values
    torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX, group=group)
    shifted = x - peak
    denom = dist_nn.functional.all_reduce(shifted.exp().sum(-1, keepdim=True), group=group)
    return shifted - denom.log()


def divergence(kind: str, log_ps: torch.Tensor, log_pt: torch.Tensor, beta: float):
    """Sum over the last dim of the per-token terms of `kind`, given log-probabilities. Every
    kind is a sum of elementwise terms, so on a vocabulary shard this is that shard's part."""
    if kind == "forward_kl":
        return _xlogy_ratio(log_pt.exp(), log_pt, log_ps)
    if kind == "reverse_kl":
        return _xlogy_ratio(log_ps.exp(), log_ps, log_pt.clamp(min=LOG_PROB_FLOOR))
    if kind == "jsd":
        log_m = torch.logaddexp(log_pt + math.log(beta), log_ps + math.log(1 - beta))
        return beta * _xlogy_ratio(log_pt.exp(), log_pt, log_m) + (1 - beta) * _xlogy_ratio(
            log_ps.exp(), log_ps, log_m
        )
    return 0.5 * (log_pt.exp() - log_ps.exp()).abs().sum(-1)  # tvd


def per_position(kind: str, student, teacher, temperature: float, beta: float, group=None):
    """The divergence at each position (no T^2, no mask) of logits `[..., vocab]` (or of
    vocabulary shards, summed over this rank's shard, with a tensor-parallel `group`)."""
    log_ps = log_softmax(student.float() / temperature, group)
    log_pt = log_softmax(teacher.float() / temperature, group)
    return divergence(kind, log_ps, log_pt, beta)


def check_settings(kind: str, temperature: float, beta: float) -> None:
    if kind not in KINDS:
        raise ConfigError(f"KD loss kind {kind!r} is unknown; choose one of {', '.join(KINDS)}")
    if not temperature > 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")
    if kind == "jsd" and not 0 < beta < 1:
        raise ConfigError(f"jsd needs 0 < beta < 1, got {beta}")


def _rows_and_grad(kind, s, t, temperature: float, beta: float, weights: torch.Tensor):
    """Per-row divergence of a chunk `[c, vocab]` and the gradient of sum(weights * rows) with
    respect to `s` (in `s`'s dtype). Forward and reverse KL use their closed forms in place,
    with about four chunk-sized temporaries; JSD and TVD differentiate the chunk by autograd."""
    if kind in ("forward_kl", "reverse_kl"):
        with torch.no_grad():
            log_ps = F.log_softmax(s.float() / temperature, dim=-1)
            log_pt = F.log_softmax(t.float() / temperature, dim=-1)
            if kind == "forward_kl":  # d/dz sum p_t (log p_t - log p_s) = p_s - p_t, z = s / T
                p_t = log_pt.exp()
                rows = torch.where(p_t > 0, log_pt.sub_(log_ps), 0.0).mul_(p_t).sum(-1)
                grad = log_ps.exp_().sub_(p_t)
            else:  # d/dz sum p_s (log p_s - log p_t) = p_s (log p_s - log p_t - value)
                f = log_ps - log_pt.clamp_(min=LOG_PROB_FLOOR)
                p_s = log_ps.exp_()
                rows = (p_s * f).sum(-1)
                grad = p_s.mul_(f.sub_(rows[:, None]))
            grad.mul_((weights / temperature)[:, None])
            return rows, grad.to(s.dtype)
    with torch.enable_grad():
        leaf = s.detach().requires_grad_()
        rows = per_position(kind, leaf, t, temperature, beta)
        (grad,) = torch.autograd.grad((rows * weights).sum(), leaf)
    return rows.detach(), grad


class _Chunked(torch.autograd.Function):
    """sum(per-position divergence x weights) over all positions, `chunk` positions at a time;
    the student gradient is written into one buffer during the forward pass."""

    @staticmethod
    def forward(ctx, student, teacher, weights, kind, temperature, beta, chunk):
        s2 = student.reshape(-1, student.shape[-1])
        t2 = teacher.reshape(-1, teacher.shape[-1])
        w = weights.reshape(-1)
        grad = torch.empty_like(s2)
        total = torch.zeros((), dtype=torch.float64, device=student.device)
        for i in range(0, s2.shape[0], chunk):
            piece = slice(i, i + chunk)
            rows, grad[piece] = _rows_and_grad(kind, s2[piece], t2[piece], temperature, beta,
                                               w[piece])  # fmt: skip
            total += (rows * w[piece]).sum().double()
        # Kept on ctx, not saved for backward: backward hands over the only reference, so
        # autograd adopts the buffer as the student's .grad instead of copying it.
        ctx.grad, ctx.shape = grad, student.shape
        return total.to(torch.float32)

    @staticmethod
    def backward(ctx, grad_output):
        grad, ctx.grad = ctx.grad, None
        if grad is None:
            raise RuntimeError("the chunked KD loss can be backpropagated once")
        grad = grad.mul_(grad_output.to(grad.dtype)).view(ctx.shape)  # in place, no copy
        return grad, None, None, None, None, None, None


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    temperature_squared: bool = True,
    beta: float = 0.5,
    mask: Optional[torch.Tensor] = None,
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """Mean KD divergence over unmasked positions (see the module docstring for the formulas)."""
    check_settings(kind, temperature, beta)
    if student_logits.shape != teacher_logits.shape:
        raise ConfigError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ in shape"
        )
    positions = student_logits.shape[:-1]
    if mask is None:
        mask = torch.ones(positions, device=student_logits.device)
    elif tuple(mask.shape) != tuple(positions):
        raise ConfigError(f"mask shape {tuple(mask.shape)} must be the logits' {tuple(positions)}")
    mask = mask.float()
    count = mask.sum()
    factor = temperature**2 if temperature_squared else 1.0
    teacher_logits = teacher_logits.detach()
    if chunk_size is None:
        values = per_position(kind, student_logits, teacher_logits, temperature, beta)
        return factor * (values * mask).sum() / count.clamp(min=1.0)

    if chunk_size < 1:
        raise ConfigError(f"chunk_size must be >= 1, got {chunk_size}")
    weights = mask * (factor / max(float(count), 1.0))
    return _Chunked.apply(student_logits, teacher_logits, weights, kind, temperature, beta,
                          chunk_size)  # fmt: skip
