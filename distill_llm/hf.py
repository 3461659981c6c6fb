"""Hugging Face checkpoints in and out: Llama (2, 3.x), Mistral, Qwen2/2.5 and Qwen3.

    import_hf("/models/Llama-3.2-1B", "ckpt/llama32_1b")             # HF dir -> engine checkpoint
    export_hf("runs/kd/final", "hf/student", tokenizer="/tok/llama3")   # engine -> HF dir
    python -m distill_llm.hf import /models/Qwen2.5-0.5B ckpt/qwen    # the same from a shell

The architecture comes from `config.json`. Weight layout (megatron-core local and TE specs):
  - q/k/v are fused into `linear_qkv` group by group: for each key/value group, its query heads,
    then its key head, then its value head (what megatron's attention splits). Tensor parallel
    gives each rank whole groups.
  - gate/up are fused into `linear_fc1` as [gate; up]; under TP each rank holds
    [its slice of gate; its slice of up].
  - embeddings and the output layer are padded with zero rows to Megatron's padded vocabulary
    (a multiple of 128 x TP) and cut back on export. The padded ids get logit 0; the Llama 3,
    Qwen and Mistral v0.3 vocabularies need no padding at TP 1, 2, 4 or 8.
  - no permutation of q/k rows: both sides rotate halves (non-interleaved RoPE).
Import runs inside a process group at the requested TP (each rank fills its own shard and
writes it); export gathers the TP shards and writes safetensors on rank 0. Both write to a
temporary directory and rename it at the end: a failed run leaves no partial output.
"""

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple

import torch

from distill_llm.errors import ConfigError, cli_status
from distill_llm.model import ModelConfig

SUPPORTED = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
_CLASS_OF = {family: arch for arch, family in SUPPORTED.items()}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)
HF_META_KEY = "hf"  # key in distill_llm.json recording the HF source of an imported checkpoint
_INDEX = "model.safetensors.index.json"


# -- recognising and reading an HF directory ---------------------------------------------------
def is_hf_dir(path) -> bool:
    """A directory with config.json and safetensors weights (not an engine checkpoint)."""
    p = Path(path)
    return (p / "config.json").is_file() and (
        (p / "model.safetensors").is_file() or (p / _INDEX).is_file()
    )


