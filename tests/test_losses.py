"""distill_llm.losses.kd_loss against an independent float64 computation of the formulas:
values and student gradients for every kind, masks, temperatures 0.5 / 1 / 4, extreme logits and
teacher zeros; the chunked and fused paths equal the plain one (TP shards: test_losses_tp.py)."""

import math

import pytest
import torch

from distill_llm.errors import ConfigError
from distill_llm.kd.losses import (
    KINDS,
    LOG_PROB_FLOOR,
    chunked_per_position,
    kd_loss,
    kd_loss_fused,
    per_position,
)


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


def away_from_tvd_kinks(student, teacher, temperature, margin=1e-3):
    """`teacher` with its logits nudged until no id has p_teacher within `margin` (relative)
    of p_student. TVD's gradient holds sign(p_t - p_s): where the two agree to float32 rounding,
    two float32 computations (another chunking, another CPU) may take opposite signs and
    differ by that id's probability, which no tolerance derived from float32 rounding covers.
    Away from those kinks the gradient is smooth and rounding-sized differences remain."""
    teacher = teacher.clone()
    log_ps = torch.log_softmax(student.double() / temperature, -1)
    for _ in range(20):
        log_pt = torch.log_softmax(teacher.double() / temperature, -1)
        near = (log_pt - log_ps).abs() < margin
        if not near.any():
            return teacher
        teacher = torch.where(near, teacher + 20 * margin * temperature, teacher)
    raise AssertionError("could not move the teacher away from TVD's kinks")


def _logits(scale=3.0, shape=(6, 3, 40), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * scale, torch.randn(shape, generator=g) * scale


MASK = torch.tensor([[1, 1, 0], [1, 0, 1], [0, 0, 0], [1, 1, 1], [1, 0, 0], [0, 1, 1]])


def _check(kind, student, teacher, chunk_size=None, **kw):
    if kind == "tvd":
        teacher = away_from_tvd_kinks(student, teacher, kw.get("temperature", 1.0))
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
    if kind == "tvd":
        teacher = away_from_tvd_kinks(student, teacher, 2.0)
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


def _close(got, want, rtol=1e-5):
    """Equal to `rtol`, elementwise and relative to the largest magnitude (float32 softmax
    gradients cancel in their smallest entries)."""
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * float(want.abs().max()))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_chunked_per_position_equals_per_position(kind, temperature):
    student, teacher = _logits(shape=(7, 5, 64), seed=4)
    teacher[..., :6] = float("-inf")  # teacher zeros take the floor / the p_t == 0 branches
    if kind == "tvd":
        teacher = away_from_tvd_kinks(student, teacher, temperature)
    gen = torch.Generator().manual_seed(9)
    grad_rows = torch.rand(7, 5, generator=gen) * 3  # non-uniform upstream weights
    grad_rows[torch.arange(35).reshape(7, 5) % 4 == 0] = 0.0  # masked positions
    s_plain = student.clone().requires_grad_()
    plain = per_position(kind, s_plain, teacher, temperature, 0.3)
    (plain * grad_rows).sum().backward()
    assert s_plain.grad.abs().max() > 0
    for chunk in (1, 4, 64):
        s = student.clone().requires_grad_()
        rows = chunked_per_position(kind, s, teacher, temperature, 0.3, chunk_size=chunk)
        assert rows.shape == (7, 5) and rows.dtype == torch.float32
        _close(rows, plain.detach())
        (rows * grad_rows).sum().backward()
        _close(s.grad, s_plain.grad)
        assert torch.count_nonzero(s.grad[grad_rows == 0]) == 0


def test_chunked_per_position_dtype_no_grad_and_single_backward():
    student, teacher = _logits(shape=(4, 3, 32), seed=5)
    with torch.no_grad():  # no gradient wanted: plain values, no graph
        rows = chunked_per_position("jsd", student.requires_grad_(), teacher, 2.0, 0.5, None, 2)
    assert rows.grad_fn is None
    _close(rows, per_position("jsd", student.detach(), teacher, 2.0, 0.5))
    # bf16 logits: the gradient comes back in bf16, scaled by float32 upstream weights
    s16 = student.detach().bfloat16().requires_grad_()
    rows = chunked_per_position("forward_kl", s16, teacher.bfloat16(), 1.0, 0.5, chunk_size=5)
    weights = torch.linspace(0.1, 1.0, 12).reshape(4, 3)
    (rows * weights).sum().backward(retain_graph=True)
    s32 = s16.detach().float().requires_grad_()
    (per_position("forward_kl", s32, teacher.bfloat16(), 1.0, 0.5) * weights).sum().backward()
    assert s16.grad.dtype == torch.bfloat16
    _close(s16.grad.float(), s32.grad, rtol=1e-2)
    with pytest.raises(RuntimeError, match="backpropagated once"):
        (rows * weights).sum().backward()


