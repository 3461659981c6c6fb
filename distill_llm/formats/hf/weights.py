"""Hugging Face tensors <-> megatron-core GPTModel parameters.

Weight layout (megatron-core local and TE specs):
  - q/k/v are fused into `linear_qkv` group by group: for each key/value group, its query heads,
    then its key head, then its value head (what megatron's attention splits). Tensor parallel
    gives each rank whole groups.
  - gate/up are fused into `linear_fc1` as [gate; up]; under TP each rank holds
    [its slice of gate; its slice of up].
  - embeddings and the output layer are padded with zero rows to Megatron's padded vocabulary
    (a multiple of 128 x TP) and cut back on export. The padded ids get logit 0; the Llama 3,
    Qwen and Mistral v0.3 vocabularies need no padding at TP 1, 2, 4 or 8.
  - no permutation of q/k rows: both sides rotate halves (non-interleaved RoPE).
  - mixture of experts: the router (`mlp.router`), each expert's `linear_fc1` ([gate; up]) and
    `linear_fc2`, and Qwen2-MoE's shared expert (`mlp.shared_experts`, fused and TP-sharded like
    a dense MLP) and its sigmoid gate (`gate_weight`). Experts are not tensor-parallel (expert
    TP 1); expert parallelism gives each EP rank E / EP whole experts, its local expert j being
    expert ep_rank * E / EP + j. Routers and gates are replicated.
Each TP rank reads only the tensors (and slices) of its own shard, each EP rank only its experts.

megatron-core is imported inside the functions that use it (a few seconds of import):
`import distill_llm` stays cheap, and megatron loads once an entry point runs.
"""

import json
import re
from pathlib import Path
from typing import Dict, List, Tuple

import torch

from distill_llm.engine import shards
from distill_llm.engine.model import ModelConfig
from distill_llm.errors import ConfigError
from distill_llm.formats.hf.config import (
    INDEX_FILE,
    family_for,
    model_config_from_hf,
    read_config,
    source_dtype,
)


def _weight_files(path: Path) -> Dict[str, Path]:
    """tensor name -> safetensors file, checking every file the index names exists."""
    from safetensors import safe_open

    if (path / INDEX_FILE).is_file():
        weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
        files = {name: path / f for name, f in weight_map.items()}
        missing = sorted({str(f.name) for f in files.values() if not f.is_file()})
        if missing:
            raise ConfigError(
                f"{path}: shard(s) {', '.join(missing)} named in {INDEX_FILE} are missing"
            )
        return files
    single = path / "model.safetensors"
    if not single.is_file():
        raise ConfigError(f"{path}: no model.safetensors or {INDEX_FILE}")
    with safe_open(single, "pt") as fh:
        return {name: single for name in fh.keys()}


class HFWeights:
    """Lazy access to an HF directory's tensors, shard by shard."""

    def __init__(self, path):
        self.path = Path(path)
        self.files = _weight_files(self.path)
        self._open: dict = {}

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def _handle(self, name: str):
        from safetensors import safe_open

        if name not in self.files:
            raise ConfigError(f"{self.path}: tensor {name!r} is missing from the weights")
        f = self.files[name]
        if f not in self._open:
            self._open[f] = safe_open(f, "pt")
        return self._open[f]

    def shape(self, name: str) -> tuple:
        """The shape of tensor `name`, read without loading it; ConfigError unless it is float32,
        bfloat16 or float16."""
        piece = self._handle(name).get_slice(name)
        if piece.get_dtype() not in ("F32", "BF16", "F16"):
            raise ConfigError(
                f"{self.path}: tensor {name!r} has dtype {piece.get_dtype()}; "
                "float32, bfloat16 and float16 are supported"
            )
        return tuple(piece.get_shape())

    def get(self, name: str) -> torch.Tensor:
        """Tensor `name`, loaded from its safetensors file."""
        return self._handle(name).get_tensor(name)


