"""Knowledge distillation through ModelOpt's Megatron plugin: config, up-front checks, the
student+teacher wrapper and the masked, TP/DP-correct loss reduction."""

from dataclasses import dataclass, field
from types import MethodType
from typing import List, Optional

import torch

from distill_llm import losses
from distill_llm.errors import ConfigError
from distill_llm.model import ModelConfig

INTERMEDIATE_LOSSES = ("cosine", "mse")


@dataclass
class KDConfig:
    """What the student learns from the teacher.

    The logits loss is `kind` (forward_kl = KL(p_teacher || p_student), reverse_kl, jsd with
    `beta`, tvd; formulas in distill_llm.losses) between both models' logits divided by
    `temperature`, multiplied by T^2 when `temperature_squared` (Hinton et al.; ModelOpt's own
    LogitsKLLoss, used by NeMo, does not), computed over the vocabulary-parallel logits.
    """

    kind: str = "forward_kl"  # forward_kl | reverse_kl | jsd | tvd
    temperature: float = 1.0  # softens both distributions; 1.0 = the models' own
    temperature_squared: bool = True  # multiply the logits loss by T^2
    beta: float = 0.5  # jsd's mixture weight of the teacher, 0 < beta < 1
    skip_lm_loss: bool = True  # train on the KD loss alone (the LM loss is still logged)
    # Static mixing: total = (1 - alpha) LM + alpha (logits KD + intermediate_weight x the
    # intermediate losses). None keeps ModelOpt's dynamic balancer (skip_lm_loss, kd_loss_scale).
    alpha: Optional[float] = None
    intermediate_weight: float = 1.0
    # Positions per chunk of the logits loss: its temporaries and gradient are made one chunk at
    # a time (memory-lean for big vocabularies; same values). None: all positions at once.
    chunk_size: Optional[int] = None
    # Compute the logits loss from the student's last hidden states and output-layer weight,
    # chunk_size (default 256) positions at a time, so the student's logits are never built.
    # KD-only training (skip_lm_loss / alpha=1): the LM loss is then logged without gradient.
    fused_output_layer: bool = False
    # With distill(teacher_cache=...): the top-k the cache must hold (None: whatever it has).
    cache_top_k: Optional[int] = None
    kd_loss_scale: float = 1.0  # with skip_lm_loss=False: KD weight after ModelOpt rescales it
    # to the LM loss's magnitude, so total = LM + kd_loss_scale x LM-sized KD
    intermediate_pairs: List[List[str]] = field(
        default_factory=list
    )  # [student_module, teacher_module,
    # "cosine"|"mse"] triples, e.g. ["decoder.final_layernorm", "decoder.final_layernorm", "cosine"]

    def validate(self) -> None:
        if not self.temperature > 0:
            raise ConfigError(f"kd.temperature must be > 0, got {self.temperature}")
        try:
            losses.check_settings(self.kind, self.temperature, self.beta)
        except ConfigError as err:
            raise ConfigError(f"kd: {err}") from None
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"kd.alpha must be in [0, 1] (or None), got {self.alpha}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ConfigError(f"kd.chunk_size must be >= 1 (or None), got {self.chunk_size}")
        if self.cache_top_k is not None and self.cache_top_k < 1:
            raise ConfigError(f"kd.cache_top_k must be >= 1 (or None), got {self.cache_top_k}")
        lm_in_loss = self.alpha < 1.0 if self.alpha is not None else not self.skip_lm_loss
        if self.fused_output_layer and lm_in_loss:
            raise ConfigError(
                "kd.fused_output_layer trains on the KD loss alone (the LM loss needs the "
                "student's logits): set kd.skip_lm_loss=True and kd.alpha=None or 1.0, or drop "
                "fused_output_layer"
            )
        if not self.kd_loss_scale > 0:
            raise ConfigError(f"kd.kd_loss_scale must be > 0, got {self.kd_loss_scale}")
        for pair in self.intermediate_pairs:
            if len(pair) not in (2, 3) or (len(pair) == 3 and pair[2] not in INTERMEDIATE_LOSSES):
                raise ConfigError(
                    f"kd.intermediate_pairs entry {list(pair)} must be [student_module, "
                    f"teacher_module] or [student_module, teacher_module, one of "
                    f"{list(INTERMEDIATE_LOSSES)}]"
                )


