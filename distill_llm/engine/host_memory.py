"""How a CPU run's process keeps the memory torch frees, instead of handing it back to the OS.

torch's CPU tensors come from glibc `malloc`. glibc serves a large block (above its mmap threshold,
which starts at 128 KiB and adapts up to 32 MiB) with a fresh `mmap` and unmaps it on `free`, and
trims the heap's free top back to the OS past 128 KiB. A training step allocates and frees the same
large activations every step, so each step faults many of their pages in again, and the kernel
zeroes each page first. Measured on the bench/peers.py models (8 x 512 teacher, 4 x 256 student,
8 x 256 tokens, 2 threads), per KD step: 33,000-47,000 page faults and 180-195 ms of kernel time
by default; with the settings below ~6 faults and 55-85 ms, and the step 0-4% shorter. Code
that frees more blocks above 32 MiB pays more: the peers bench/peers.py times against take
168,000-218,000 faults per step.

`keep_freed_memory()` raises the mmap threshold to 1 GiB (blocks up to that size come from the
heap and are reused) and the trim threshold to 1 GiB (freed memory stays with the process up to
that much). Peak memory is unchanged (1334-1359 MiB either way on that KD step): it is
reached inside the step.

It changes only this process's allocator settings, through glibc's `mallopt`. It does nothing when
the C library is not glibc, or when the user has set glibc's own knobs in the environment
(`MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`, `GLIBC_TUNABLES`), which then win.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

KEEP_BYTES = 1 << 30  # blocks up to 1 GiB from the heap; up to 1 GiB of free heap kept
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers (malloc.h)
_USER_KNOBS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")
_done = False


def keep_freed_memory() -> bool:
    """Set the allocator up as the module docstring says, once per process. True when the
    settings are in force (set now or before), False when skipped (not glibc, or the user's own
    environment settings apply)."""
    global _done
    if _done:
        return True
    if any(k in os.environ for k in _USER_KNOBS):
        return False
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    ok = libc.mallopt(_M_MMAP_THRESHOLD, KEEP_BYTES) == 1
    ok = libc.mallopt(_M_TRIM_THRESHOLD, KEEP_BYTES) == 1 and ok
    _done = ok
    return ok
