"""The one KD criterion: a teacher *source* (a live teacher's logits, or a cache's top-k + rest
bucket) feeds one criterion that owns the divergence, T^2, the shared-vocabulary rule, the
chunking, the LM/KD mixing and the tensor-parallel reduction. The online teacher (through
ModelOpt's wrapper, `kd.wrapper`) and the cached teacher (`kd.offline`) both call it.

    criterion = KDCriterion(kd, shared_vocab=min(student_vocab, teacher_vocab))
    per_token = criterion.per_token(student_logits, LiveLogits(teacher_logits), tp_group)
    kd_sum = criterion.token_sum(per_token, loss_mask, tp_group)      # this micro-batch's sum
    out = criterion.balancer()({STUDENT_LOSS_KEY: lm_sum, "LogitsKDLoss": kd_sum})

Layouts: logits are `[..., V/TP]` (this rank's vocabulary shard), positions any leading shape
(`[s, b]` from ModelOpt's hooks, `[b, s]` from the model's output); `per_token` returns the
leading shape. Each source returns THIS RANK'S SHARE of a position's divergence, so the shares
add up over the tensor-parallel group (`token_sum`), whatever the source.
"""

from __future__ import annotations

from typing import Optional

import torch

from distill_llm.engine.model import padding_ids
from distill_llm.kd import losses, teacher_cache
from distill_llm.kd.config import KDConfig
from distill_llm.kd.teacher_cache import tp_rank_size

FUSED_CHUNK = 256  # positions per chunk of the fused loss when kd.chunk_size is None


def real_vocab(model) -> int:
    """A built model's real vocabulary (without Megatron's padding rows)."""
    return getattr(model, "real_vocab_size", model.vocab_size)


# -- the shared-vocabulary rule ------------------------------------------------------------------
def excluded_ids(local: int, shared: int, group=None, device=None) -> Optional[torch.Tensor]:
    """THE shared-vocabulary rule: which of this rank's `local` vocabulary ids (a shard starting
    at rank x local) lie at or beyond `shared`, the ids both models really have (Megatron's
    padding rows, or ids one model lacks). Those get probability exactly 0 in both
    distributions, so no loss or gradient reaches them. Bool `[local]`, or None when none."""
    return padding_ids(local, shared, tp_rank_size(group)[0], device)


def _exclude(logits: torch.Tensor, excluded: Optional[torch.Tensor]) -> torch.Tensor:
    if excluded is None:
        return logits
    return logits.float().masked_fill(excluded, losses.EXCLUDED_LOGIT)


def align_teacher(teacher: torch.Tensor, local_s: int, group=None) -> torch.Tensor:
    """The teacher's logits for the ids of this rank's student shard (`local_s` ids from
    rank x local_s on), `[..., local_s]`. Under TP with different vocabulary sizes the shards
    cover different ids, so the teacher's full logits are gathered (no gradient) and this
    rank's range cut from them; ids the teacher lacks get probability 0."""
    if teacher.shape[-1] == local_s:
        return teacher
    rank, tp = tp_rank_size(group)
    full = teacher
    if tp > 1:
        pieces = [torch.empty_like(teacher) for _ in range(tp)]
        torch.distributed.all_gather(pieces, teacher.contiguous(), group=group)
        full = torch.cat(pieces, dim=-1)
    full = full[..., rank * local_s : (rank + 1) * local_s]
    out = full.new_full((*teacher.shape[:-1], local_s), losses.EXCLUDED_LOGIT, dtype=torch.float32)
    out[..., : full.shape[-1]] = full
    return out


def shared_vocab_logits(student, teacher, shared: int, group=None):
    """This rank's student and teacher logit shards `[..., V_student/TP]` and
    `[..., V_teacher/TP]`, aligned on the student's ids, with `excluded_ids` given a logit of
    probability 0 in both. Same sizes with no exclusion: returned as they are; at TP=1 both
    are cut to `shared` (a cheaper way to the same values)."""
    local_s = student.shape[-1]
    if tp_rank_size(group)[1] == 1:
        if local_s == teacher.shape[-1] == shared:
            return student, teacher
        return student[..., :shared], teacher[..., :shared]
    excluded = excluded_ids(local_s, shared, group, student.device)
    teacher = _exclude(align_teacher(teacher, local_s, group), excluded)
    return _exclude(student, excluded), teacher


