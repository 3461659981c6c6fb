"""The data module: datasets built with megatron-core, cut into resumable per-rank micro-batches.

The engine asks a `DataModule` for two things: an iterator of training micro-batches that starts
at a given number of consumed samples (so a resumed run continues the exact sample stream), and
a fresh iterator over validation micro-batches. Samples come from Megatron indexed datasets
(`<prefix>.bin/.idx`, made by `distill_llm.preprocess`), blended by weight with megatron-core's
BlendedMegatronDatasetBuilder and GPTDataset, or from megatron-core's mock GPT dataset.

The global order of samples depends only on the data, split, sequence length, seed and number
of samples, never on the data-parallel layout: rank r of D takes its micro-batches from each
global batch in turn, so the D ranks together read every sample of the global batch once.

megatron-core is imported inside the functions that use it (a few seconds of import):
`import distill_llm` stays cheap, and megatron loads once an entry point runs.
"""

import hashlib
import json
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Union

import numpy as np
import torch

from distill_llm.data.tokenizer import load_tokenizer
from distill_llm.errors import ConfigError

_IDX_HEADER = b"MMIDIDX\x00\x00"  # megatron-core indexed_dataset._INDEX_HEADER, version 1
_IDX_PREAMBLE = 9 + 8 + 1 + 8 + 8  # header, version, dtype code, sequence and document counts
_DTYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 8, 7: 8, 8: 2}  # megatron DType codes
META_SUFFIX = ".meta.json"  # written by distill_llm.preprocess
SPLIT_NAMES = ("train", "valid", "test")


@dataclass
class DataConfig:
    """Where samples come from.

    `paths` takes the seed's form: weighted prefixes `[w1, prefix1, w2, prefix2, ...]`, a
    single bare prefix `[prefix]` or `prefix`, or the same as one string
    (`"[1.0,path/to/data]"`, as in a DATA_PATHS variable). Empty means megatron-core's mock
    data. `tokenizer` is the tokenizer the data was made with; it may be left out when the
    prefixes carry the `.meta.json` that `distill_llm.preprocess` writes.
    """

    paths: Union[List[Any], str] = field(default_factory=list)  # weighted prefixes; [] = mock data
    split: str = "98,1,1"  # train/valid/test shares of each prefix's documents
    tokenizer: Optional[str] = None  # HF tokenizer dir or SentencePiece .model of the data
    cache_dir: Optional[str] = None  # megatron's index caches; None = <output_dir>/data_cache
    eod_mask_loss: bool = False  # leave end-of-document targets out of the loss

    @property
    def mock(self) -> bool:
        """Whether `paths` is empty, so megatron-core's mock GPT data is used."""
        return not self.paths

    def resolve(
        self, model_vocab: dict[str, int], seq_length: int, splits=("train", "valid")
    ) -> "DataSource":
        """Check everything about the data a user can get wrong, before anything is built.

        `model_vocab` maps a role ("teacher", "student", "model") to its vocabulary size; the
        tokenizer must fit in each. Raises ConfigError with the fix; returns the checked blend.
        """
        shares = parse_split(self.split)
        if self.mock:
            return DataSource(
                prefixes=[], weights=None, eod=0, vocab_size=min(model_vocab.values())
            )
        prefixes, weights = parse_blend(self.paths)
        infos = [inspect_prefix(p) for p in prefixes]
        tok_info = self._tokenizer_info(infos)
        for role, vocab in model_vocab.items():
            if tok_info["vocab_size"] > vocab:
                raise ConfigError(
                    f"tokenizer {tok_info['path']} has {tok_info['vocab_size']} tokens but the "
                    f"{role}'s vocabulary is {vocab}; use a model with vocab_size >= "
                    f"{tok_info['vocab_size']} or the tokenizer the model was trained with"
                )
        for info in infos:
            info.check_splits(shares, self.split, splits)
        return DataSource(
            prefixes=[i.prefix for i in infos],
            weights=weights,
            eod=tok_info["eod"],
            vocab_size=tok_info["vocab_size"],
            identity=[i.identity() for i in infos],
        )

    def _tokenizer_info(self, infos: "list[IndexInfo]") -> dict:
        """The tokenizer's vocab size and EOD id, from `tokenizer` or the prefixes' metadata;
        refuses data made with a different tokenizer than the one given."""
        given = None
        if self.tokenizer:
            given = load_tokenizer(self.tokenizer).describe()
        for info in infos:
            made_with = (info.meta or {}).get("tokenizer")
            if given and made_with and made_with["fingerprint"] != given["fingerprint"]:
                raise ConfigError(
                    f"{info.prefix} was tokenized with {made_with['path']} (fingerprint "
                    f"{made_with['fingerprint']}), not with data.tokenizer {given['path']} "
                    f"({given['fingerprint']}); preprocess the text again or pass that tokenizer"
                )
        if given:
            return given
        metas = [i.meta["tokenizer"] for i in infos if i.meta and "tokenizer" in i.meta]
        if len(metas) < len(infos):
            missing = next(i.prefix for i in infos if not (i.meta and "tokenizer" in i.meta))
            raise ConfigError(
                f"data.tokenizer is not set and {missing} has no {META_SUFFIX}; pass the "
                "tokenizer the data was made with as data.tokenizer"
            )
        if len({m["fingerprint"] for m in metas}) > 1:
            raise ConfigError(
                "the blended prefixes were made with different tokenizers ("
                + ", ".join(sorted({m["path"] for m in metas}))
                + "); preprocess them all with one tokenizer"
            )
        return metas[0]


