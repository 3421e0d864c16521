"""``pntk_fn``: the "sum of logits" pseudo-NTK (pNTK), an ``(N1, N2)`` eNTK approximation.

For ``f`` with ``O`` output components per sample (all non-batch entries of all output
leaves), the pNTK is the eNTK of the scalar function ``g(x) = Σ_o f_o(x) / √O``::

    pNTK(x1, x2) = ∇g(x1) ∇g(x2)ᵀ = (1/O) Σ_{o,o'} Θ_{oo'}(x1, x2)

It costs one output instead of ``O``: one VJP per sample (implementation 1's path), against
``O`` for the full eNTK. Mohamadi, Bae & Sutherland (2023, "A fast, well-founded
approximation to the empirical neural tangent kernel") prove that at standard
initialisation ``pNTK ⊗ I_O`` converges to the full eNTK as the width ``n`` grows, with
error ``O(n^{-1/2})``: at initialisation the off-diagonal blocks ``Θ_{oo'}`` (o ≠ o')
average out and the diagonal ones agree. Far from initialisation (after much
training), with narrow layers, or when the readout layer is not freshly initialised
(e.g. tied or pre-trained heads) the approximation can be poor: measure it on a
subset with ``ntk_fn(f, trace_axes=())`` (see ``examples/pntk_vs_width.py``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.utils import _pytree as pytree

from ntkfunc._core.checks import BATCH_COUPLED_ATTR, split_vmap_axes
from ntkfunc._core.finite import NonFinite, check_mode
from ntkfunc._core.pytree import broadcast_prefix
from ntkfunc._core.types import ApplyFn, KernelFn, MemoryBudget, PyTree, VMapAxes
from ntkfunc._engines import Implementation, get_engine
from ntkfunc.ntk import ntk_fn


def sum_of_logits(f: ApplyFn, fx_axis: Any, *, api: str = "pntk_fn", keepdim: bool = False) -> ApplyFn:
    """``g(params, x) = Σ_o f_o(params, x) / √O`` of shape ``(N,)`` (``(N, 1)`` with ``keepdim``).

    ``O`` counts every non-batch entry of every output leaf; ``fx_axis`` is the output batch
    axis (a pytree prefix of the output, or None for axis 0).
    """

    def g(params: PyTree, x: PyTree) -> torch.Tensor:
        out = f(params, x)
        leaves = pytree.tree_leaves(out)
        axes = [0] * len(leaves) if fx_axis is None else broadcast_prefix(fx_axis, out, api=api)
        sums, count = [], 0
        for k, (o, a) in enumerate(zip(leaves, axes)):
            if not isinstance(o, torch.Tensor) or o.ndim == 0 or a is None:
                raise ValueError(
                    f"{api}: output leaf {k} of f is {getattr(o, 'shape', type(o).__name__)}; expected a tensor "
                    "with a batch axis (given by vmap_axes, axis 0 when vmap_axes=None)"
                )
            o = o.movedim(a, 0)
            count += math.prod(o.shape[1:])
            sums.append(o.reshape(o.shape[0], -1).sum(1))
        total = sum(sums[1:], sums[0]) / math.sqrt(count)
        return total.unsqueeze(-1) if keepdim else total

    g.__name__ = f"sum_of_logits_{getattr(f, '__name__', 'f')}"
    batch_coupled = getattr(f, BATCH_COUPLED_ATTR, None)
    if batch_coupled:
        setattr(g, BATCH_COUPLED_ATTR, batch_coupled)
    return g


def pntk_fn(
    f: ApplyFn,
    vmap_axes: VMapAxes = 0,
    implementation: int | str | Implementation = Implementation.AUTO,
    *,
    memory_budget: MemoryBudget = None,
    nonfinite: NonFinite = "raise",
) -> KernelFn:
    """Returns ``kernel(x1, x2, params)``: the ``(N1, N2)`` sum-of-logits pNTK of ``f``.

    ``kernel(x1, x2, params)[i, j] = (1/O) Σ_{o,o'} Θ_{oo'}(x1[i], x2[j])``, with ``O`` the
    number of output components of one sample (every non-batch entry of every output
    leaf) and ``Θ`` the full eNTK (``ntk_fn(f, trace_axes=())``). Computed as the exact eNTK
    of ``g(x) = Σ_o f_o(x) / √O`` by ``ntk_fn``, so one VJP per sample instead of ``O``.
    See the module docstring for when it approximates ``Θ`` (as ``pNTK ⊗ I_O``) well.

    Args:
      f: ``f(params, x)`` as for :func:`ntkfunc.ntk_fn`.
      vmap_axes: as for ``ntk_fn``; its output axis (or axis 0 when ``None``) is the batch axis.
      implementation, memory_budget, nonfinite: passed to ``ntk_fn`` (``implementation="auto"`` by
        default; ``nonfinite="raise"``: a ``FloatingPointError`` naming the samples of NaN or infinite entries).

    Example:
      >>> import torch, ntkfunc
      >>> model = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10))
      >>> f, params = ntkfunc.from_module(model)
      >>> x1, x2 = torch.randn(6, 4), torch.randn(3, 4)
      >>> k = ntkfunc.pntk_fn(f)(x1, x2, params)
      >>> k.shape
      torch.Size([6, 3])
      >>> full = ntkfunc.ntk_fn(f, trace_axes=())(x1, x2, params)  # (6, 3, 10, 10)
      >>> bool(torch.allclose(k, full.sum((2, 3)) / 10, atol=1e-5))
      True
    """
    engine = get_engine(implementation, api="pntk_fn")
    x_axis, fx_axis = split_vmap_axes(vmap_axes, "pntk_fn")
    axes: VMapAxes = None if vmap_axes is None else (x_axis, 0, {})
    g = sum_of_logits(f, fx_axis)
    return ntk_fn(g, trace_axes=(), vmap_axes=axes, implementation=engine.implementation, memory_budget=memory_budget,
                  nonfinite=check_mode(nonfinite, "pntk_fn"))
