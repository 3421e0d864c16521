"""``settle_heap``: after it, a freed working set of 40 one-MiB tensors is reused, not faulted in again (glibc only)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

SCRIPT = r"""
import resource, torch
from ntkfunc._core.heap import settle_heap

def faults_per_use():  # like a kernel call's temporaries: many blocks under the mmap threshold
    counts = []
    for _ in range(8):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        ts = [torch.ones(2**18) for _ in range(40)]  # 40 x 1 MiB, written
        del ts
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    # the fewest faults of the uses after the first two: an unsettled heap faults the freed 40 MiB in again on
    # every use (10,240 pages), a settled one reuses them
    return min(counts[2:])

cold = faults_per_use()
assert settle_heap()
warm = faults_per_use()
print(cold, warm)
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's heap thresholds only")
def test_settled_heap_reuses_freed_tensors() -> None:
    """In every one of several fresh processes (their heaps differ by chance: some start with glibc's thresholds
    already raised, some with a large free chunk below the heap's top, where freeing a large block to raise the
    thresholds failed in about a third of processes), the freed working set is reused after ``settle_heap``."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    runs = []
    for _ in range(6):
        out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, check=True).stdout
        cold, warm = map(int, out.split())
        runs.append((cold, warm))
        assert warm < 200, f"after settle_heap the freed blocks should stay mapped; got {warm} faults (cold: {cold}; runs: {runs})"
    if all(cold <= 2000 for cold, _ in runs):  # no process faulted the freed 40 MiB in again before settle_heap
        pytest.skip(f"every fresh process already reused freed blocks before settle_heap (faults cold, warm: {runs})")


def test_settle_heap_is_idempotent() -> None:
    from ntkfunc._core.heap import settle_heap

    assert settle_heap() is settle_heap()
