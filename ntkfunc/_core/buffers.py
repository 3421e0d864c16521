"""Work buffers kept from call to call (a fresh allocation of tens of MB page-faults on every use).

One class for every reused buffer: the rules' per-sample gradient paths (im2col patches, the
padded input, the product's contiguous target), the sketches' permuted factors and FFT inputs,
and the formed gradients a sketch projects.
"""

from __future__ import annotations

import time
from collections.abc import Hashable

import torch


def clock(device: torch.device) -> float:
    """Seconds now for the measured rates of ``Buffers.seconds``: on a GPU the wall clock after the device's queued
    work; on the CPU this process's CPU time (all its threads), which other jobs sharing the cores do not move."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return time.perf_counter()
    return time.process_time()


class Buffers:
    """Named buffers, grown on demand and reused: ``get(name, shape, like)`` is a view of the first elements.

    One flat buffer per name (and dtype and device), as large as the largest request so far:
    layers of different shapes share it, and its views are contiguous (``out=`` targets of
    ``bmm``). Two views in use at once need two names.

    >>> b = Buffers()
    >>> x = b.get("u", (2, 3), torch.ones(1))
    >>> y = b.get("u", (1, 3), torch.ones(1))   # the same storage, reused
    >>> x.data_ptr() == y.data_ptr(), tuple(y.shape)
    (True, (1, 3))
    """

    def __init__(self) -> None:
        self._held: dict[tuple, torch.Tensor] = {}
        self.seconds: dict[Hashable, dict[str, float]] = {}
        """Measured seconds per sample of each way of doing one job, by the job's key (a rule times its ways once per
        key on the first samples and takes the fastest from then on: the rate table lives with the buffers it fills)."""

    def get(self, name: Hashable, shape: tuple[int, ...], like: torch.Tensor, zero: bool = False) -> torch.Tensor:
        """A ``shape`` view of buffer ``name`` (dtype and device of ``like``); zero-filled if ``zero``."""
        n = 1
        for d in shape:
            n *= int(d)
        key = (name, like.dtype, like.device)
        held = self._held.get(key)
        if held is None or held.numel() < n:
            held = torch.empty(max(n, 1), dtype=like.dtype, device=like.device)
            self._held[key] = held
        view = held[:n].view(shape)
        if zero:
            view.zero_()
        return view

    def clear(self) -> None:
        self._held.clear()  # the memory; the measured seconds stay