def expected_hf_shapes(cfg: ModelConfig) -> Dict[str, tuple]:
    """Every HF tensor `cfg` needs, with its shape (an MoE layer: router, every expert, shared
    expert and its gate, named as `cfg`'s family names them)."""
    h, f, d = cfg.hidden_size, cfg.ffn_hidden_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * d, cfg.query_groups * d
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,)}
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    for i, moe in enumerate(cfg.moe_layer_pattern):
        a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        shapes.update({
            f"model.layers.{i}.input_layernorm.weight": (h,),
            f"model.layers.{i}.post_attention_layernorm.weight": (h,),
            f"{a}q_proj.weight": (q, h), f"{a}k_proj.weight": (kv, h),
            f"{a}v_proj.weight": (kv, h), f"{a}o_proj.weight": (h, q),
        })  # fmt: skip
        if cfg.add_qkv_bias or cfg.add_bias_linear:
            shapes.update({f"{a}q_proj.bias": (q,), f"{a}k_proj.bias": (kv,),
                           f"{a}v_proj.bias": (kv,)})  # fmt: skip
        if cfg.add_bias_linear:
            shapes[f"{a}o_proj.bias"] = (h,)
        if cfg.qk_layernorm:
            shapes.update({f"{a}q_norm.weight": (d,), f"{a}k_norm.weight": (d,)})
        if moe:
            shapes.update(_moe_shapes(cfg, i))
            continue
        shapes.update({f"{m}gate_proj.weight": (f, h), f"{m}up_proj.weight": (f, h),
                       f"{m}down_proj.weight": (h, f)})  # fmt: skip
        if cfg.add_bias_linear:
            shapes.update({f"{m}gate_proj.bias": (f,), f"{m}up_proj.bias": (f,),
                           f"{m}down_proj.bias": (h,)})  # fmt: skip
    return shapes


def _moe_shapes(cfg: ModelConfig, i: int) -> Dict[str, tuple]:
    h, fe, fs = cfg.hidden_size, cfg.expert_ffn, cfg.moe_shared_expert_size
    shapes = {_router_name(cfg, i): (cfg.num_experts, h)}
    for e in range(cfg.num_experts):
        gate, up, down = _expert_names(cfg, i, e)
        shapes.update({gate: (fe, h), up: (fe, h), down: (h, fe)})
    if fs:
        s = f"model.layers.{i}.mlp.shared_expert."
        shapes.update({f"{s}gate_proj.weight": (fs, h), f"{s}up_proj.weight": (fs, h),
                       f"{s}down_proj.weight": (h, fs)})  # fmt: skip
        if cfg.moe_shared_expert_gate:
            shapes[f"model.layers.{i}.mlp.shared_expert_gate.weight"] = (1, h)
    return shapes


def check_weights(cfg: ModelConfig, weights: HFWeights) -> None:
    """Every tensor config.json implies is present with its shape, and nothing unknown is."""
    expected = expected_hf_shapes(cfg)
    for name, shape in expected.items():
        found = weights.shape(name)
        if found != shape:
            raise ConfigError(
                f"{weights.path}: tensor {name!r} has shape {found}, config.json implies {shape}; "
                "config and weights disagree"
            )
    ignorable = ("rotary_emb.inv_freq", "lm_head.weight")
    extra = sorted(n for n in weights.files if n not in expected and not n.endswith(ignorable))
    if extra:
        raise ConfigError(
            f"{weights.path}: {len(extra)} tensor(s) config.json does not describe, e.g. "
            f"{extra[0]!r}; config and weights disagree"
        )


# -- HF names <-> megatron names, full (unsharded) tensors --------------------------------------
def _router_name(cfg: ModelConfig, i: int) -> str:
    """Layer i's router: Mixtral's `block_sparse_moe.gate`, the Qwen MoE families' `mlp.gate`."""
    moe = "block_sparse_moe" if family_for(cfg) == "mixtral" else "mlp"
    return f"model.layers.{i}.{moe}.gate.weight"


def _expert_names(cfg: ModelConfig, i: int, e: int) -> Tuple[str, str, str]:
    """HF (gate, up, down) projections of expert e (global numbering) of layer i: Mixtral's
    w1, w3, w2; the Qwen MoE families' gate_proj, up_proj, down_proj."""
    if family_for(cfg) == "mixtral":
        return tuple(f"model.layers.{i}.block_sparse_moe.experts.{e}.{w}.weight"
                     for w in ("w1", "w3", "w2"))  # fmt: skip
    return tuple(f"model.layers.{i}.mlp.experts.{e}.{p}_proj.weight"
                 for p in ("gate", "up", "down"))  # fmt: skip


_EXPERT = re.compile(r"mlp\.experts\.local_experts\.(\d+)\.linear_fc([12])\.weight")