def _fused_inputs(shape=(6, 3), hidden_size=16, vocab=40, seed=6):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, hidden_size, generator=gen)
    weight = torch.randn(vocab, hidden_size, generator=gen) * 0.8
    teacher = torch.randn(*shape, vocab, generator=gen) * 3
    teacher[..., :4] = float("-inf")
    return hidden, weight, teacher


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_fused_equals_plain(kind, temperature):
    hidden, weight, teacher = _fused_inputs()
    if kind == "tvd":
        teacher = away_from_tvd_kinks(hidden.double() @ weight.double().T, teacher, temperature)
    for mask, squared in ((MASK, True), (None, True), (MASK, False)):
        kw = dict(kind=kind, temperature=temperature, temperature_squared=squared, beta=0.3,
                  mask=mask)  # fmt: skip
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        plain = kd_loss(h @ w.T, teacher, **kw)
        plain.backward()
        assert h.grad.abs().max() > 0 and w.grad.abs().max() > 0
        for chunk in (1, 7, 1000):
            hf, wf = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
            fused = kd_loss_fused(hf, wf, teacher, chunk_size=chunk, **kw)
            assert fused.dtype == torch.float32
            assert fused.item() == pytest.approx(plain.item(), rel=1e-5)
            (2.5 * fused).backward()  # the upstream gradient scales both
            # The fused path forms the logits chunk by chunk (another summation order than the
            # plain matmul), so they differ by float32 rounding d; the softmax sees d / T, and
            # the gradients differ by that relative amount: 1e-5 of the largest entry at T >= 1,
            # scaled by 1/T below. (TVD's teacher is kept off its |.| kinks, see above.) TVD's
            # gradient p_s (sign - <sign>_{p_s}) / T subtracts a vocabulary mean from each entry,
            # which doubles the rounding in its smallest entries: measured 1.07x the plain bound
            # on one x86 machine at T=0.5, so TVD gets 2x.
            rtol = 1e-5 * max(1.0, 1.0 / temperature) * (2 if kind == "tvd" else 1)
            _close(hf.grad, 2.5 * h.grad, rtol)
            _close(wf.grad, 2.5 * w.grad, rtol)
            if mask is not None:  # masked positions' hidden states get no gradient
                assert torch.count_nonzero(hf.grad[MASK == 0]) == 0


def test_fused_in_bf16_accumulates_the_weight_gradient_in_float32():
    hidden, weight, teacher = _fused_inputs(shape=(400, 2))
    h, w = hidden.double().requires_grad_(), weight.double().requires_grad_()
    reference("jsd", h @ w.T, teacher.double(), temperature=2.0).backward()
    h16, w16 = hidden.bfloat16().requires_grad_(), weight.bfloat16().requires_grad_()
    kd_loss_fused(h16, w16, teacher, kind="jsd", temperature=2.0, chunk_size=3).backward()
    assert h16.grad.dtype == w16.grad.dtype == torch.bfloat16
    # Within bf16 precision of the float64 gradients (0.6% measured); adding the 267 chunks'
    # products to a bf16 accumulator instead would be 3% off.
    _close(h16.grad.double(), h.grad, rtol=1.5e-2)
    _close(w16.grad.double(), w.grad, rtol=1.5e-2)


def test_fused_with_a_frozen_input_and_bad_shapes():
    hidden, weight, teacher = _fused_inputs()
    w = weight.clone().requires_grad_()
    kd_loss(hidden @ w.T, teacher, kind="reverse_kl").backward()
    wf = weight.clone().requires_grad_()
    fused = kd_loss_fused(hidden, wf, teacher, kind="reverse_kl", chunk_size=5)
    fused.backward(retain_graph=True)
    _close(wf.grad, w.grad)
    with pytest.raises(RuntimeError, match="backpropagated once"):
        fused.backward()
    with torch.no_grad():
        value = kd_loss_fused(hidden, weight.requires_grad_(), teacher, kind="tvd")
    assert value.item() == pytest.approx(kd_loss(hidden @ weight.T, teacher, kind="tvd").item())
    with pytest.raises(ConfigError, match=r"must be \[vocab, hidden size\]"):
        kd_loss_fused(hidden, weight.T, teacher)
    with pytest.raises(ConfigError, match=r"teacher logits \(6, 3, 39\) must be \(6, 3, 40\)"):
        kd_loss_fused(hidden, weight, teacher[..., :39])
    with pytest.raises(ConfigError, match="mask shape"):
        kd_loss_fused(hidden, weight, teacher, mask=torch.ones(6))


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
