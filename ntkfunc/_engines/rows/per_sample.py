"""Per-sample Jacobians of any ``f``: the rows of every parameter, cut into ``f``'s outputs (what ``jacobian_fn`` returns).

Three paths, one result (``(N, *out_leaf, P)`` per output leaf, parameters in the documented
row order of :mod:`.source`; ``(*out_leaf, P)`` with ``vmap_axes=None``):

- **rows** (nothing will differentiate the result): the row engine of the implementation, in
  chunks of :func:`~.source.chunk_size` samples into one buffer (as many as the budget allows, not
  capped at ``kernel_matrix``'s :data:`~.source.CHUNK`: every pass has a fixed cost): :class:`~.structured.StructuredRows`
  (every parameter in a slot: gradients formed by the rules from one batched pass) for
  implementations 3 and ``"auto"``, except that ``"auto"`` takes :class:`~.jacobian.JacobianRows`
  (``vmap(jacrev)``, implementation 1) where implementation 1's whole work costs less than the
  capture's probe (:func:`~ntkfunc._engines.structured.routes.unprobed`: small models on few samples);
  implementation 1: :class:`~.jacobian.JacobianRows`;
- **differentiable** (an input or parameter requires grad, or an outer ``torch.func`` transform
  wraps one, ``vmap`` over an ensemble of parameters included): ``vmap(jacrev)`` per chunk and
  ``torch.cat``, which autograd and ``torch.func`` differentiate (the row buffers are written in
  place, which they cannot);
- **whole batch** (``vmap_axes=None``): ``jacrev`` of ``f`` on the batch as one unit.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.func import jacrev

from ntkfunc._core.cache import KernelCache
from ntkfunc._core.ops import needs_higher_order
from ntkfunc._core.problem import Problem
from ntkfunc._core.types import PyTree, VMapAxes
from ntkfunc._engines.rows import outputs
from ntkfunc._engines.rows.jacobian import JacobianRows
from ntkfunc._engines.rows.source import RowSource, block_size, chunk_size, chunks
from ntkfunc._engines.rows.structured import StructuredRows
from ntkfunc._engines.structured import kernel as structured
from ntkfunc._engines.structured import routes

_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def source(rp: Problem, captures: bool, auto: bool) -> RowSource:
    """The row source of every parameter for ``rp`` (see the module docstring); auto's choice is made once per
    input signature and number of samples, and so are the rules' measured ways (``Buffers.seconds``): a kernel
    function called again with the same shapes takes the faster ways from its first calls."""
    if not captures:
        return JacobianRows(rp)
    if auto and rp.remember("rows_unprobed", lambda: routes.unprobed(None, structured.implementation1_price(rp)) is not None, rp.n1):
        return JacobianRows(rp)
    src = StructuredRows(rp, routes="rows")
    # the ways measured faster (per layer shape, per chunk size) carry over to the next call with these shapes
    src.buffers.seconds = rp.remember("rows_seconds", dict, rp.n1)
    return src


def jacobians(p0: Problem, x: PyTree, params: PyTree, vmap_axes: VMapAxes, budget: float, *, captures: bool, auto: bool,
              cache: KernelCache | None = None, cat_cache: KernelCache | None = None) -> list[torch.Tensor]:
    """Per output leaf of ``p0`` (the checked problem of ``f`` on ``x``): its per-sample Jacobians, ``(N, *out_leaf, P)``.

    ``budget``: bytes the gradient passes may hold on top of the result; ``captures``/``auto``: the
    engine's (see :func:`source`); ``cache``/``cat_cache``: the caller's caches of ``f`` and of its
    concatenated outputs (:func:`~.outputs.rows_problem`).
    """
    rp = outputs.rows_problem(p0, x, params, vmap_axes, cache, cat_cache)
    wrapped = any(_is_wrapped(t) for t in torch.utils._pytree.tree_leaves((x, params)) if isinstance(t, torch.Tensor))
    if not rp.vmapped:
        rows = whole_batch(rp)
    elif wrapped or needs_higher_order(x, params):  # the row buffers are written in place: neither transforms nor autograd see through them
        rows = differentiable(rp, budget)
    else:
        src = source(rp, captures, auto)
        rows = torch.empty((rp.n1, *src.out_shape, src.slots.width), dtype=rp.out_dtype, device=rp.device)
        sample = rp.remember("rows_sample_bytes", src.sample_bytes, type(src).__name__)  # per sample: shapes alone
        src.compute(rp.x1_leaves, rows, chunk_size(budget, sample, cap=rp.n1))
    return outputs.split(rows, p0, rp)


def differentiable(rp: Problem, budget: float) -> torch.Tensor:
    """``(N, *out, P)`` by ``vmap(jacrev)`` per chunk and ``torch.cat``: differentiable in ``x`` and the parameters."""
    src = JacobianRows(rp)
    axes: list[Any] = rp.x_axes or []
    n = block_size(rp.x1_leaves, axes)
    leaves = rp.params.diff_leaves
    parts = []
    for s, e, xc in chunks(rp.x1_leaves, axes, n, chunk_size(budget, src.sample_bytes(), cap=n)):
        jac = src.fn(leaves, xc)[0]
        parts.append(torch.cat([j.reshape(e - s, *src.out_shape, -1) for j in jac], -1))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def whole_batch(rp: Problem) -> torch.Tensor:
    """``(*out, P)``: the Jacobian of ``f`` on the whole batch as one unit (``vmap_axes=None``)."""
    out_shape = rp.out_shapes1[0]
    jac = jacrev(rp.batch_fn(), argnums=0)(rp.params.diff_leaves, rp.x1_leaves)[0]
    return torch.cat([j.reshape(*out_shape, -1) for j in jac], -1)

