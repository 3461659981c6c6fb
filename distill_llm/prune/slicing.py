"""The pruned model's tensors: each full (TP=1) teacher tensor cut to the kept indices.

Rules per megatron-core parameter (local spec names; the TE spec's fused norms
`linear_qkv.layer_norm_*` / `linear_fc1.layer_norm_*` are cut like the norms they are):
  - word and position embeddings, untied output layer `[V, h]`: columns of the kept hidden
    channels (a tied output layer is the embedding itself);
  - every norm's weight and bias (input_layernorm, pre_mlp_layernorm, final_layernorm) `[h]`:
    the kept hidden channels. QK norms (`q_layernorm`, `k_layernorm`, `[d]`) are untouched:
    heads keep their width.
  - `linear_qkv` `[G*(p+2)*d, h]` (+ bias), megatron's interleaved layout, per group
    [its p query heads; its key head; its value head]: for each kept group in order, the rows
    of its kept query heads, then its key and value rows; columns: the kept hidden channels;
  - `linear_proj` `[h, H*d]`: rows of the kept hidden channels, columns of the kept heads (in
    the same order as in linear_qkv); its bias `[h]`: the kept hidden channels;
  - `linear_fc1` `[F, h]`, or `[2F, h]` = [gate; up] for SwiGLU (+ bias): rows of the kept
    neurons (of gate and of up alike), columns: the kept hidden channels;
  - `linear_fc2` `[h, F]`: rows of the kept hidden channels, columns of the kept neurons; its
    bias: the kept hidden channels.
Student layer j is teacher layer `plan.layers[j]`. Under tensor parallel each teacher tensor is
gathered, cut, and each rank keeps its shard of the result (`engine.shards`), one tensor at a
time, so the result does not depend on the TP size.
"""

import re
from typing import List

import torch

from distill_llm.engine import shards
from distill_llm.engine.model import ModelConfig
from distill_llm.prune.plan import PrunePlan

_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.+)")
_HIDDEN_COLUMNS = (
    "embedding.word_embeddings.weight",
    "embedding.position_embeddings.weight",
    "output_layer.weight",
)
_NORMS = (
    "input_layernorm.",
    "pre_mlp_layernorm.",
    "self_attention.linear_qkv.layer_norm_",
    "mlp.linear_fc1.layer_norm_",
)


def _rows(ranges: List[range]) -> torch.Tensor:
    return torch.tensor([r for span in ranges for r in span], dtype=torch.long)


def qkv_rows(cfg: ModelConfig, groups: List[int], heads: List[int]) -> torch.Tensor:
    """Rows of `linear_qkv` (teacher `cfg`) for the kept query `groups` and their kept `heads`
    (global head numbers), in the student's interleaved order."""
    d, per_group = cfg.head_dim, cfg.num_attention_heads // cfg.query_groups
    spans = []
    for g in groups:
        base = g * (per_group + 2) * d
        for h in (h for h in heads if h // per_group == g):
            j = h - g * per_group
            spans.append(range(base + j * d, base + (j + 1) * d))
        spans.append(range(base + per_group * d, base + (per_group + 2) * d))  # key, value
    return _rows(spans)


def head_columns(cfg: ModelConfig, heads: List[int]) -> torch.Tensor:
    """Columns of `linear_proj` (teacher `cfg`) for the kept `heads`."""
    d = cfg.head_dim
    return _rows([range(h * d, (h + 1) * d) for h in heads])


def fc1_rows(cfg: ModelConfig, neurons: List[int]) -> torch.Tensor:
    """Rows of `linear_fc1` (teacher `cfg`) for the kept FFN `neurons` (gate and up if gated)."""
    kept = torch.tensor(neurons, dtype=torch.long)
    return torch.cat([kept, kept + cfg.ffn_hidden_size]) if cfg.activation == "swiglu" else kept


def _norm(cut: torch.Tensor, name: str, plan: PrunePlan, slot: int) -> torch.Tensor:
    """A norm's cut tensor, its weight times the plan's factor for norm `slot` (if any)."""
    if plan.norm_scales is None or not name.endswith("weight"):
        return cut
    return cut * plan.norm_scales[slot]


def slice_full(name: str, full: torch.Tensor, plan: PrunePlan, teacher: ModelConfig):
    """The student's full tensor from teacher parameter `name`'s full tensor `full`."""
    hidden = torch.tensor(plan.hidden, dtype=torch.long)
    if name in _HIDDEN_COLUMNS:
        return full[:, hidden]
    if name.startswith("decoder.final_layernorm."):
        return _norm(full[hidden], name, plan, -1)
    found = _LAYER.fullmatch(name)
    if found is None:
        raise RuntimeError(f"pruning has no rule for parameter {name!r}")
    at, rest = plan.position(int(found.group(1))), found.group(2)
    kind = rest.rsplit(".", 1)[1]
    if rest.startswith(_NORMS):
        first = rest.startswith(("input_layernorm.", "self_attention.linear_qkv."))
        return _norm(full[hidden], name, plan, 2 * at + (0 if first else 1))
    if rest.startswith(("self_attention.q_layernorm.", "self_attention.k_layernorm.")):
        return full
    if rest.startswith("self_attention.linear_qkv."):
        rows = qkv_rows(teacher, plan.query_groups[at], plan.heads[at])
        return full[rows][:, hidden] if kind == "weight" else full[rows]
    if rest == "self_attention.linear_proj.weight":
        return full[hidden][:, head_columns(teacher, plan.heads[at])]
    if rest.startswith("mlp.linear_fc1."):
        rows = fc1_rows(teacher, plan.ffn[at])
        return full[rows][:, hidden] if kind == "weight" else full[rows]
    if rest == "mlp.linear_fc2.weight":
        return full[hidden][:, torch.tensor(plan.ffn[at], dtype=torch.long)]
    if rest in ("self_attention.linear_proj.bias", "mlp.linear_fc2.bias"):
        return full[hidden]
    raise RuntimeError(f"pruning has no rule for parameter {name!r}")


def teacher_name(student_name: str, plan: PrunePlan) -> str:
    """The teacher parameter a student parameter is cut from (layer j <- plan.layers[j])."""
    found = _LAYER.fullmatch(student_name)
    if found is None:
        return student_name
    return f"decoder.layers.{plan.layers[int(found.group(1))]}.{found.group(2)}"


@torch.no_grad()
def fill(student, teacher, plan: PrunePlan, teacher_cfg: ModelConfig) -> None:
    """Copy into `student` (this rank's shard of the pruned GPTModel) the teacher's tensors cut
    to `plan`, from `teacher` (this rank's shard of the teacher, on the same TP layout)."""
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    source = dict(shards.named_params(teacher))
    for name, param in shards.named_params(student):
        src = teacher_name(name, plan)
        full = slice_full(src, shards.gather_full(src, source[src], tp), plan, teacher_cfg)
        piece = shards.shard_of(name, param, full, tp, rank)
        if piece.shape != param.shape:  # a rule above disagrees with the pruned ModelConfig
            raise RuntimeError(f"{name}: cut to {tuple(piece.shape)}, needs {tuple(param.shape)}")
        param.copy_(piece)
