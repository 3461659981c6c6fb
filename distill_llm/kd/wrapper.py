"""The student+teacher wrapper: ModelOpt's Megatron distillation plugin around a student
GPTModel and a frozen teacher, with the logits loss replaced by our `KDCriterion` and the
student's LM loss made safe to compute beside it. ModelOpt and megatron-core are imported at
module level: this module is loaded only when a distillation run builds its model.
"""

import re
from types import MethodType

import modelopt.torch.distill as mtd
import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region
from megatron.core.transformer.transformer_layer import TransformerLayer
from modelopt.torch.distill.plugins import megatron as mtd_mcore

from distill_llm.engine.model import lm_loss
from distill_llm.errors import ConfigError
from distill_llm.kd import losses
from distill_llm.kd.config import KDConfig
from distill_llm.kd.criterion import FUSED_CHUNK, KDCriterion, LiveLogits, masked_sum, real_vocab


def _tp_group():
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        return parallel_state.get_tensor_model_parallel_group()
    return None


class LogitsKDLoss(mtd_mcore.BaseLoss):
    """ModelOpt's criterion slot for the logits pair, computed by our `KDCriterion`.

    Takes the student's and teacher's logits `[s, b, V/TP]` as ModelOpt's hooks capture them
    (in fused mode the student's side is its last hidden states `[s, b, h]`, and the weight
    comes from the student's output layer) and returns `(per_token [b, s], tp_reduce=True,
    sequence_parallel)`: this rank's share, which `KDCriterion.token_sum` adds across the TP
    group. "Logits" in the class name: ModelOpt's balancer finds the logits loss by it."""

    def __init__(self, config, criterion: KDCriterion, output_layer=None):
        super().__init__(config)
        self.criterion = criterion
        self.output_layer = output_layer  # set in fused mode (kd.fused_output_layer)

    def forward(self, predictions, targets):
        """Per-token KD loss of one micro-batch (see the class docstring)."""
        predictions, targets = self.pre_forward(predictions, targets)
        group = _tp_group()
        if self.output_layer is not None:
            hidden = predictions
            if group is not None:  # its backward adds the ranks' hidden-state gradients
                hidden = copy_to_tensor_model_parallel_region(predictions)
            per_token = self.criterion.per_token_fused(
                hidden, self.output_layer.kd_weight, targets, group
            )
        else:
            per_token = self.criterion.per_token(predictions, LiveLogits(targets), group)
        return self.post_forward(per_token, tp_reduce=True)


def _fuse_output_layer(student, chunk_size: int):
    """Make the student's output layer hand on its input hidden states instead of logits
    (keeping the weight it would have used), and return a `compute_language_model_loss` that
    computes the student's LM loss from them chunk by chunk, without gradient (for logging:
    fused KD trains on the KD loss alone)."""
    layer = student.output_layer

    def hidden_out(self, input_, weight=None, runtime_gather_output=None):
        self.kd_weight = self.weight if weight is None else weight
        return input_, None

    layer.forward = MethodType(hidden_out, layer)
    real = real_vocab(student)

    def lm_loss_from_hidden(self, labels, hidden):  # hidden [s, b, h] -> loss [b, s]
        ce = losses.chunked_cross_entropy(
            hidden.detach(), layer.kd_weight.detach(), labels.transpose(0, 1), _tp_group(),
            chunk_size, real,
        )  # fmt: skip
        return ce.transpose(0, 1).contiguous()

    return lm_loss_from_hidden


def _guarded_lm_loss(kd: KDConfig, real: int, criterion: KDCriterion):
    """The student's `compute_language_model_loss`, made safe for distillation.

    megatron's `vocab_parallel_cross_entropy` overwrites its logits argument in place, and its
    `.float()` makes no copy of fp32 logits. The KD loss reads the same logits tensor afterwards
    (captured by ModelOpt's forward hook), so it must not see softmax probabilities there.
    When the LM loss is only logged (not in the gradient, or no gradient at all), it is computed
    chunk by chunk without touching the logits (`losses.logits_cross_entropy`: no full copy);
    when it trains, megatron's CE gets its own copy. Either way it is over the `real`
    vocabulary (engine.model.lm_loss), not Megatron's padding rows.
    In a training forward whose KD loss can write it (`KDCriterion.can_fill_lm`: the default
    forward KL among them), the logged loss is left to the KD loss's chunks: the tensor
    returned is filled when the KD loss runs, which `kd_loss_terms` waits for.
    """
    chunk = kd.chunk_size or FUSED_CHUNK
    fill_later = criterion.can_fill_lm(real)

    def compute_language_model_loss(self, labels, logits):  # logits [s, b, V/TP] -> [b, s]
        criterion.defer_lm(None)  # a forward's own: none left over from an earlier forward
        if kd.lm_in_gradient and torch.is_grad_enabled():
            return lm_loss(self, labels, logits, copy=True)
        if fill_later and torch.is_grad_enabled() and logits.requires_grad:
            out = torch.full(labels.shape[::-1], float("nan"), device=logits.device)  # [s, b]
            criterion.defer_lm(labels.transpose(0, 1).reshape(-1), out.view(-1))
            return out.transpose(0, 1)
        ce = losses.logits_cross_entropy(
            logits.detach(), labels.transpose(0, 1), _tp_group(), chunk, real
        )
        return ce.transpose(0, 1).contiguous()

    return compute_language_model_loss


def _local_name(name: str, config) -> str:
    """A module name with its global layer index made local to this pipeline stage."""
    offset = TransformerLayer._get_layer_offset(config)
    return re.sub(r"^(decoder\.layers\.)(\d+)", lambda m: f"{m[1]}{int(m[2]) - offset}", name)


