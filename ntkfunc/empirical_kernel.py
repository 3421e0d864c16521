"""``kernel_fn``: NTK and / or NNGP of ``f`` in one call, as ``neural_tangents.empirical_kernel_fn``."""

from __future__ import annotations

import collections
import functools
from typing import Any, Union

from ntkfunc._core.checks import as_axes_tuple, explained_f_errors, refuse_batch_coupled, split_vmap_axes
from ntkfunc._core.finite import NonFinite, check_kernels, check_mode
from ntkfunc._core.ops import kernel_context
from ntkfunc._core.problem import make_problem
from ntkfunc._core.types import ApplyFn, Axes, MemoryBudget, PyTree, VMapAxes
from ntkfunc._engines import Implementation, compute, get_engine, refuse_param_vmap
from ntkfunc.nngp import nngp_from_outputs

KINDS = ("ntk", "nngp")

Get = Union[str, tuple[str, ...], list[str]]


@functools.cache
def kernel_tuple(fields: tuple[str, ...]) -> type:
    """The namedtuple type ``Kernel`` with ``fields`` in that order (one type per order)."""
    return collections.namedtuple("Kernel", fields)


def canonical_get(get: Any, caller: str = "kernel_fn") -> tuple[bool, tuple[str, ...]]:
    """``(is_single, fields)``: ``get`` checked against ``{"ntk", "nngp"}``."""
    if isinstance(get, str):
        single, fields = True, (get,)
    elif isinstance(get, (tuple, list)) and get and all(isinstance(g, str) for g in get):
        single, fields = False, tuple(get)
    else:
        raise ValueError(f"{caller}: get={get!r}; expected 'ntk', 'nngp' or a non-empty tuple of them")
    bad = [g for g in fields if g not in KINDS]
    if bad:
        raise ValueError(f"{caller}: get={get!r} contains {bad[0]!r}; expected 'ntk', 'nngp' or a tuple of them")
    if len(set(fields)) != len(fields):
        raise ValueError(f"{caller}: get={get!r} repeats a kernel; expected each of 'ntk', 'nngp' at most once")
    return single, fields


def kernel_fn(
    f: ApplyFn,
    trace_axes: Axes = (-1,),
    diagonal_axes: Axes = (),
    vmap_axes: VMapAxes = 0,
    implementation: int | str | Implementation = Implementation.AUTO,
    *,
    memory_budget: MemoryBudget = None,
    nonfinite: NonFinite = "raise",
) -> Any:
    """Returns ``k(x1, x2, get, params)``: the empirical NTK and / or NNGP of ``f``.

    ``get`` is ``"ntk"`` or ``"nngp"`` (the kernel itself is returned), or a tuple of them
    (a namedtuple ``Kernel`` with those fields, in that order). The arguments are those of
    :func:`ntkfunc.ntk_fn` (``implementation="auto"`` by default, where neural-tangents uses 1)
    and :func:`ntkfunc.nngp_fn`, and so are the shapes. The op context
    is entered once for both kernels; the NNGP
    costs one forward pass per input batch, the NTK is computed by ``implementation`` (its
    Jacobian pass runs its own forward). Both are differentiable in ``x1``, ``x2``, ``params``.
    ``nonfinite`` checks both kernels as in :func:`ntkfunc.ntk_fn` (default ``"raise"``).

    Example:
      >>> import torch, ntkfunc
      >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
      >>> f, params = ntkfunc.from_module(model)
      >>> x1, x2 = torch.randn(5, 4), torch.randn(2, 4)
      >>> k = ntkfunc.kernel_fn(f, trace_axes=())(x1, x2, ("nngp", "ntk"), params)
      >>> k.nngp.shape, k.ntk.shape
      (torch.Size([5, 2, 3, 3]), torch.Size([5, 2, 3, 3]))
      >>> ntkfunc.kernel_fn(f)(x1, None, "ntk", params).shape
      torch.Size([5, 5])
    """
    api = "kernel_fn"
    engine = get_engine(implementation, api=api)
    trace_axes, diagonal_axes = as_axes_tuple(trace_axes), as_axes_tuple(diagonal_axes)
    split_vmap_axes(vmap_axes, api)
    check_mode(nonfinite, api)
    refuse_batch_coupled(f, vmap_axes, api)

    def k(x1: PyTree, x2: PyTree | None, get: Get, params: PyTree) -> Any:
        single, fields = canonical_get(get, api)
        out: dict[str, PyTree] = {}
        with kernel_context(x1, x2, params), explained_f_errors(api, params, {"x1": x1, "x2": x2}, vmap_axes):
            if "ntk" in fields:
                refuse_param_vmap(engine, params, api)
                problem = make_problem(f, x1, x2, params, vmap_axes, trace_axes, diagonal_axes, api=api)
                out["ntk"] = compute(problem, engine, memory_budget)
                check_kernels(out["ntk"], problem.layouts, nonfinite, api, label="NTK")
            if "nngp" in fields:
                fx1 = f(params, x1)
                fx2 = None if x2 is None else f(params, x2)
                out["nngp"] = nngp_from_outputs(fx1, fx2, vmap_axes, trace_axes, diagonal_axes, api, nonfinite)
        if single:
            return out[fields[0]]
        return kernel_tuple(fields)(*(out[g] for g in fields))

    name = engine.name if engine.implementation == Implementation.AUTO else int(engine.implementation)
    k.__doc__ = f"Empirical kernels of {getattr(f, '__name__', 'f')} (implementation {name}): k(x1, x2, get, params)."
    return k