def read_config(path) -> dict:
    p = Path(path)
    if not p.is_dir():
        raise ConfigError(f"Hugging Face directory {str(p)!r} does not exist")
    if not (p / "config.json").is_file():
        raise ConfigError(f"{str(p)!r} has no config.json; give a Hugging Face model directory")
    try:
        return json.loads((p / "config.json").read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{p / 'config.json'} is not valid JSON ({err})") from None


def _family(hf: dict, where: str) -> str:
    archs = hf.get("architectures") or []
    for arch in archs:
        if arch in SUPPORTED:
            return SUPPORTED[arch]
    name = archs[0] if archs else hf.get("model_type", "unknown")
    raise ConfigError(
        f"{where}: architecture {name!r} is not supported; supported: {', '.join(SUPPORTED)}"
    )


def _rope(hf: dict, where: str) -> Tuple[float, Optional[dict]]:
    """(theta, llama3 scaling or None) from either the 4.x or the 5.x way of writing it."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or params
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise ConfigError(f"{where}: RoPE scaling {kind!r} is not supported (default or llama3)")
    expected = {"low_freq_factor": 1.0, "high_freq_factor": 4.0}
    for key, value in expected.items():
        if float(scaling.get(key, value)) != value:
            raise ConfigError(
                f"{where}: llama3 RoPE with {key}={scaling[key]} is not supported "
                f"(megatron-core fixes it at {value})"
            )
    if int(scaling.get("original_max_position_embeddings", 8192)) != 8192:
        raise ConfigError(
            f"{where}: llama3 RoPE with original_max_position_embeddings="
            f"{scaling['original_max_position_embeddings']} is not supported (megatron-core: 8192)"
        )
    return theta, scaling


def model_config_from_hf(hf: dict, where: str = "config.json") -> Tuple[ModelConfig, str]:
    """The engine's architecture for an HF config, and the family; one-line errors otherwise."""
    family = _family(hf, where)
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{where}: hidden_act {act!r} is not supported (silu / SwiGLU only)")
    theta, scaling = _rope(hf, where)
    if float(theta) != int(theta):
        raise ConfigError(f"{where}: rope_theta {theta} is not an integer")
    hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
    max_pos = hf.get("max_position_embeddings", 4096)
    window = hf.get("sliding_window")
    if family in ("qwen2", "qwen3") and not hf.get("use_sliding_window", False):
        window = None
    if window is not None and window < max_pos:
        raise ConfigError(
            f"{where}: sliding-window attention ({window} < {max_pos} positions) is not supported"
        )
    attention_bias = bool(hf.get("attention_bias", False))
    mlp_bias = bool(hf.get("mlp_bias", False))
    if family in ("llama", "qwen3", "mistral") and attention_bias != mlp_bias:
        raise ConfigError(
            f"{where}: attention_bias={attention_bias} with mlp_bias={mlp_bias} is not supported "
            "(megatron-core biases every linear layer or none)"
        )
    cfg = ModelConfig(
        num_layers=hf["num_hidden_layers"],
        hidden_size=hidden,
        ffn_hidden_size=hf["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        kv_channels=hf.get("head_dim") or (128 if family == "qwen3" else hidden // heads),
        vocab_size=hf["vocab_size"],
        max_seq_length=max_pos,
        rotary_base=int(theta),
        rope_scaling=scaling is not None,
        rope_scaling_factor=float(scaling["factor"]) if scaling else 8.0,
        normalization="RMSNorm",
        activation="swiglu",
        add_bias_linear=attention_bias and family != "qwen2",
        add_qkv_bias=family == "qwen2",
        qk_layernorm=family == "qwen3",
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        init_method_std=float(hf.get("initializer_range", 0.02)),
    )
    cfg.validate(role=where)
    return cfg, family


def source_dtype(hf: dict, where: str) -> torch.dtype:
    name = hf.get("dtype") or hf.get("torch_dtype") or "float32"  # 5.x writes dtype
    if name not in _DTYPES:
        raise ConfigError(f"{where}: dtype {name!r} is unknown; known: {', '.join(_DTYPES)}")
    return _DTYPES[name]


def _weight_files(path: Path) -> Dict[str, Path]:
    """tensor name -> safetensors file, checking every file the index names exists."""
    from safetensors import safe_open

    if (path / _INDEX).is_file():
        weight_map = json.loads((path / _INDEX).read_text())["weight_map"]
        files = {name: path / f for name, f in weight_map.items()}
        missing = sorted({str(f.name) for f in files.values() if not f.is_file()})
        if missing:
            raise ConfigError(
                f"{path}: shard(s) {', '.join(missing)} named in {_INDEX} are missing"
            )
        return files
    single = path / "model.safetensors"
    if not single.is_file():
        raise ConfigError(f"{path}: no model.safetensors or {_INDEX}")
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
        piece = self._handle(name).get_slice(name)
        if piece.get_dtype() not in ("F32", "BF16", "F16"):
            raise ConfigError(
                f"{self.path}: tensor {name!r} has dtype {piece.get_dtype()}; "
                "float32, bfloat16 and float16 are supported"
            )
        return tuple(piece.get_shape())

    def get(self, name: str) -> torch.Tensor:
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


# -- writing an HF directory ---------------------------------------------------------------------
def hf_config_for(cfg: ModelConfig, family: str, dtype: torch.dtype, tokens: dict) -> dict:
    """config.json for `cfg`, readable by transformers 4.x and 5.x (legacy rope keys)."""
    if cfg.position_embedding != "rope" or cfg.activation != "swiglu":
        raise ConfigError("only RoPE + SwiGLU models can be exported to Hugging Face")
    if cfg.normalization != "RMSNorm":
        raise ConfigError("only RMSNorm models can be exported to Hugging Face")
    scaling = None
    if cfg.rope_scaling:
        scaling = {
            "rope_type": "llama3",
            "factor": cfg.rope_scaling_factor,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        }
    dtype_name = {v: k for k, v in _DTYPES.items()}[dtype]
    hf = {
        "architectures": [_CLASS_OF[family]],
        "model_type": family,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.query_groups,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_length,
        "rms_norm_eps": cfg.norm_epsilon,
        "rope_theta": float(cfg.rotary_base),
        "rope_scaling": scaling,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_method_std,
        "attention_dropout": 0.0,
        "torch_dtype": dtype_name,
        "dtype": dtype_name,
        "use_cache": True,
        **tokens,
    }
    if family in ("llama", "qwen3", "mistral"):
        hf["attention_bias"] = cfg.add_bias_linear
    if family == "llama":
        hf["mlp_bias"] = cfg.add_bias_linear
        hf["pretraining_tp"] = 1
    if family == "mistral":
        hf["sliding_window"] = None  # transformers assumes 4096 when the key is absent
    if family in ("qwen2", "qwen3"):
        hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_layers)
    return hf


def family_for(cfg: ModelConfig, recorded: Optional[str] = None) -> str:
    """The HF family to export as: the one imported from, else what the architecture implies."""
    if cfg.qk_layernorm:
        return "qwen3"
    if cfg.add_qkv_bias:
        return "qwen2"
    if cfg.add_bias_linear and recorded not in ("llama", "qwen3"):
        return "llama"
    return recorded or "llama"


def check_exportable(cfg: ModelConfig, family: str) -> None:
    if family == "qwen2" and (not cfg.add_qkv_bias or cfg.add_bias_linear):
        raise ConfigError("a Qwen2 export needs QKV biases only (add_qkv_bias, no add_bias_linear)")
    if family != "qwen2" and cfg.add_qkv_bias and not cfg.add_bias_linear:
        raise ConfigError(f"{family} has no QKV-only bias; export this model as qwen2")
    if cfg.qk_layernorm and family != "qwen3":
        raise ConfigError(f"{family} has no QK norm; export this model as qwen3")


def _token_ids(tokenizer_dir: Optional[Path]) -> dict:
    if tokenizer_dir is None:
        return {}
    from distill_llm.tokenizer import load_tokenizer

    tok = load_tokenizer(str(tokenizer_dir))
    ids = {"eos_token_id": tok.eod}
    if tok.bos is not None:
        ids["bos_token_id"] = tok.bos
    if tok.pad is not None:
        ids["pad_token_id"] = tok.pad
    return ids


def write_hf_dir(
    tensors: Dict[str, torch.Tensor],
    hf_config: dict,
    output_dir,
    tokenizer_dir: Optional[Path] = None,
    max_shard_bytes: int = 2 * 1024**3,
) -> Path:
    """Write config, generation config, safetensors (sharded past `max_shard_bytes`) and the
    tokenizer files into `output_dir`, through a temporary directory renamed at the end."""
    from safetensors.torch import save_file

    out = Path(output_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        shards, current, size = [], {}, 0
        for name in sorted(tensors, key=_hf_order):
            nbytes = tensors[name].numel() * tensors[name].element_size()
            if current and size + nbytes > max_shard_bytes:
                shards.append(current)
                current, size = {}, 0
            current[name] = tensors[name].contiguous()
            size += nbytes
        shards.append(current)
        if len(shards) == 1:
            save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map, total = {}, 0
            for k, shard in enumerate(shards, 1):
                fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata={"format": "pt"})
                for name, t in shard.items():
                    weight_map[name] = fname
                    total += t.numel() * t.element_size()
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / _INDEX).write_text(json.dumps(index, indent=2))
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
        gen = {k: hf_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
               if k in hf_config}  # fmt: skip
        (tmp / "generation_config.json").write_text(json.dumps({**gen, "do_sample": False}))
        if tokenizer_dir is not None:
            for fname in TOKENIZER_FILES:
                if (Path(tokenizer_dir) / fname).is_file():
                    shutil.copy2(Path(tokenizer_dir) / fname, tmp / fname)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _hf_order(name: str):
    parts = name.split(".")
    layer = int(parts[2]) if len(parts) > 2 and parts[1] == "layers" else -1
    return (name.startswith("lm_head"), name == "model.norm.weight", layer, name)


