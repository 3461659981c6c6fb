"""Checkpoints on megatron-core dist_checkpointing: atomic saves, a `latest` pointer, resume.

Layout of a training checkpoint directory `checkpoints/iter_0000042/`:
  - dist_checkpointing files: the student's weights (never the teacher's), optimizer state,
    LR scheduler state and the training position (step, consumed samples), loadable at any
    TP size;
  - `rng/rank_<r>.pt`: each rank's RNG states (used when resuming on the same layout);
  - `distill_llm.json`: the student architecture, so the directory alone describes the model.
A model-only checkpoint (`final/`, or any teacher/student given to `distill`) has the weights
under the key prefix `model.` and the same `distill_llm.json`.

A save is written to `iter_N.tmp/` and renamed once every rank has finished, then `latest` is
replaced atomically: a process killed mid-save leaves the previous checkpoint and pointer intact.

megatron-core is imported inside the functions that use it (a few seconds of import):
`import distill_llm` stays cheap, and megatron loads once an entry point runs.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from distill_llm.engine import parallel
from distill_llm.engine.model import ModelConfig
from distill_llm.errors import ConfigError

META_FILE = "distill_llm.json"
LATEST_FILE = "latest"
FORMAT_VERSION = 1
# The distributed optimizer's default `fully_sharded_model_space` format fails in megatron-core
# 0.16.1 ("ShardedTensor.flattened_range is not supported"); `dp_reshardable` works and also
# reloads at another DP size. Other optimizers ignore it.
_OPTIM_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


def _iter_name(step: int) -> str:
    return f"iter_{step:07d}"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_metadata(path: str | Path) -> dict:
    """The `distill_llm.json` of a checkpoint directory, or a ConfigError naming what is wrong."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"checkpoint directory {str(path)!r} does not exist")
    meta = path / META_FILE
    if not meta.is_file():
        raise ConfigError(
            f"{str(path)!r} is not a distill_llm checkpoint (no {META_FILE}); give a directory "
            "written by distill_llm (a run's final/ or checkpoints/iter_N/)"
        )
    return json.loads(meta.read_text())


def model_config_of(path: str | Path) -> ModelConfig:
    """The architecture stored with a distill_llm checkpoint (any model path: formats.paths)."""
    return ModelConfig.from_dict(read_metadata(path)["model"])


