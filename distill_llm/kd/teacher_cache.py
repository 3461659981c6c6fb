"""Offline teacher logits: run the teacher once over the training data, store its top-k
log-probabilities per position (compressed, sharded), and train a student from them later with
no teacher in memory.

    # once, with the teacher (logits [b, s, V/TP] on each TP rank)
    log_probs, indices, rest = topk_log_probs(teacher_logits, k=32, temperature=T, group=tp_group)
    with CacheWriter("runs/cache", k=32, temperature=T, vocab_size=V, seq_length=s,
                     provenance={"teacher": ckpt, "data": path, ...}) as writer:
        writer.add(sample_ids, log_probs, indices, rest, tokens)

    # when training the student
    cache = TeacherCache("runs/cache")
    cache.check({"k": 32, "temperature": T, "vocab_size": V, "seq_length": s, "teacher": ckpt})
    log_probs, indices, rest = cache.lookup(sample_ids, tokens)  # CPU tensors
    per_pos = cached_per_position(student_logits, log_probs, indices, rest, kind="forward_kl",
                                  temperature=T, beta=0.5, group=tp_group)  # [b, s]

The leftover-mass rule. With p_t = softmax(teacher / T) and p_s = softmax(student / T) over the
whole vocabulary (ids >= `vocab_limit`, the padding rows, excluded on both sides) and K the
teacher's k most probable ids, the divergence is taken over k + 1 buckets: one per id i in K
(p_t(i) against p_s(i)) and one "rest" bucket holding the teacher's remaining mass
p_t(not K), matched against the student's mass outside the same ids, p_s(not K). The student is
taught the teacher's top-k probabilities exactly and how much mass lies elsewhere, but not how to
split it (renormalising over K instead would ask it to put all of its mass on K). Both rests are
sums over the other ids, never 1 - sum(K), which cancels when sum(K) ~ 1. With k = the whole
(limited) vocabulary both rest buckets are empty (log -inf), contribute exactly 0, and the value
is the full-vocabulary loss of `distill_llm.losses.per_position`. All four kinds are
f-divergences, so merging the ids outside K into one bucket never raises the value; it equals the
full value when the student splits its rest in the teacher's proportions. The stored teacher
buckets are renormalised to sum to 1 before use, which undoes float16 rounding.

Tensor parallelism and gradients. `cached_per_position` returns the same value L on every rank of
`group`, computed through `torch.distributed.nn` all-reduces whose backward SUMS the incoming
gradients over the group. If every rank backpropagates L, every rank's logits receive TP times
the true gradient. So each rank must backpropagate L / TP (the true loss is the sum of the TP
equal shares). In ModelOpt's criterion (`distill_llm.kd`) that is
`post_forward(per_position / tp_size, tp_reduce=True)`: `kd_loss_terms` adds the shares with
megatron's gather, whose backward hands each rank only its own share's gradient, so the value is
L and the gradient is exact. Backpropagating L itself, or an all-reduced sum of the shares through
`torch.distributed.nn`, gives TP times the gradient.

Storage: a directory with `cache.json` (see `CacheWriter`) and shards `shard_00000.npz`, ...
(`np.savez_compressed`), each holding for its samples `sample_ids` int64 [m], `log_probs`
[m, s, k] and `rest` [m, s] in `dtype` (float16, or float32 for exactness), `indices` [m, s, k] in
the smallest unsigned integer type that holds vocab_size, and `checksums` uint32 [m], the crc32 of
each sample's input token ids (as little-endian int64), so a reader can tell that the data changed.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import weakref
import zipfile
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from distill_llm.engine.model import padding_ids
from distill_llm.errors import ConfigError
from distill_llm.kd import losses

FORMAT = "distill_llm.teacher_cache"
FORMAT_VERSION = 1
DTYPES = ("float16", "float32")
FIX = "rebuild it with cache_teacher or point teacher_cache at a matching cache"
_META_KEYS = ("k", "temperature", "vocab_size", "seq_length", "dtype")


def tp_rank_size(group) -> tuple[int, int]:
    """(rank, size) of this process in the tensor-parallel `group`; (0, 1) without one."""
    if group is None or torch.distributed.get_world_size(group) == 1:
        return 0, 1
    return torch.distributed.get_rank(group), torch.distributed.get_world_size(group)


def _padding(v_local: int, rank: int, vocab_limit: Optional[int], device) -> Optional[torch.Tensor]:
    """Bool [v_local]: which of this rank's ids are >= vocab_limit (None when none are)."""
    return None if vocab_limit is None else padding_ids(v_local, vocab_limit, rank, device)


