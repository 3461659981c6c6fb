"""The static LM/KD mix, as a ModelOpt loss balancer (ModelOpt's own balancer is the other
choice; `KDCriterion.balancer` picks one). Its own module because ModelOpt, which it
subclasses, is heavy to import: only a training run loads it."""

import modelopt.torch.distill as mtd
import torch


class StaticMix(mtd.DistillationLossBalancer):
    """total = (1 - alpha) LM + alpha (logits KD + intermediate_weight x mean intermediate).

    Takes ModelOpt's loss dict (the student's LM token sum under STUDENT_LOSS_KEY, the logits
    loss under a key containing "Logits", intermediate losses under the others: scalars) and
    returns `{kd_loss: total, logits_loss, intermediate_loss}` as ModelOpt's balancer does."""

    def __init__(self, alpha: float, intermediate_weight: float):
        super().__init__()
        self.alpha = alpha
        self.intermediate_weight = intermediate_weight

    def forward(self, loss_dict: dict) -> dict:
        """Mix one micro-batch's token sums (see the class docstring)."""
        loss_dict = dict(loss_dict)
        lm = loss_dict.pop(mtd.loss_balancers.STUDENT_LOSS_KEY)
        logits = loss_dict.pop(next(k for k in loss_dict if "Logits" in k))
        intermediate = sum(loss_dict.values()) / max(len(loss_dict), 1)
        if not torch.is_tensor(intermediate):
            intermediate = logits.new_tensor(float(intermediate))
        kd_total = logits + self.intermediate_weight * intermediate
        if self.alpha == 1.0:
            total = kd_total
        else:
            total = (1 - self.alpha) * lm + self.alpha * kd_total
        return {"kd_loss": total, "logits_loss": logits, "intermediate_loss": intermediate}
