"""Any ``f`` as the rows' domain (one output tensor, batch axis first), and its rows cut back into ``f``'s outputs.

The row sources want one output tensor with the batch axis first. A function with several
output leaves, or a batch axis elsewhere, is wrapped as
``f_cat(params, x) = cat([leaf moved to batch-first, flattened])`` (:func:`concatenated`), whose
rows are split back into the leaves (:func:`split`): leaf ``(N, *out_leaf)`` gets
``(N, *out_leaf, width)`` (batch first, the leaf's other axes in order), the batch-first layout
:meth:`~ntkfunc._core.layout.Layout.contract` takes. With ``vmap_axes=None`` the whole batch is
one unit and leaf ``out`` gets ``(*out, width)``. Used by the sketched features
(:mod:`ntkfunc._engines.sketch.features`) and by ``jacobian_fn`` (:mod:`.per_sample`).

Example:
  >>> import torch
  >>> from ntkfunc._core.problem import make_problem
  >>> f = lambda p, x: {"a": x @ p, "b": (x @ p).sum(1, keepdim=True).T}   # "b" has its batch axis last
  >>> p0 = make_problem(f, torch.randn(5, 3), None, torch.randn(3, 2), (0, {"a": 0, "b": 1}, {}), (), ())
  >>> direct(p0)
  False
  >>> rp = rows_problem(p0, torch.randn(5, 3), torch.randn(3, 2), (0, {"a": 0, "b": 1}, {}), None, None)
  >>> rp.sample_out_shapes(1)                        # 2 + 1 outputs per sample, concatenated
  [(3,)]
  >>> [t.shape for t in split(torch.zeros(5, 3, 7), p0, rp)]
  [torch.Size([5, 2, 7]), torch.Size([5, 1, 7])]
"""

from __future__ import annotations

import math

import torch

from ntkfunc._core.cache import KernelCache
from ntkfunc._core.checks import split_vmap_axes
from ntkfunc._core.problem import Problem, make_problem
from ntkfunc._core.pytree import tree_flatten
from ntkfunc._core.types import ApplyFn, PyTree, VMapAxes


def direct(p0: Problem) -> bool:
    """``f`` itself is in the rows' domain: one output tensor, batch axis first (or none: ``vmap_axes=None``)."""
    return len(p0.layouts) == 1 and (p0.fx_axes is None or p0.fx_axes == [0])


def concatenated(f: ApplyFn, fx_axes: list[int] | None) -> ApplyFn:
    """``f`` with its output leaves moved batch-first, flattened and concatenated: ``(N, Σ numel)`` (or ``(Σ numel,)``)."""

    def f_cat(params: PyTree, x: PyTree) -> torch.Tensor:
        leaves, _ = tree_flatten(f(params, x))
        if fx_axes is None:
            return torch.cat([leaf.reshape(-1) for leaf in leaves])
        parts = [leaf.movedim(a, 0) for leaf, a in zip(leaves, fx_axes)]
        return torch.cat([p.reshape(p.shape[0], -1) for p in parts], dim=1)

    f_cat.__qualname__ = f"{getattr(f, '__qualname__', 'f')}[concatenated outputs]"
    return f_cat


def rows_problem(p0: Problem, x: PyTree, params: PyTree, vmap_axes: VMapAxes, cache: KernelCache | None,
                 cat_cache: KernelCache | None) -> Problem:
    """The full (nothing traced) problem of ``x`` whose rows are ``p0``'s outputs': ``p0``'s own ``f`` if
    :func:`direct` (probed once per input signature in ``cache``), else :func:`concatenated`'s (in ``cat_cache``)."""
    if direct(p0):
        return make_problem(p0.f, x, None, params, vmap_axes, (), (), cache, api=p0.api)
    x_axis, _ = split_vmap_axes(vmap_axes, p0.api)
    axes = None if p0.fx_axes is None else list(p0.fx_axes)
    vm: VMapAxes = None if axes is None else (x_axis, 0, {})
    return make_problem(concatenated(p0.f, axes), x, None, params, vm, (), (), cat_cache, api=p0.api)


def split(out: torch.Tensor, p0: Problem, rp: Problem) -> list[torch.Tensor]:
    """Rows of ``rp`` (possibly the concatenated outputs) cut into ``p0``'s output leaves, batch first (views)."""
    width = out.shape[-1]
    if direct(p0):
        return [out]
    shapes = p0.sample_out_shapes(1) if p0.vmapped else p0.out_shapes1
    sizes = [math.prod(s) for s in shapes]
    if p0.vmapped:
        flat = out.reshape(out.shape[0], -1, width)
        return [part.reshape(out.shape[0], *s, width) for part, s in zip(flat.split(sizes, dim=1), shapes)]
    flat = out.reshape(-1, width)
    return [part.reshape(*s, width) for part, s in zip(flat.split(sizes, dim=0), shapes)]