def _check_vocab(v_local: int, size: int, vocab_limit: Optional[int], k: int) -> int:
    """The number of usable ids, after checking vocab_limit and k against it."""
    full = v_local * size
    if vocab_limit is not None and not 0 < vocab_limit <= full:
        raise ConfigError(
            f"vocab_limit must be in 1..{full} (the logits' vocabulary), got {vocab_limit}"
        )
    usable = full if vocab_limit is None else vocab_limit
    if not 1 <= k <= usable:
        raise ConfigError(f"k must be in 1..{usable} (the vocabulary size), got {k}")
    return usable


def _selected(indices: torch.Tensor, rank: int, v_local: int) -> torch.Tensor:
    """Bool [..., v_local]: which of this rank's ids are among the global `indices` [..., k]."""
    local = indices - rank * v_local
    here = (local >= 0) & (local < v_local)
    # Ids on other ranks go to a spare last column, dropped after the scatter.
    local = torch.where(here, local, v_local)
    mask = torch.zeros(*indices.shape[:-1], v_local + 1, dtype=torch.bool, device=indices.device)
    return mask.scatter_(-1, local, True)[..., :v_local]


def _log_sum_exp(x: torch.Tensor, group, differentiable: bool) -> torch.Tensor:
    """log(sum(exp(x))) over the last dim and across `group` ([...]); -inf where every entry is
    -inf, with a zero (never NaN) gradient there."""
    peak = x.detach().amax(-1)
    if group is not None:
        torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX, group=group)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    total = (x - peak[..., None]).exp().sum(-1)
    if group is not None:
        if differentiable:
            from torch.distributed import nn as dist_nn

            total = dist_nn.functional.all_reduce(total, group=group)
        else:
            torch.distributed.all_reduce(total, group=group)
    empty = total <= 0
    # log(0)'s backward is inf, times the divergence's 0 is NaN: take the log of a stand-in 1.
    safe = torch.where(empty, torch.ones_like(total), total)
    return torch.where(empty, torch.full_like(total, -math.inf), safe.log() + peak)


