"""NeMo dist-ckpt tensors <-> a megatron-core GPTModel, on any tensor/pipeline layout.

NeMo 1 (`model_weights/`, keys `model.`) and NeMo 2 (`weights/`, keys `module.`) store what
megatron-core's `sharded_state_dict` describes: per-layer tensors stacked on a leading layer
axis, q/k/v fused group by group, fc1 = [gate; up], layer norms under the TE names
(`linear_qkv.layer_norm_weight`, `linear_fc1.layer_norm_weight`), global (TP-independent)
shapes. So this rank's GPTModel says, through its own sharded state dict, which region of
which stored tensor each of its parameters is; `dcp.DcpReader` reads exactly those regions.
Writing is megatron-core's own `dist_checkpointing.save` of the same sharded state dict
under NeMo's prefix, which is what NeMo writes.
"""

from __future__ import annotations

from typing import Dict

import torch

from distill_llm.engine.model import ModelConfig
from distill_llm.errors import ConfigError
from distill_llm.formats.nemo.dcp import DcpReader


def expected_shapes(cfg: ModelConfig, prefix: str) -> Dict[str, tuple]:
    """Every tensor a NeMo checkpoint of `cfg` holds, with its global shape; the vocabulary
    rows (padded by NeMo at save time) are given as -1."""
    h, f, d, n = cfg.hidden_size, cfg.ffn_hidden_size, cfg.head_dim, cfg.num_layers
    q, kv = cfg.num_attention_heads * d, cfg.query_groups * d
    gated = 2 if cfg.activation == "swiglu" else 1
    layer = prefix + "decoder.layers."
    shapes = {
        prefix + "embedding.word_embeddings.weight": (-1, h),
        layer + "self_attention.linear_qkv.layer_norm_weight": (n, h),
        layer + "self_attention.linear_qkv.weight": (n, q + 2 * kv, h),
        layer + "self_attention.linear_proj.weight": (n, h, q),
        layer + "mlp.linear_fc1.layer_norm_weight": (n, h),
        layer + "mlp.linear_fc1.weight": (n, gated * f, h),
        layer + "mlp.linear_fc2.weight": (n, h, f),
        prefix + "decoder.final_layernorm.weight": (h,),
    }
    if cfg.normalization == "LayerNorm":
        shapes[layer + "self_attention.linear_qkv.layer_norm_bias"] = (n, h)
        shapes[layer + "mlp.linear_fc1.layer_norm_bias"] = (n, h)
        shapes[prefix + "decoder.final_layernorm.bias"] = (h,)
    if cfg.add_bias_linear or cfg.add_qkv_bias:
        shapes[layer + "self_attention.linear_qkv.bias"] = (n, q + 2 * kv)
    if cfg.add_bias_linear:
        shapes[layer + "self_attention.linear_proj.bias"] = (n, h)
        shapes[layer + "mlp.linear_fc1.bias"] = (n, gated * f)
        shapes[layer + "mlp.linear_fc2.bias"] = (n, h)
    if cfg.qk_layernorm:
        shapes[layer + "self_attention.q_layernorm.weight"] = (n, d)
        shapes[layer + "self_attention.k_layernorm.weight"] = (n, d)
    if cfg.position_embedding == "learned_absolute":
        shapes[prefix + "embedding.position_embeddings.weight"] = (cfg.max_seq_length, h)
    if not cfg.tie_embeddings:
        shapes[prefix + "output_layer.weight"] = (-1, h)
    return shapes


def check_weights(cfg: ModelConfig, reader: DcpReader, prefix: str, config_name: str) -> None:
    """Every tensor the config implies is stored with its shape, and nothing else is."""
    stored = reader.tensor_shapes()
    expected = expected_shapes(cfg, prefix)
    for key, shape in expected.items():
        if key not in stored:
            raise ConfigError(
                f"{reader.where}: tensor {key!r} is missing; {config_name} and weights disagree"
            )
        found = stored[key]
        if shape[0] == -1:
            ok = len(found) == 2 and found[1] == shape[1] and found[0] >= cfg.vocab_size
        else:
            ok = found == shape
        if not ok:
            shown = ("vocab>=" + str(cfg.vocab_size),) + shape[1:] if shape[0] == -1 else shape
            raise ConfigError(
                f"{reader.where}: tensor {key!r} has shape {found}, {config_name} implies "
                f"{shown}; config and weights disagree"
            )
        if reader.dtype(key) not in (torch.float32, torch.bfloat16, torch.float16):
            raise ConfigError(f"{reader.where}: tensor {key!r} has dtype {reader.dtype(key)}")
    extra = sorted(k for k in stored if k not in expected)
    if extra:
        raise ConfigError(
            f"{reader.where}: {len(extra)} tensor(s) {config_name} does not describe, e.g. "
            f"{extra[0]!r}; config and weights disagree"
        )


def load_weights(module, reader: DcpReader, prefix: str) -> None:
    """Fill this rank's shard of `module` (a GPTModel on the current layout) from `reader`;
    each parameter reads only its own region of the stored tensor, copied straight into the
    parameter (no second copy of the model is held)."""
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    # The model's own sharded state dict says, per parameter, which stored tensor and region
    # it is; its tensors are views of the parameters (fc1's factory splits [gate; up] into
    # two views), so copying into them fills the model.
    sharded = module.sharded_state_dict(prefix=prefix)
    apply_factories(sharded)
    filled = []

    def fill(item):
        if isinstance(item, ShardedTensor):
            if item.flattened_range is not None:  # pragma: no cover - optimizer states only
                raise RuntimeError(f"{item.key}: flattened shards are not model weights")
            sizes = (1,) * item.prepend_axis_num + tuple(item.local_shape)
            region = reader.read(item.key, tuple(item.global_offset), sizes)
            item.data.copy_(region.reshape(item.local_shape))
            filled.append(item.data)
        return item

    with torch.no_grad():
        dict_list_map_inplace(fill, sharded)
    # a bug guard: a copy (not a view) would leave the parameter unfilled without an error
    if {t.untyped_storage().data_ptr() for t in filled} - _storages(module):
        raise RuntimeError("a sharded tensor is not a view of the model's parameters")


def _storages(module) -> set:
    return {p.untyped_storage().data_ptr() for p in module.parameters()}


def save_weights(module, directory: str, prefix: str) -> None:
    """Write `module` (every rank its shard) as a NeMo dist-ckpt directory: megatron-core's
    own torch_dist save of its sharded state dict under `prefix`."""
    from megatron.core import dist_checkpointing

    from distill_llm.engine.checkpoint import results_queue_without_spawn

    results_queue_without_spawn()
    dist_checkpointing.save(
        module.sharded_state_dict(prefix=prefix), directory, validate_access_integrity=False
    )
