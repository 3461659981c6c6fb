"""Which units of the teacher survive: the top-scored ones, for the student's shape.

Every list of kept indices is in the teacher's numbering and in ascending order, so the
student keeps the teacher's order of layers, channels, groups and heads (pruning to the
teacher's own shape is the identity). Ties go to the lower index.
  - layers: the `student.num_layers` highest depth scores (all when the depth is kept).
  - hidden: the `student.hidden_size` highest hidden-channel scores, one set for the whole
    model (the residual stream, embeddings, every norm and the output layer share it). With
    `hidden_method="pca"` the scores are the eigenvalues of the rotated teacher's channels
    (`prune.rotation`), in descending order, so the first channels are kept.
  - per kept layer: the `student.query_groups` highest-scored query groups (a kept group keeps
    its key and value head); within each kept group its `heads per group` highest-scored heads
    (every group the same count); the `student.ffn_hidden_size` highest-scored FFN neurons.
Heads are numbered globally within a layer: group g holds heads g*p .. g*p + p - 1 (p = the
teacher's heads per group).
"""

from dataclasses import asdict, dataclass
from typing import List, Optional

import torch

from distill_llm.engine.model import ModelConfig
from distill_llm.prune.importance import Scores


@dataclass
class PrunePlan:
    """The kept indices (teacher numbering, ascending); per-layer lists follow `layers`."""

    layers: List[int]
    hidden: List[int]
    query_groups: List[List[int]]
    heads: List[List[int]]
    ffn: List[List[int]]
    # RMSNorm weight factors, per student norm (input, pre-MLP per kept layer, then final):
    # None when no hidden channel is dropped or the correction is off (see `norm_scales`)
    norm_scales: Optional[List[float]] = None

    def to_dict(self) -> dict:
        """The plan as plain lists (prune.json's "kept")."""
        return asdict(self)

    def position(self, layer: int) -> int:
        """Where teacher layer `layer` sits among the kept layers (its student number)."""
        return self.layers.index(layer)


def top(scores: torch.Tensor, k: int) -> List[int]:
    """Indices of the `k` highest `scores` (ties: the lower index), in ascending order."""
    order = torch.argsort(-scores.double(), stable=True)
    return sorted(order[:k].tolist())


def norm_scales(norm_inputs: torch.Tensor, hidden: List[int], layers: List[int]) -> List[float]:
    """The factor on each kept RMSNorm's weight that keeps its output at the teacher's scale once
    only the `hidden` channels remain. An RMSNorm divides by the root mean square of its input;
    over the kept channels (the important, larger ones) that is larger than over all, so the
    pruned model's normalised activations would shrink. With m_c the calibration mean of the
    squared input of channel c (`norm_inputs`, one row per teacher norm), the factor is
    sqrt(mean of m over the kept channels / mean of m over all channels), the ratio of the two
    root mean squares on average. Rows of the kept `layers` (input, pre-MLP), then the final."""
    kept = torch.tensor(hidden, dtype=torch.long)
    rows = [2 * i + k for i in layers for k in (0, 1)] + [norm_inputs.shape[0] - 1]
    m = norm_inputs.double()[rows]
    return (m[:, kept].mean(dim=1) / m.mean(dim=1)).sqrt().tolist()


def kept_layers(
    scores: Scores, teacher: ModelConfig, student: ModelConfig, depth_method: str
) -> List[int]:
    """The teacher layers the student keeps: the `student.num_layers` highest depth scores."""
    if student.num_layers < teacher.num_layers:
        return top(scores.layers(depth_method), student.num_layers)
    return list(range(teacher.num_layers))


def choose(
    scores: Scores,
    teacher: ModelConfig,
    student: ModelConfig,
    depth_method: str,
    rescale_norms: bool = True,
) -> PrunePlan:
    """The units of `teacher` that `student`'s shape keeps, by `scores` (see module docstring)."""
    per_group = teacher.num_attention_heads // teacher.query_groups
    keep_per_group = student.num_attention_heads // student.query_groups
    layers = kept_layers(scores, teacher, student, depth_method)
    group_scores = scores.groups(teacher)
    groups, heads, ffn = [], [], []
    for i in layers:
        kept = top(group_scores[i], student.query_groups)
        groups.append(kept)
        heads.append(
            [
                g * per_group + j
                for g in kept
                for j in top(scores.heads[i, g * per_group : (g + 1) * per_group], keep_per_group)
            ]
        )
        ffn.append(top(scores.ffn[i], student.ffn_hidden_size))
    hidden = top(scores.hidden, student.hidden_size)
    scales = None
    if (
        rescale_norms
        and teacher.normalization == "RMSNorm"
        and student.hidden_size < teacher.hidden_size
        and scores.norm_inputs is not None
    ):
        scales = norm_scales(scores.norm_inputs, hidden, layers)
    return PrunePlan(
        layers=layers, hidden=hidden, query_groups=groups, heads=heads, ffn=ffn, norm_scales=scales
    )
