"""One NeMo checkpoint opened for reading: which format it is, its architecture, its weights
and the tokenizer it carries.

    NeMo 1 `.nemo` tar (or tar.gz) or its unpacked directory:
        model_config.yaml, model_weights/ (dist-ckpt, keys `model.`), <hex>_tokenizer.model
    NeMo 2 directory:
        context/model.yaml (+ io.json, nemo_tokenizer/), weights/ (dist-ckpt, keys `module.`)

Nothing here imports nemo_toolkit or runs code from the file: YAML through the safe loader,
`.metadata` through an allowlist unpickler, tensors with `torch.load(weights_only=True)`;
`common.pt` is never read (the YAML says everything it would). A tokenizer inside a tar is the
only thing written out, as plain bytes, to a cache directory named by its content hash.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Optional

from distill_llm.engine.model import ModelConfig
from distill_llm.errors import ConfigError
from distill_llm.formats.nemo import config as nemo_config
from distill_llm.formats.nemo import dcp, weights
from distill_llm.formats.nemo.source import (
    NEMO1_CONFIG,
    NEMO1_WEIGHTS,
    NEMO2_CONFIG,
    NEMO2_CONTEXT,
    NEMO2_WEIGHTS,
    NemoSource,
    nemo_kind,
)

NEMO2_TOKENIZER = "context/nemo_tokenizer"


def is_nemo(path) -> bool:
    """Whether `path` looks like a NeMo checkpoint (by its names; nothing is parsed)."""
    return bool(path) and nemo_kind(path) is not None


def _cache_root() -> Path:
    return Path(os.environ.get("DISTILL_LLM_CACHE") or tempfile.gettempdir()) / "distill_llm-nemo"


def _materialise(source: NemoSource, names: dict) -> Path:
    """Copy members `names` ({member: name to give it}) as plain bytes into a cache directory
    named by their content; returns that directory. Every rank may do this at once: each file
    is written to a private name and renamed into place."""
    blobs = {rel: source.read_bytes(member) for member, rel in names.items()}
    digest = hashlib.sha256()
    for rel in sorted(blobs):
        digest.update(rel.encode() + b"\0" + hashlib.sha256(blobs[rel]).digest())
    root = _cache_root() / digest.hexdigest()[:24]
    for rel, data in blobs.items():
        target = root / rel
        if target.is_file() and target.stat().st_size == len(data):
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, target)
    return root


class NemoCheckpoint:
    """A NeMo 1 or NeMo 2 checkpoint: `.config` (ModelConfig), `.tokenizer_path()`,
    `.load_into(module)`. Construction reads only the YAML (and the tokenizer for NeMo 1's
    vocabulary size); every unsupported variant is refused here, in one line."""

    def __init__(self, path):
        self.path = Path(path)
        self.format = nemo_kind(path)
        if self.format is None:
            raise ConfigError(f"{path} is not a NeMo checkpoint")
        self.source = NemoSource(path)
        if self.format == "nemo1":
            self._open_nemo1()
        else:
            self._open_nemo2()

    # -- NeMo 1 ----------------------------------------------------------------------------
    def _open_nemo1(self) -> None:
        src, where = self.source, str(self.path)
        if not src.exists(NEMO1_CONFIG):
            raise ConfigError(f"{where} is not a NeMo 1 checkpoint: it has no {NEMO1_CONFIG}")
        self.config_name = f"{where}/{NEMO1_CONFIG}"
        self.yaml = nemo_config.parse_yaml(src.read_text(NEMO1_CONFIG), self.config_name)
        self.prefix, self.weights_dir = "model.", NEMO1_WEIGHTS
        self._check_variant()
        tokenizer = self.tokenizer_path()
        vocab = self._tokenizer_vocab(tokenizer)
        if vocab is None:  # no usable tokenizer inside: the stored rows are the vocabulary
            shapes = self._reader().tensor_shapes()
            vocab = shapes.get(self.prefix + "embedding.word_embeddings.weight", (0,))[0]
        self.config = nemo_config.from_nemo1(self.yaml, self.config_name, vocab)

    def _nemo1_tokenizer(self) -> Optional[str]:
        tok = self.yaml.get("tokenizer") or {}
        ref = tok.get("model") if tok.get("library") == "sentencepiece" else tok.get("type")
        if not isinstance(ref, str):
            return None
        if ref.startswith("nemo:"):
            member = ref[len("nemo:") :]
            if member.startswith("/") or ".." in member.split("/"):
                raise ConfigError(f"{self.config_name}: tokenizer artifact {member!r} escapes it")
            if self.source.exists(member):
                return self._local_file(member)
            if self.source.is_dir(member):
                return self._local_dir(member)
            raise ConfigError(f"{self.config_name}: tokenizer artifact {member!r} is missing")
        return ref if Path(ref).exists() else None  # a hub name cannot be fetched here

    # -- NeMo 2 ----------------------------------------------------------------------------
    def _open_nemo2(self) -> None:
        src, where = self.source, str(self.path)
        if not src.is_dir(NEMO2_CONTEXT):
            raise ConfigError(f"{where} is not a NeMo 2 checkpoint: it has no {NEMO2_CONTEXT}/")
        if not src.is_dir(NEMO2_WEIGHTS):
            raise ConfigError(f"{where} is not a NeMo 2 checkpoint: it has no {NEMO2_WEIGHTS}/")
        if not src.exists(NEMO2_CONFIG):
            raise ConfigError(f"{where}: {NEMO2_CONFIG} is missing (written by NeMo >= 2.0)")
        self.config_name = f"{where}/{NEMO2_CONFIG}"
        self.yaml = nemo_config.parse_yaml(src.read_text(NEMO2_CONFIG), self.config_name)
        self.prefix, self.weights_dir = "module.", NEMO2_WEIGHTS
        self._check_variant()
        cfg = self.yaml.get("config") or {}
        vocab = None if cfg.get("vocab_size") else self._tokenizer_vocab(self.tokenizer_path())
        self.config = nemo_config.from_nemo2(self.yaml, self.config_name, vocab)

    def _nemo2_tokenizer(self) -> Optional[str]:
        if self.source.is_dir(NEMO2_TOKENIZER):
            return self._local_dir(NEMO2_TOKENIZER)
        # NeMo's SentencePieceTokenizer may instead name its file relative to context/
        tok = self.yaml.get("tokenizer") or {}
        model_path = tok.get("model_path") if isinstance(tok, dict) else None
        if isinstance(model_path, str) and not model_path.startswith(("/", "..")):
            member = f"{NEMO2_CONTEXT}/{model_path}"
            if ".." not in member.split("/") and self.source.exists(member):
                return self._local_file(member)
        return None

    # -- shared ----------------------------------------------------------------------------
    def _check_variant(self) -> None:
        where = str(self.path)
        if not self.source.is_dir(self.weights_dir):
            legacy = [n for n in self.source.names() if n.endswith("model_weights.ckpt")]
            if legacy:
                raise ConfigError(
                    f"{where}: legacy NeMo weights ({legacy[0]}, a pickled torch state dict) are "
                    "not supported; re-save it with NeMo >= 1.23 (dist-ckpt torch_dist)"
                )
            raise ConfigError(f"{where}: no {self.weights_dir}/ directory; not a NeMo checkpoint")
        kind = dcp.backend(self.source, self.weights_dir)
        if kind != "torch_dist":
            raise ConfigError(
                f"{where}: {self.weights_dir}/ uses the {kind!r} dist-ckpt backend; only "
                "torch_dist is supported (re-save it with NeMo >= 1.23 or megatron-core)"
            )
        if self.source.is_dir(f"{self.weights_dir}/modelopt_state"):
            raise ConfigError(
                f"{where}: the weights carry ModelOpt state (a quantized or pruned model in "
                "ModelOpt form); export it to a plain model first"
            )

    def _local_file(self, member: str) -> str:
        """A SentencePiece artifact (`<hex>_tokenizer.model`) as `tokenizer.model` in a cache
        directory of its own, so the directory is a tokenizer directory (HF export, checks)."""
        root = _materialise(self.source, {member: "tokenizer.model"})
        return str(root / "tokenizer.model")

    def _local_dir(self, member: str) -> str:
        if self.source.kind == "dir":
            return str(self.source.path / member)
        names = self.source.names(member)
        return str(_materialise(self.source, {n: n[len(member) :].lstrip("/") for n in names}))

    def tokenizer_path(self) -> Optional[str]:
        """A local path to the tokenizer this checkpoint carries (a SentencePiece `.model`
        file or an HF tokenizer directory), or None when it carries none we can read."""
        return self._nemo1_tokenizer() if self.format == "nemo1" else self._nemo2_tokenizer()

    def _tokenizer_vocab(self, tokenizer: Optional[str]) -> Optional[int]:
        if tokenizer is None:
            return None
        from distill_llm.data.tokenizer import load_tokenizer

        return load_tokenizer(tokenizer).vocab_size

    def _reader(self) -> dcp.DcpReader:
        return dcp.DcpReader(self.source, self.weights_dir)

    def check_weights(self) -> None:
        """Every tensor the YAML implies is stored, with its shape (reads `.metadata` only)."""
        weights.check_weights(self.config, self._reader(), self.prefix, self.config_name)

    def load_into(self, module) -> None:
        """Fill this rank's shard of `module` (a GPTModel built for `.config`)."""
        reader = self._reader()
        weights.check_weights(self.config, reader, self.prefix, self.config_name)
        weights.load_weights(module, reader, self.prefix)


def open_checkpoint(path) -> NemoCheckpoint:
    """`NemoCheckpoint(path)` with its weights' names and shapes checked."""
    ckpt = NemoCheckpoint(path)
    ckpt.check_weights()
    return ckpt


def model_config_of(path) -> ModelConfig:
    """The architecture of the NeMo checkpoint at `path` (weights' shapes checked)."""
    return open_checkpoint(path).config
