"""``monte_carlo_kernel_fn``: empirical kernels averaged over random initialisations.

The average of ``ntk`` / ``nngp`` over ``n_samples`` draws of ``params = init_fn(generator)``
estimates the infinite-width (analytic) kernels. Draws are stacked and their kernels
computed ``batch_size`` at a time with ``torch.func.vmap`` over the parameters (a Python
loop for implementations that do not support it). Sample ``i`` uses a generator seeded
with ``sample_seeds(seed, n_samples)[i]``, so results depend only on ``seed`` (not on
``batch_size`` or on the global RNG).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils import _pytree as pytree

from ntkfunc._core.checks import as_axes_tuple, check_positive_int
from ntkfunc._core.memory import parse_budget
from ntkfunc._core.types import ApplyFn, Axes, MemoryBudget, PyTree, VMapAxes
from ntkfunc._engines import Implementation, get_engine
from ntkfunc.empirical_kernel import Get, canonical_get, kernel_fn, kernel_tuple

InitFn = Callable[[torch.Generator], PyTree]


def sample_seeds(seed: int, n_samples: int) -> list[int]:
    """The seeds of the generators passed to ``init_fn``, one per sample (deterministic in ``seed``).

    >>> sample_seeds(0, 3) == sample_seeds(0, 3) != sample_seeds(1, 3)
    True
    """
    gen = torch.Generator().manual_seed(int(seed))
    return [int(s) for s in torch.randint(0, 2**62, (n_samples,), generator=gen, dtype=torch.int64)]


def _auto_batch(params: PyTree, out_numel: int, budget: int) -> int:
    """Draws per vmapped call so that their per-sample Jacobians stay within a quarter of ``budget``."""
    n_params = sum(t.numel() for t in pytree.tree_leaves(params) if t.is_floating_point())
    itemsize = max(t.element_size() for t in pytree.tree_leaves(params) if t.is_floating_point())
    per_draw = out_numel * n_params * itemsize * 2
    return max(1, int(budget // 4 // max(per_draw, 1)))


def monte_carlo_kernel_fn(
    f: ApplyFn,
    init_fn: InitFn,
    n_samples: int,
    *,
    trace_axes: Axes = (-1,),
    diagonal_axes: Axes = (),
    vmap_axes: VMapAxes = 0,
    implementation: int | str | Implementation = Implementation.AUTO,
    get: Get | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    memory_budget: MemoryBudget = None,
) -> Callable[..., Any]:
    """Returns ``kernel(x1, x2=None, get=None)``: the mean of empirical kernels over ``n_samples`` initialisations.

    Args:
      f: ``f(params, x)``; init_fn: ``init_fn(generator) -> params`` (draw every random number
        from ``generator``); n_samples: number of initialisations.
      trace_axes, diagonal_axes, vmap_axes, implementation: as :func:`ntkfunc.kernel_fn` (``"auto"`` by default).
      get: ``"ntk"``, ``"nngp"``, or a tuple of them (namedtuple result); ``None`` means
        ``("nngp", "ntk")``. Can be overridden per call.
      seed: the draws are reproducible for a given seed (see :func:`sample_seeds`).
      batch_size: draws whose kernels are computed in one ``torch.func.vmap`` call; default:
        as many as the memory budget allows (one at a time for implementations that do
        not support ``vmap`` over params).
      memory_budget: bytes for each kernel computation, as in :func:`ntkfunc.ntk_fn`.

    Shapes: those of :func:`ntkfunc.kernel_fn`.

    Example:
      >>> import torch, ntkfunc
      >>> def init_fn(gen):
      ...     return {"w": torch.randn(3, 64, generator=gen), "v": torch.randn(64, 1, generator=gen)}
      >>> f = lambda p, x: torch.tanh(x @ p["w"]) @ p["v"] / 8
      >>> mc = ntkfunc.monte_carlo_kernel_fn(f, init_fn, 16, seed=0)
      >>> k = mc(torch.randn(4, 3), None)
      >>> k.nngp.shape, k.ntk.shape
      (torch.Size([4, 4]), torch.Size([4, 4]))
    """
    api = "monte_carlo_kernel_fn"
    check_positive_int(n_samples, "n_samples", api)
    check_positive_int(batch_size, "batch_size", api, allow_none=True)
    if not callable(init_fn):
        raise TypeError(f"{api}: init_fn is a {type(init_fn).__name__}; expected init_fn(generator) -> params")
    engine = get_engine(implementation, api=api)
    default_get = ("nngp", "ntk") if get is None else get
    canonical_get(default_get, api)
    trace_axes, diagonal_axes = as_axes_tuple(trace_axes), as_axes_tuple(diagonal_axes)
    k_fn = kernel_fn(f, trace_axes, diagonal_axes, vmap_axes, engine.implementation, memory_budget=memory_budget)
    seeds = sample_seeds(seed, n_samples)

    def kernel(x1: PyTree, x2: PyTree | None = None, get: Get | None = None) -> Any:
        single, fields = canonical_get(default_get if get is None else get, api)
        first = init_fn(torch.Generator().manual_seed(seeds[0]))
        batch = batch_size
        if not engine.param_vmap:
            batch = 1
        elif batch is None:
            out_numel = sum(t.numel() for t in pytree.tree_leaves(f(first, x1)))
            if x2 is not None:
                out_numel += sum(t.numel() for t in pytree.tree_leaves(f(first, x2)))
            device = pytree.tree_leaves(first)[0].device
            batch = _auto_batch(first, out_numel, parse_budget(memory_budget, device))
        batch = min(batch, n_samples)

        def one(params: PyTree) -> list[PyTree]:
            k = k_fn(x1, x2, fields, params)
            return [getattr(k, g) for g in fields]

        total: list[PyTree] | None = None
        for start in range(0, n_samples, batch):
            draws = [first if i == 0 else init_fn(torch.Generator().manual_seed(seeds[i]))
                     for i in range(start, min(start + batch, n_samples))]
            if batch == 1:
                part = one(draws[0])
            else:
                stacked = pytree.tree_map(lambda *ts: torch.stack(ts), *draws)
                summed = torch.func.vmap(one, in_dims=(0,))(stacked)
                part = pytree.tree_map(lambda t: t.sum(0), summed)
            total = part if total is None else pytree.tree_map(torch.add, total, part)
        assert total is not None
        mean = [pytree.tree_map(lambda t: t / n_samples, k) for k in total]
        if single:
            return mean[0]
        return kernel_tuple(fields)(*mean)

    kernel.__doc__ = f"Monte Carlo kernels of {getattr(f, '__name__', 'f')} over {n_samples} initialisations."
    return kernel
