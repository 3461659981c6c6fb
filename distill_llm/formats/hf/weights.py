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
Each TP rank reads only the tensors (and slices) of its own shard.

megatron-core is imported inside the functions that use it (a few seconds of import):
`import distill_llm` stays cheap, and megatron loads once an entry point runs.
"""

import json
from pathlib import Path
from typing import Dict, Iterator, Tuple

import torch

from distill_llm.engine.model import ModelConfig
from distill_llm.errors import ConfigError
from distill_llm.formats.hf.config import (
    INDEX_FILE,
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
    """Every HF tensor `cfg` needs, with its shape."""
    h, f, d = cfg.hidden_size, cfg.ffn_hidden_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * d, cfg.query_groups * d
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,)}
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    for i in range(cfg.num_layers):
        a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        shapes.update({
            f"model.layers.{i}.input_layernorm.weight": (h,),
            f"model.layers.{i}.post_attention_layernorm.weight": (h,),
            f"{a}q_proj.weight": (q, h), f"{a}k_proj.weight": (kv, h),
            f"{a}v_proj.weight": (kv, h), f"{a}o_proj.weight": (h, q),
            f"{m}gate_proj.weight": (f, h), f"{m}up_proj.weight": (f, h),
            f"{m}down_proj.weight": (h, f),
        })  # fmt: skip
        if cfg.add_qkv_bias or cfg.add_bias_linear:
            shapes.update({f"{a}q_proj.bias": (q,), f"{a}k_proj.bias": (kv,),
                           f"{a}v_proj.bias": (kv,)})  # fmt: skip
        if cfg.add_bias_linear:
            shapes.update({f"{a}o_proj.bias": (h,), f"{m}gate_proj.bias": (f,),
                           f"{m}up_proj.bias": (f,), f"{m}down_proj.bias": (h,)})  # fmt: skip
        if cfg.qk_layernorm:
            shapes.update({f"{a}q_norm.weight": (d,), f"{a}k_norm.weight": (d,)})
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
def _layer_names(i: int) -> Dict[str, str]:
    hf, mg = f"model.layers.{i}.", f"decoder.layers.{i}."
    return {
        f"{mg}input_layernorm.weight": f"{hf}input_layernorm.weight",
        f"{mg}self_attention.linear_proj.weight": f"{hf}self_attn.o_proj.weight",
        f"{mg}self_attention.linear_proj.bias": f"{hf}self_attn.o_proj.bias",
        f"{mg}self_attention.q_layernorm.weight": f"{hf}self_attn.q_norm.weight",
        f"{mg}self_attention.k_layernorm.weight": f"{hf}self_attn.k_norm.weight",
        f"{mg}pre_mlp_layernorm.weight": f"{hf}post_attention_layernorm.weight",
        f"{mg}mlp.linear_fc2.weight": f"{hf}mlp.down_proj.weight",
        f"{mg}mlp.linear_fc2.bias": f"{hf}mlp.down_proj.bias",
    }


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


def hf_tensor_for(cfg: ModelConfig, name: str, weights: HFWeights) -> torch.Tensor:
    """The full (TP=1, unpadded) megatron tensor `name`, built from the HF tensors."""
    name = _local_name(name)
    if name == "embedding.word_embeddings.weight":
        return weights.get("model.embed_tokens.weight")
    if name == "output_layer.weight":
        return weights.get("model.embed_tokens.weight" if cfg.tie_embeddings else "lm_head.weight")
    if name == "decoder.final_layernorm.weight":
        return weights.get("model.norm.weight")
    i = int(name.split(".")[2])
    hf = f"model.layers.{i}."
    kind = name.rsplit(".", 1)[1]  # weight or bias
    if name.endswith(f"linear_qkv.{kind}"):
        q, k, v = (weights.get(f"{hf}self_attn.{p}_proj.{kind}") for p in "qkv")
        return _fuse_qkv(cfg, q, k, v)
    if name.endswith(f"linear_fc1.{kind}"):
        return torch.cat([weights.get(f"{hf}mlp.{p}_proj.{kind}") for p in ("gate", "up")])
    mapped = _layer_names(i).get(name)
    if mapped is None:
        raise ConfigError(f"no Hugging Face tensor maps to megatron parameter {name!r}")
    return weights.get(mapped)


def hf_tensors_from(cfg: ModelConfig, full: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """HF-named tensors from full (gathered, vocab already cut) megatron tensors."""
    out: Dict[str, torch.Tensor] = {}
    for name, t in full.items():
        name = _local_name(name)
        if name == "embedding.word_embeddings.weight":
            out["model.embed_tokens.weight"] = t
        elif name == "output_layer.weight":
            if not cfg.tie_embeddings:
                out["lm_head.weight"] = t
        elif name == "decoder.final_layernorm.weight":
            out["model.norm.weight"] = t
        else:
            i = int(name.split(".")[2])
            hf = f"model.layers.{i}."
            kind = name.rsplit(".", 1)[1]
            if name.endswith(f"linear_qkv.{kind}"):
                for p, part in zip("qkv", _split_qkv(cfg, t)):
                    out[f"{hf}self_attn.{p}_proj.{kind}"] = part.contiguous()
            elif name.endswith(f"linear_fc1.{kind}"):
                gate, up = t.chunk(2)
                out[f"{hf}mlp.gate_proj.{kind}"] = gate.contiguous()
                out[f"{hf}mlp.up_proj.{kind}"] = up.contiguous()
            else:
                out[_layer_names(i)[name]] = t
    return out


# -- tensor-parallel shards ----------------------------------------------------------------------
def _is_fc1(name: str) -> bool:
    return ".linear_fc1.weight" in name or ".linear_fc1.bias" in name


def _shard(name: str, param, full: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    """This rank's piece of `full` for megatron parameter `param`."""
    if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        rows = param.shape[0] * tp
        if full.shape[0] > rows:
            raise ConfigError(f"{name}: {full.shape[0]} vocabulary rows exceed the padded {rows}")
        full = torch.cat([full, full.new_zeros(rows - full.shape[0], *full.shape[1:])])
        return full.chunk(tp)[rank]
    if tp == 1 or not getattr(param, "tensor_model_parallel", False):
        return full
    if _is_fc1(name):
        gate, up = full.chunk(2)
        return torch.cat([gate.chunk(tp)[rank], up.chunk(tp)[rank]])
    return full.chunk(tp, dim=param.partition_dim)[rank]


