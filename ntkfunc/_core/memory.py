"""Memory budgets and the planner terms every engine shares.

The engines plan their work (parameter groups x sample blocks) so that what they hold
at once stays under a budget in bytes. Budgets are given as numbers of bytes or
strings such as ``"2GB"`` or ``"512MiB"``; ``None`` means: 80% of the free memory of a
CUDA device, or half of the available RAM on CPU. Where a caller's plan could not use more
than what a machine surely has, :func:`planned_budget` does not ask the system (see there).

The terms of every plan live here, once: :data:`SAFETY` (the fraction of the budget
planned tensors may use; the rest absorbs allocator slack and small temporaries),
:func:`itemsize`, :func:`outputs_per_sample` and :func:`backward_transient` (what one
sample's vmapped backward pass holds while its Jacobian or cotangents are built).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Sequence

import torch

from ntkfunc._core.problem import Problem
from ntkfunc._core.types import MemoryBudget, PyTree

SAFETY = 0.7
"""Fraction of the memory budget that planned tensors may occupy."""

CPU_SHARE = 0.5
"""Fraction of the available RAM that the default budget on CPU is."""

RAM_FLOOR = 128 * 2**20
"""Bytes of available RAM that :func:`planned_budget` takes for granted on CPU without reading ``/proc/meminfo``: a
process that has imported torch holds more than that itself, and a machine with less free is out of memory already."""

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
    if not math.isfinite(value):
        raise ValueError(f"memory_budget={budget!r}: expected a finite number of bytes (or None for the default)")
    if value <= 0:
        raise ValueError(f"memory_budget={budget!r}: expected a positive size")
    return int(value)


def planned_budget(budget: MemoryBudget, device: torch.device, enough: Callable[[float], bool] | None = None) -> float:
    """Bytes planned tensors may use: ``parse_budget(budget, device) * SAFETY``, or less where that is known to suffice.

    The default budget on CPU is a share of the available RAM, and reading it (``/proc/meminfo``)
    costs tens of microseconds: more than the rest of a small model's per-sample gradients. So
    where the caller's plan, given the budget of :data:`RAM_FLOOR` available bytes (a lower bound
    of the default), already takes all it can use (``enough(bytes)``: e.g. its whole batch in one
    pass), that budget is returned and nothing is read: a larger budget would plan the same.
    ``enough`` must be monotone (true for a budget, true for any larger one). A budget the caller
    gave, and any budget on CUDA, is used as it is (and checked as :func:`parse_budget` checks it).

    >>> planned_budget("1MB", torch.device("cpu"))
    700000.0
    >>> planned_budget(None, torch.device("cpu"), enough=lambda b: b >= 1000) == RAM_FLOOR * CPU_SHARE * SAFETY
    True
    """
    if budget is None and device.type == "cpu" and enough is not None:
        floor = RAM_FLOOR * CPU_SHARE * SAFETY
        if enough(floor):
            return floor
    return parse_budget(budget, device) * SAFETY


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
    return int(CPU_SHARE * available_ram())


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


def itemsize(dtype: torch.dtype) -> int:
    """Bytes per element of ``dtype``.

    >>> itemsize(torch.float32), itemsize(torch.bfloat16)
    (4, 2)
    """
    return torch.empty((), dtype=dtype).element_size()


def outputs_per_sample(problem: Problem) -> int:
    """Output entries of one sample (all output leaves), the larger of x1's and x2's."""
    return max(sum(math.prod(s) for s in problem.sample_out_shapes(w)) for w in (1, 2))


def per_sample_activation_bytes(problem: Problem) -> int:
    """Bytes of the activations of one forward pass on one sample (estimate)."""
    x = problem.x_block(1, 0, 1)
    fn = problem.sample_fn() if problem.vmapped else problem.batch_fn()
    xs = [a if ax is None else a.squeeze(ax) for a, ax in zip(x, problem.x_axes)] if problem.vmapped and problem.x_axes else x
    return activation_bytes(lambda leaves: fn(leaves, xs), problem.params.diff_leaves)


def backward_transient(problem: Problem) -> int:
    """Bytes one sample holds while its Jacobian (or cotangents) is built by a vmapped backward pass.

    About ``2 O + 1`` copies of the activations: the forward pass's, and the cotangents of
    ``O`` output components flowing back through the saved tensors.
    """
    return (2 * outputs_per_sample(problem) + 1) * per_sample_activation_bytes(problem)
