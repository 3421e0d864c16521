"""The C heap under torch's CPU tensors: let glibc reuse freed kernel temporaries instead of unmapping them.

torch allocates CPU tensors with ``posix_memalign``. glibc serves blocks above its mmap threshold
with a fresh ``mmap`` (every page faulted in and zeroed on first touch) and returns free memory at
the top of the heap to the system once it exceeds the trim threshold. Both thresholds start at
128 KiB and only grow, by glibc's own rule, when an mmapped block is freed: the mmap threshold
becomes that block's size (up to 32 MiB) and the trim threshold twice that. In a process whose
largest freed block was a few MiB, every kernel call therefore faults its working set in again:
implementation 2 on the self-attention setup of ``benchmarks/bench_vs_nt.py`` (N=16, T=16, d=64,
one thread) took about 10,000 minor page faults per call, a quarter to a third of its time.

:func:`settle_heap` frees one untouched block just under 32 MiB once per process, which moves both
thresholds to glibc's dynamic maximum exactly as freeing any large tensor would (the dynamic mode
stays on; nothing is set with ``mallopt``). Afterwards blocks up to 32 MiB come from the heap and
up to 64 MiB of free heap top stays mapped for the next call. The block is never written, so
it costs one ``mmap`` and one ``munmap``. Other C libraries (musl, macOS, an ``LD_PRELOAD``-ed
jemalloc) are left alone.
"""

from __future__ import annotations

import functools
import platform

import torch

__all__ = ["SETTLE_BYTES", "settle_heap"]

SETTLE_BYTES = 32 * 2**20 - 2**16
"""Size of the freed block: just under glibc's ``DEFAULT_MMAP_THRESHOLD_MAX`` (32 MiB on 64-bit),
above which a freed block does not move the thresholds (the 64 KiB margin covers the chunk header
and ``posix_memalign``'s alignment padding)."""


@functools.cache
def settle_heap() -> bool:
    """Raise glibc's dynamic mmap / trim thresholds once per process (see the module docstring).

    Returns whether it did (glibc only; a no-op elsewhere).

    >>> settle_heap() in (True, False)
    True
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    block = torch.empty(SETTLE_BYTES, dtype=torch.uint8)  # mmapped (above the threshold), never touched
    del block
    return True