# -- teacher sources -----------------------------------------------------------------------------
class LiveLogits:
    """A teacher source: the teacher's logits `[..., V_teacher/TP]` from a forward pass that
    ran beside the student's (same leading shape as the student's logits)."""

    def __init__(self, logits: torch.Tensor):
        self.logits = logits.detach()

    def prepare(self, student: torch.Tensor, shared: int, group):
        """(student, teacher rows `[n, V/TP]`) aligned on the shared vocabulary
        (`shared_vocab_logits`), the teacher's positions flattened for `rows`."""
        student, teacher = shared_vocab_logits(student, self.logits, shared, group)
        t2 = teacher.reshape(-1, teacher.shape[-1])
        return student, t2

    def rows(self, kd: KDConfig, s, t_rows, group):
        """This rank's share of the divergence (no T^2, no mask) per row: float32 `[n]` from student
        rows `s` and teacher rows `t_rows`, both `[n, V/TP]`."""
        return losses.per_position(kd.kind, s, t_rows, kd.temperature, kd.beta, group)

    def rows_and_grad(self, kd: KDConfig, s, t_rows, group, out=None, lm=None):
        """`rows` `[n]` and the gradient of their sum with respect to `s` (`[n, V/TP]`, in `s`'s
        dtype), in closed form for forward and reverse KL, written into `out` where it can;
        with `lm` (labels `[n]`, out `[n]`), the student's cross entropy too."""
        return losses._rows_and_grad(
            kd.kind, s, t_rows, kd.temperature, kd.beta, None, group, out, lm
        )


class CachedTopK:
    """A teacher source: a cache's top-k log-probabilities `[..., k]`, their global ids
    `[..., k]` and the rest bucket `[...]` (distill_llm.kd.teacher_cache), per position."""

    def __init__(self, log_probs: torch.Tensor, indices: torch.Tensor, rest: torch.Tensor):
        self.log_probs, self.indices, self.rest = log_probs, indices, rest

    def prepare(self, student: torch.Tensor, shared: int, group):
        """(student with `excluded_ids` at probability 0, the cache rows flattened)."""
        student = _exclude(student, excluded_ids(student.shape[-1], shared, group, student.device))
        flat = tuple(t.reshape(-1, *t.shape[student.dim() - 1 :]) for t in
                     (self.log_probs, self.indices, self.rest))  # fmt: skip
        return student, flat

    def rows(self, kd: KDConfig, s, cache_rows, group):
        """This rank's share: the k+1-bucket value is the same on every rank of `group` and its
        backward sums over the group, so each rank contributes value / TP (teacher_cache's
        module docstring)."""
        log_probs, indices, rest = cache_rows
        value = teacher_cache.cached_per_position(
            s, log_probs, indices, rest, kind=kd.kind, temperature=kd.temperature, beta=kd.beta,
            group=group,
        )  # fmt: skip
        return value / tp_rank_size(group)[1]

    def rows_and_grad(self, kd: KDConfig, s, cache_rows, group, out=None, lm=None):
        """`rows` `[n]` and, by autograd, the gradient of their sum with respect to `s`
        (`[n, V/TP]`, in `s`'s dtype; `out` unused, the caller copies it there; `lm` unused:
        the cache's LM loss never rides along)."""
        return losses.autograd_rows_and_grad(lambda _, z: self.rows(kd, z, cache_rows, group))(
            None, s
        )


def _take(rows, piece):
    """Rows `piece` of a flattened source (a tensor, or a tuple of them)."""
    if isinstance(rows, tuple):
        return tuple(r[piece] for r in rows)
    return rows[piece]


