"""A torch.distributed.checkpoint ("torch_dist") reader that never unpickles code.

megatron-core's dist-ckpt (what NeMo 1 `model_weights/` and NeMo 2 `weights/` hold) is a torch
DCP directory: `.metadata` (a pickle: tensor shapes, chunks and where each chunk's bytes are)
and `__R_I.distcp` files (each chunk a `torch.save` blob). torch's own reader `pickle.load`s
`.metadata`, which runs whatever a crafted file names. Here it is unpickled with an allowlist of
the DCP metadata classes (anything else is refused), and chunks are read with
`torch.load(weights_only=True)`. A region of a tensor reads only the chunks it overlaps, so a
tensor-parallel rank reads the chunks of its own shard.
"""

from __future__ import annotations

import io
import json
import pickle
from typing import Dict, Tuple

import torch

from distill_llm.errors import ConfigError
from distill_llm.formats.nemo.source import NemoSource

METADATA = ".metadata"
BACKEND_FILE = "metadata.json"


class _Ignored:
    """Stand-in for save-planner records in `.metadata` (not needed to read tensors)."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def _allowed() -> dict:
    import torch.distributed.checkpoint.filesystem as fs
    import torch.distributed.checkpoint.metadata as md

    classes = {
        ("torch.distributed.checkpoint.metadata", n): getattr(md, n)
        for n in (
            "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
            "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
        )
        if hasattr(md, n)
    }  # fmt: skip
    classes[("torch.distributed.checkpoint.filesystem", "_StorageInfo")] = fs._StorageInfo
    classes[("torch", "Size")] = torch.Size
    classes[("collections", "OrderedDict")] = __import__("collections").OrderedDict
    return classes


_LAYOUTS = {"torch.strided": torch.strided, "torch.sparse_coo": torch.sparse_coo}


def _get_layout(name: str):
    if name not in _LAYOUTS:
        raise ConfigError(f"unexpected tensor layout {name!r} in .metadata")
    return _LAYOUTS[name]


class _SafeUnpickler(pickle.Unpickler):
    """Builds DCP metadata only; any other global in the pickle is refused."""

    def __init__(self, fh, where: str):
        super().__init__(fh)
        self.where = where
        self.allowed = _allowed()

    def find_class(self, module: str, name: str):
        if (module, name) in self.allowed:
            return self.allowed[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module in ("torch._utils", "torch.serialization") and name == "_get_layout":
            return _get_layout
        planner = module == "torch.distributed.checkpoint.planner" or name == "MCoreSavePlan"
        if planner and name in ("MCoreSavePlan", "SavePlan", "WriteItem", "TensorWriteData"):
            return _Ignored
        if module == "torch.distributed.checkpoint.planner" and name == "WriteItemType":
            return lambda *a, **k: None
        raise ConfigError(
            f"{self.where}: refusing to unpickle {module}.{name} (not tensor metadata); the "
            "file may be crafted to run code"
        )


class DcpReader:
    """The tensors of one DCP directory `under` inside a NemoSource."""

    def __init__(self, source: NemoSource, under: str):
        self.source, self.under = source, under.rstrip("/")
        where = f"{source.path}/{self.under}"
        self.where = where
        if not source.exists(self._name(METADATA)):
            raise ConfigError(f"{where}: no {METADATA}; not a torch_dist checkpoint")
        try:
            meta = _SafeUnpickler(io.BytesIO(source.read_bytes(self._name(METADATA))), where).load()
        except ConfigError:
            raise
        except Exception as e:  # any malformed pickle
            raise ConfigError(
                f"{where}/{METADATA} cannot be read ({type(e).__name__}: {e})"
            ) from None
        self.meta = meta
        self._chunk_cache: Dict[Tuple[str, tuple], torch.Tensor] = {}

    def _name(self, file: str) -> str:
        return f"{self.under}/{file}" if self.under else file

    def tensor_shapes(self) -> Dict[str, tuple]:
        """Every stored tensor's global shape (byte entries such as `_extra_state` left out)."""
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        return {
            k: tuple(v.size)
            for k, v in self.meta.state_dict_metadata.items()
            if isinstance(v, TensorStorageMetadata)
        }

    def dtype(self, key: str) -> torch.dtype:
        """The stored dtype of tensor `key`."""
        return self.meta.state_dict_metadata[key].properties.dtype

    def _chunk(self, key: str, chunk) -> torch.Tensor:
        from torch.distributed.checkpoint.metadata import MetadataIndex

        offsets = tuple(chunk.offsets)
        cached = self._chunk_cache.get((key, offsets))
        if cached is not None:
            return cached
        info = None
        for index in self.meta.storage_data:
            if isinstance(index, MetadataIndex) and index.fqn == key:
                if tuple(index.offset) == offsets:
                    info = self.meta.storage_data[index]
                    break
        if info is None:
            raise ConfigError(f"{self.where}: chunk {offsets} of {key!r} has no storage entry")
        name = self._name(info.relative_path)
        if not self.source.exists(name):
            raise ConfigError(f"{self.where}: {info.relative_path} is missing (named in .metadata)")
        if info.offset + info.length > self.source.size(name):
            raise ConfigError(
                f"{self.where}: {info.relative_path} is shorter than .metadata says; the "
                "checkpoint is truncated"
            )
        if getattr(info, "transform_descriptors", None):
            raise ConfigError(f"{self.where}: {key!r} is stored with transforms; not supported")
        with self.source.open(name) as fh:
            fh.seek(info.offset)
            blob = fh.read(info.length)
        if len(blob) != info.length:
            raise ConfigError(f"{self.where}: {info.relative_path} ends early; truncated")
        try:
            t = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
        except Exception as e:
            raise ConfigError(f"{self.where}: chunk of {key!r} cannot be read ({e})") from None
        if not torch.is_tensor(t) or tuple(t.shape) != tuple(chunk.sizes):
            raise ConfigError(f"{self.where}: chunk of {key!r} does not match .metadata")
        self._chunk_cache = {(key, offsets): t}  # keep one: a fused fc1 reads one chunk twice
        return t

    def read(self, key: str, offsets: tuple, sizes: tuple) -> torch.Tensor:
        """The region [offsets, offsets + sizes) of tensor `key`, reading only the chunks it
        overlaps. Rows beyond the stored shape (vocabulary padding) come back as zeros."""
        entry = self.meta.state_dict_metadata.get(key)
        if entry is None:
            raise ConfigError(f"{self.where}: tensor {key!r} is missing")
        out = torch.zeros(sizes, dtype=entry.properties.dtype)
        for chunk in entry.chunks:
            lo = [max(o, c) for o, c in zip(offsets, chunk.offsets)]
            ends = zip(offsets, sizes, chunk.offsets, chunk.sizes)
            hi = [min(o + s, c + n) for o, s, c, n in ends]
            if any(h <= low for low, h in zip(lo, hi)):
                continue
            data = self._chunk(key, chunk)
            src = tuple(slice(a - c, b - c) for a, b, c in zip(lo, hi, chunk.offsets))
            dst = tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, offsets))
            out[dst] = data[src]
        return out


def backend(source: NemoSource, under: str) -> str:
    """The dist-ckpt backend of directory `under` ('torch_dist', 'zarr', ...), from its
    metadata.json; 'legacy' when the directory has no dist-ckpt at all."""
    name = f"{under}/{BACKEND_FILE}" if under else BACKEND_FILE
    if not source.exists(name):
        return "torch_dist" if source.exists(f"{under}/{METADATA}") else "legacy"
    try:
        info = json.loads(source.read_text(name))
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"{source.path}/{name} is not valid JSON ({e})") from None
    return str(info.get("sharded_backend", "unknown"))
