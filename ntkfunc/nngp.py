"""``nngp_fn``: the empirical NNGP kernel ``f(x1) f(x2)ᵀ`` with ``ntk_fn``'s output-axis rule.

The outputs of ``f`` on the whole batches ``x1`` and ``x2`` are moved batch-first and
contracted with the same :class:`~ntkfunc._core.layout.Layout` einsum as the NTK (traced axes
summed and averaged, diagonal axes kept once, other axes paired), so ``nngp_fn`` and
``ntk_fn`` agree on every shape convention by construction.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ntkfunc._core.checks import as_axes_tuple, explained_f_errors, refuse_batch_coupled, split_vmap_axes
from ntkfunc._core.finite import NonFinite, check_kernels, check_mode
from ntkfunc._core.layout import Layout
from ntkfunc._core.pytree import broadcast_prefix, tree_flatten, tree_unflatten
from ntkfunc._core.types import ApplyFn, Axes, KernelFn, PyTree, VMapAxes


def output_layouts(out1: Sequence[torch.Tensor], out2: Sequence[torch.Tensor], out_tree: PyTree, vmap_axes: VMapAxes,
                   trace_axes: Axes, diagonal_axes: Axes, api: str = "nngp_fn") -> list[Layout]:
    """One :class:`Layout` per output leaf of ``f(x1)``/``f(x2)`` (whole batches), checked."""
    _, fx_axis = split_vmap_axes(vmap_axes, api)
    fx_axes = [None] * len(out1) if fx_axis is None else broadcast_prefix(fx_axis, out_tree, api=api)
    layouts = []
    for k, (a, b, ax) in enumerate(zip(out1, out2, fx_axes)):
        if a.ndim != b.ndim:
            raise ValueError(f"{api}: f(x1) and f(x2) have different ndims {a.ndim} and {b.ndim} (output leaf {k}); expected equal")
        if ax is not None and not -a.ndim <= ax < a.ndim:
            raise ValueError(
                f"{api}(vmap_axes={vmap_axes!r}): output leaf {k} of shape {tuple(a.shape)} has no batch axis {ax}; "
                "expected f to keep the batch axis of its input"
            )
        lay = Layout.make(a.ndim, None if ax is None else ax % a.ndim, trace_axes, diagonal_axes, api)
        for i in lay.trace + lay.diagonal:
            if a.shape[i] != b.shape[i]:
                raise ValueError(
                    f"{api}: f(x1) has shape {tuple(a.shape)} and f(x2) has shape {tuple(b.shape)} (output leaf {k}): "
                    f"traced and diagonal axes must match, axis {i} differs ({a.shape[i]} vs {b.shape[i]})"
                )
        layouts.append(lay)
    return layouts


def nngp_from_outputs(out1: PyTree, out2: PyTree | None, vmap_axes: VMapAxes, trace_axes: Axes,
                      diagonal_axes: Axes, api: str = "nngp_fn", nonfinite: NonFinite = "ignore") -> PyTree:
    """The NNGP kernel of already computed outputs (``out2=None``: ``out1`` against itself), checked per ``nonfinite``."""
    leaves1, spec = tree_flatten(out1)
    leaves2 = leaves1 if out2 is None else tree_flatten(out2)[0]
    if out2 is not None and tree_flatten(out2)[1] != spec:
        raise ValueError(f"{api}: f(x1) and f(x2) have different structures {spec} and {tree_flatten(out2)[1]}")
    layouts = output_layouts(leaves1, leaves2, out1, vmap_axes, trace_axes, diagonal_axes, api)
    kernels = []
    for a, b, lay in zip(leaves1, leaves2, layouts):
        order = lay.order()
        k = lay.contract(a.permute(order), b.permute(order), 0)
        kernels.append(k / lay.trace_size(a.shape))
    check_kernels(kernels, layouts, nonfinite, api, label="NNGP", stacklevel=3)
    return tree_unflatten(kernels, spec)


def nngp_fn(f: ApplyFn, trace_axes: Axes = (-1,), diagonal_axes: Axes = (), vmap_axes: VMapAxes = 0, *,
            nonfinite: NonFinite = "raise") -> KernelFn:
    """Returns ``nngp(x1, x2, params)``, the empirical NNGP kernel ``f(params, x1) f(params, x2)ᵀ``.

    Same output-axis semantics as :func:`ntkfunc.ntk_fn` (and ``neural_tangents.empirical_nngp_fn``):
    for each output axis, nothing if traced (the trace is *averaged*), one axis if diagonal,
    two ``(d1, d2)`` otherwise; the batch axis (``vmap_axes``) is one of the output axes.
    ``x2=None`` means ``x2 = x1``. Pytree outputs give the same pytree of kernels. ``f`` is run
    once per batch on the whole batch. The result is differentiable in ``x1``, ``x2``, ``params``.
    ``nonfinite``: as :func:`ntkfunc.ntk_fn` (default ``"raise"``: NaN or infinite entries raise a
    ``FloatingPointError`` naming their samples).

    Shapes: ``f(params, x): (N, O)`` gives ``(N1, N2)`` with ``trace_axes=(-1,)`` and
    ``(N1, N2, O, O)`` with ``trace_axes=()``.

    Example:
      >>> import torch, ntkfunc
      >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
      >>> f, params = ntkfunc.from_module(model)
      >>> x1, x2 = torch.randn(5, 4), torch.randn(2, 4)
      >>> k = ntkfunc.nngp_fn(f)(x1, x2, params)
      >>> k.shape
      torch.Size([5, 2])
      >>> torch.allclose(k, f(params, x1) @ f(params, x2).T / 3)
      True
      >>> ntkfunc.nngp_fn(f, trace_axes=(), diagonal_axes=(0,))(x1, None, params).shape
      torch.Size([5, 3, 3])
    """
    trace_axes, diagonal_axes = as_axes_tuple(trace_axes), as_axes_tuple(diagonal_axes)
    split_vmap_axes(vmap_axes, "nngp_fn")
    check_mode(nonfinite, "nngp_fn")
    refuse_batch_coupled(f, vmap_axes, "nngp_fn")

    def nngp(x1: PyTree, x2: PyTree | None, params: PyTree) -> PyTree:
        with explained_f_errors("nngp_fn", params, {"x1": x1, "x2": x2}, vmap_axes):
            out1 = f(params, x1)
            out2 = None if x2 is None else f(params, x2)
        return nngp_from_outputs(out1, out2, vmap_axes, trace_axes, diagonal_axes, nonfinite=nonfinite)

    nngp.__doc__ = f"Empirical NNGP of {getattr(f, '__name__', 'f')}: nngp(x1, x2, params)."
    return nngp