def _check_pair_modules(student, teacher, pairs) -> None:
    """Refuse intermediate pairs naming modules the models do not have."""
    for pair in pairs:
        for model, name, role in ((student, pair[0], "student"), (teacher, pair[1], "teacher")):
            try:
                model.get_submodule(_local_name(name, model.config))
            except AttributeError:
                raise ConfigError(
                    f"kd.intermediate_pairs: the {role} has no module {name!r}; use a name "
                    f"from its named_modules(), e.g. 'decoder.final_layernorm'"
                ) from None


def build_distillation_model(student, teacher, kd: KDConfig):
    """Wrap `student` (a GPTModel) with the frozen `teacher` via ModelOpt.

    The result runs both forwards (teacher under no_grad, in eval mode), backpropagates through
    the student only, and hides the teacher from `state_dict` / `sharded_state_dict`. Its
    `kd_criterion` is the KDCriterion the loss function reduces and mixes with.
    """
    pairs = [tuple(p) for p in kd.intermediate_pairs]
    if parallel_state.is_pipeline_last_stage():  # the only stage holding the paired modules
        _check_pair_modules(student, teacher, pairs)
    criterion = KDCriterion(kd, min(real_vocab(student), real_vocab(teacher)))
    cfg = mtd_mcore.DistillationConfig(
        intermediate_layer_pairs=pairs,
        skip_lm_loss=not kd.lm_in_gradient,
        kd_loss_scale=kd.kd_loss_scale,
        logit_kl_temperature=kd.temperature,
    )
    # The projection layer (student width -> teacher width) draws its weights from the run
    # seed, so it starts the same whatever the parallel layout built before it.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(torch.initial_seed())
        cfg = mtd_mcore.setup_distillation_config(cfg, student.config, teacher.config)
    logits_key = tuple(cfg.logit_layers)
    if logits_key in cfg.criterion:  # the last pipeline stage: our criterion replaces ModelOpt's
        output_layer = student.output_layer if kd.fused_output_layer else None
        cfg.criterion[logits_key] = LogitsKDLoss(student.config, criterion, output_layer)
    cfg.loss_balancer = criterion.balancer()
    teacher.eval()
    teacher.requires_grad_(False)
    model = mtd.convert(
        student,
        mode=[
            (
                "kd_loss",
                {
                    "teacher_model": teacher,
                    "criterion": cfg.criterion,
                    "loss_balancer": cfg.loss_balancer,
                },
            )
        ],
    )
    mtd_mcore.adjust_distillation_model_for_mcore(model, cfg)
    if kd.fused_output_layer and getattr(student, "post_process", True):
        lm_loss_fn = _fuse_output_layer(student, kd.chunk_size or FUSED_CHUNK)
    else:
        lm_loss_fn = _guarded_lm_loss(kd, real_vocab(student), criterion)
    model.compute_language_model_loss = MethodType(lm_loss_fn, model)
    model.kd_criterion = criterion
    return model


class OnlineTeacher:
    """The teacher side of the training loop's loss for a live teacher: the wrapped `model`
    (from `build_distillation_model`) computes both forwards; `terms` reduces and mixes."""

    wants_logits = False  # the wrapped model's forward returns the student's LM loss [b, s]

    def __init__(self, model):
        self.model = model

    def terms(self, lm_per_token: torch.Tensor, batch: dict, training: bool) -> dict:
        """Token sums of this micro-batch: `lm`, `logits`, `intermediate` and `total`."""
        return kd_loss_terms(self.model, lm_per_token, batch["loss_mask"])

    def student_only(self):
        """A context in which the wrapped model saves as the student alone."""
        return self.model.hide_loss_modules()

    def adjust_tensor_shapes(self, models, **shapes):
        """Between pipeline stages the wrapper sends student and teacher activations
        concatenated; megatron's schedule needs the combined shapes."""
        if parallel_state.get_pipeline_model_parallel_world_size() == 1:
            return None
        return mtd_mcore.get_tensor_shapes_adjust_fn_for_distillation(
            models, decoder_seq_length=shapes["seq_length"], **shapes
        )


def kd_loss_terms(model, lm_per_token: torch.Tensor, loss_mask: torch.Tensor) -> dict:
    """The losses of the last forward of the wrapped `model`, each summed over unmasked tokens
    of this micro-batch (`loss_mask` [b, s]): `lm` (the student's LM loss, from its per-token
    `lm_per_token` [b, s], the wrapped model's output), `logits` and `intermediate`, and `total`
    (what is backpropagated), mixed by the criterion's balancer. Scalars."""
    criterion = model.kd_criterion
    group = _tp_group()

    def reduce(loss):
        per_token, tp_reduce, _sequence_parallel = loss
        return criterion.token_sum(per_token, loss_mask, group if tp_reduce else None)

    deferred = criterion.lm_deferred
    if deferred:
        # The LM loss is only logged and the KD loss writes it (`_guarded_lm_loss`): the KD
        # loss runs first, then the sum. The balancer never reads a logged-only LM loss.
        lm_sum = lm_per_token.new_zeros(())
    else:
        lm_sum = masked_sum(lm_per_token, loss_mask)
    out = model.compute_kd_loss(student_loss=lm_sum, loss_reduction_fn=reduce)
    if deferred:
        if criterion.lm_deferred:
            raise RuntimeError("the KD loss did not run, so the logged LM loss was never written")
        lm_sum = masked_sum(lm_per_token, loss_mask)
    intermediate = out["intermediate_loss"]
    if not torch.is_tensor(intermediate):
        intermediate = lm_sum.new_tensor(float(intermediate))
    return {
        "lm": lm_sum,
        "total": out["kd_loss"],
        "logits": out["logits_loss"],
        "intermediate": intermediate,
    }