def checked_config(path) -> ModelConfig:
    """The architecture of an HF directory, its dtype and weights checked against config.json."""
    p = Path(path)
    hf = read_config(p)
    cfg, _ = model_config_from_hf(hf, where=str(p / "config.json"))
    source_dtype(hf, str(p / "config.json"))
    check_weights(cfg, HFWeights(p))
    return cfg


def export_settings(
    sources, tokenizer: Optional[str] = None
) -> Tuple[Optional[str], torch.dtype, Optional[str]]:
    """(family, dtype, tokenizer dir) for exporting a model trained from `sources` (HF
    directories or imported checkpoints, first match wins): the family and dtype of the first
    HF source, the tokenizer given, else the first source directory holding tokenizer files."""
    from distill_llm import checkpoint

    family, dtype, tok = None, torch.float32, tokenizer
    for src in sources:
        if not src:
            continue
        p = Path(src)
        if is_hf_dir(p):
            hf = read_config(p)
            dtype_name = str(source_dtype(hf, str(p))).split(".")[1]
            info = {"family": _family(hf, str(p)), "dtype": dtype_name, "source": str(p)}
        else:
            info = checkpoint.read_metadata(p).get(HF_META_KEY) or {}
        if family is None and info.get("family"):
            family, dtype = info["family"], _DTYPES[info["dtype"]]
        if tok is None and info.get("source") and find_tokenizer_dir(Path(info["source"])):
            tok = info["source"]
    return family, dtype, tok