def _gather(name: str, param, tp: int) -> torch.Tensor:
    """The full tensor of a TP-sharded parameter (every rank of the TP group gets it)."""
    from megatron.core import parallel_state

    t = param.detach()
    if tp == 1 or not getattr(param, "tensor_model_parallel", False):
        return t.clone()
    parts = [torch.empty_like(t) for _ in range(tp)]
    torch.distributed.all_gather(
        parts, t.contiguous(), group=parallel_state.get_tensor_model_parallel_group()
    )
    if _is_fc1(name):
        gates, ups = zip(*(p.chunk(2) for p in parts))
        return torch.cat([*gates, *ups])
    return torch.cat(parts, dim=param.partition_dim)


def _named_params(model) -> Iterator[Tuple[str, torch.nn.Parameter]]:
    seen = set()
    for name, p in model.named_parameters():
        if id(p) not in seen:  # tied output layer shares the embedding
            seen.add(id(p))
            yield name, p


def load_hf_weights(model, cfg: ModelConfig, hf_path) -> None:
    """Fill this rank's shard of `model` (a GPTModel built for `cfg`) from an HF directory."""
    from megatron.core import parallel_state

    weights = HFWeights(hf_path)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    with torch.no_grad():
        for name, p in _named_params(model):
            full = hf_tensor_for(cfg, name, weights)
            expected = _full_shape(name, p, tp, cfg)
            if tuple(full.shape) != expected:  # check_weights ran first: a bug if reached
                raise RuntimeError(f"{name}: {tuple(full.shape)} != {expected}")
            p.copy_(_shard(name, p, full, tp, rank).to(p.dtype))


def _full_shape(name: str, p, tp: int, cfg: ModelConfig) -> tuple:
    shape = list(p.shape)
    if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        shape[0] = cfg.vocab_size
    elif tp > 1 and getattr(p, "tensor_model_parallel", False):
        shape[p.partition_dim] *= tp
    return tuple(shape)


def gather_hf_state(model, cfg: ModelConfig, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """Every TP rank gathers the full tensors; returns HF-named tensors in `dtype`."""
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    full = {}
    for name, p in _named_params(model):
        t = _gather(name, p, tp)
        if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
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