def _hf_parts(cfg: ModelConfig, name: str, expert_offset: int = 0) -> List[str]:
    """The HF tensors whose concatenation (dim 0) is megatron layer tensor `name` (all but
    linear_qkv); local expert j is expert `expert_offset` + j."""
    _, _, i, rest = name.split(".", 3)
    hf, kind = f"model.layers.{i}.", name.rsplit(".", 1)[1]
    one = {
        "input_layernorm.weight": "input_layernorm.weight",
        f"self_attention.linear_proj.{kind}": f"self_attn.o_proj.{kind}",
        "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
        "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
        "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
        f"mlp.linear_fc2.{kind}": f"mlp.down_proj.{kind}",
        "mlp.shared_experts.linear_fc2.weight": "mlp.shared_expert.down_proj.weight",
        "mlp.shared_experts.gate_weight": "mlp.shared_expert_gate.weight",
    }
    if rest in one:
        return [hf + one[rest]]
    if rest == f"mlp.linear_fc1.{kind}":
        return [f"{hf}mlp.gate_proj.{kind}", f"{hf}mlp.up_proj.{kind}"]
    if rest == "mlp.shared_experts.linear_fc1.weight":
        return [f"{hf}mlp.shared_expert.gate_proj.weight", f"{hf}mlp.shared_expert.up_proj.weight"]
    if rest == "mlp.router.weight":
        return [_router_name(cfg, int(i))]
    expert = _EXPERT.fullmatch(rest)
    if expert is None:
        raise ConfigError(f"no Hugging Face tensor maps to megatron parameter {name!r}")
    gate, up, down = _expert_names(cfg, int(i), expert_offset + int(expert.group(1)))
    return [gate, up] if expert.group(2) == "1" else [down]


# The TE spec fuses the two layer norms into the following linear layers.
_TE_ALIASES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}


def _local_name(name: str) -> str:
    for te, local in _TE_ALIASES.items():
        if name.endswith(te):
            return name[: -len(te)] + local
    return name


def _fuse_qkv(cfg: ModelConfig, q, k, v) -> torch.Tensor:
    g, d = cfg.query_groups, cfg.head_dim
    per = cfg.num_attention_heads // g
    tail = q.shape[1:]
    parts = [q.reshape(g, per * d, *tail), k.reshape(g, d, *tail), v.reshape(g, d, *tail)]
    return torch.cat(parts, dim=1).reshape(g * (per + 2) * d, *tail)


def _split_qkv(cfg: ModelConfig, qkv) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g, d = cfg.query_groups, cfg.head_dim
    per = cfg.num_attention_heads // g
    tail = qkv.shape[1:]
    q, k, v = qkv.reshape(g, (per + 2) * d, *tail).split([per * d, d, d], dim=1)
    return q.reshape(-1, *tail), k.reshape(-1, *tail), v.reshape(-1, *tail)


