"""The pruned architecture: a target shape, or a parameter budget turned into one.

    resolve(teacher, PruneTarget(hidden_size=3072, ffn_hidden_size=9216))  # Minitron 4B-Width
    resolve(teacher, {"num_layers": 16})                                    # depth only
    resolve(teacher, "4B")                                 # the largest shape within 4e9 params

Pruning removes whole units and keeps everything else of the teacher: its vocabulary, norms,
activation, biases, positions and head width (`kv_channels`: heads are removed, never narrowed).
A field of the target left out keeps the teacher's, with two rules for attention:
  - `num_query_groups` left out: the teacher's groups; for a teacher with one head per group
    (multi-head attention) it follows `num_attention_heads`, so the student stays MHA.
  - `num_attention_heads` left out: the kept groups x the teacher's heads per group.
Every kept query group keeps the same number of heads (at most the teacher's per group).

A budget (an int, or a string such as "2M", "1.5B", "500K") picks the shape along one width
family: depth kept, and hidden size, FFN width and query groups at one fraction s of the
teacher's, the heads per group kept (so the heads shrink by s too), each rounded down to its
step (64 for widths >= 1024, else 8; FFN steps and group counts also multiples of TP), and
the hidden size a multiple of the heads (transformers' Llama needs it). The largest s whose
`ModelConfig.num_parameters()` fits the budget wins; parameters grow with s, so the first fit
from the top is the largest.
"""

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Optional, Union

from distill_llm.engine.model import ModelConfig
from distill_llm.errors import ConfigError

SHAPE_FIELDS = (
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "num_query_groups",
)
_DROPOUT = {"hidden_dropout", "attention_dropout"}
_SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}


@dataclass
class PruneTarget:
    """The pruned shape; None keeps the teacher's (attention: see the module docstring)."""

    num_layers: Optional[int] = None  # transformer layers kept (the highest-scored)
    hidden_size: Optional[int] = None  # embedding / residual channels kept
    ffn_hidden_size: Optional[int] = None  # FFN neurons kept per layer (per branch when gated)
    num_attention_heads: Optional[int] = None  # query heads kept per layer
    num_query_groups: Optional[int] = None  # key/value heads (GQA groups) kept per layer


Target = Union[PruneTarget, ModelConfig, dict, int, str]


