"""distill_llm.losses.kd_loss against an independent float64 computation of the formulas:
values and student gradients for every kind, masks, temperatures 0.5 / 1 / 4, extreme logits and
teacher zeros; the chunked path equals the plain one."""

import math

import pytest
import torch

from distill_llm.errors import ConfigError
from distill_llm.losses import KINDS, LOG_PROB_FLOOR, kd_loss


def reference(kind, student, teacher, *, temperature, beta=0.5, mask=None, squared=True):
    s = torch.log_softmax(student.double() / temperature, dim=-1)
    t = torch.log_softmax(teacher.double() / temperature, dim=-1)
    ps, pt = s.exp(), t.exp()
    if kind == "forward_kl":
        per = torch.where(pt > 0, pt * (t - s), 0.0).sum(-1)
    elif kind == "reverse_kl":
        per = (ps * (s - torch.clamp(t, min=LOG_PROB_FLOOR))).sum(-1)
    elif kind == "jsd":
        m = torch.logaddexp(t + math.log(beta), s + math.log(1 - beta))
        kl_t = torch.where(pt > 0, pt * (t - m), 0.0).sum(-1)
        kl_s = (ps * (s - m)).sum(-1)
        per = beta * kl_t + (1 - beta) * kl_s
    else:
        per = 0.5 * (pt - ps).abs().sum(-1)
    mask = torch.ones(per.shape, dtype=torch.float64) if mask is None else mask.double()
    value = (per * mask).sum() / mask.sum()
    return value * (temperature**2 if squared else 1.0)


def _logits(scale=3.0, shape=(6, 3, 40), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * scale, torch.randn(shape, generator=g) * scale


MASK = torch.tensor([[1, 1, 0], [1, 0, 1], [0, 0, 0], [1, 1, 1], [1, 0, 0], [0, 1, 1]])


def _check(kind, student, teacher, chunk_size=None, **kw):
    s = student.clone().requires_grad_()
    ours = kd_loss(s, teacher, kind=kind, chunk_size=chunk_size, **kw)
    ours.backward()
    s64 = student.double().requires_grad_()
    mapping = dict(temperature=kw.get("temperature", 1.0), beta=kw.get("beta", 0.5),
                   mask=kw.get("mask"), squared=kw.get("temperature_squared", True))  # fmt: skip
    ref = reference(kind, s64, teacher, **mapping)
    ref.backward()
    assert torch.isfinite(ours) and torch.isfinite(s.grad).all()
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-7)
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=1e-4, atol=1e-7)
    return ours


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_values_and_gradients_match_the_formulas(kind, temperature):
    student, teacher = _logits()
    _check(kind, student, teacher, temperature=temperature, mask=MASK)
    _check(kind, student, teacher, temperature=temperature)


@pytest.mark.parametrize("kind", KINDS)
def test_extreme_logits_and_teacher_zeros(kind):
    student, teacher = _logits(scale=1e4)  # magnitudes around 1e4
    _check(kind, student, teacher, temperature=1.0, mask=MASK)
    student, teacher = _logits()
    teacher[..., :10] = float("-inf")  # the teacher gives these tokens probability exactly 0
    value = _check(kind, student, teacher, temperature=2.0, mask=MASK)
    if kind == "reverse_kl":  # the student's mass on the teacher's zeros costs, finitely
        assert value.item() > 10


@pytest.mark.parametrize("kind", KINDS)
def test_chunked_equals_plain(kind):
    student, teacher = _logits(shape=(7, 5, 64), seed=3)
    mask = (torch.arange(35).reshape(7, 5) % 3 != 0).float()
    plain = _check(kind, student, teacher, temperature=2.0, beta=0.3, mask=mask)
    for chunk in (1, 4, 64):
        s = student.clone().requires_grad_()
        s_plain = student.clone().requires_grad_()
        chunked = kd_loss(s, teacher, kind=kind, temperature=2.0, beta=0.3, mask=mask,
                          chunk_size=chunk)  # fmt: skip
        chunked.backward()
        kd_loss(s_plain, teacher, kind=kind, temperature=2.0, beta=0.3, mask=mask).backward()
        assert chunked.item() == pytest.approx(plain.item(), rel=1e-5)
        torch.testing.assert_close(s.grad, s_plain.grad, rtol=1e-5, atol=1e-8)


def test_temperature_rule_and_mask_semantics():
    student, teacher = _logits()
    with_t2 = kd_loss(student, teacher, temperature=4.0)
    without = kd_loss(student, teacher, temperature=4.0, temperature_squared=False)
    assert with_t2.item() == pytest.approx(16 * without.item(), rel=1e-6)
    # a masked position's logits do not matter, and get no gradient
    s = student.clone().requires_grad_()
    changed = student.clone()
    changed[2] += 100.0  # row 2 is fully masked in MASK
    assert kd_loss(s, teacher, mask=MASK).item() == pytest.approx(
        kd_loss(changed, teacher, mask=MASK).item(), rel=1e-6
    )
    kd_loss(s, teacher, mask=MASK).backward()
    assert torch.count_nonzero(s.grad[2]) == 0
    # identical distributions: every kind is 0
    for kind in KINDS:
        assert kd_loss(teacher, teacher, kind=kind).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(kind="kl"), "unknown; choose one of forward_kl, reverse_kl, jsd, tvd"),
        (dict(temperature=0.0), "temperature must be > 0"),
        (dict(kind="jsd", beta=1.0), "0 < beta < 1"),
        (dict(chunk_size=0), "chunk_size must be >= 1"),
        (dict(mask=torch.ones(6)), "mask shape"),
    ],
)
def test_bad_settings_are_refused(kwargs, match):
    student, teacher = _logits()
    with pytest.raises(ConfigError, match=match):
        kd_loss(student, teacher, **kwargs)
    with pytest.raises(ConfigError, match="differ in shape"):
        kd_loss(student, teacher[..., :10])