def check_compatible(
    student: ModelConfig,
    teacher: ModelConfig,
    *,
    seq_length: int,
    tensor_parallel: int,
    pipeline_parallel: int,
) -> None:
    """Refuse, before anything heavy runs, a teacher/student pair that cannot be distilled."""
    student.validate(tensor_parallel, pipeline_parallel, role="student")
    teacher.validate(tensor_parallel, pipeline_parallel, role="teacher")
    # Vocabulary sizes may differ (e.g. 152064 vs 151936 rows for one tokenizer): the KD loss
    # runs over the ids both have. Different tokenizers are refused by check_same_tokenizer,
    # and data.resolve refuses token ids beyond either model's vocabulary.
    check_seq_length(student, seq_length, "student")
    check_seq_length(teacher, seq_length, "teacher")


_LAST_STAGE_MODULES = ("decoder.final_layernorm", "output_layer")


def check_pipeline_pairs(
    kd: KDConfig, student: ModelConfig, teacher: ModelConfig, pipeline_parallel: int
) -> None:
    """Under pipeline parallel the KD losses are computed on the last stage, so intermediate
    pairs can only name modules that live there (ModelOpt's plugin has no cross-stage pairs)."""
    import re

    if pipeline_parallel == 1:
        return
    for pair in kd.intermediate_pairs:
        for name, cfg, role in ((pair[0], student, "student"), (pair[1], teacher, "teacher")):
            first = cfg.num_layers - cfg.num_layers // pipeline_parallel
            layer = re.match(r"decoder\.layers\.(\d+)(\.|$)", name)
            on_last = name.startswith(_LAST_STAGE_MODULES) or (
                layer is not None and int(layer.group(1)) >= first
            )
            if not on_last:
                raise ConfigError(
                    f"kd.intermediate_pairs: the {role}'s {name!r} is not on the last pipeline "
                    f"stage, where KD losses are computed with pipeline_parallel="
                    f"{pipeline_parallel}; pair modules from decoder.layers.{first}-"
                    f"{cfg.num_layers - 1} or decoder.final_layernorm, or lower pipeline_parallel"
                )


def tokenizer_dir_of(path) -> Optional[str]:
    """The tokenizer directory belonging to a model path: an HF directory's own tokenizer
    files, or those of the HF directory a checkpoint was imported from; None if unknown."""
    from pathlib import Path

    from distill_llm import checkpoint, hf

    if not path or not Path(path).is_dir():
        return None
    if hf.is_hf_dir(path) and hf.find_tokenizer_dir(Path(path)):
        return str(path)
    meta_file = Path(path) / checkpoint.META_FILE
    if meta_file.is_file():
        source = (checkpoint.read_metadata(path).get(hf.HF_META_KEY) or {}).get("source")
        if source and Path(source).is_dir() and hf.find_tokenizer_dir(Path(source)):
            return source
    return None


def check_same_tokenizer(named: dict) -> None:
    """Refuse models/data that come with different tokenizers ({role: model or tokenizer path}).

    Logit distillation compares probabilities id by id, which only means something when both
    models give each id the same token."""
    from distill_llm.tokenizer import load_tokenizer, vocabulary_difference

    found = []
    for role, path in named.items():
        where = path if role == "data.tokenizer" else tokenizer_dir_of(path)
        if where:
            found.append((role, where, load_tokenizer(where)))
    for role, where, tok in found[1:]:
        first_role, first_where, first = found[0]
        diff = vocabulary_difference(first, tok)
        if diff is not None:
            raise ConfigError(
                f"the {first_role}'s tokenizer ({first_where}) and the {role}'s ({where}) differ "
                f"({diff}); cross-tokenizer distillation is not supported: use a student and "
                "data with the teacher's tokenizer"
            )