# -- entry points ------------------------------------------------------------------------------
def fingerprint(hf_path) -> str:
    """Identifies an HF directory's contents cheaply (config + weight file names, sizes, mtimes)."""
    p = Path(hf_path)
    h = hashlib.sha256((p / "config.json").read_bytes())
    for f in sorted(p.glob("*.safetensors")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def find_tokenizer_dir(path: Path) -> Optional[Path]:
    return (
        path
        if any((path / f).is_file() for f in TOKENIZER_FILES[:1] + ("tokenizer.model",))
        else None
    )


def import_hf(hf_path: str, output_dir: str, tensor_parallel: int = 1) -> str:
    """Convert a local HF causal-LM directory into an engine checkpoint at `output_dir`.

    Run as one process (TP=1) or under torchrun with `tensor_parallel` processes per model
    replica; each rank converts and writes its own shard. The checkpoint loads at any TP."""
    from distill_llm import checkpoint, parallel
    from distill_llm.model import build_gpt

    src = Path(hf_path)
    hf = read_config(src)
    cfg, family = model_config_from_hf(hf, where=str(src / "config.json"))
    dtype = source_dtype(hf, str(src / "config.json"))
    check_weights(cfg, HFWeights(src))  # before any process group or output exists
    out = Path(output_dir)
    if out.exists():
        raise ConfigError(f"{out} already exists; remove it or choose another output_dir")
    cfg.validate(tensor_parallel=tensor_parallel)
    pcfg = parallel.ParallelConfig(tensor_parallel=tensor_parallel)
    parallel.initialize(pcfg, seed=0)
    model = build_gpt(cfg, tensor_parallel=tensor_parallel)
    try:
        load_hf_weights(model, cfg, src)
    finally:
        parallel.barrier()
    record = {"family": family, "dtype": str(dtype).split(".")[1], "source": str(src.resolve()),
              "fingerprint": fingerprint(src)}  # fmt: skip
    checkpoint.save_model(out, model, cfg, step=0, **{HF_META_KEY: record})
    if parallel.is_main():
        print(f"imported {src} ({family}, {cfg.num_parameters() / 1e6:.1f}M params) -> {out}")
    return str(out)


def export_model(
    model,
    cfg: ModelConfig,
    output_dir,
    *,
    family: Optional[str] = None,
    dtype: torch.dtype = torch.float32,
    tokenizer: Optional[str] = None,
) -> Optional[Path]:
    """Write an in-memory (possibly TP-sharded) GPTModel as an HF directory from rank 0."""
    from distill_llm import parallel

    family = family_for(cfg, family)
    check_exportable(cfg, family)
    tok_dir = Path(tokenizer) if tokenizer else None
    if tok_dir is not None and not tok_dir.is_dir():
        raise ConfigError(f"tokenizer directory {tokenizer!r} does not exist")
    tensors = gather_hf_state(model, cfg, dtype)
    written = None
    if parallel.is_main():
        hf_config = hf_config_for(cfg, family, dtype, _token_ids(tok_dir))
        written = write_hf_dir(tensors, hf_config, output_dir, tok_dir)
    parallel.barrier()
    return written


def export_checkpoint(checkpoint: str, cfg: ModelConfig, output_dir, layout, **how) -> None:
    """Load an engine checkpoint into a model built on the current `layout` (a ParallelConfig)
    and write it as an HF directory (`how`: export_model's family, dtype, tokenizer)."""
    from distill_llm import checkpoint as ckpt
    from distill_llm.model import build_gpt

    model = build_gpt(
        cfg,
        tensor_parallel=layout.tensor_parallel,
        pipeline_parallel=layout.pipeline_parallel,
        params_dtype=layout.params_dtype,
    )
    ckpt.load_model(checkpoint, model, cfg, role="model")
    export_model(model, cfg, output_dir, **how)


def export_hf(
    checkpoint: str,
    output_dir: str,
    tokenizer: Optional[str] = None,
    dtype: Optional[str] = None,
    family: Optional[str] = None,
) -> str:
    """Write the engine checkpoint at `checkpoint` as an HF directory loadable by
    `transformers.AutoModelForCausalLM`. The family and dtype default to those the checkpoint
    was imported from (else llama / qwen2 / qwen3 as the architecture implies, float32);
    the tokenizer files come from `tokenizer` or, for an imported checkpoint, its source."""
    from distill_llm import checkpoint as ckpt
    from distill_llm import parallel

    cfg = ckpt.model_config_of(checkpoint)
    if dtype is not None and dtype not in _DTYPES:
        raise ConfigError(f"dtype {dtype!r} is unknown; known: {', '.join(_DTYPES)}")
    if family is not None and family not in _CLASS_OF:
        raise ConfigError(f"family {family!r} is unknown; known: {', '.join(_CLASS_OF)}")
    recorded, torch_dtype, tokenizer = export_settings([checkpoint], tokenizer)
    family = family or recorded
    check_exportable(cfg, family_for(cfg, family))
    torch_dtype = _DTYPES[dtype] if dtype else torch_dtype
    layout = parallel.ParallelConfig()
    parallel.initialize(layout, seed=0)
    export_checkpoint(checkpoint, cfg, output_dir, layout, family=family, dtype=torch_dtype,
                      tokenizer=tokenizer)  # fmt: skip
    if parallel.is_main():
        print(f"exported {checkpoint} -> {output_dir}")
    return str(output_dir)


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m distill_llm.hf", description=__doc__.splitlines()[0]
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    imp = sub.add_parser("import", help="HF directory -> engine checkpoint")
    imp.add_argument("hf_path")
    imp.add_argument("output_dir")
    imp.add_argument("--tensor-parallel", type=int, default=1)
    exp = sub.add_parser("export", help="engine checkpoint -> HF directory")
    exp.add_argument("checkpoint")
    exp.add_argument("output_dir")
    exp.add_argument("--tokenizer")
    exp.add_argument("--dtype", choices=sorted(_DTYPES))
    exp.add_argument("--family", choices=sorted(_CLASS_OF))
    args = ap.parse_args(argv)
    if args.cmd == "import":
        return cli_status(lambda: import_hf(args.hf_path, args.output_dir, args.tensor_parallel))
    return cli_status(
        lambda: export_hf(args.checkpoint, args.output_dir, args.tokenizer, args.dtype, args.family)
    )


if __name__ == "__main__":
    sys.exit(main())
