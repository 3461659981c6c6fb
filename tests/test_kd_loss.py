"""The KD loss of the ModelOpt path equals an independent plain-torch computation."""

import pytest
import torch
import torch.nn.functional as F
from conftest import STUDENT, TEACHER
from test_losses import reference

from distill_llm.engine import parallel
from distill_llm.engine.model import ModelConfig, build_gpt
from distill_llm.kd import config as kd
from distill_llm.kd import wrapper
from distill_llm.kd.losses import CLOSED_FORMS, KINDS


@pytest.fixture(scope="module", autouse=True)
def single_process():
    parallel.initialize(parallel.ParallelConfig(), seed=5)


def _batch(b=3, s=24, vocab=1000):
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, vocab, (b, s), generator=gen)
    labels = torch.randint(0, vocab, (b, s), generator=gen)
    mask = (torch.rand(b, s, generator=gen) > 0.3).float()
    mask[0, :] = 0  # a fully padded row must not count at all
    positions = torch.arange(s).expand(b, s)
    return tokens, labels, mask, positions


def _independent(s_logits, t_logits, labels, mask, temperature, kind="forward_kl"):
    """The KD loss (`kind` at temperature T, times T^2) and the student's CE, both means over
    mask==1, computed in float64 by tests/test_losses.py's reference."""
    v = STUDENT["vocab_size"]  # the real vocabulary, not Megatron's padding rows (to 1024)
    kd_value = reference(
        kind, s_logits[..., :v], t_logits[..., :v], temperature=temperature, mask=mask
    )
    # the CE too is over the real vocabulary: padding rows take no probability
    ce = F.cross_entropy(
        s_logits[..., :v].double().flatten(0, 1), labels.flatten(), reduction="none"
    )
    return kd_value, (ce.view_as(mask) * mask).sum() / mask.sum()


def _models(seed=21):
    parallel.seed_everything(seed)
    teacher = build_gpt(ModelConfig(**TEACHER))
    student = build_gpt(ModelConfig(**STUDENT))
    return student, teacher


def _grads_of(student, loss) -> dict:
    """The student's parameter gradients of `loss`, cleared from the student afterwards."""
    loss.backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad()
    return grads


def _assert_grads(model, want: dict) -> None:
    """The wrapper's trainable student parameters carry the gradients `want`."""
    for name, param in model.named_parameters():
        if param.requires_grad and name in want:
            torch.testing.assert_close(param.grad, want[name], rtol=1e-4, atol=1e-6)


# How the logits loss runs: all positions at once, 7 at a time, or 7 at a time fused with the
# student's output layer (KD-only training, so with skip_lm_loss only).
VARIANTS = [
    (variant, skip_lm_loss)
    for variant in ("plain", "chunked", "fused")
    for skip_lm_loss in (True, False)
    if not (variant == "fused" and not skip_lm_loss)
]


