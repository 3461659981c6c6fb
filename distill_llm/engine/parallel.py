"""torch.distributed and megatron-core parallel_state: process groups, devices and seeding.

megatron-core is imported inside the functions that use it (a few seconds of import):
`import distill_llm` stays cheap, and megatron loads once an entry point runs.
"""

import os
import random
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from distill_llm.engine import cpu_compat, host_memory
from distill_llm.errors import ConfigError

Precision = Literal["fp32", "bf16"]


@dataclass
class ParallelConfig:
    """How the job is laid out. Data parallel is derived: world size / (TP x PP)."""

    tensor_parallel: int = 1  # splits each layer's weights across this many processes
    pipeline_parallel: int = 1  # splits the layers into this many stages (1F1B schedule)
    precision: Precision = "fp32"  # parameter and compute dtype; bf16 keeps fp32 master weights
    use_distributed_optimizer: bool = False  # shard optimizer state across data-parallel ranks
    expert_parallel: int = 1  # splits an MoE model's experts across this many processes

    @property
    def params_dtype(self) -> torch.dtype:
        """The parameter and compute dtype: torch.bfloat16 for bf16, else torch.float32."""
        return torch.bfloat16 if self.precision == "bf16" else torch.float32

    def validate(self, world_size: int) -> int:
        """Return the data-parallel size, or raise ConfigError if the grid does not fit."""
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"precision {self.precision!r} is not supported; use fp32 or bf16")
        model_parallel = self.tensor_parallel * self.pipeline_parallel
        if self.tensor_parallel < 1 or self.pipeline_parallel < 1:
            raise ConfigError("tensor_parallel and pipeline_parallel must be at least 1")
        if world_size % model_parallel:
            raise ConfigError(
                f"world size {world_size} is not divisible by tensor_parallel x "
                f"pipeline_parallel = {model_parallel}; launch a multiple of {model_parallel} "
                "processes (torchrun --nproc_per_node)"
            )
        # Experts are not tensor-parallel (expert TP 1): their grid is EP x PP x expert-DP.
        expert_grid = self.expert_parallel * self.pipeline_parallel
        if self.expert_parallel < 1:
            raise ConfigError("expert_parallel must be at least 1")
        if world_size % expert_grid:
            raise ConfigError(
                f"world size {world_size} is not divisible by expert_parallel x "
                f"pipeline_parallel = {expert_grid}; launch a multiple of {expert_grid} processes "
                "or lower expert_parallel"
            )
        return world_size // model_parallel


def world_size_from_env() -> int:
    """The number of processes, from `WORLD_SIZE` (set by torchrun); 1 when unset."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def initialize(parallel: ParallelConfig, seed: int) -> None:
    """Start torch.distributed (gloo on CPU, nccl on GPU), parallel_state and all RNGs.

    Works under torchrun and as a plain single process (a one-rank group on a free port).
    Calling it again with the same layout is a no-op; a different layout rebuilds the groups.
    """
    from megatron.core import parallel_state, tensor_parallel

    cpu_compat.apply()
    if not torch.cuda.is_available():
        host_memory.keep_freed_memory()  # a CPU step re-faults its activations otherwise
    parallel.validate(world_size_from_env())
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if "RANK" in os.environ:  # launched by torchrun (or Slurm via torchrun)
            torch.distributed.init_process_group(backend=backend)
        else:  # a plain process: a one-rank group, leaving the environment untouched
            torch.distributed.init_process_group(
                backend=backend,
                init_method=f"tcp://127.0.0.1:{_free_port()}",
                rank=0,
                world_size=1,
            )
    if parallel_state.model_parallel_is_initialized():
        same = (
            parallel_state.get_tensor_model_parallel_world_size() == parallel.tensor_parallel
            and parallel_state.get_pipeline_model_parallel_world_size()
            == parallel.pipeline_parallel
            and parallel_state.get_expert_model_parallel_world_size() == parallel.expert_parallel
        )
        if not same:
            parallel_state.destroy_model_parallel()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=parallel.tensor_parallel,
            pipeline_model_parallel_size=parallel.pipeline_parallel,
            expert_model_parallel_size=parallel.expert_parallel,
            expert_tensor_parallel_size=1,
        )
    seed_everything(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch. The same seed on every rank: weights are initialised
    identically on data-parallel replicas, and megatron's tracker derives per-TP-rank streams."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rank() -> int:
    """This process's global rank; 0 when torch.distributed is not initialised."""
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def is_main() -> bool:
    """Whether this is global rank 0, the rank that writes files and prints."""
    return rank() == 0


def barrier() -> None:
    """Blocks until every rank reaches it; a no-op when torch.distributed is not initialised."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
