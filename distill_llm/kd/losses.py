"""Logit-distillation losses over logits `[..., vocab]`: plain, chunked over positions, or
fused with the student's output layer.

    kd_loss(student_logits, teacher_logits, kind="forward_kl", temperature=1.0,
            temperature_squared=True, beta=0.5, mask=None, chunk_size=None)
    kd_loss_fused(hidden, output_weight, teacher_logits, ..., chunk_size=256)
    per_position(kind, student, teacher, temperature, beta, group=None)
    chunked_per_position(kind, student, teacher, temperature, beta, group=None, chunk_size=256)

The last two give the unreduced divergence at each position, also over vocabulary shards
(tensor parallel, `group`), for Megatron's own masked reduction.

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
full-vocabulary float32 copies. `kd_loss_fused` goes further: it takes the student's last
hidden states and output weight, and neither the student's logits nor their gradient exist.
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F

from distill_llm.engine.model import EXCLUDED_LOGIT
from distill_llm.errors import ConfigError

KINDS = ("forward_kl", "reverse_kl", "jsd", "tvd")
CLOSED_FORMS = ("forward_kl", "reverse_kl")  # kinds whose chunk gradient needs no autograd
LOG_PROB_FLOOR = -100.0


def temperature_scale(temperature: float, squared: bool) -> float:
    """The factor of a logits loss at `temperature`: T^2 when `squared` (Hinton et al. 2015,
    so gradients keep their scale as T changes), else 1. The only place T^2 is applied."""
    return temperature**2 if squared else 1.0


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
    log_ps = log_softmax(_scaled(student, temperature), group)
    log_pt = log_softmax(_scaled(teacher, temperature), group)
    return divergence(kind, log_ps, log_pt, beta)


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """float32 `logits / temperature`, with no pass over the logits at T = 1 (the default)."""
    return logits.float() if temperature == 1 else logits.float() / temperature


def check_settings(kind: str, temperature: float, beta: float) -> None:
    """Raises ConfigError unless `kind` is known, `temperature` > 0 and, for jsd, 0 < `beta` < 1."""
    if kind not in KINDS:
        raise ConfigError(f"KD loss kind {kind!r} is unknown; choose one of {', '.join(KINDS)}")
    if not temperature > 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")
    if kind == "jsd" and not 0 < beta < 1:
        raise ConfigError(f"jsd needs 0 < beta < 1, got {beta}")


def _sharded(group) -> bool:
    return group is not None and torch.distributed.get_world_size(group) > 1


def _rows_and_grad(
    kind, s, t, temperature: float, beta: float, weights=None, group=None, out=None, lm=None
):
    """Per-row divergence of a chunk `[c, vocab]` (this rank's shard part with a TP `group`)
    and the gradient of sum(weights * rows) with respect to `s`, in `s`'s dtype (weights 1
    when None). `out`: a `[c, vocab]` the forward KL writes its float32 gradient into (no copy
    afterwards); other cases return a new tensor, and the caller copies. With a `group` the
    gradient is that of the rows summed over all ranks, every rank giving the same weights:
    the gradient autograd gives through `per_position(..., group)` in Megatron's reduction.
    Forward and reverse KL use their closed forms in place, with about four chunk-sized
    temporaries; JSD and TVD differentiate the chunk by autograd (whose backward all-reduces
    the normalisers' gradients, on every rank in the same order).
    `lm`: (labels `[c]`, out `[c]`) to also write the student's cross entropy of `labels` into
    `out`, read off the log-probabilities the closed forms make anyway (`CLOSED_FORMS` at
    T = 1 only: they are the student's own log-probabilities then).
    """
    if lm is not None and (kind not in CLOSED_FORMS or temperature != 1):
        raise ValueError("the LM loss rides along only with a closed form at temperature 1")
    if kind in CLOSED_FORMS:
        with torch.no_grad():
            log_ps = log_softmax(_scaled(s, temperature), group)
            if lm is not None:
                labels, ce = lm
                ce.copy_(target_values(log_ps, labels, group).neg_())
            log_pt = log_softmax(_scaled(t, temperature), group)
            if kind == "forward_kl":  # d/dz sum p_t (log p_t - log p_s) = p_s - p_t, z = s / T
                p_t = log_pt.exp()
                # A -inf log-probability on either side, raised to EXCLUDED_LOGIT, makes its
                # term 0 * finite instead of NaN (in place: cheaper than masking with where)
                log_ps.clamp_(min=EXCLUDED_LOGIT)
                rows = log_pt.clamp_(min=EXCLUDED_LOGIT).sub_(log_ps).mul_(p_t).sum(-1)
                into = out if out is not None and out.dtype == torch.float32 else log_ps
                grad = torch.exp(log_ps, out=into).sub_(p_t)
            else:  # d/dz sum p_s (log p_s - log p_t) = p_s (log p_s - log p_t - value)
                f = log_ps - log_pt.clamp_(min=LOG_PROB_FLOOR)
                p_s = log_ps.exp_()
                rows = (p_s * f).sum(-1)
                value = rows  # the closed form needs the whole row's value, not this shard's
                if _sharded(group):
                    value = rows.clone()
                    torch.distributed.all_reduce(value, group=group)
                grad = p_s.mul_(f.sub_(value[:, None]))
            if weights is None:
                if temperature != 1:
                    grad.div_(temperature)
            else:
                grad.mul_((weights / temperature)[:, None])
            return rows, grad.to(s.dtype)
    with torch.enable_grad():
        leaf = s.detach().requires_grad_()
        rows = per_position(kind, leaf, t, temperature, beta, group)
        total = rows.sum() if weights is None else (rows * weights).sum()
        (grad,) = torch.autograd.grad(total, leaf)
    return rows.detach(), grad


class _ChunkedRows(torch.autograd.Function):
    """Per-position rows, `chunk` positions at a time, from `rows_and_grad(piece, s_chunk)`
    (the rows of the positions `piece` and their gradient with respect to `s_chunk`, weights
    1). The gradients are written into one student-sized buffer during the forward pass (by
    `rows_and_grad` itself where it can, else copied there), and
    the backward scales that buffer in place by the rows' incoming gradient: valid because
    each row depends on its own position's logits only. The one chunking mechanism of the
    logits losses (online teacher logits and cached top-k alike); `_FusedRows` differs only
    where it must (no logits exist there, so it recomputes them in its backward)."""

    @staticmethod
    def forward(ctx, student, rows_and_grad, chunk):
        s2 = student.reshape(-1, student.shape[-1])
        rows = torch.empty(s2.shape[0], dtype=torch.float32, device=student.device)
        grad = torch.empty_like(s2)
        for i in range(0, s2.shape[0], chunk):
            piece = slice(i, i + chunk)
            rows[piece], g = rows_and_grad(piece, s2[piece], grad[piece])
            if g.data_ptr() != grad[piece].data_ptr():
                grad[piece] = g
        # Kept on ctx, not saved for backward: backward hands over the only reference, so
        # autograd adopts the buffer as the student's .grad instead of copying it.
        ctx.grad, ctx.shape, ctx.chunk = grad, student.shape, chunk
        return rows.view(student.shape[:-1])

    @staticmethod
    def backward(ctx, grad_rows):
        grad, ctx.grad = ctx.grad, None
        if grad is None:
            raise RuntimeError("the chunked KD loss can be backpropagated once")
        weights = grad_rows.reshape(-1, 1)
        # Chunk by chunk, so a bf16 buffer is scaled by float32 weights without a full-size
        # float32 temporary.
        for i in range(0, grad.shape[0], ctx.chunk):
            grad[i : i + ctx.chunk].mul_(weights[i : i + ctx.chunk])
        return grad.view(ctx.shape), None, None


def autograd_rows_and_grad(rows_fn):
    """A `rows_and_grad` for `chunked_rows` from a differentiable `rows_fn(piece, s_chunk)`:
    the chunk's rows and, by autograd, the gradient of their sum with respect to `s_chunk`."""

    def rows_and_grad(piece, s, out=None):  # `out` unused: chunked_rows copies the gradient
        with torch.enable_grad():
            leaf = s.detach().requires_grad_()
            rows = rows_fn(piece, leaf)
            (grad,) = torch.autograd.grad(rows.sum(), leaf)
        return rows.detach(), grad.to(s.dtype)

    return rows_and_grad


def chunked_rows(student: torch.Tensor, rows_fn, rows_and_grad, chunk_size: int) -> torch.Tensor:
    """Rows `student.shape[:-1]` of a per-position loss, `chunk_size` positions at a time.

    student: logits `[..., V]` (or a vocabulary shard); `rows_fn(piece, s_chunk)` gives the
    float32 rows of the flattened positions `piece` from their logits `s_chunk` `[c, V]`,
    and `rows_and_grad(piece, s_chunk, out)` the rows with their gradient (weights 1), written
    into the student-sized `out` `[c, V]` where it can (else returned anew). With a
    gradient wanted, the gradient buffer is filled in the forward pass (`_ChunkedRows`);
    without, only the rows are computed. Backpropagate at most once."""
    if torch.is_grad_enabled() and student.requires_grad:
        return _ChunkedRows.apply(student, rows_and_grad, chunk_size)
    s2 = student.detach().reshape(-1, student.shape[-1])
    with torch.no_grad():  # no gradient wanted: no buffer
        pieces = [slice(i, i + chunk_size) for i in range(0, s2.shape[0], chunk_size)]
        rows = [rows_fn(p, s2[p]) for p in pieces]
    return torch.cat(rows).view(student.shape[:-1])


def chunked_per_position(
    kind: str,
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float,
    beta: float,
    group=None,
    chunk_size: int = 256,
) -> torch.Tensor:
    """`per_position(kind, student, teacher, temperature, beta, group)`, `chunk_size`
    positions at a time, with its own backward.

    student, teacher: logits `[..., vocab]` (with a tensor-parallel `group`: this rank's
    vocabulary shard `[..., vocab / TP]`). Returns float32 rows of shape `student.shape[:-1]`:
    the divergence at each position (no T^2, no mask; with a `group`, this rank's part of the
    vocabulary sum, to be added across the group). Mask by giving masked rows weight 0.

    Differentiable with respect to `student` only. The forward pass writes the gradient of
    the rows into one buffer of the student's shape and dtype; the backward multiplies it in
    place by the rows' gradient and hands it on, so peak extra memory is that buffer plus one
    chunk's temporaries. Backpropagate at most once. With a `group`, the gradient is the one
    autograd gives through `per_position(..., group)` when the rows are summed across the
    group with the same upstream weights on every rank (as Megatron's TP reduction of the
    masked token sums does); every rank must call this with the same positions.
    """
    check_settings(kind, temperature, beta)
    if chunk_size < 1:
        raise ConfigError(f"chunk_size must be >= 1, got {chunk_size}")
    if student.shape != teacher.shape:
        raise ConfigError(
            f"student logits {tuple(student.shape)} and teacher logits "
            f"{tuple(teacher.shape)} differ in shape"
        )
    t2 = teacher.detach().reshape(-1, teacher.shape[-1])
    return chunked_rows(
        student,
        lambda p, s: per_position(kind, s, t2[p], temperature, beta, group),
        lambda p, s, out: _rows_and_grad(kind, s, t2[p], temperature, beta, None, group, out),
        chunk_size,
    )


def _position_weights(
    positions, mask: Optional[torch.Tensor], device, temperature: float, squared: bool
) -> torch.Tensor:
    """Per-position weights of the mean over unmasked positions, T^2 included."""
    if mask is None:
        mask = torch.ones(positions, device=device)
    elif tuple(mask.shape) != tuple(positions):
        raise ConfigError(f"mask shape {tuple(mask.shape)} must be the logits' {tuple(positions)}")
    mask = mask.float()
    return mask * (temperature_scale(temperature, squared) / mask.sum().clamp(min=1.0))


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
    """Mean KD divergence over unmasked positions (see the module docstring for the formulas).

    student_logits, teacher_logits: `[..., vocab]`; mask: `[...]`, 1 where a position counts.
    Returns a float32 scalar. `chunk_size=N` gives the same value and gradient through
    `chunked_per_position`, N positions at a time.
    """
    check_settings(kind, temperature, beta)
    if student_logits.shape != teacher_logits.shape:
        raise ConfigError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ in shape"
        )
    if chunk_size is not None and chunk_size < 1:
        raise ConfigError(f"chunk_size must be >= 1, got {chunk_size}")
    weights = _position_weights(
        student_logits.shape[:-1], mask, student_logits.device, temperature, temperature_squared
    )
    teacher_logits = teacher_logits.detach()
    if chunk_size is None:
        rows = per_position(kind, student_logits, teacher_logits, temperature, beta)
    else:
        rows = chunked_per_position(
            kind, student_logits, teacher_logits, temperature, beta, chunk_size=chunk_size
        )
    return (rows * weights).sum()


def kd_loss_fused(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    temperature_squared: bool = True,
    beta: float = 0.5,
    mask: Optional[torch.Tensor] = None,
    chunk_size: int = 256,
) -> torch.Tensor:
    """`kd_loss(hidden @ weight.T, teacher_logits, ...)` without the student's logits.

    hidden: the student's last hidden states `[..., h]`; weight: its output layer `[vocab, h]`
    (the student's logits are `hidden @ weight.T`, no bias); teacher_logits: `[..., vocab]`;
    mask: `[...]`, 1 where a position counts. Returns the float32 mean over unmasked positions
    (times T^2 when `temperature_squared`; 0 when no position counts), equal in value and in
    the gradients of `hidden` and `weight` to the plain `kd_loss`. It is the weighted sum of
    `fused_per_position`'s rows: neither the student's full logits nor their gradient ever
    exist; `chunk_size` positions at a time the logits chunk `[chunk, vocab]` is formed (again
    in the backward), its gradient computed in closed form (or by autograd for jsd and tvd) and
    turned at once into its rows of `hidden`'s gradient (g @ weight) and its share of
    `weight`'s (g.T @ hidden, accumulated in float32). Peak extra memory is those two
    gradients plus one chunk's temporaries.
    Backpropagate at most once. No tensor-parallel group: `weight` must hold the whole
    vocabulary (a vocabulary-parallel output layer needs the Megatron path's
    `chunked_per_position` on its logits shard instead).
    """
    check_settings(kind, temperature, beta)
    if chunk_size < 1:
        raise ConfigError(f"chunk_size must be >= 1, got {chunk_size}")
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ConfigError(
            f"output weight {tuple(weight.shape)} must be [vocab, hidden size] with hidden size "
            f"that of hidden {tuple(hidden.shape)}"
        )
    want = tuple(hidden.shape[:-1]) + (weight.shape[0],)
    if tuple(teacher_logits.shape) != want:
        raise ConfigError(
            f"teacher logits {tuple(teacher_logits.shape)} must be {want}: hidden's positions "
            f"by the output weight's vocabulary"
        )
    weights = _position_weights(
        hidden.shape[:-1], mask, hidden.device, temperature, temperature_squared
    )
    rows = fused_per_position(
        kind, hidden, weight, teacher_logits, temperature, beta, chunk_size=chunk_size
    )
    return (rows * weights).sum()


# EXCLUDED_LOGIT (engine.model): a logit of probability exactly 0 that keeps every later
# operation finite (-inf would turn some gradients, logaddexp's or 0 x inf, into NaN).


def _chunk_logits(hidden, weight, real: Optional[int]) -> torch.Tensor:
    """float32 logits `hidden @ weight.T` of a chunk, ids from `real` on excluded."""
    z = (hidden @ weight.T).float()
    if real is not None and real < z.shape[-1]:
        z[:, real:] = EXCLUDED_LOGIT
    return z


class _FusedRows(torch.autograd.Function):
    """Per-position divergence rows of the logits `hidden @ weight.T`, `chunk` positions at a
    time. The backward recomputes each chunk's logits and scales its gradient by the rows'
    incoming gradient, so neither the logits nor their gradient ever exist in full."""

    @staticmethod
    def forward(ctx, hidden, weight, teacher, kind, temperature, beta, group, chunk, real):
        h2 = hidden.reshape(-1, hidden.shape[-1])
        t2 = teacher.reshape(-1, teacher.shape[-1])
        rows = torch.empty(h2.shape[0], dtype=torch.float32, device=hidden.device)
        for i in range(0, h2.shape[0], chunk):
            piece = slice(i, i + chunk)
            z = _chunk_logits(h2[piece], weight, real)
            rows[piece] = per_position(kind, z, t2[piece], temperature, beta, group)
        ctx.save_for_backward(hidden, weight, teacher)
        ctx.how = (kind, temperature, beta, group, chunk, real)
        ctx.done = False
        return rows.view(hidden.shape[:-1])

    @staticmethod
    def backward(ctx, grad_rows):
        if ctx.done:  # one backward, as the chunked loss (the inputs may have changed since)
            raise RuntimeError("the fused KD loss can be backpropagated once")
        ctx.done = True
        hidden, weight, teacher = ctx.saved_tensors
        kind, temperature, beta, group, chunk, real = ctx.how
        need_h, need_w = ctx.needs_input_grad[:2]
        h2 = hidden.reshape(-1, hidden.shape[-1])
        t2 = teacher.reshape(-1, teacher.shape[-1])
        g_rows = grad_rows.reshape(-1).float()
        grad_h = torch.empty_like(h2) if need_h else None
        # many chunks' products: accumulated in float32 whatever the weight's dtype
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        for i in range(0, h2.shape[0], chunk):
            piece = slice(i, i + chunk)
            z = _chunk_logits(h2[piece], weight, real)
            _, g = _rows_and_grad(kind, z, t2[piece], temperature, beta, g_rows[piece], group)
            if real is not None and real < g.shape[-1]:
                g[:, real:] = 0.0
            if need_h:
                grad_h[piece] = (g.to(weight.dtype) @ weight).to(hidden.dtype)
            if need_w:
                grad_w.addmm_(g.T, h2[piece].float())
        grad_h = None if grad_h is None else grad_h.view(hidden.shape)
        grad_w = None if grad_w is None else grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None, None, None, None, None


def fused_per_position(
    kind: str,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float,
    beta: float,
    group=None,
    chunk_size: int = 256,
    real: Optional[int] = None,
) -> torch.Tensor:
    """`per_position(kind, hidden @ weight.T, teacher, ...)` without the student's logits.

    hidden: the student's last hidden states `[..., h]`; weight: its output layer `[vocab, h]`
    (with a tensor-parallel `group`: this rank's vocabulary shard `[vocab / TP, h]`, and
    `teacher` this rank's shard `[..., vocab / TP]`). `real`: ids of this shard from `real` on
    are excluded (probability 0 for both models; None: all count). Returns float32 rows
    `hidden.shape[:-1]` (no T^2, no mask; with a `group`, this rank's part of the sum).

    Differentiable with respect to `hidden` and `weight`; the backward recomputes each chunk's
    logits (one more matrix product per chunk) instead of keeping anything logits-sized. With a
    `group`, the hidden-state gradient returned is this rank's part: the caller passes `hidden`
    through Megatron's copy-to-tensor-parallel region, whose backward adds the parts; the rows'
    upstream weights must be the same on every rank (as in chunked_per_position).
    """
    check_settings(kind, temperature, beta)
    if chunk_size < 1:
        raise ConfigError(f"chunk_size must be >= 1, got {chunk_size}")
    if weight.shape[0] != teacher.shape[-1] or hidden.shape[:-1] != teacher.shape[:-1]:
        raise ConfigError(
            f"hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)} and teacher logits "
            f"{tuple(teacher.shape)} do not fit together"
        )
    return _FusedRows.apply(
        hidden, weight, teacher.detach(), kind, temperature, beta, group, chunk_size, real
    )


def target_values(z: torch.Tensor, labels: torch.Tensor, group=None) -> torch.Tensor:
    """`z[i, labels[i]]` for rows `z` `[c, local]` (this rank's vocabulary shard under a TP
    `group`, starting at rank x local) and global ids `labels` `[c]`: each id lives on one
    rank, which gives its value; the others give 0, and the group adds them up."""
    local = z.shape[-1]
    start = torch.distributed.get_rank(group) * local if _sharded(group) else 0
    ids = labels - start
    here = (ids >= 0) & (ids < local)
    picked = z.gather(-1, ids.clamp(0, local - 1)[:, None])[:, 0]
    picked = torch.where(here, picked, torch.zeros_like(picked))
    if _sharded(group):
        torch.distributed.all_reduce(picked, group=group)
    return picked


def _cross_entropy_chunks(chunk_logits, n: int, labels, group, chunk_size: int):
    """THE chunked cross entropy (no gradient): `chunk_logits(piece)` gives float32 logits
    `[len(piece), local]` of this rank's vocabulary shard, padding already excluded; `labels`
    `[n]` are global ids. Returns `[n]` float32."""
    y = labels.reshape(-1)
    out = torch.empty(n, dtype=torch.float32, device=labels.device)
    for i in range(0, n, chunk_size):
        piece = slice(i, i + chunk_size)
        z = chunk_logits(piece)
        out[piece] = _log_normaliser(z, group) - target_values(z, y[piece], group)
    return out


def _log_normaliser(z: torch.Tensor, group=None) -> torch.Tensor:
    """log sum_v exp(z_v) over the last dim, over the whole vocabulary under a TP `group`."""
    if not _sharded(group):
        return torch.logsumexp(z, dim=-1)
    peak = z.max(dim=-1).values
    torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX, group=group)
    total = (z - peak[:, None]).exp().sum(-1)
    torch.distributed.all_reduce(total, group=group)
    return peak + total.log()


