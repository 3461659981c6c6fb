"""NeMo checkpoints out: `export_nemo` and the `python -m distill_llm.nemo` command line.

    export_nemo("runs/kd/final", "student.nemo", format="nemo1")   # NeMo 1 tar
    export_nemo("runs/kd/final", "student_nemo2")                  # NeMo 2 directory
    python -m distill_llm.nemo export runs/kd/final student.nemo --format nemo1

What is written is what NeMo's own converters write (tests/fixtures/nemo holds their output):
NeMo 1: `model_config.yaml` (MegatronGPTModel keys), `model_weights/` (megatron-core
torch_dist, keys `model.`), the SentencePiece tokenizer as a `nemo:<hex>_tokenizer.model`
artifact, in an uncompressed tar whose members start with `./`. NeMo 2: `context/` (io.json,
model.yaml naming NeMo's classes as strings, nemo_tokenizer/) and `weights/` (keys `module.`).
Every rank writes its own shard; the result appears atomically (written under a temporary
name, renamed at the end), so a failed export leaves nothing behind.
"""

import os
import shutil
import sys
import tarfile
import uuid
from pathlib import Path
from typing import Optional

import torch

from distill_llm.engine import parallel
from distill_llm.engine.model import ModelConfig
from distill_llm.errors import ConfigError, cli_status
from distill_llm.formats import paths
from distill_llm.formats.nemo import config as nemo_config
from distill_llm.formats.nemo.source import NEMO1_CONFIG, NEMO1_WEIGHTS, NEMO2_WEIGHTS
from distill_llm.formats.nemo.weights import save_weights

FORMATS = ("nemo1", "nemo2")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_SP_FILE = "tokenizer.model"


def format_for(output: str) -> str:
    """The format a path asks for: a `.nemo` suffix -> NeMo 1 tar; else a NeMo 2 directory."""
    return "nemo1" if str(output).endswith(".nemo") else "nemo2"


def _tokenizer_kind(tokenizer: Optional[str]) -> Optional[str]:
    """'sentencepiece' (a .model file, or a directory with only tokenizer.model), 'hf' (a
    directory with tokenizer.json) or None; ConfigError for a path that is neither."""
    if tokenizer is None:
        return None
    p = Path(tokenizer)
    if p.is_file():
        return "sentencepiece"
    if p.is_dir() and (p / "tokenizer.json").is_file():
        return "hf"
    if p.is_dir() and (p / _SP_FILE).is_file():
        return "sentencepiece"
    raise ConfigError(
        f"tokenizer {tokenizer!r} is neither a SentencePiece .model file nor a tokenizer "
        "directory (tokenizer.json or tokenizer.model)"
    )


def check_output(output: str, fmt: Optional[str], inputs: list) -> str:
    """The format to write `output` in, after refusing an existing output, an input as the
    output, an unknown format and a `.nemo` name for a NeMo 2 directory."""
    fmt = fmt or format_for(output)
    if fmt not in FORMATS:
        raise ConfigError(f"format {fmt!r} is unknown; choose nemo1 (a .nemo file) or nemo2")
    if fmt == "nemo1" and not str(output).endswith(".nemo"):
        raise ConfigError(f"a NeMo 1 checkpoint is a .nemo file; name it {output}.nemo")
    if fmt == "nemo2" and str(output).endswith(".nemo"):
        raise ConfigError("a NeMo 2 checkpoint is a directory; drop the .nemo suffix")
    for p in [i for i in inputs if i]:
        if Path(output).resolve() == Path(p).resolve():
            raise ConfigError(f"export_nemo {output!r} is an input of this run; choose a new path")
    if Path(output).exists():
        raise ConfigError(f"{output} already exists; remove it or choose another path")
    if not Path(output).resolve().parent.is_dir():
        raise ConfigError(f"the directory of {output} does not exist")
    return fmt


def _nemo1_tokenizer(staging: Path, tokenizer: Optional[str]) -> dict:
    kind = _tokenizer_kind(tokenizer)
    if kind is None:
        return {"library": None, "model": None}
    name = uuid.uuid4().hex
    if kind == "sentencepiece":
        src = Path(tokenizer)
        src = src / _SP_FILE if src.is_dir() else src
        member = f"{name}_tokenizer.model"
        shutil.copyfile(src, staging / member)
        return {"library": "sentencepiece", "type": None, "model": f"nemo:{member}"}
    member = f"{name}_nemo_tokenizer"
    _copy_tokenizer_dir(Path(tokenizer), staging / member)
    return {"library": "huggingface", "type": f"nemo:{member}", "model": None}


def _copy_tokenizer_dir(src: Path, dst: Path) -> None:
    from distill_llm.formats.hf.config import TOKENIZER_FILES

    dst.mkdir(parents=True)
    for f in TOKENIZER_FILES:
        if (src / f).is_file():
            shutil.copyfile(src / f, dst / f)


def _tar(staging: Path, target: Path) -> None:
    """An uncompressed tar of `staging` with members named `./...`, as NeMo writes them."""
    with tarfile.open(target, "w:") as tar:
        tar.add(str(staging), arcname=".", recursive=False)
        for root, dirs, files in os.walk(staging):
            dirs.sort()
            for name in sorted(dirs) + sorted(files):
                full = Path(root) / name
                arc = "./" + full.relative_to(staging).as_posix()
                tar.add(str(full), arcname=arc, recursive=False)