class KDCriterion:
    """The logits KD loss of `kd` on the ids below `shared_vocab`, and how it is mixed with the
    student's LM loss and reduced over tokens and tensor-parallel ranks."""

    def __init__(self, kd: KDConfig, shared_vocab: int):
        self.kd = kd
        self.shared_vocab = shared_vocab
        self._lm = None  # (labels [n], out [n]): the logged LM loss the next per_token fills

    # -- the logged LM loss, read off the KD loss's chunks -------------------------------------
    def can_fill_lm(self, student_vocab: int) -> bool:
        """Whether `per_token` can write the student's LM loss as it goes, when that loss is only
        logged: the closed-form kinds at T = 1 over chunks of logits (they form the student's
        log-probabilities over its whole real vocabulary, `student_vocab`, anyway), which saves
        the separate cross-entropy pass over the logits (~1% of a KD step on CPU,
        bench/kd_loss_parts.py)."""
        kd = self.kd
        return (
            kd.kind in losses.CLOSED_FORMS and kd.temperature == 1 and bool(kd.chunk_size)
            and not kd.fused_output_layer and not kd.lm_in_gradient
            and self.shared_vocab == student_vocab
        )  # fmt: skip

    def defer_lm(self, labels: Optional[torch.Tensor], out: Optional[torch.Tensor] = None):
        """Have the next `per_token` write the cross entropy of `labels` (`[n]`, global ids, the
        positions flattened as the logits' leading dims) into `out` (`[n]` float32); with
        `labels` None, forget any such request."""
        self._lm = None if labels is None else (labels, out)

    @property
    def lm_deferred(self) -> bool:
        """Whether a deferred LM loss still waits for `per_token`."""
        return self._lm is not None

    def per_token(self, student: torch.Tensor, source, group=None) -> torch.Tensor:
        """This rank's share of the divergence at each position, times `kd.scale` (T^2):
        float32 `student.shape[:-1]`, no mask. `student`: logits `[..., V/TP]`, differentiable;
        `source`: LiveLogits or CachedTopK for the same positions. `kd.chunk_size` positions at
        a time (`losses.chunked_rows`), or all at once when it is None."""
        kd = self.kd
        group = group if tp_rank_size(group)[1] > 1 else None
        lm, self._lm = self._lm, None
        student, teacher_rows = source.prepare(student, self.shared_vocab, group)
        rides = (
            lm is not None and isinstance(source, LiveLogits) and bool(kd.chunk_size)
            and torch.is_grad_enabled() and student.requires_grad
        )  # fmt: skip
        if lm is not None and not rides:  # its own pass, over the same (prepared) logits
            lm[1].copy_(
                losses.logits_cross_entropy(student.detach(), lm[0], group, kd.chunk_size or 256)
            )
        if kd.chunk_size:

            def rows_and_grad(p, s, out):
                along = (lm[0][p], lm[1][p]) if rides else None
                return source.rows_and_grad(kd, s, _take(teacher_rows, p), group, out, along)

            rows = losses.chunked_rows(
                student,
                lambda p, s: source.rows(kd, s, _take(teacher_rows, p), group),
                rows_and_grad,
                kd.chunk_size,
            )
        else:
            flat = student.reshape(-1, student.shape[-1])
            rows = source.rows(kd, flat, teacher_rows, group).view(student.shape[:-1])
        return rows * kd.scale

    def per_token_fused(self, hidden, weight, teacher_logits, group=None) -> torch.Tensor:
        """`per_token` when the student's side arrives as its last hidden states `[..., h]` and
        output-layer shard `weight` `[V/TP, h]` (kd.fused_output_layer): the logits are made
        chunk by chunk inside the loss and never exist in full. `hidden` must already pass
        through Megatron's copy-to-tensor-parallel region under TP (its backward adds the
        ranks' hidden-state gradients)."""
        kd = self.kd
        group = group if tp_rank_size(group)[1] > 1 else None
        local = weight.shape[0]
        excluded = excluded_ids(local, self.shared_vocab, group, weight.device)
        teacher = _exclude(align_teacher(teacher_logits.detach(), local, group), excluded)
        real = None if excluded is None else int((~excluded).sum())
        rows = losses.fused_per_position(
            kd.kind, hidden, weight, teacher, kd.temperature, kd.beta, group,
            kd.chunk_size or FUSED_CHUNK, real,
        )  # fmt: skip
        return rows * kd.scale

    @staticmethod
    def token_sum(per_token: torch.Tensor, loss_mask: torch.Tensor, group=None) -> torch.Tensor:
        """THE reduction: the sum of a `[b, s]` per-token loss over positions where `loss_mask`
        is 1, added across the tensor-parallel `group` (each rank holds its share). The gather
        keeps each rank's gradient its own (a plain all-reduce would multiply it by TP)."""
        total = masked_sum(per_token, loss_mask)
        if tp_rank_size(group)[1] > 1:
            # megatron-core is heavy to import; only TP runs need its gather
            from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

            total = gather_from_tensor_model_parallel_region(total.reshape(1)).sum()
        return total

    def balancer(self):
        """THE mixing of LM and KD losses, a ModelOpt loss balancer: `StaticMix` with
        `kd.alpha`, else ModelOpt's own (KD rescaled to the LM loss's magnitude)."""
        # ModelOpt is heavy to import and needed only once a run trains
        from modelopt.torch.distill.plugins.megatron import LogitsAndIntermediatesLossBalancer

        from distill_llm.kd.mixing import StaticMix

        if self.kd.alpha is not None:
            return StaticMix(self.kd.alpha, self.kd.intermediate_weight)
        return LogitsAndIntermediatesLossBalancer(
            kd_loss_scale=self.kd.kd_loss_scale, skip_original_loss=not self.kd.lm_in_gradient
        )


def masked_sum(per_token: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Sum of a `[b, s]` per-token loss over positions where `loss_mask` ([b, s]) is 1."""
    return (per_token.float().reshape(-1) * loss_mask.reshape(-1).float()).sum()