@pytest.mark.parametrize("variant, skip_lm_loss", VARIANTS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("kind", KINDS)
def test_kd_loss_matches_plain_torch(skip_lm_loss, training, temperature, kind, variant):
    tokens, labels, mask, pos = _batch()
    student, teacher = _models()
    with torch.no_grad():
        t_logits = teacher(tokens, pos, None)
    s_logits = student(tokens, pos, None)
    want_kd, want_ce = _independent(s_logits, t_logits, labels, mask, temperature, kind)
    want_grads = _grads_of(student, want_kd)

    model = wrapper.build_distillation_model(
        student,
        teacher,
        kd.KDConfig(
            skip_lm_loss=skip_lm_loss,
            temperature=temperature,
            kind=kind,
            chunk_size=None if variant == "plain" else 7,
            fused_output_layer=variant == "fused",
        ),
    )
    model.train(training)
    per_token = model(tokens, pos, None, labels=labels)
    # The logged LM loss rides on the KD loss's chunks where it can (closed forms at T=1 over
    # chunks of logits): the model returns it unwritten, and the KD loss writes it.
    rides = variant == "chunked" and skip_lm_loss and temperature == 1 and kind in CLOSED_FORMS
    assert model.kd_criterion.lm_deferred == rides
    assert bool(torch.isnan(per_token).all()) == rides
    terms = wrapper.kd_loss_terms(model, per_token, mask)
    assert not model.kd_criterion.lm_deferred
    lm_sum = terms["lm"]
    n = mask.sum()
    torch.testing.assert_close(terms["logits"].double() / n, want_kd, rtol=0, atol=1e-5)
    # The LM loss is computed (and logged) in every mode, and is the true CE.
    torch.testing.assert_close(lm_sum.double() / n, want_ce, rtol=0, atol=1e-5)
    if skip_lm_loss:
        torch.testing.assert_close(terms["total"], terms["logits"])
    else:  # ModelOpt's balancer: KD rescaled to the LM loss magnitude, then added
        torch.testing.assert_close(terms["total"], 2 * lm_sum, rtol=1e-6, atol=0)
    if training and skip_lm_loss:
        (terms["total"] / n).backward()
        _assert_grads(model, want_grads)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_static_mixing_weights_lm_and_kd(alpha):
    """total = (1 - alpha) LM + alpha KD, in value and in the student's gradients."""
    tokens, labels, mask, pos = _batch()
    student, teacher = _models()
    with torch.no_grad():
        t_logits = teacher(tokens, pos, None)
    want_kd, want_ce = _independent(student(tokens, pos, None), t_logits, labels, mask, 2.0)
    want_grads = _grads_of(student, ((1 - alpha) * want_ce + alpha * want_kd))
    model = wrapper.build_distillation_model(
        student, teacher, kd.KDConfig(alpha=alpha, temperature=2.0)
    )
    model.train()
    per_token = model(tokens, pos, None, labels=labels)
    terms = wrapper.kd_loss_terms(model, per_token, mask)
    n = mask.sum()
    want_total = (1 - alpha) * want_ce + alpha * want_kd
    torch.testing.assert_close(terms["total"].double() / n, want_total, rtol=0, atol=1e-5)
    (terms["total"] / n).backward()
    _assert_grads(model, want_grads)


def test_unguarded_cross_entropy_would_corrupt_the_kd_loss():
    """The trap the guard exists for: megatron's CE overwrites fp32 logits in place."""
    tokens, labels, mask, pos = _batch()
    student, teacher = _models()
    with torch.no_grad():
        want_kd, _ = _independent(
            student(tokens, pos, None), teacher(tokens, pos, None), labels, mask, 1.0
        )
    model = wrapper.build_distillation_model(student, teacher, kd.KDConfig(skip_lm_loss=False))
    del model.compute_language_model_loss  # back to the unguarded upstream method
    model.compute_language_model_loss = type(model).compute_language_model_loss.__get__(model)
    model.train()
    per_token = model(tokens, pos, None, labels=labels)
    terms = wrapper.kd_loss_terms(model, per_token, mask)
    assert abs(terms["logits"].item() / mask.sum().item() - want_kd.item()) > 1e-3


def test_intermediate_pairs_are_logged_and_validated():
    tokens, labels, mask, pos = _batch()
    student, teacher = _models()
    pair = ["decoder.final_layernorm", "decoder.final_layernorm", "cosine"]
    model = wrapper.build_distillation_model(
        student, teacher, kd.KDConfig(intermediate_pairs=[pair])
    )
    model.train()
    per_token = model(tokens, pos, None, labels=labels)
    terms = wrapper.kd_loss_terms(model, per_token, mask)
    assert terms["intermediate"].item() > 0
    # cosine loss is at most 2 per token
    assert terms["intermediate"].item() / mask.sum().item() <= 2.0
    student2, teacher2 = _models()
    with pytest.raises(kd.ConfigError, match="student has no module 'decoder.nope'"):
        wrapper.build_distillation_model(
            student2, teacher2, kd.KDConfig(intermediate_pairs=[["decoder.nope", "decoder"]])
        )


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("kind", ["forward_kl", "jsd"])
def test_different_vocab_sizes_use_the_shared_vocabulary(kind, fused):
    """Same tokenizer, different embedding sizes (as Qwen2.5 7B's 152064 vs 1.5B's 151936): the
    loss runs over the ids both models have; the teacher's extra rows are left out."""
    tokens, labels, mask, pos = _batch()
    parallel.seed_everything(21)
    teacher = build_gpt(ModelConfig(**dict(TEACHER, vocab_size=1100)))  # padded to 1152
    student = build_gpt(ModelConfig(**STUDENT))  # 1000, padded to 1024
    with torch.no_grad():
        t_logits = teacher(tokens, pos, None)
    s_logits = student(tokens, pos, None)
    assert t_logits.shape[-1] == 1152 and s_logits.shape[-1] == 1024
    want_kd, _ = _independent(s_logits, t_logits, labels, mask, 2.0, kind)
    want_grads = _grads_of(student, want_kd)
    model = wrapper.build_distillation_model(
        student,
        teacher,
        kd.KDConfig(
            temperature=2.0,
            kind=kind,
            beta=0.4 if kind == "jsd" else 0.5,
            fused_output_layer=fused,
            chunk_size=5 if fused else None,
        ),
    )
    model.train()
    if fused:  # the student's output layer hands on hidden states: no logits are made
        assert model.output_layer(torch.zeros(3, 2, 32))[0].shape == (3, 2, 32)
    per_token = model(tokens, pos, None, labels=labels)
    terms = wrapper.kd_loss_terms(model, per_token, mask)
    n = mask.sum()
    if kind == "forward_kl":
        torch.testing.assert_close(terms["logits"].double() / n, want_kd, rtol=0, atol=1e-5)
        (terms["total"] / n).backward()
        _assert_grads(model, want_grads)
    else:
        want = reference(kind, s_logits[..., :1000], t_logits[..., :1000], temperature=2.0,
                         beta=0.4, mask=mask)  # fmt: skip
        torch.testing.assert_close(terms["logits"].double() / n, want, rtol=0, atol=1e-5)
