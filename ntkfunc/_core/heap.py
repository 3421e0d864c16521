"""The C heap under torch's CPU tensors: let glibc reuse freed kernel temporaries instead of unmapping them.

torch allocates CPU tensors with ``posix_memalign``. glibc serves blocks above its mmap threshold
with a fresh ``mmap`` (every page faulted in and zeroed on first touch) and returns free memory at
the top of the heap to the system once it exceeds the trim threshold. Both thresholds start at
128 KiB and only grow, by glibc's own rule, when an mmapped block is freed: the mmap threshold
becomes that block's size (up to 32 MiB) and the trim threshold twice that. In a process whose
largest freed block was a few MiB, every kernel call therefore faults its working set in again:
implementation 2 on the self-attention setup of ``benchmarks/bench_vs_nt.py`` (N=16, T=16, d=64,
one thread) took about 10,000 minor page faults per call, a quarter to a third of its time.

:func:`settle_heap` sets both thresholds once per process, with ``mallopt``, to the values glibc's
own rule reaches at most: :data:`MMAP_THRESHOLD` (32 MiB, glibc's ``DEFAULT_MMAP_THRESHOLD_MAX`` on
64-bit) and :data:`TRIM_THRESHOLD` (twice that). Afterwards blocks up to 32 MiB come from the heap
and up to 64 MiB of free heap top stays mapped for the next call. (An earlier version freed one
untouched 32 MiB block to move the thresholds by that rule instead; where the heap already held a
free chunk that large, glibc served the block from it, the thresholds stayed where they were and the
heap's top was trimmed on every later call: in about a third of fresh processes, every use of 40 MiB
of temporaries faulted them all in again.) Setting a threshold with ``mallopt`` turns glibc's dynamic
rule off, which here changes nothing: the values set are the ones it could reach at most. Other C
libraries (musl, macOS, an ``LD_PRELOAD``-ed jemalloc) are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import platform

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "settle_heap"]

MMAP_THRESHOLD = 32 * 2**20
"""Bytes above which glibc serves a block by ``mmap``: its ``DEFAULT_MMAP_THRESHOLD_MAX`` on 64-bit, the most
its dynamic rule sets and the most ``mallopt(M_MMAP_THRESHOLD)`` accepts."""

TRIM_THRESHOLD = 2 * MMAP_THRESHOLD
"""Bytes of free heap top above which glibc returns memory to the system: twice the mmap threshold, as its
dynamic rule sets it."""

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)


@functools.cache
def settle_heap() -> bool:
    """Set glibc's mmap and trim thresholds once per process (see the module docstring).

    Returns whether it did (glibc only; a no-op elsewhere).

    >>> settle_heap() in (True, False)
    True
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # the mmap threshold first: setting either turns the dynamic rule off, which then keeps the other as it is
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
