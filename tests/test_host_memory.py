"""engine.host_memory: a CPU run reuses the memory torch frees instead of faulting it in again.

Each case runs in a fresh interpreter: allocator settings are per process and cannot be undone.
"""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only"
)

# Allocate, fill and free a 64 MiB tensor six times, counting the minor page faults of each time.
# Freed to the OS (glibc's default for a block that size), every one of its 16,384 pages faults in
# again each time. Kept by the process, the first few times may still fault: torch asks for
# 64-byte-aligned memory, so a freed block of exactly the tensor's size can be a few bytes short
# for the next request and the heap grows instead (seen here: [16379, 0, 16384, 0, 0, 0] and
# [16380, 16384, 0, 0, 0, 0]). Once two freed blocks lie side by side the request always fits,
# so the test looks at the last three times, as a training loop's steady state would.
_PROBE = """
import json, resource, sys
import torch
from distill_llm.engine import host_memory
kept = host_memory.keep_freed_memory() if sys.argv[1] == "keep" else None
faults = []
for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.empty(16 << 20, dtype=torch.float32)  # 64 MiB
    x.fill_(1.0)
    del x
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"kept": kept, "faults": faults}))
"""
PAGES = (64 << 20) // 4096


def _probe(mode: str, **env) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_default_allocator_faults_a_freed_block_in_again():
    """The problem the module solves, seen on this machine: without it, every 64 MiB
    tensor faults in (nearly) all of its pages again."""
    got = _probe("default")
    assert all(f > PAGES // 2 for f in got["faults"][3:]), got


def test_kept_memory_is_reused_without_faults():
    got = _probe("keep")
    assert got["kept"] is True
    assert sum(got["faults"][3:]) < PAGES // 16, got  # a few pages of bookkeeping at most


def test_users_own_glibc_settings_win():
    """MALLOC_TRIM_THRESHOLD_ in the environment: we leave the allocator alone."""
    got = _probe("keep", MALLOC_TRIM_THRESHOLD_="131072")
    assert got["kept"] is False