@torch.no_grad()
def topk_log_probs(
    logits: torch.Tensor,
    k: int,
    temperature: float = 1.0,
    group=None,
    vocab_limit: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teacher's k most probable ids per position and the log of the mass left over.

    `logits` [..., V_local]: with a tensor-parallel `group`, this rank's contiguous vocabulary
    shard (rank r holds ids [r V_local, (r+1) V_local)). Ids >= `vocab_limit` are excluded.
    Returns `log_probs` [..., k] float32, log_softmax(logits / T) over the whole vocabulary at
    the k most probable ids (descending), `indices` [..., k] int64 (global ids) and `rest` [...]
    float32, the log of the total probability of all other ids (-inf when there is none), summed
    directly over those ids. Identical on every rank of `group`.
    """
    if not temperature > 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")
    rank, size = tp_rank_size(group)
    group = group if size > 1 else None
    v_local = logits.shape[-1]
    _check_vocab(v_local, size, vocab_limit, k)
    x = logits.to(torch.float32, copy=True).div_(temperature)
    pad = _padding(v_local, rank, vocab_limit, x.device)
    if pad is not None:
        x.masked_fill_(pad, -math.inf)
    lowest = torch.finfo(torch.float32).min
    key = x
    if vocab_limit is not None:  # on every rank, a real -inf (probability 0) ranks above padding
        key = x.clamp(min=lowest)
        if pad is not None:
            key.masked_fill_(pad, -math.inf)
    values, local_ids = key.topk(min(k, v_local), dim=-1)
    ids = local_ids + rank * v_local
    del key
    if group is not None:
        all_values = [torch.empty_like(values) for _ in range(size)]
        all_ids = [torch.empty_like(ids) for _ in range(size)]
        torch.distributed.all_gather(all_values, values.contiguous(), group=group)
        torch.distributed.all_gather(all_ids, ids.contiguous(), group=group)
        values, best = torch.cat(all_values, -1).topk(k, dim=-1)
        ids = torch.cat(all_ids, -1).gather(-1, best)
    total = _log_sum_exp(x, group, differentiable=False)
    values = torch.where(values == lowest, -math.inf, values)
    log_probs = values - total[..., None]
    rest = _log_sum_exp(x.masked_fill_(_selected(ids, rank, v_local), -math.inf), group, False)
    return log_probs, ids, rest - total


def cached_per_position(
    student_logits: torch.Tensor,
    log_probs: torch.Tensor,
    indices: torch.Tensor,
    rest: torch.Tensor,
    *,
    kind: str,
    temperature: float,
    beta: float = 0.5,
    group=None,
    vocab_limit: Optional[int] = None,
) -> torch.Tensor:
    """The divergence `kind` at each position over the k + 1 buckets of the leftover-mass rule.

    `student_logits` [..., V_local] (this rank's vocabulary shard under `group`); the teacher's
    `log_probs` [..., k], `indices` [..., k] (global ids) and `rest` [...] as `topk_log_probs`
    returns them (any float dtype, on the logits' device). Returns float32 [...], no T^2 and no
    mask, the same value on every rank; under TP each rank must backpropagate it divided by the
    TP size (see the module docstring).
    """
    losses.check_settings(kind, temperature, beta)
    lead = tuple(student_logits.shape[:-1])
    if tuple(log_probs.shape[:-1]) != lead or tuple(rest.shape) != lead:
        raise ConfigError(
            f"teacher cache entries {tuple(log_probs.shape)} / rest {tuple(rest.shape)} do not "
            f"match the student logits {tuple(student_logits.shape)}: the cache was made for "
            "another batch layout or sequence length"
        )
    if indices.shape != log_probs.shape:
        raise ConfigError(
            f"indices {tuple(indices.shape)} must be shaped like the log-probs "
            f"{tuple(log_probs.shape)}"
        )
    rank, size = tp_rank_size(group)
    group = group if size > 1 else None
    v_local = student_logits.shape[-1]
    _check_vocab(v_local, size, vocab_limit, indices.shape[-1])
    indices = indices.long()

    z = student_logits.float() / temperature
    pad = _padding(v_local, rank, vocab_limit, z.device)
    if pad is not None:
        z = z.masked_fill(pad, -math.inf)
    log_ps = losses.log_softmax(z, group)
    local = indices - rank * v_local
    here = (local >= 0) & (local < v_local)
    picked = log_ps.gather(-1, torch.where(here, local, 0))
    picked = torch.where(here, picked, torch.zeros_like(picked))
    if group is not None:
        from torch.distributed import nn as dist_nn

        picked = dist_nn.functional.all_reduce(picked, group=group)
    others = _selected(indices, rank, v_local)
    if pad is not None:
        others = others | pad
    student_rest = _log_sum_exp(log_ps.masked_fill(others, -math.inf), group, differentiable=True)

    log_ps_buckets = torch.cat([picked, student_rest[..., None]], -1)
    log_pt_buckets = torch.cat([log_probs.float(), rest.float()[..., None]], -1)
    log_pt_buckets = torch.log_softmax(log_pt_buckets.detach(), -1)
    return losses.divergence(kind, log_ps_buckets, log_pt_buckets, beta)


def _index_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer type that holds every id below `vocab_size`."""
    for dtype in (np.uint16, np.uint32):
        if vocab_size - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.uint64)


def token_checksums(tokens) -> np.ndarray:
    """crc32 of each sample's token ids (taken as little-endian int64): uint32 [n] of [n, s]."""
    rows = np.ascontiguousarray(_numpy(tokens), dtype="<i8")
    return np.array([zlib.crc32(row.tobytes()) for row in rows], dtype=np.uint32)


def _numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _runs(ids: np.ndarray) -> list[list[int]]:
    """[[start, stop), ...]: `ids` in order, as runs of consecutive values."""
    if len(ids) == 0:
        return []
    breaks = np.flatnonzero(np.diff(ids) != 1) + 1
    return [[int(run[0]), int(run[-1]) + 1] for run in np.split(ids, breaks)]


class CacheWriter:
    """Writes a teacher cache under a temporary directory, renamed to `output_dir` at close().

    `k`, `temperature`, `vocab_size` (ids are < it) and `seq_length` describe every sample;
    `provenance` is whatever the caller wants a reader to be able to check (teacher checkpoint
    and fingerprint, data paths / split / fingerprint, tokenizer fingerprint, seed, ...), stored
    as given (it must be JSON). `dtype` is how log-probs and rests are stored ("float16", or
    "float32" for an exact copy); `samples_per_shard` samples go into each compressed shard.
    An existing `output_dir` is refused unless `overwrite`. Use as a context manager, or call
    close(); a writer dropped or failing without close() leaves nothing at `output_dir`.

    cache.json: format, format_version, k, temperature, dtype, index_dtype, vocab_size,
    seq_length, num_samples, shards ([{file, samples, ranges: [[first id, last id + 1], ...],
    bytes}], rows in `ranges` order), total_bytes, bytes_per_position, provenance.
    """

    def __init__(
        self,
        output_dir,
        *,
        k: int,
        temperature: float,
        vocab_size: int,
        seq_length: int,
        provenance: dict,
        dtype: str = "float16",
        samples_per_shard: int = 1024,
        overwrite: bool = False,
    ):
        self.path = Path(output_dir)
        if self.path.exists() and not overwrite:
            raise ConfigError(
                f"{self.path} already exists; pass overwrite=True or choose another "
                "teacher cache path"
            )
        if dtype not in DTYPES:
            raise ConfigError(f"teacher cache dtype {dtype!r} is unknown; choose one of {DTYPES}")
        for name, value in (
            ("k", k),
            ("vocab_size", vocab_size),
            ("seq_length", seq_length),
            ("samples_per_shard", samples_per_shard),
        ):
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ConfigError(f"teacher cache {name} must be a positive integer, got {value!r}")
        if k > vocab_size:
            raise ConfigError(f"k={k} is more than the vocabulary ({vocab_size} ids)")
        if not temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {temperature}")
        try:
            provenance = json.loads(json.dumps(provenance))
        except (TypeError, ValueError) as err:
            raise ConfigError(f"teacher cache provenance must be JSON data: {err}") from None
        self.overwrite = overwrite
        self.meta = dict(
            format=FORMAT,
            format_version=FORMAT_VERSION,
            k=int(k),
            temperature=float(temperature),
            dtype=dtype,
            index_dtype=_index_dtype(vocab_size).name,
            vocab_size=int(vocab_size),
            seq_length=int(seq_length),
            provenance=provenance,
        )
        self.samples_per_shard = int(samples_per_shard)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = Path(
            tempfile.mkdtemp(prefix=f".{self.path.name}.partial-", dir=self.path.parent)
        )
        self._discard = weakref.finalize(self, shutil.rmtree, str(self._tmp), True)
        self._pending: list[dict] = []
        self._pending_rows = 0
        self._shards: list[dict] = []
        self._closed = False

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def add(self, sample_ids, log_probs, indices, rest, tokens) -> None:
        """Append samples: `sample_ids` [n] int, `log_probs` / `indices` [n, s, k], `rest` [n, s]
        (as `topk_log_probs` returns them) and the input `tokens` [n, s] they were made from.
        Torch tensors (any device) or numpy arrays."""
        if self._closed:
            raise ConfigError("this teacher cache writer is already closed")
        ids = _numpy(sample_ids).astype(np.int64).reshape(-1)
        n, s, k = len(ids), self.meta["seq_length"], self.meta["k"]
        arrays = dict(
            log_probs=_numpy(log_probs),
            indices=_numpy(indices),
            rest=_numpy(rest),
            tokens=_numpy(tokens),
        )
        shapes = dict(log_probs=(n, s, k), indices=(n, s, k), rest=(n, s), tokens=(n, s))
        for name, want in shapes.items():
            if arrays[name].shape != want:
                raise ConfigError(
                    f"teacher cache add(): {name} is {arrays[name].shape}, expected "
                    f"{want} (n={n} samples, seq_length={s}, k={k})"
                )
        if n == 0:
            return
        idx = arrays["indices"]
        if idx.min() < 0 or idx.max() >= self.meta["vocab_size"]:
            raise ConfigError(
                f"teacher cache add(): token ids outside 0..{self.meta['vocab_size'] - 1}"
            )
        store = np.dtype(self.meta["dtype"])
        self._pending.append(
            dict(
                sample_ids=ids,
                log_probs=arrays["log_probs"].astype(store),
                indices=idx.astype(self.meta["index_dtype"]),
                rest=arrays["rest"].astype(store),
                checksums=token_checksums(arrays["tokens"]),
            )
        )
        self._pending_rows += n
        while self._pending_rows >= self.samples_per_shard:
            self._flush(self.samples_per_shard)

    def _flush(self, rows: int) -> None:
        """Write the first `rows` pending samples as the next shard."""
        joined = {key: np.concatenate([p[key] for p in self._pending]) for key in self._pending[0]}
        now = {key: value[:rows] for key, value in joined.items()}
        later = {key: value[rows:] for key, value in joined.items()}
        self._pending = [later] if len(later["sample_ids"]) else []
        self._pending_rows -= rows
        name = f"shard_{len(self._shards):05d}.npz"
        np.savez_compressed(self._tmp / name, **now)
        self._shards.append(
            dict(
                file=name,
                samples=rows,
                ranges=_runs(now["sample_ids"]),
                bytes=(self._tmp / name).stat().st_size,
            )
        )

    def close(self) -> Path:
        """Write the last shard and cache.json, then move the directory into place."""
        if self._closed:
            return self.path
        try:
            if self._pending_rows:
                self._flush(self._pending_rows)
            runs = sorted(r for shard in self._shards for r in shard["ranges"])
            for (_, stop), (start, _) in zip(runs, runs[1:]):
                if start < stop:
                    raise ConfigError(f"sample id {start} was added to the teacher cache twice")
            num = sum(shard["samples"] for shard in self._shards)
            total = sum(shard["bytes"] for shard in self._shards)
            self.meta.update(
                num_samples=num,
                shards=self._shards,
                total_bytes=total,
                bytes_per_position=total / max(num * self.meta["seq_length"], 1),
            )
            (self._tmp / "cache.json").write_text(json.dumps(self.meta, indent=1) + "\n")
            self._move_into_place()
        except BaseException:
            self.abort()
            raise
        self._closed = True
        self._discard.detach()
        return self.path

    def _move_into_place(self) -> None:
        if self.path.exists() or self.path.is_symlink():
            if not self.overwrite:
                raise ConfigError(
                    f"{self.path} appeared while the cache was written; pass "
                    "overwrite=True or choose another teacher cache path"
                )
            old = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.old-", dir=self.path.parent))
            os.replace(self.path, old / "cache")
            os.replace(self._tmp, self.path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self._tmp, self.path)

    def abort(self) -> None:
        """Drop everything written so far; nothing appears at the output path."""
        self._closed = True
        self._pending, self._pending_rows = [], 0
        self._discard()


class TeacherCache:
    """A teacher cache written by `CacheWriter`, opened and checked for missing or truncated
    shards (their contents are checked as they are read). `meta` is cache.json as a dict."""

    def __init__(self, path, *, shards_in_memory: int = 2):
        self.path = Path(path)
        meta_file = self.path / "cache.json"
        if not meta_file.is_file():
            raise ConfigError(
                f"{self.path} is not a teacher cache directory (no cache.json); "
                "build one with cache_teacher"
            )
        try:
            meta = json.loads(meta_file.read_text())
        except (ValueError, OSError) as err:
            raise ConfigError(f"{meta_file} is unreadable ({err}); rebuild the cache") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ConfigError(
                f"{self.path} is not a teacher cache directory (cache.json is not "
                f"a {FORMAT}); build one with cache_teacher"
            )
        if meta.get("format_version") != FORMAT_VERSION:
            raise ConfigError(
                f"teacher cache {self.path} has format version "
                f"{meta.get('format_version')!r}, this distill_llm reads "
                f"{FORMAT_VERSION}; rebuild it with cache_teacher"
            )
        missing = [key for key in ("k", "seq_length", "num_samples", "shards") if key not in meta]
        if missing:
            raise ConfigError(f"{meta_file} lacks {', '.join(missing)}; rebuild the cache")
        self.meta = meta
        runs = []  # (first id, last id + 1, shard number, row of the first id in the shard)
        for number, shard in enumerate(meta["shards"]):
            file = self.path / shard["file"]
            if not file.is_file():
                raise ConfigError(f"teacher cache shard {file} is missing; rebuild the cache")
            if file.stat().st_size != shard["bytes"]:
                raise ConfigError(
                    f"teacher cache shard {file} is truncated or corrupt "
                    f"({file.stat().st_size} bytes, cache.json says {shard['bytes']});"
                    " rebuild the cache"
                )
            row = 0
            for start, stop in shard["ranges"]:
                runs.append((start, stop, number, row))
                row += stop - start
        table = np.array(sorted(runs), dtype=np.int64).reshape(-1, 4)
        self._starts, self._stops, self._shard_of, self._row0 = table.T
        self._loaded: OrderedDict[int, dict] = OrderedDict()
        self._keep = max(int(shards_in_memory), 1)

    def __len__(self) -> int:
        return int(self.meta["num_samples"])

    @property
    def bytes_per_position(self) -> float:
        """Compressed bytes on disk per cached position (all shards / samples / seq_length)."""
        return float(self.meta["bytes_per_position"])

    def check(self, expected: dict) -> None:
        """Refuse a cache made differently from this run: each key of `expected` (k, seq_length,
        temperature, vocab_size, dtype, or a provenance key) must equal what the cache records."""
        for key, want in expected.items():
            source = self.meta if key in _META_KEYS else self.meta.get("provenance", {})
            got = source.get(key, "<not recorded>")
            try:
                want_json = json.loads(json.dumps(want))
            except (TypeError, ValueError):
                want_json = want
            if got != want_json:
                raise ConfigError(
                    f"teacher cache {self.path} was made with {key}={got!r} but this "
                    f"run has {key}={want!r}: {FIX}"
                )

    def _where(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard number, row in shard) of each sample id; ConfigError for an unknown one."""
        run = np.searchsorted(self._starts, ids, side="right") - 1
        found = run >= 0
        found[found] = ids[found] < self._stops[run[found]]
        if not found.all():
            missing = int(ids[~found][0])
            raise ConfigError(
                f"sample {missing} is not in the teacher cache {self.path} "
                f"({len(self)} samples); rebuild it for this data"
            )
        return self._shard_of[run], self._row0[run] + ids - self._starts[run]

    def _shard(self, number: int) -> dict:
        if number in self._loaded:
            self._loaded.move_to_end(number)
            return self._loaded[number]
        info = self.meta["shards"][number]
        file = self.path / info["file"]
        s, k = self.meta["seq_length"], self.meta["k"]
        want = dict(
            sample_ids=(info["samples"],),
            log_probs=(info["samples"], s, k),
            indices=(info["samples"], s, k),
            rest=(info["samples"], s),
            checksums=(info["samples"],),
        )
        try:
            with np.load(file, allow_pickle=False) as npz:
                arrays = {key: npz[key] for key in want}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as err:
            raise ConfigError(
                f"teacher cache shard {file} is corrupt ({type(err).__name__}); rebuild the cache"
            ) from None
        listed = np.concatenate([np.arange(a, b) for a, b in info["ranges"]] or [np.zeros(0)])
        if any(arrays[key].shape != shape for key, shape in want.items()) or not np.array_equal(
            arrays["sample_ids"], listed
        ):
            raise ConfigError(
                f"teacher cache shard {file} does not hold what cache.json lists; rebuild the cache"
            )
        self._loaded[number] = arrays
        while len(self._loaded) > self._keep:
            self._loaded.popitem(last=False)
        return arrays

    def lookup(self, sample_ids, tokens=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The cached teacher outputs of `sample_ids` [n] (any order): `log_probs` float32
        [n, s, k], `indices` int64 [n, s, k] and `rest` float32 [n, s], on the CPU. With `tokens`
        [n, s], refuse samples whose token ids differ from those the cache was made from."""
        ids = _numpy(sample_ids).astype(np.int64).reshape(-1)
        shard_of, rows = self._where(ids)
        n, s, k = len(ids), self.meta["seq_length"], self.meta["k"]
        log_probs = np.empty((n, s, k), np.float32)
        indices = np.empty((n, s, k), np.int64)
        rest = np.empty((n, s), np.float32)
        checksums = np.empty(n, np.uint32)
        for number in np.unique(shard_of):
            take = np.flatnonzero(shard_of == number)
            shard = self._shard(int(number))
            log_probs[take] = shard["log_probs"][rows[take]]
            indices[take] = shard["indices"][rows[take]]
            rest[take] = shard["rest"][rows[take]]
            checksums[take] = shard["checksums"][rows[take]]
        if tokens is not None:
            tokens = _numpy(tokens)
            if tokens.shape != (n, s):
                raise ConfigError(f"tokens {tokens.shape} must be [{n}, {s}] to check the cache")
            bad = np.flatnonzero(token_checksums(tokens) != checksums)
            if len(bad):
                raise ConfigError(
                    f"sample {ids[bad[0]]}'s tokens differ from those the cache was "
                    "made from: the data changed; rebuild the cache"
                )
        return torch.from_numpy(log_probs), torch.from_numpy(indices), torch.from_numpy(rest)