def _real_in_shard(local: int, vocab_limit: Optional[int], group) -> Optional[int]:
    """How many of this rank's `local` ids are below `vocab_limit` (None: all are real)."""
    if vocab_limit is None:
        return None
    start = torch.distributed.get_rank(group) * local if _sharded(group) else 0
    return max(0, min(local, vocab_limit - start))


@torch.no_grad()
def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    group=None,
    chunk_size=256,
    vocab_limit: Optional[int] = None,
) -> torch.Tensor:
    """The cross entropy of `labels` under the logits `hidden @ weight.T` (no gradient),
    `chunk_size` positions at a time: `hidden` `[..., h]`, `weight` `[vocab, h]` (this rank's
    vocabulary shard under a TP `group`), `labels` of shape `hidden.shape[:-1]`; ids from
    `vocab_limit` on (Megatron's padding rows) get probability 0."""
    h2 = hidden.reshape(-1, hidden.shape[-1])
    real = _real_in_shard(weight.shape[0], vocab_limit, group)
    out = _cross_entropy_chunks(
        lambda piece: _chunk_logits(h2[piece], weight, real),
        h2.shape[0], labels, group, chunk_size,
    )  # fmt: skip
    return out.view(labels.shape)


@torch.no_grad()
def logits_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    group=None,
    chunk_size=256,
    vocab_limit: Optional[int] = None,
) -> torch.Tensor:
    """The cross entropy of `labels` under `logits` `[..., V/TP]` (this rank's shard under a TP
    `group`; `labels` of shape `logits.shape[:-1]`), no gradient, `chunk_size` positions at a
    time: it neither modifies `logits` (megatron's CE does) nor copies them whole, so a KD loss
    can read the same tensor afterwards. Ids from `vocab_limit` on get probability 0."""
    local = logits.shape[-1]
    z2 = logits.reshape(-1, local)
    real = _real_in_shard(local, vocab_limit, group)

    padding = None
    if real is not None and real < local:
        padding = torch.arange(local, device=logits.device) >= real

    def chunk_logits(piece):  # out of place: `logits` stays as it was
        z = z2[piece].float()
        return z if padding is None else z.masked_fill(padding, EXCLUDED_LOGIT)

    out = _cross_entropy_chunks(chunk_logits, z2.shape[0], labels, group, chunk_size)
    return out.view(labels.shape)
