"""Memory budgets: parsing, defaults, and a per-sample activation estimate.

The Jacobian-based implementations plan their work (parameter groups x sample
blocks) so that what they hold at once stays under a budget in bytes. Budgets are
given as numbers of bytes or strings such as ``"2GB"`` or ``"512MiB"``; ``None``
means: 80% of the free memory of a CUDA device, or half of the available RAM on CPU.
"""

from __future__ import annotations

import os
import re
from typing import Callable, Sequence

import torch

from ntkfunc._typing import MemoryBudget, PyTree

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
}


def parse_budget(budget: MemoryBudget, device: torch.device) -> int:
    """Bytes for ``budget`` on ``device``.

    >>> parse_budget("2GB", torch.device("cpu"))
    2000000000
    >>> parse_budget(1024, torch.device("cpu"))
    1024
    """
    if budget is None:
        return default_budget(device)
    if isinstance(budget, bool) or not isinstance(budget, (int, float, str)):
        raise TypeError(f"memory_budget={budget!r}: expected bytes as a number or a string like '2GB'")
    if isinstance(budget, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", budget)
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(
                f"memory_budget={budget!r}: expected a number of bytes or a string like "
                f"'2GB', '512MiB' (units: {', '.join(u for u in _UNITS if u)})"
            )
        value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    else:
        value = float(budget)
    if value <= 0:
        raise ValueError(f"memory_budget={budget!r}: expected a positive size")
    return int(value)


def fmt_bytes(n: float) -> str:
    """``1536 -> '1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def available_ram() -> int:
    """Bytes of RAM available to new allocations (MemAvailable), or total RAM as a fallback."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def default_budget(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(0.8 * free)
    return int(0.5 * available_ram())


def activation_bytes(fn: Callable[[list[torch.Tensor]], PyTree], params: Sequence[torch.Tensor]) -> int:
    """Bytes of the tensors autograd saves for backward while ``fn(params)`` runs (its activations).

    ``params`` are made to require grad (on detached copies) and are not counted. Returns 0
    when ``fn`` cannot run like this (e.g. inside another functorch transform); callers
    then rely on their other terms.
    """
    total = 0
    seen: set[int] = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
        return t

    try:
        leaves = [t.detach().requires_grad_(True) for t in params]
        seen.update(t.untyped_storage().data_ptr() for t in leaves)
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(leaves)
    except Exception:
        return 0
    return total