def check_seq_length(model: ModelConfig, seq_length: int, role: str) -> None:
    if seq_length > model.max_seq_length:
        raise ConfigError(
            f"seq_length {seq_length} is beyond the {role}'s max_seq_length "
            f"{model.max_seq_length}; lower train.seq_length"
        )


def _fuse_output_layer(student, chunk_size: int):
    """Make the student's output layer hand on its input hidden states instead of logits
    (keeping the weight it would have used), and compute the student's LM loss from them
    chunk by chunk, without gradient (for logging: fused KD trains on the KD loss alone)."""
    from megatron.core import parallel_state

    layer = student.output_layer

    def hidden_out(self, input_, weight=None, runtime_gather_output=None):
        self.kd_weight = self.weight if weight is None else weight
        return input_, None

    layer.forward = MethodType(hidden_out, layer)

    def lm_loss_from_hidden(self, labels, hidden):  # hidden [s, b, h] -> loss [b, s]
        group = None
        if parallel_state.get_tensor_model_parallel_world_size() > 1:
            group = parallel_state.get_tensor_model_parallel_group()
        ce = losses.chunked_cross_entropy(
            hidden.detach(), layer.kd_weight.detach(), labels.transpose(0, 1), group, chunk_size
        )
        return ce.transpose(0, 1).contiguous()

    return lm_loss_from_hidden


def _guarded_lm_loss(skip_lm_loss: bool):
    """The student's `compute_language_model_loss`, made safe for distillation.

    megatron's `vocab_parallel_cross_entropy` overwrites its logits argument in place, and its
    `.float()` makes no copy of fp32 logits. The KD loss reads the same logits tensor afterwards
    (captured by ModelOpt's forward hook), so without a copy it would silently see softmax
    probabilities instead of logits. The CE therefore gets its own copy whenever it would alias.
    With `skip_lm_loss` in training the CE does not enter the gradient: it runs under no_grad
    on a copy, for logging only.
    """

    def compute_language_model_loss(self, labels, logits):
        upstream = type(self).compute_language_model_loss
        if skip_lm_loss and self.training:
            with torch.no_grad():
                return upstream(self, labels, logits.detach().clone())
        safe = logits.clone() if logits.dtype == torch.float32 else logits
        return upstream(self, labels, safe)

    return compute_language_model_loss


def build_distillation_model(student, teacher, kd: KDConfig):
    """Wrap `student` (a GPTModel) with the frozen `teacher` via ModelOpt.

    The result runs both forwards (teacher under no_grad, in eval mode), backpropagates through
    the student only, and hides the teacher from `state_dict` / `sharded_state_dict`.
    """
    import modelopt.torch.distill as mtd
    from megatron.core import parallel_state
    from modelopt.torch.distill.plugins import megatron as mtd_mcore

    pairs = [tuple(p) for p in kd.intermediate_pairs]
    if parallel_state.is_pipeline_last_stage():  # the only stage holding the paired modules
        for pair in pairs:
            for model, name, role in ((student, pair[0], "student"), (teacher, pair[1], "teacher")):
                try:
                    model.get_submodule(_local_name(name, model.config))
                except AttributeError:
                    raise ConfigError(
                        f"kd.intermediate_pairs: the {role} has no module {name!r}; use a name "
                        f"from its named_modules(), e.g. 'decoder.final_layernorm'"
                    ) from None
    skip_lm_loss = kd.skip_lm_loss if kd.alpha is None else kd.alpha == 1.0
    cfg = mtd_mcore.DistillationConfig(
        intermediate_layer_pairs=pairs,
        skip_lm_loss=skip_lm_loss,
        kd_loss_scale=kd.kd_loss_scale,
        logit_kl_temperature=kd.temperature,
    )
    # The projection layer (student width -> teacher width) draws its weights from the run
    # seed, so it starts the same whatever the parallel layout built before it.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(torch.initial_seed())
        cfg = mtd_mcore.setup_distillation_config(cfg, student.config, teacher.config)
    logits_key = tuple(cfg.logit_layers)
    if logits_key in cfg.criterion:  # the last pipeline stage: our loss kinds replace ModelOpt's
        shared = min(_real_vocab(student), _real_vocab(teacher))
        output_layer = student.output_layer if kd.fused_output_layer else None
        cfg.criterion[logits_key] = _logits_kd_loss(student.config, kd, shared, output_layer)
    if kd.alpha is not None:
        cfg.loss_balancer = _static_mix(kd.alpha, kd.intermediate_weight)
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
        lm_loss = _fuse_output_layer(student, kd.chunk_size or FUSED_CHUNK)
    else:
        lm_loss = _guarded_lm_loss(skip_lm_loss)
    model.compute_language_model_loss = MethodType(lm_loss, model)
    return model