def _rng_state() -> dict:
    """This process's RNG states as tensors, numbers and lists only, so that
    `torch.load(..., weights_only=True)` reads them back (no pickled objects: a checkpoint from
    someone else cannot run code when resumed)."""
    from megatron.core import tensor_parallel

    version, python_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(python_state), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    """Restore the states `_rng_state` saved."""
    from megatron.core import tensor_parallel

    version, python_state, gauss = state["python"]
    random.setstate((version, tuple(python_state), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def read_rng_file(path: Path) -> dict:
    """A rank's RNG file, read without unpickling objects; ConfigError if it holds anything
    else (a crafted or foreign file) or is not a torch file."""
    try:
        return torch.load(path, weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"{path} is not an RNG state file distill_llm wrote ({first[:200]}); it is not "
            "loaded, since it could run code. Delete the checkpoint's rng/ folder to resume "
            "without restoring RNG states, or resume from a checkpoint you trust"
        ) from None


def latest_checkpoint(ckpt_root: str | Path) -> Path | None:
    """The checkpoint `latest` points at, or None when there is none yet."""
    pointer = Path(ckpt_root) / LATEST_FILE
    if not pointer.is_file():
        return None
    target = Path(ckpt_root) / pointer.read_text().strip()
    if not (target / META_FILE).is_file():
        raise ConfigError(
            f"{pointer} points at {target.name}, which is missing or incomplete; point it at an "
            "existing iter_N directory or delete it to start over"
        )
    return target


def results_queue_without_spawn() -> None:
    """Give megatron's torch_dist writer its results queue from a fork-started Manager.

    On the first save the writer (`strategies/filesystem_async.py`) starts a multiprocessing
    Manager with the `spawn` method, which re-imports the launching script: a script that calls
    `distill()` without an `if __name__ == "__main__":` guard then runs itself again inside the
    Manager and hangs (under torchrun the copy joins the rendezvous). A forked Manager is a plain
    queue server that imports nothing and touches neither CUDA nor the process groups.
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if (
        filesystem_async._results_queue is None
        and "fork" in multiprocessing.get_all_start_methods()
    ):
        filesystem_async._results_queue = multiprocessing.get_context("fork").Manager().Queue()


def _save_dir(sharded_state: dict, final_dir: Path, metadata: dict) -> None:
    """Write `sharded_state` to `final_dir` atomically (through `final_dir.tmp`)."""
    from megatron.core import dist_checkpointing

    results_queue_without_spawn()
    tmp = final_dir.with_name(final_dir.name + ".tmp")
    if parallel.is_main():
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    parallel.barrier()
    dist_checkpointing.save(sharded_state, str(tmp), validate_access_integrity=False)
    rng_dir = tmp / "rng"
    rng_dir.mkdir(exist_ok=True)
    torch.save(_rng_state(), rng_dir / f"rank_{parallel.rank()}.pt")
    parallel.barrier()
    if parallel.is_main():
        _write_atomic(tmp / META_FILE, json.dumps(metadata, indent=2))
        if final_dir.exists():
            shutil.rmtree(final_dir)
        os.replace(tmp, final_dir)
        _fsync_dir(final_dir.parent)
    parallel.barrier()


def _metadata(model_cfg: ModelConfig, **extra) -> dict:
    from megatron.core import parallel_state

    return {
        "format_version": FORMAT_VERSION,
        "model": model_cfg.to_dict(),
        "tensor_parallel": parallel_state.get_tensor_model_parallel_world_size(),
        "pipeline_parallel": parallel_state.get_pipeline_model_parallel_world_size(),
        "world_size": torch.distributed.get_world_size(),
        **extra,
    }


def save_training(
    ckpt_root: str | Path,
    *,
    step: int,
    consumed_samples: int,
    model,
    optimizer,
    scheduler,
    model_cfg: ModelConfig,
    data_stream: str | None = None,
) -> Path:
    """Save a resumable training checkpoint and point `latest` at it.

    `data_stream` identifies the training sample order, so a resume can check it continues
    the same stream."""
    ckpt_root = Path(ckpt_root)
    model_sd = model.sharded_state_dict()
    state = {
        "model": model_sd,
        "optimizer": optimizer.sharded_state_dict(model_sd, metadata=_OPTIM_METADATA),
        "scheduler": scheduler.state_dict(),
        "progress": {"step": step, "consumed_samples": consumed_samples},
    }
    target = ckpt_root / _iter_name(step)
    _save_dir(
        state,
        target,
        _metadata(model_cfg, step=step, consumed_samples=consumed_samples, data_stream=data_stream),
    )
    if parallel.is_main():
        _write_atomic(ckpt_root / LATEST_FILE, target.name)
    parallel.barrier()
    return target


def _distributed_optimizers(optimizer) -> list:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    chain = getattr(optimizer, "chained_optimizers", [optimizer])
    return [opt for opt in chain if isinstance(opt, DistributedOptimizer)]


def load_training(path: Path, *, model, optimizer, scheduler) -> dict:
    """Restore model, optimizer, scheduler and (same layout only) RNG states from `path`.

    Returns the training position `{"step", "consumed_samples"}`.
    """
    from megatron.core import dist_checkpointing

    meta = read_metadata(path)
    distributed = _distributed_optimizers(optimizer)
    for opt in distributed:
        # state_dict() below needs Adam states to exist; upstream creates them only later.
        opt._init_optimizer_states_with_dummy_values()
    model_sd = model.sharded_state_dict()
    template = {
        "model": model_sd,
        "optimizer": optimizer.sharded_state_dict(
            model_sd, is_loading=True, metadata=_OPTIM_METADATA
        ),
        "scheduler": scheduler.state_dict(),
        "progress": {"step": 0, "consumed_samples": 0},
    }
    with torch.no_grad():
        loaded = dist_checkpointing.load(template, str(path))
        model.load_state_dict(loaded["model"])
        optimizer.load_state_dict(loaded["optimizer"])
    scheduler.load_state_dict(loaded["scheduler"])
    for opt in distributed:
        # The dp_reshardable format does not carry torch Adam's per-parameter `step` (bias
        # correction); every step so far was taken, so it equals the training step.
        for state in opt.optimizer.state.values():
            if "step" in state:
                state["step"] = torch.full_like(
                    torch.as_tensor(state["step"]), float(loaded["progress"]["step"])
                )
    rng_file = path / "rng" / f"rank_{parallel.rank()}.pt"
    if meta["world_size"] == torch.distributed.get_world_size() and rng_file.is_file():
        _set_rng_state(read_rng_file(rng_file))
    return dict(loaded["progress"])


def save_model(path: str | Path, module, model_cfg: ModelConfig, **extra) -> Path:
    """Save one model's weights alone (no optimizer) as a loadable checkpoint directory."""
    path = Path(path)
    _save_dir({"model": module.sharded_state_dict()}, path, _metadata(model_cfg, **extra))
    return path


def load_model(path: str | Path, module, model_cfg: ModelConfig) -> None:
    """Load weights saved by `save_model` (at any TP size) into `module` (built for
    `model_cfg`; formats.paths.load_model checks the architecture first)."""
    from megatron.core import dist_checkpointing

    with torch.no_grad():
        loaded = dist_checkpointing.load({"model": module.sharded_state_dict()}, str(path))
        module.load_state_dict(loaded["model"])
