"""Workarounds that let megatron-core 0.16.1 run on a CPU-only torch.

megatron-core assumes CUDA in a handful of places. Every workaround below names the upstream call
site it covers, so it can be deleted once upstream stops assuming a GPU. Nothing here is applied
when CUDA is available: `apply()` returns at once.

What is patched, and why:
1. `torch.cuda.current_device()` answers the CPU device. Upstream allocates on it in
   `utils.GlobalMemoryBuffer.get_tensor` (local DotProductAttention),
   `RotaryEmbedding.get_emb` (moves `inv_freq`), `distributed/param_and_grad_buffer.py`
   (DDP grad buffers) and the TP gather helpers in `tensor_parallel/mappings.py`.
2. `torch.cuda.synchronize()` is a no-op: called by dist_checkpointing's torch_dist writer
   (`strategies/filesystem_async.py` `preload_tensors`, `strategies/fully_parallel.py`).
3. `Tensor.cuda()` returns the tensor itself: `optimizer/optimizer.py` and the checkpoint
   loaders move state with `.cuda()`.
4. The model-parallel RNG tracker (`tensor_parallel/random.py` `CudaRNGStatesTracker.add/fork`)
   reads and writes CUDA RNG state; a tracker over the CPU generator replaces it, so attention
   dropout inside `fork()` stays reproducible and distinct per TP rank.
5. A `TorchFunctionMode` maps literal `device='cuda'` arguments to the CPU and makes
   `Tensor.type()` report `torch.cuda.*` names. It covers `optimizer/optimizer.py`
   (`FP32Optimizer`, `MixedPrecisionOptimizer` build tensors with `device='cuda'` and check
   `param.type()`), `optimizer/clip_grads.py` (asserts `'torch.cuda.FloatTensor'`) and
   `optimizer/distrib_optimizer.py` (refuses non-`torch.cuda.*` parameter types).

Without TransformerEngine (CPU or GPU), one more, applied by `apply()` in either case:
6. `transformer/moe/moe_utils.py` imports `te_general_gemm` only when TE is installed, yet
   `RouterGatingLinearFunction.forward/backward` test `te_general_gemm is not None`: without
   TE that is a NameError in every MoE router. Defining it as None selects upstream's own
   torch matmul path.
On a CPU the MoE token dispatcher must be `allgather` (engine.model chooses it): `alltoall`
builds `torch.cuda.Stream()` and CUDA events in `MoEAlltoAllTokenDispatcher`.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

_APPLIED = False
_CPU = torch.device("cpu")


def cuda_available() -> bool:
    """True when a CUDA device can be used; the workarounds are then never applied."""
    return torch.cuda.is_available()


def _to_cpu_device(device):
    if isinstance(device, torch.device) and device.type == "cuda":
        return _CPU
    if isinstance(device, str) and device.startswith("cuda"):
        return _CPU
    if isinstance(device, int) and not isinstance(device, bool):
        return _CPU  # a bare index means a CUDA ordinal to torch
    return device


_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
}


class _CudaAsCpu(TorchFunctionMode):
    """Rewrites CUDA device arguments to the CPU (workaround 5 in the module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        if func is torch.Tensor.to and len(args) > 1:
            args = (args[0], _to_cpu_device(args[1]), *args[2:])
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = _CUDA_TYPE_NAMES.get(args[0].dtype)
            if name is not None:
                return name
        return func(*args, **kwargs)


class _CPURNGStatesTracker:
    """CPU-generator version of megatron's CudaRNGStatesTracker (workaround 4).

    Keeps named generator states; `fork(name)` swaps the CPU generator to that state for the
    duration of the block and stores where it ended, exactly as the CUDA tracker does.
    """

    def __init__(self, *args, **kwargs):
        self.reset()

    def is_initialized(self) -> bool:
        return self._is_initialized

    def reset(self) -> None:
        self._is_initialized = False
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()

    def get_states(self) -> dict[str, torch.Tensor]:
        return {name: state.clone() for name, state in self.states_.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = {name: state.clone() for name, state in states.items()}

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise RuntimeError(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise RuntimeError(f"rng state {name} already exists")
        outer = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(outer)

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise RuntimeError(f"rng state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def _install_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    original_initialize = mrandom.initialize_rng_tracker

    def initialize_rng_tracker(*args, force_reset: bool = False, **kwargs):
        if mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED and not force_reset:
            return
        mrandom._CUDA_RNG_STATE_TRACKER = _CPURNGStatesTracker()
        mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True

    initialize_rng_tracker.__wrapped__ = original_initialize
    mrandom.initialize_rng_tracker = initialize_rng_tracker
    # model_parallel_cuda_manual_seed seeds the CUDA generator first; on CPU that queues a lazy
    # call that never runs. Harmless, so it is left alone.


def _moe_without_te() -> None:
    """Workaround 6 (see the module docstring)."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def apply() -> None:
    """Apply every workaround once, and only when CUDA is absent (6: whenever TE is absent).
    Safe to call many times."""
    global _APPLIED
    _moe_without_te()
    if _APPLIED or cuda_available():
        return
    torch.cuda.current_device = lambda: _CPU  # workaround 1
    torch.cuda.synchronize = lambda *args, **kwargs: None  # workaround 2
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # workaround 3
    _install_rng_tracker()  # workaround 4
    _CudaAsCpu().__enter__()  # workaround 5: process-wide, never exited
    _APPLIED = True
