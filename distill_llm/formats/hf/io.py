"""Hugging Face directories in and out: `import_hf`, `export_hf` and their command line.

    import_hf("/models/Llama-3.2-1B", "ckpt/llama32_1b")             # HF dir -> engine checkpoint
    export_hf("runs/kd/final", "hf/student", tokenizer="/tok/llama3")   # engine -> HF dir
    python -m distill_llm.hf import /models/Qwen2.5-0.5B ckpt/qwen    # the same from a shell

Import runs inside a process group at the requested TP (and EP for a mixture of experts; each
rank fills its own shard and writes it); export gathers the TP shards (and every expert-parallel
rank's experts) and writes safetensors on rank 0. Both write to a temporary directory and rename
it at the end: a failed run leaves no partial output.
(config.json mapping: `formats.hf.config`; tensor layout: `formats.hf.weights`.)
"""

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from distill_llm.data.tokenizer import load_tokenizer
from distill_llm.engine import checkpoint, parallel
from distill_llm.engine.model import ModelConfig, build_gpt
from distill_llm.errors import ConfigError, cli_status
from distill_llm.formats import paths
from distill_llm.formats.hf.config import (
    CLASS_OF,
    DTYPES,
    HF_META_KEY,
    INDEX_FILE,
    TOKENIZER_FILES,
    check_exportable,
    family_for,
    family_of,
    find_tokenizer_dir,
    hf_config_for,
    is_hf_dir,
    model_config_from_hf,
    read_config,
    source_dtype,
)
from distill_llm.formats.hf.weights import (
    HFWeights,
    check_weights,
    gather_hf_state,
    load_hf_weights,
)
from distill_llm.formats.nemo.checkpoint import is_nemo


def _token_ids(tokenizer_dir: Optional[Path]) -> dict:
    if tokenizer_dir is None:
        return {}

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
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2))
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


def export_settings(
    sources, tokenizer: Optional[str] = None
) -> Tuple[Optional[str], torch.dtype, Optional[str]]:
    """(family, dtype, tokenizer dir) for exporting a model trained from `sources` (HF
    directories or imported checkpoints, first match wins): the family and dtype of the first
    HF source, the tokenizer given, else the first source directory holding tokenizer files."""

    family, dtype, tok = None, torch.float32, tokenizer
    for src in sources:
        if not src:
            continue
        p = Path(src)
        if is_hf_dir(p):
            hf = read_config(p)
            dtype_name = str(source_dtype(hf, str(p))).split(".")[1]
            info = {"family": family_of(hf, str(p)), "dtype": dtype_name, "source": str(p)}
        elif is_nemo(p):  # NeMo records no HF family; its tokenizer travels with it
            found = paths.tokenizer_dir_of(str(p))
            found = str(Path(found).parent) if found and Path(found).is_file() else found
            info = {"source": found} if found else {}
        else:
            info = checkpoint.read_metadata(p).get(HF_META_KEY) or {}
        if family is None and info.get("family"):
            family, dtype = info["family"], DTYPES[info["dtype"]]
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


def import_hf(
    hf_path: str, output_dir: str, tensor_parallel: int = 1, expert_parallel: int = 1
) -> str:
    """Convert a local HF causal-LM directory into an engine checkpoint at `output_dir`.

    Run as one process (TP=1) or under torchrun with `tensor_parallel` processes per model
    replica (and, for a mixture of experts, `expert_parallel` ranks sharing out the experts);
    each rank converts and writes its own shard. The checkpoint loads at any TP and EP."""

    src = Path(hf_path)
    hf = read_config(src)
    cfg, family = model_config_from_hf(hf, where=str(src / "config.json"))
    dtype = source_dtype(hf, str(src / "config.json"))
    check_weights(cfg, HFWeights(src))  # before any process group or output exists
    out = Path(output_dir)
    if out.exists():
        raise ConfigError(f"{out} already exists; remove it or choose another output_dir")
    cfg.validate(tensor_parallel=tensor_parallel, expert_parallel=expert_parallel)
    pcfg = parallel.ParallelConfig(tensor_parallel=tensor_parallel, expert_parallel=expert_parallel)
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
    """Write an in-memory (possibly TP- or EP-sharded) GPTModel as an HF directory from rank 0."""

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

    export_model(paths.load_on_layout(checkpoint, cfg, layout), cfg, output_dir, **how)


def export_hf(
    checkpoint: str,
    output_dir: str,
    tokenizer: Optional[str] = None,
    dtype: Optional[str] = None,
    family: Optional[str] = None,
) -> str:
    """Write the engine checkpoint at `checkpoint` as an HF directory loadable by
    `transformers.AutoModelForCausalLM`. The family and dtype default to those the checkpoint
    was imported from (else llama / qwen2 / qwen3, or for a mixture of experts mixtral /
    qwen2_moe / qwen3_moe, as the architecture implies; float32);
    the tokenizer files come from `tokenizer` or, for an imported checkpoint, its source."""

    cfg = paths.model_config_of(checkpoint)
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is unknown; known: {', '.join(DTYPES)}")
    if family is not None and family not in CLASS_OF:
        raise ConfigError(f"family {family!r} is unknown; known: {', '.join(CLASS_OF)}")
    recorded, torch_dtype, tokenizer = export_settings([checkpoint], tokenizer)
    family = family or recorded
    check_exportable(cfg, family_for(cfg, family))
    torch_dtype = DTYPES[dtype] if dtype else torch_dtype
    layout = parallel.ParallelConfig()
    parallel.initialize(layout, seed=0)
    export_checkpoint(checkpoint, cfg, output_dir, layout, family=family, dtype=torch_dtype,
                      tokenizer=tokenizer)  # fmt: skip
    if parallel.is_main():
        print(f"exported {checkpoint} -> {output_dir}")
    return str(output_dir)


def main(argv=None) -> int:
    """The `python -m distill_llm.hf` command line (`import` / `export`): 0 on success, 2 with
    one `error:` line for a ConfigError."""
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m distill_llm.hf", description=__doc__.splitlines()[0]
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    imp = sub.add_parser("import", help="HF directory -> engine checkpoint")
    imp.add_argument("hf_path")
    imp.add_argument("output_dir")
    imp.add_argument("--tensor-parallel", type=int, default=1)
    imp.add_argument("--expert-parallel", type=int, default=1)
    exp = sub.add_parser("export", help="engine checkpoint -> HF directory")
    exp.add_argument("checkpoint")
    exp.add_argument("output_dir")
    exp.add_argument("--tokenizer")
    exp.add_argument("--dtype", choices=sorted(DTYPES))
    exp.add_argument("--family", choices=sorted(CLASS_OF))
    args = ap.parse_args(argv)
    if args.cmd == "import":
        return cli_status(
            lambda: import_hf(
                args.hf_path, args.output_dir, args.tensor_parallel, args.expert_parallel
            )
        )
    return cli_status(
        lambda: export_hf(args.checkpoint, args.output_dir, args.tokenizer, args.dtype, args.family)
    )


if __name__ == "__main__":
    sys.exit(main())