def _local_name(name: str, config) -> str:
    """A module name with its global layer index made local to this pipeline stage."""
    import re

    from megatron.core.transformer.transformer_layer import TransformerLayer

    offset = TransformerLayer._get_layer_offset(config)
    return re.sub(r"^(decoder\.layers\.)(\d+)", lambda m: f"{m[1]}{int(m[2]) - offset}", name)


def _real_vocab(model) -> int:
    return getattr(model, "real_vocab_size", model.vocab_size)


def align_teacher(teacher, local_s: int, shared: int, group=None):
    """The teacher's logits for the ids of this rank's student shard (`local_s` ids from
    rank x local_s on) and how many of them count: `(teacher [..., local_s], real)`, with ids
    from `real` on (padding rows, or ids one model lacks) set to probability 0 (`real` None:
    all count). Under TP with different vocabulary sizes the shards cover different ids, so
    the teacher's full logits are gathered (no gradient) and this rank's range cut from them."""
    tp = 1 if group is None else torch.distributed.get_world_size(group)
    start = 0 if tp == 1 else torch.distributed.get_rank(group) * local_s
    if teacher.shape[-1] != local_s:
        full = teacher
        if tp > 1:
            pieces = [torch.empty_like(teacher) for _ in range(tp)]
            torch.distributed.all_gather(pieces, teacher.contiguous(), group=group)
            full = torch.cat(pieces, dim=-1)
        full = full[..., start : start + local_s]
        shape = (*teacher.shape[:-1], local_s)
        teacher = full.new_full(shape, losses.EXCLUDED_LOGIT, dtype=torch.float32)
        teacher[..., : full.shape[-1]] = full
    real = max(0, min(local_s, shared - start))
    if real == local_s:
        return teacher, None
    excluded = torch.arange(local_s, device=teacher.device) >= real
    return teacher.float().masked_fill(excluded, losses.EXCLUDED_LOGIT), real


def shared_vocab_logits(student, teacher, shared: int, group=None):
    """This rank's student and teacher logit shards `[..., V_student/TP]` and
    `[..., V_teacher/TP]`, aligned on the student's ids; ids >= `shared` (padding rows, or ids
    one model lacks) get a logit of probability 0 in both, so no loss or gradient reaches them.
    Same sizes with no padding in use: returned as they are; at TP=1 both are cut to `shared`."""
    tp = 1 if group is None else torch.distributed.get_world_size(group)
    local_s = student.shape[-1]
    if tp == 1:
        if local_s == teacher.shape[-1] == shared:
            return student, teacher
        return student[..., :shared], teacher[..., :shared]
    teacher, real = align_teacher(teacher, local_s, shared, group)
    if real is not None:
        excluded = torch.arange(local_s, device=student.device) >= real
        student = student.float().masked_fill(excluded, losses.EXCLUDED_LOGIT)
    return student, teacher


FUSED_CHUNK = 256  # positions per chunk of the fused loss when kd.chunk_size is None