def parse_split(split: str) -> list[float]:
    """ "98,1,1" -> normalised train/valid/test shares [0.98, 0.01, 0.01]."""
    parts = [p.strip() for p in str(split).split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if not 1 <= len(values) <= 3 or any(v < 0 for v in values) or sum(values) <= 0:
        raise ConfigError(
            f"data.split {split!r} is not 1-3 non-negative comma-separated shares; "
            'write it like "98,1,1" (train, valid, test)'
        )
    values += [0.0] * (3 - len(values))
    return [v / sum(values) for v in values]


def parse_blend(paths: list | str) -> tuple[list[str], list[float] | None]:
    """The seed's weighted-prefix list -> (prefixes, weights), weights None for one bare prefix.

    Accepts `[w1, p1, w2, p2, ...]`, `[p]`, `p`, or any of them as one string.
    """
    if isinstance(paths, str):
        text = paths.strip()
        if text.startswith("[") and text.endswith("]"):
            text = text[1:-1]
        items = [t.strip().strip("'\"") for t in re.split(r"[,\s]+", text) if t.strip()]
    else:
        items = list(paths)
    if not items:
        raise ConfigError(
            "data.paths is empty; give [weight, prefix, ...] or leave it unset for mock data"
        )
    if len(items) == 1:
        return [_prefix_of(items[0])], None
    if len(items) % 2:
        raise ConfigError(
            f"data.paths has {len(items)} entries; give weight/prefix pairs like "
            "[0.7, path/a, 0.3, path/b], or a single bare prefix"
        )
    weights, prefixes = [], []
    for w, p in zip(items[0::2], items[1::2]):
        try:
            weight = float(w)
        except (TypeError, ValueError):
            weight = float("nan")
        if not weight > 0 or weight == float("inf"):
            raise ConfigError(
                f"data.paths: weight {w!r} of {p} is not a positive number; every weight must "
                "be > 0 (drop a prefix rather than giving it weight 0)"
            )
        weights.append(weight)
        prefixes.append(_prefix_of(p))
    if len(prefixes) == 1:
        return prefixes, None  # [1.0, prefix]: one prefix, nothing to blend
    return prefixes, weights


def _prefix_of(item) -> str:
    p = str(item)
    for suffix in (".bin", ".idx"):
        if p.endswith(suffix):
            p = p[: -len(suffix)]  # a path to either file names its prefix
    return str(Path(p).expanduser().resolve())


@dataclass
class IndexInfo:
    """One checked indexed dataset."""

    prefix: str
    dtype_size: int
    sequence_lengths: np.ndarray  # tokens per document (one sequence per document)
    document_indices: np.ndarray
    bin_bytes: int
    meta: dict | None

    @property
    def num_documents(self) -> int:
        """The number of documents in the index (`document_indices` entries minus one)."""
        return len(self.document_indices) - 1

    def identity(self) -> dict:
        """What the sample stream depends on, without the path (data may move)."""
        return {
            "documents": self.num_documents,
            "bin_bytes": self.bin_bytes,
            "tokenizer": ((self.meta or {}).get("tokenizer") or {}).get("fingerprint"),
        }

    def check_splits(self, shares: list[float], split: str, names) -> None:
        """Each split in `names` must get at least one document with tokens, by the same
        rounding megatron-core uses to cut a prefix's documents into splits."""
        n = self.num_documents
        bounds = np.cumsum([0.0] + shares)
        for i, name in enumerate(SPLIT_NAMES):
            if name not in names:
                continue
            beg, end = int(round(bounds[i] * n)), int(round(bounds[i + 1] * n))
            first, last = self.document_indices[beg], self.document_indices[end]
            if end <= beg or int(self.sequence_lengths[first:last].sum()) == 0:
                raise ConfigError(
                    f"data.split {split!r} leaves the {name} split of {self.prefix} empty "
                    f"({n} documents, {shares[i]:.1%} for {name}); give {name} a larger share "
                    "or add documents"
                )


def inspect_prefix(prefix: str) -> IndexInfo:
    """Check `<prefix>.bin` and `<prefix>.idx` exist and agree, without trusting either."""
    bin_path, idx_path = Path(prefix + ".bin"), Path(prefix + ".idx")
    for path, other in ((bin_path, idx_path), (idx_path, bin_path)):
        if not path.is_file():
            have = f" ({other.name} is there)" if other.is_file() else ""
            raise ConfigError(
                f"{path} is missing{have}; run `python -m distill_llm.preprocess` to make "
                f"{Path(prefix).name}.bin/.idx, or fix the prefix in data.paths"
            )
    corrupt = f"{idx_path} is truncated or corrupt"
    fix = "; preprocess the data again"
    size = idx_path.stat().st_size
    with open(idx_path, "rb") as f:
        head = f.read(_IDX_PREAMBLE)
    if len(head) < _IDX_PREAMBLE or head[:9] != _IDX_HEADER:
        raise ConfigError(f"{corrupt} (not a Megatron index header){fix}")
    version, code, n_seq, n_doc = struct.unpack("<QBQQ", head[9:])
    if version != 1 or code not in _DTYPE_SIZES:
        raise ConfigError(f"{corrupt} (version {version}, dtype code {code}){fix}")
    expected = _IDX_PREAMBLE + n_seq * (4 + 8) + n_doc * 8
    if size not in (expected, expected + n_seq):  # + n_seq: multimodal modes, ignored here
        raise ConfigError(f"{corrupt} ({size} bytes where its header implies {expected}){fix}")
    mm = np.memmap(idx_path, mode="r", dtype=np.uint8)
    lengths = np.frombuffer(mm, np.int32, n_seq, _IDX_PREAMBLE)
    pointers = np.frombuffer(mm, np.int64, n_seq, _IDX_PREAMBLE + 4 * n_seq)
    docs = np.frombuffer(mm, np.int64, n_doc, _IDX_PREAMBLE + 12 * n_seq)
    itemsize = _DTYPE_SIZES[code]
    bin_bytes = bin_path.stat().st_size
    data_bytes = int(lengths.sum(dtype=np.int64)) * itemsize
    if n_doc < 2 or docs[0] != 0 or docs[-1] != n_seq or np.any(np.diff(docs) < 0):
        raise ConfigError(f"{corrupt} (document table inconsistent or no documents){fix}")
    if n_seq and (pointers[0] != 0 or np.any(lengths < 0)):
        raise ConfigError(f"{corrupt} (sequence table inconsistent){fix}")
    if data_bytes != bin_bytes:
        raise ConfigError(
            f"{bin_path} has {bin_bytes} bytes but {idx_path.name} describes {data_bytes}; the "
            f"pair is from different runs or truncated{fix}"
        )
    meta_path = Path(prefix + META_SUFFIX)
    meta = None
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError:
            raise ConfigError(f"{meta_path} is not valid JSON{fix}") from None
    return IndexInfo(prefix, itemsize, lengths, docs, bin_bytes, meta)


@dataclass
class DataSource:
    """A checked blend: what `DataModule` builds datasets from."""

    prefixes: list[str]
    weights: list[float] | None
    eod: int
    vocab_size: int
    identity: list = field(default_factory=list)

    @property
    def mock(self) -> bool:
        """Whether the blend has no prefixes, i.e. megatron-core's mock GPT data."""
        return not self.prefixes


class _DatasetTokenizer:
    """What GPTDataset reads from a tokenizer: vocab size, EOD, pad. The data is already
    tokenized, so the real tokenizer is not needed while training."""

    def __init__(self, vocab_size: int, eod: int):
        self.vocab_size = vocab_size
        self.eod = eod
        self.pad = -1  # never a real token id, so no real token is treated as padding
        # megatron hashes these into the dataset description (and its cache file names)
        self.unique_identifiers = {
            "class": "DatasetTokenizer",
            "vocab_size": vocab_size,
            "eod": eod,
        }


@dataclass
class BatchPlan:
    """How one global batch is cut: global = micro x accumulation x data-parallel."""

    micro_batch_size: int
    global_batch_size: int
    data_parallel_size: int
    data_parallel_rank: int = 0

    def __post_init__(self):
        per_step = self.micro_batch_size * self.data_parallel_size
        if self.micro_batch_size < 1 or self.global_batch_size < 1:
            raise ConfigError("micro_batch_size and global_batch_size must be at least 1")
        if self.global_batch_size % per_step:
            raise ConfigError(
                f"global_batch_size {self.global_batch_size} is not divisible by "
                f"micro_batch_size {self.micro_batch_size} x data-parallel size "
                f"{self.data_parallel_size} = {per_step}; pick a multiple of {per_step}"
            )

    @property
    def num_microbatches(self) -> int:
        """Micro-batches per global batch on each data-parallel rank (gradient accumulation)."""
        return self.global_batch_size // (self.micro_batch_size * self.data_parallel_size)

    def indices(self, consumed_samples: int) -> list[list[int]]:
        """Sample indices of this rank's micro-batches for the global batch starting at
        `consumed_samples`. Each chunk of micro x DP consecutive samples gives every DP rank
        one micro-batch, so all DP ranks together cover the global batch exactly once."""
        out = []
        chunk = self.micro_batch_size * self.data_parallel_size
        for m in range(self.num_microbatches):
            start = consumed_samples + m * chunk + self.data_parallel_rank * self.micro_batch_size
            out.append(list(range(start, start + self.micro_batch_size)))
        return out


def collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    """Stack GPTDataset samples into `[micro_batch, seq]` tensors."""
    return {
        k: torch.stack([s[k] for s in samples])
        for k in ("tokens", "labels", "loss_mask", "position_ids")
    }


class DataModule:
    """Train and validation datasets plus the batch plan that cuts them per rank.

    Call on every rank after torch.distributed is initialised: rank 0 builds megatron's
    index caches in `cache_dir` first, the others then load them.
    """

    def __init__(
        self,
        cfg: DataConfig,
        source: DataSource,
        *,
        seq_length: int,
        plan: BatchPlan,
        train_samples: int,
        valid_samples: int,
        seed: int,
        cache_dir: str | None = None,
    ):
        from megatron.core.datasets.blended_megatron_dataset_builder import (
            BlendedMegatronDatasetBuilder,
        )
        from megatron.core.datasets.gpt_dataset import (
            GPTDataset,
            GPTDatasetConfig,
            MockGPTDataset,
        )

        self.cfg = cfg
        self.plan = plan
        self.seq_length = seq_length
        train_samples, valid_samples = max(train_samples, 1), max(valid_samples, 1)
        # Mock indices are cheap to rebuild and large (one epoch of mock documents): not cached.
        cache = None if source.mock else (cfg.cache_dir or cache_dir)
        config = GPTDatasetConfig(
            random_seed=seed,
            sequence_length=seq_length,
            blend=None if source.mock else (source.prefixes, source.weights),
            split=cfg.split,
            tokenizer=_DatasetTokenizer(source.vocab_size, source.eod),
            reset_position_ids=False,
            reset_attention_mask=False,
            eod_mask_loss=cfg.eod_mask_loss,
            create_attention_mask=False,  # causal masking is built into the attention layers
            path_to_cache=str(cache) if cache else None,
        )
        # Training never reads the test split, so it is not built: megatron skips a split
        # whose bounds are None. (Its documents stay held out of train and valid all the same.)
        config.split_matrix = [config.split_matrix[0], config.split_matrix[1], None]
        self.train, self.valid, _ = BlendedMegatronDatasetBuilder(
            MockGPTDataset if source.mock else GPTDataset,
            [train_samples, valid_samples, 0],
            lambda: True,
            config,
        ).build()
        # Everything the global sample order depends on; a resume must find the same.
        stream = {
            "data": source.identity if not source.mock else "mock",
            "weights": source.weights,
            "split": parse_split(cfg.split),
            "seq_length": seq_length,
            "seed": seed,
            "train_samples": train_samples,
            "eod_mask_loss": cfg.eod_mask_loss,
        }
        self.stream_id = hashlib.sha256(json.dumps(stream, sort_keys=True).encode()).hexdigest()[
            :16
        ]

    def train_batches(self, consumed_samples: int) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's training micro-batches, from the global batch at `consumed_samples` on."""
        while True:
            for idx in self.plan.indices(consumed_samples):
                yield _with_ids(self.train, [i % len(self.train) for i in idx])
            consumed_samples += self.plan.global_batch_size

    def valid_batches(self, num_global_batches: int) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's validation micro-batches: the same fixed samples at every evaluation."""
        for g in range(num_global_batches):
            for idx in self.plan.indices(g * self.plan.global_batch_size):
                yield _with_ids(self.valid, [i % len(self.valid) for i in idx])


def _with_ids(dataset, ids: list[int]) -> dict[str, torch.Tensor]:
    """A micro-batch plus `sample_ids`, the dataset indices a teacher cache is keyed by."""
    return {**collate([dataset[i] for i in ids]), "sample_ids": torch.tensor(ids)}