def write_nemo(
    module,
    cfg: ModelConfig,
    output: str,
    *,
    fmt: Optional[str] = None,
    tokenizer: Optional[str] = None,
) -> Path:
    """Write an in-memory GPTModel (this rank's shard; every rank calls this) as a NeMo
    checkpoint at `output`, atomically. The weights keep the module's dtype."""
    fmt = fmt or format_for(output)
    out = Path(output)
    staging = out.with_name(f".{out.name}.tmp")
    if parallel.is_main():
        if staging.exists():
            shutil.rmtree(staging)
        (staging / (NEMO1_WEIGHTS if fmt == "nemo1" else NEMO2_WEIGHTS)).mkdir(parents=True)
    parallel.barrier()
    dtype = next(module.parameters()).dtype
    try:
        nemo1 = fmt == "nemo1"
        prefix, weights_dir = ("model.", NEMO1_WEIGHTS) if nemo1 else ("module.", NEMO2_WEIGHTS)
        save_weights(module, str(staging / weights_dir), prefix)
        if parallel.is_main():
            if fmt == "nemo1":
                tok = _nemo1_tokenizer(staging, tokenizer)
                yaml_dict = nemo_config.to_nemo1(cfg, dtype, tok)
                (staging / NEMO1_CONFIG).write_text(_dump_yaml(yaml_dict))
                partial = out.with_name(f".{out.name}.part")
                _tar(staging, partial)
                os.replace(partial, out)
                shutil.rmtree(staging)
            else:
                from distill_llm.formats.nemo.context import write_context

                model_class, config_class = nemo_config.nemo2_classes(cfg)
                tok_dir = None
                if tokenizer is not None:
                    _tokenizer_kind(tokenizer)
                    tok_dir = Path(tokenizer) if Path(tokenizer).is_dir() else None
                    if tok_dir is None:  # a bare SentencePiece file: give it a directory
                        tok_dir = staging / ".tokenizer"
                        tok_dir.mkdir()
                        shutil.copyfile(tokenizer, tok_dir / _SP_FILE)
                write_context(staging / "context", nemo_config.to_nemo2(cfg, dtype),
                              model_class=model_class, config_class=config_class,
                              tokenizer_files=tok_dir)  # fmt: skip
                if (staging / ".tokenizer").exists():
                    shutil.rmtree(staging / ".tokenizer")
                os.replace(staging, out)
    finally:
        parallel.barrier()
        if parallel.is_main() and staging.exists():  # a failure on any rank: leave nothing
            shutil.rmtree(staging, ignore_errors=True)
    return out


def _dump_yaml(data: dict) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)


def export_nemo(
    checkpoint: str,
    output: str,
    format: Optional[str] = None,
    tokenizer: Optional[str] = None,
    dtype: Optional[str] = None,
) -> str:
    """Write the model at `checkpoint` (ours, Hugging Face or NeMo) as a NeMo checkpoint:
    `format="nemo1"` a `.nemo` tar, `"nemo2"` a directory (default: from `output`'s suffix).
    The tokenizer defaults to the one the checkpoint carries or was imported from; `dtype`
    (float32 or bfloat16) defaults to float32."""
    cfg = paths.model_config_of(checkpoint)
    fmt = check_output(output, format, [checkpoint])
    tokenizer = tokenizer or paths.tokenizer_dir_of(checkpoint)
    _tokenizer_kind(tokenizer)
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is unknown; known: {', '.join(DTYPES)}")
    if fmt == "nemo1":
        nemo_config.check_nemo1(cfg)
    layout = parallel.ParallelConfig(precision="bf16" if dtype == "bfloat16" else "fp32")
    parallel.initialize(layout, seed=0)
    export_checkpoint(checkpoint, cfg, output, layout, fmt=fmt, tokenizer=tokenizer)
    if parallel.is_main():
        print(f"exported {checkpoint} -> {output} ({fmt})")
    return str(output)


def export_checkpoint(checkpoint: str, cfg: ModelConfig, output: str, layout, **how) -> None:
    """Load `checkpoint` into a model built on the current `layout` (a ParallelConfig) and
    write it as a NeMo checkpoint (`how`: write_nemo's fmt and tokenizer)."""
    write_nemo(paths.load_on_layout(checkpoint, cfg, layout), cfg, output, **how)


def main(argv=None) -> int:
    """`python -m distill_llm.nemo export CHECKPOINT OUTPUT [--format] [--tokenizer]
    [--dtype]`: 0 on success, 2 with one `error:` line for a ConfigError."""
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m distill_llm.nemo", description=__doc__.splitlines()[0]
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    exp = sub.add_parser("export", help="any checkpoint -> NeMo 1 .nemo or NeMo 2 directory")
    exp.add_argument("checkpoint")
    exp.add_argument("output")
    exp.add_argument("--format", choices=FORMATS)
    exp.add_argument("--tokenizer")
    exp.add_argument("--dtype", choices=sorted(DTYPES))
    args = ap.parse_args(argv)
    return cli_status(
        lambda: export_nemo(args.checkpoint, args.output, args.format, args.tokenizer, args.dtype)
    )


if __name__ == "__main__":
    sys.exit(main())