def parse_budget(value) -> Optional[int]:
    """A parameter budget from `value` (an int, or "2M", "1.5B", "500K", "2_000_000"), or None
    when `value` is a shape. ConfigError for a string that is neither."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    if isinstance(value, (int, float)):
        return int(value)
    text = value.lower().replace("_", "").strip()
    found = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmbgt]?)", text)
    if found is None:
        raise ConfigError(
            f"target {value!r} is neither a shape nor a parameter budget; give e.g. "
            "target=2M, target=4B or a shape such as target.hidden_size=3072"
        )
    return int(float(found.group(1)) * _SUFFIXES[found.group(2)])


def _target_fields(teacher: ModelConfig, target) -> dict:
    """The shape fields a target sets (None for those it leaves to the teacher)."""
    if isinstance(target, PruneTarget):
        return dataclasses.asdict(target)
    if isinstance(target, dict):
        unknown = sorted(set(target) - set(SHAPE_FIELDS))
        if unknown:
            raise ConfigError(
                f"target fields {unknown} are not shape fields; pruning sets only "
                f"{', '.join(SHAPE_FIELDS)}"
            )
        return {f: target.get(f) for f in SHAPE_FIELDS}
    if isinstance(target, ModelConfig):
        # the shape, and what only matters to training from scratch (the teacher's are kept)
        keep = set(SHAPE_FIELDS) | {"kv_channels", "init_method_std"} | _DROPOUT
        diff = {
            f.name: (getattr(target, f.name), getattr(teacher, f.name))
            for f in dataclasses.fields(ModelConfig)
            if f.name not in keep and getattr(target, f.name) != getattr(teacher, f.name)
        }
        if diff:
            raise ConfigError(
                f"the target architecture differs from the teacher's beyond its shape "
                f"(field: (target, teacher)) {diff}; pruning changes only {', '.join(SHAPE_FIELDS)}"
            )
        if target.head_dim != teacher.head_dim:
            raise ConfigError(
                f"the target's head width is {target.head_dim}, the teacher's {teacher.head_dim}; "
                "pruning removes heads and keeps their width: set kv_channels="
                f"{teacher.head_dim} or fewer num_attention_heads"
            )
        return target_record(target)
    raise ConfigError(
        f"target must be a shape (PruneTarget, dict or ModelConfig) or a parameter budget "
        f"(int or a string like 4B), got {type(target).__name__}"
    )


def pruned_config(teacher: ModelConfig, fields: dict, tensor_parallel: int = 1) -> ModelConfig:
    """The teacher's architecture with the shape `fields` (None: see the module docstring);
    ConfigError unless pruning can reach it (every size within the teacher's, whole query groups
    with at most the teacher's heads per group, divisible by `tensor_parallel`)."""
    per_group = teacher.num_attention_heads // teacher.query_groups
    shape = {f: fields.get(f) for f in SHAPE_FIELDS}
    for f, value in shape.items():
        whole = isinstance(value, int) and not isinstance(value, bool) and value >= 1
        if value is not None and not whole:
            raise ConfigError(f"target {f} must be a whole number >= 1, got {value!r}")
    for f in ("num_layers", "hidden_size", "ffn_hidden_size"):
        shape[f] = getattr(teacher, f) if shape[f] is None else shape[f]
    heads, groups = shape["num_attention_heads"], shape["num_query_groups"]
    if groups is None:
        groups = heads if (per_group == 1 and heads is not None) else teacher.query_groups
    heads = groups * per_group if heads is None else heads
    shape.update(num_attention_heads=heads, num_query_groups=groups)
    teacher_shape = {
        **{f: getattr(teacher, f) for f in SHAPE_FIELDS[:-1]},
        "num_query_groups": teacher.query_groups,
    }
    for f, value in shape.items():
        if value > teacher_shape[f]:
            raise ConfigError(
                f"target {f} {value} is larger than the teacher's {teacher_shape[f]}; pruning "
                "only removes units"
            )
    if heads % groups:
        raise ConfigError(
            f"target num_attention_heads {heads} is not a multiple of num_query_groups {groups}; "
            "every kept query group keeps the same number of heads"
        )
    if heads // groups > per_group:
        raise ConfigError(
            f"target has {heads // groups} heads per query group, the teacher {per_group}; "
            f"pruning keeps whole groups and removes heads within them: use at most "
            f"{groups * per_group} heads for {groups} groups, or more groups"
        )
    d = teacher.head_dim
    same_width = teacher.kv_channels is None and shape["hidden_size"] == heads * d
    student = dataclasses.replace(
        teacher,
        **{f: shape[f] for f in SHAPE_FIELDS[:-1]},
        # None stays None (one group per head), as the teacher had it
        num_query_groups=None if teacher.num_query_groups is None and groups == heads else groups,
        kv_channels=teacher.kv_channels if teacher.kv_channels is not None or same_width else d,
    )
    student.validate(tensor_parallel, role="pruned model")
    return student


def _step(width: int, tensor_parallel: int = 1) -> int:
    """The rounding step of a width in the budget search (see the module docstring)."""
    base = 64 if width >= 1024 else (8 if width >= 64 else 1)
    return math.lcm(base, tensor_parallel)


def shape_for_budget(teacher: ModelConfig, budget: int, tensor_parallel: int = 1) -> ModelConfig:
    """The largest shape of the width family (module docstring) with at most `budget`
    parameters; ConfigError when the budget exceeds the teacher or is below the family's
    smallest shape (one step of hidden and FFN width, `tensor_parallel` query groups)."""
    total = teacher.num_parameters()
    if budget > total:
        raise ConfigError(
            f"budget {budget:,} parameters is larger than the teacher's {total:,}; pruning only "
            "removes units"
        )
    h, f, g = teacher.hidden_size, teacher.ffn_hidden_size, teacher.query_groups
    per_group = teacher.num_attention_heads // g
    step_h, step_f = _step(h), _step(f, tensor_parallel)
    candidate = None
    for hidden in range(h // step_h * step_h, 0, -step_h):
        ffn = max(step_f, hidden * f // (h * step_f) * step_f)
        groups = max(tensor_parallel, hidden * g // (h * tensor_parallel) * tensor_parallel)
        fields = dict(hidden_size=hidden, ffn_hidden_size=ffn, num_query_groups=groups,
                      num_attention_heads=groups * per_group)  # fmt: skip
        candidate = pruned_config(teacher, fields, tensor_parallel)
        if hidden % candidate.num_attention_heads:
            continue  # transformers' Llama cannot hold it (formats.hf.config.check_exportable)
        if candidate.num_parameters() <= budget:
            return candidate
    smallest = candidate.num_parameters() if candidate is not None else total
    raise ConfigError(
        f"budget {budget:,} parameters is below the smallest shape at the teacher's depth "
        f"({smallest:,}: {describe(candidate or teacher)}); raise the budget or give a shape "
        "with fewer layers"
    )


def resolve(teacher: ModelConfig, target: Target, tensor_parallel: int = 1) -> ModelConfig:
    """The student architecture for `target` (a shape, or a parameter budget: see the module
    docstring), checked to be reachable by pruning `teacher` at `tensor_parallel`."""
    budget = parse_budget(target)
    if budget is not None:
        return shape_for_budget(teacher, budget, tensor_parallel)
    return pruned_config(teacher, _target_fields(teacher, target), tensor_parallel)


def target_record(target: Target):
    """`target` as plain JSON: a budget as given, a shape as the fields it sets."""
    if isinstance(target, PruneTarget):
        return dataclasses.asdict(target)
    if isinstance(target, ModelConfig):
        return {f: getattr(target, f) for f in SHAPE_FIELDS[:-1]} | {
            "num_query_groups": target.query_groups
        }
    return target


def describe(cfg: ModelConfig) -> str:
    """The shape fields of `cfg` in one line."""
    return (
        f"num_layers={cfg.num_layers} hidden_size={cfg.hidden_size} "
        f"ffn_hidden_size={cfg.ffn_hidden_size} num_attention_heads={cfg.num_attention_heads} "
        f"num_query_groups={cfg.query_groups} kv_channels={cfg.head_dim}"
    )


def announce(teacher: str, teacher_cfg: ModelConfig, target: Target, student: ModelConfig) -> str:
    """What pruning `teacher` to `target` makes, in one line (the shape a budget chose
    included)."""
    budget = parse_budget(target)
    why = f"budget {budget:,} parameters -> " if budget is not None else ""
    t, s = teacher_cfg.num_parameters(), student.num_parameters()
    return (
        f"pruning {teacher} ({t:,} parameters) to {why}{describe(student)} "
        f"({s:,} parameters, {100 * s / t:.1f}% of the teacher)"
    )
