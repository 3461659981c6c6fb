"""The data module: datasets built with megatron-core, cut into resumable per-rank micro-batches.

The engine asks a `DataModule` for two things: an iterator of training micro-batches that starts
at a given number of consumed samples (so a resumed run continues the exact sample stream), and
a fresh iterator over validation micro-batches. For now the samples come from megatron-core's
mock GPT dataset; real indexed datasets plug in behind the same interface.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from distill_llm.errors import ConfigError


@dataclass
class DataConfig:
    """Where samples come from. `paths` None means megatron-core's mock GPT data."""

    paths: list = field(default_factory=list)  # weighted prefixes [w1, prefix1, ...]; [] = mock
    split: str = "98,1,1"  # train/valid/test shares of the documents
    cache_dir: str | None = None  # megatron index caches; None = next to the data
    eod_mask_loss: bool = False  # leave end-of-document targets out of the loss


class _MockTokenizer:
    """What GPTDataset reads from a tokenizer (vocab size, EOD, pad) for mock data."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.eod = 0
        self.pad = -1  # never a real token id, so nothing is treated as padding
        # megatron hashes these into the dataset description (and its cache file names)
        self.unique_identifiers = {"class": "MockTokenizer", "vocab_size": vocab_size}


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
    """Train and validation datasets plus the batch plan that cuts them per rank."""

    def __init__(
        self,
        cfg: DataConfig,
        *,
        seq_length: int,
        vocab_size: int,
        plan: BatchPlan,
        train_samples: int,
        valid_samples: int,
        seed: int,
    ):
        self.cfg = cfg
        self.plan = plan
        self.seq_length = seq_length
        if cfg.paths:
            raise ConfigError(
                "data.paths: indexed datasets are not wired in yet; leave paths empty for mock data"
            )
        self.train, self.valid = self._build_mock(vocab_size, train_samples, valid_samples, seed)

    def _build_mock(self, vocab_size: int, train_samples: int, valid_samples: int, seed: int):
        from megatron.core.datasets.blended_megatron_dataset_builder import (
            BlendedMegatronDatasetBuilder,
        )
        from megatron.core.datasets.gpt_dataset import GPTDatasetConfig, MockGPTDataset

        config = GPTDatasetConfig(
            random_seed=seed,
            sequence_length=self.seq_length,
            split=self.cfg.split,
            tokenizer=_MockTokenizer(vocab_size),
            reset_position_ids=False,
            reset_attention_mask=False,
            eod_mask_loss=self.cfg.eod_mask_loss,
            create_attention_mask=False,  # causal masking is built into the attention layers
            path_to_cache=self.cfg.cache_dir,
        )
        train, valid, _ = BlendedMegatronDatasetBuilder(
            MockGPTDataset,
            [max(train_samples, 1), max(valid_samples, 1), 1],
            lambda: True,
            config,
        ).build()
        return train, valid

    def train_batches(self, consumed_samples: int) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's training micro-batches, from the global batch at `consumed_samples` on."""
        while True:
            for idx in self.plan.indices(consumed_samples):
                yield collate([self.train[i % len(self.train)] for i in idx])
            consumed_samples += self.plan.global_batch_size

    def valid_batches(self, num_global_batches: int) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's validation micro-batches: the same fixed samples at every evaluation."""
        for g in range(num_global_batches):
            for idx in self.plan.indices(g * self.plan.global_batch_size):
                yield collate([self.valid[i % len(self.valid)] for i in idx])