def _logits_kd_loss(config, kd: KDConfig, shared_vocab: int, output_layer=None):
    """A ModelOpt Megatron criterion computing `kd.kind` over vocabulary-parallel logits, on
    the ids below `shared_vocab`; with the student's `output_layer` (fused mode) the student's
    side arrives as hidden states and the logits are made chunk by chunk inside the loss."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region
    from modelopt.torch.distill.plugins.megatron import BaseLoss

    class LogitsKDLoss(BaseLoss):  # "Logits" in the name: ModelOpt's balancer looks for it
        """[s, b, vocab/TP] student and teacher logits -> per-token loss [b, s], this rank's
        part of the vocabulary sum (kd_loss_terms adds the parts across the TP group)."""

        def forward(self, predictions, targets):
            group = None
            if parallel_state.get_tensor_model_parallel_world_size() > 1:
                group = parallel_state.get_tensor_model_parallel_group()
            predictions, targets = self.pre_forward(predictions, targets)
            if output_layer is not None:  # predictions: the student's hidden states [s, b, h]
                weight = output_layer.kd_weight
                targets, real = align_teacher(targets, weight.shape[0], shared_vocab, group)
                hidden = predictions
                if group is not None:  # its backward adds the ranks' hidden-state gradients
                    hidden = copy_to_tensor_model_parallel_region(predictions)
                per_token = losses.fused_per_position(
                    kd.kind, hidden, weight, targets, kd.temperature, kd.beta, group,
                    kd.chunk_size or FUSED_CHUNK, real,
                )  # fmt: skip
                if kd.temperature_squared:
                    per_token = per_token * kd.temperature**2
                return self.post_forward(per_token, tp_reduce=True)
            predictions, targets = shared_vocab_logits(predictions, targets, shared_vocab, group)
            if kd.chunk_size:
                per_token = losses.chunked_per_position(
                    kd.kind, predictions, targets, kd.temperature, kd.beta, group, kd.chunk_size
                )
            else:
                per_token = losses.per_position(
                    kd.kind, predictions, targets, kd.temperature, kd.beta, group
                )
            if kd.temperature_squared:
                per_token = per_token * kd.temperature**2
            return self.post_forward(per_token, tp_reduce=True)

    return LogitsKDLoss(config)


def _static_mix(alpha: float, intermediate_weight: float):
    """A ModelOpt loss balancer: (1 - alpha) LM + alpha (logits + weight x intermediate)."""
    import modelopt.torch.distill as mtd

    class StaticMix(mtd.DistillationLossBalancer):
        def forward(self, loss_dict):
            lm = loss_dict.pop(mtd.loss_balancers.STUDENT_LOSS_KEY)
            logits = loss_dict.pop(next(k for k in loss_dict if "Logits" in k))
            intermediate = sum(loss_dict.values()) / max(len(loss_dict), 1)
            if not torch.is_tensor(intermediate):
                intermediate = logits.new_tensor(float(intermediate))
            kd_total = logits + intermediate_weight * intermediate
            total = kd_total if alpha == 1.0 else (1 - alpha) * lm + alpha * kd_total
            return {"kd_loss": total, "logits_loss": logits, "intermediate_loss": intermediate}

    return StaticMix()


def masked_sum(per_token: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Sum of a `[b, s]` per-token loss over positions where `loss_mask` ([b, s]) is 1."""
    return (per_token.float().reshape(-1) * loss_mask.reshape(-1).float()).sum()


def kd_loss_terms(model, lm_sum: torch.Tensor, loss_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """KD losses of the last forward, each summed over unmasked tokens of this micro-batch.

    ModelOpt's losses return `(per_token [b, s], tp_reduce, sequence_parallel)`. For the logits
    KL under TP each rank holds the KL summed over its own vocabulary shard, so the token sums
    are added across the TP group; the gather keeps each rank's gradient its own (a plain
    all-reduce would multiply the gradient by the TP size).
    Returns `total` (what is backpropagated), `logits` and `intermediate`.
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    def reduce(loss):
        per_token, tp_reduce, _sequence_parallel = loss
        total = masked_sum(per_token, loss_mask)
        if tp_reduce and parallel_state.get_tensor_model_parallel_world_size() > 1:
            total = gather_from_tensor_model_parallel_region(total.reshape(1)).sum()
        return total

    out = model.compute_kd_loss(student_loss=lm_sum, loss_reduction_fn=reduce)
    intermediate = out["intermediate_loss"]
    if not torch.is_tensor(intermediate):
        intermediate = lm_sum.new_tensor(float(intermediate))
    return {"total": out["kd_loss"], "logits": out["logits_loss"], "intermediate": intermediate}