def hf_tensor_for(
    cfg: ModelConfig, name: str, weights: HFWeights, expert_offset: int = 0
) -> torch.Tensor:
    """The full (TP=1, unpadded) megatron tensor `name`, built from the HF tensors; a local
    expert j is HF expert `expert_offset` + j."""
    name = _local_name(name)
    if name == "embedding.word_embeddings.weight":
        return weights.get("model.embed_tokens.weight")
    if name == "output_layer.weight":
        return weights.get("model.embed_tokens.weight" if cfg.tie_embeddings else "lm_head.weight")
    if name == "decoder.final_layernorm.weight":
        return weights.get("model.norm.weight")
    kind = name.rsplit(".", 1)[1]  # weight or bias
    if name.endswith(f"self_attention.linear_qkv.{kind}"):
        hf = f"model.layers.{name.split('.')[2]}.self_attn."
        q, k, v = (weights.get(f"{hf}{p}_proj.{kind}") for p in "qkv")
        return _fuse_qkv(cfg, q, k, v)
    parts = [weights.get(n) for n in _hf_parts(cfg, name, expert_offset)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def hf_tensors_from(cfg: ModelConfig, full: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """HF-named tensors from full (gathered, vocab already cut) megatron tensors, experts
    numbered globally (as at EP=1)."""
    out: Dict[str, torch.Tensor] = {}
    for name, t in full.items():
        name, kind = _local_name(name), name.rsplit(".", 1)[1]
        if name == "embedding.word_embeddings.weight":
            out["model.embed_tokens.weight"] = t
        elif name == "output_layer.weight":
            if not cfg.tie_embeddings:
                out["lm_head.weight"] = t
        elif name == "decoder.final_layernorm.weight":
            out["model.norm.weight"] = t
        elif name.endswith(f"self_attention.linear_qkv.{kind}"):
            hf = f"model.layers.{name.split('.')[2]}.self_attn."
            for p, part in zip("qkv", _split_qkv(cfg, t)):
                out[f"{hf}{p}_proj.{kind}"] = part.contiguous()
        else:
            parts = _hf_parts(cfg, name)
            for hf_name, part in zip(parts, t.chunk(len(parts))):
                out[hf_name] = part.contiguous()
    return out


# -- tensor-parallel shards (the layout: engine.shards) ------------------------------------------
_VOCAB_ROWS = ("embedding.word_embeddings.weight", "output_layer.weight")


def _shard(name: str, param, full: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    """This rank's piece of `full` for megatron parameter `param` (vocabulary rows padded with
    zeros to Megatron's padded size first)."""
    if name in _VOCAB_ROWS:
        rows = param.shape[0] * tp
        if full.shape[0] > rows:
            raise ConfigError(f"{name}: {full.shape[0]} vocabulary rows exceed the padded {rows}")
        full = torch.cat([full, full.new_zeros(rows - full.shape[0], *full.shape[1:])])
        return full.chunk(tp)[rank]
    return shards.shard_of(name, param, full, tp, rank)


def load_hf_weights(model, cfg: ModelConfig, hf_path) -> None:
    """Fill this rank's shard of `model` (a GPTModel built for `cfg`) from an HF directory:
    its TP slice of every tensor, and only its own experts' tensors."""
    from megatron.core import parallel_state

    weights = HFWeights(hf_path)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    offset = _expert_offset(cfg)
    with torch.no_grad():
        for name, p in shards.named_params(model):
            full = hf_tensor_for(cfg, name, weights, offset)
            expected = _full_shape(name, p, tp, cfg)
            if tuple(full.shape) != expected:  # check_weights ran first: a bug if reached
                raise RuntimeError(f"{name}: {tuple(full.shape)} != {expected}")
            p.copy_(_shard(name, p, full, tp, rank).to(p.dtype))


def _expert_offset(cfg: ModelConfig) -> int:
    """The global number of this rank's local expert 0: EP rank x experts per EP rank."""
    from megatron.core import parallel_state

    if not cfg.is_moe:
        return 0
    ep = parallel_state.get_expert_model_parallel_world_size()
    return parallel_state.get_expert_model_parallel_rank() * (cfg.num_experts // ep)


def _full_shape(name: str, p, tp: int, cfg: ModelConfig) -> tuple:
    shape = list(p.shape)
    if name in _VOCAB_ROWS:
        shape[0] = cfg.vocab_size
    elif shards.is_sharded(name, p, tp):
        shape[p.partition_dim] *= tp
    return tuple(shape)


def _gather_experts(name: str, param, cfg: ModelConfig) -> Dict[str, torch.Tensor]:
    """Local expert parameter `name` of every EP rank, renamed with its global expert number
    (every rank of the expert-parallel group gets them all)."""
    from megatron.core import parallel_state

    ep = parallel_state.get_expert_model_parallel_world_size()
    t = param.detach().contiguous()
    parts = [t.clone()]
    if ep > 1:
        parts = [torch.empty_like(t) for _ in range(ep)]
        group = parallel_state.get_expert_model_parallel_group()
        torch.distributed.all_gather(parts, t, group=group)
    head, j, tail = re.match(r"(.*local_experts\.)(\d+)(\..*)", name).groups()
    per_rank = cfg.num_experts // ep
    return {f"{head}{r * per_rank + int(j)}{tail}": part for r, part in enumerate(parts)}


def gather_hf_state(model, cfg: ModelConfig, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """Every rank gathers the full tensors (TP shards, and every EP rank's experts); returns
    HF-named tensors in `dtype`."""
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    full = {}
    for name, p in shards.named_params(model):
        if shards.is_expert(name):
            full.update({n: t.to(dtype) for n, t in _gather_experts(name, p, cfg).items()})
            continue
        t = shards.gather_full(name, p, tp)
        if name in _VOCAB_ROWS:
            t = t[: cfg.vocab_size]
        full[name] = t.to(dtype)
    return hf_tensors_from(cfg, full)


def checked_config(path) -> ModelConfig:
    """The architecture of an HF directory, its dtype and weights checked against config.json."""
    p = Path(path)
    hf = read_config(p)
    cfg, _ = model_config_from_hf(hf, where=str(p / "config.json"))
    source_dtype(hf, str(p / "config.json"))
    check_weights(cfg, HFWeights(p))
    return cfg
