"""KDConfig: what the student learns from the teacher, with the facts derived from it
(`lm_in_gradient`, `scale`) decided here once for every loss path."""

from dataclasses import dataclass, field
from typing import List, Optional

from distill_llm.errors import ConfigError
from distill_llm.kd import losses

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
    # a time (memory-lean and faster for big vocabularies; same values and gradients, to
    # float32 rounding). None: all positions at once (autograd through log-softmax).
    chunk_size: Optional[int] = 256
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

    @property
    def lm_in_gradient(self) -> bool:
        """Whether the student's LM loss enters the gradient (else it is only logged): with a
        static `alpha`, when alpha < 1; with ModelOpt's balancer, unless `skip_lm_loss`."""
        if self.alpha is not None:
            return self.alpha < 1.0
        return not self.skip_lm_loss

    @property
    def scale(self) -> float:
        """The factor on the logits loss: T^2 with `temperature_squared`, else 1."""
        return losses.temperature_scale(self.temperature, self.temperature_squared)

    def validate(self) -> None:
        """Raise ConfigError for settings no loss can run with."""
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
        if self.fused_output_layer and self.lm_in_gradient:
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
