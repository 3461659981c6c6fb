"""Tensor-parallel shards of megatron-core GPTModel parameters: the full (TP=1) tensor from the
shards every rank of a TP group holds, and one rank's shard of a full tensor.

The layout (megatron-core local and TE specs): a parameter with `tensor_model_parallel` is cut
into TP equal pieces along its `partition_dim` (column-parallel: 0, row-parallel: 1), except
  - `linear_fc1` of a gated MLP, fused as [gate; up]: each rank holds [its slice of gate; its
    slice of up], so the full tensor is [all gate slices; all up slices];
  - experts (`mlp.experts.local_experts.*`), whole on every TP rank (expert TP 1).
Everything else (norms, row-parallel biases, routers) is replicated. `linear_qkv` needs no
special case: each rank holds whole query groups, so its shards concatenate to the interleaved
[q heads of group, k, v] layout of the full tensor.

megatron-core is imported inside the functions that use it (a few seconds of import):
`import distill_llm` stays cheap, and megatron loads once an entry point runs.
"""

from typing import Iterator, Tuple

import torch


def is_expert(name: str) -> bool:
    """Whether parameter `name` belongs to a routed expert (whole on every TP rank)."""
    return ".mlp.experts.local_experts." in name


def is_fc1(name: str) -> bool:
    """Whether parameter `name` is a fused `linear_fc1` weight or bias ([gate; up] when gated)."""
    return ".linear_fc1.weight" in name or ".linear_fc1.bias" in name


def is_sharded(name: str, param, tp: int) -> bool:
    """Whether parameter `param` is cut into `tp` pieces (else every TP rank holds it whole)."""
    return tp > 1 and getattr(param, "tensor_model_parallel", False) and not is_expert(name)


def shard_of(name: str, param, full: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    """Rank `rank`'s piece (of `tp`) of the full tensor `full` of megatron parameter `param`."""
    if not is_sharded(name, param, tp):
        return full
    if is_fc1(name):
        gate, up = full.chunk(2)
        return torch.cat([gate.chunk(tp)[rank], up.chunk(tp)[rank]])
    return full.chunk(tp, dim=param.partition_dim)[rank]


def gather_full(name: str, param, tp: int) -> torch.Tensor:
    """The full tensor of parameter `param` (every rank of the TP group gets it; a copy)."""
    from megatron.core import parallel_state

    t = param.detach()
    if not is_sharded(name, param, tp):
        return t.clone()
    parts = [torch.empty_like(t) for _ in range(tp)]
    torch.distributed.all_gather(
        parts, t.contiguous(), group=parallel_state.get_tensor_model_parallel_group()
    )
    if is_fc1(name):
        gates, ups = zip(*(p.chunk(2) for p in parts))
        return torch.cat([*gates, *ups])
    return torch.cat(parts, dim=param.partition_dim)


def named_params(model) -> Iterator[Tuple[str, torch.nn.Parameter]]:
    """`model`'s parameters by name, each once (a tied output layer shares the embedding)."""
    seen = set()
    for name, p in model.named_parameters():
        if id(p) not in seen:
            seen.add(id(p))
            yield name, p
