"""Per-sample Jacobians of any ``f``: the rows of every parameter, cut into ``f``'s outputs (what ``jacobian_fn`` returns).

Three paths, one result (``(N, *out_leaf, P)`` per output leaf, parameters in the documented
row order of :mod:`.source`; ``(*out_leaf, P)`` with ``vmap_axes=None``):

- **rows** (nothing will differentiate the result): the row engine of the implementation, in
  chunks of :func:`~.source.chunk_size` samples into one buffer (as many as the budget allows, not
  capped at ``kernel_matrix``'s :data:`~.source.CHUNK`: every pass has a fixed cost): :class:`~.structured.StructuredRows`
  (every parameter in a slot: gradients formed by the rules from one batched pass) for
  implementations 3 and ``"auto"``, except that ``"auto"`` takes :class:`~.jacobian.JacobianRows`
  (``vmap(jacrev)``, implementation 1) where implementation 1's whole work costs less than the
  capture's probe (:func:`~ntkfunc._engines.structured.routes.unprobed`: small models on few samples), or
  where an earlier call with these shapes measured ``vmap(jacrev)`` faster on the whole batch as one chunk
  (:meth:`~.structured.StructuredRows.measured_way`: the rules' set-up is then skipped too);
  implementation 1: :class:`~.jacobian.JacobianRows`. Where ``vmap(jacrev)`` is the way taken on a
  batch of one chunk and the caller wants a pytree (not ``flat``), its per-parameter results are the
  result (no copy into the buffer); the rules' work buffers are lent to the next call with the same
  shapes (:func:`borrow_buffers`);
- **differentiable** (an input or parameter requires grad, or an outer ``torch.func`` transform
  wraps one, ``vmap`` over an ensemble of parameters included): ``vmap(jacrev)`` per chunk and
  ``torch.cat``, which autograd and ``torch.func`` differentiate (the row buffers are written in
  place, which they cannot);
- **whole batch** (``vmap_axes=None``): ``jacrev`` of ``f`` on the batch as one unit.

The rows path can also fill a buffer the caller gives (``out``, :func:`check_out`) instead of a new one: a
new result of ``N O P`` numbers above glibc's mmap threshold (32 MiB, :mod:`ntkfunc._core.heap`) is a fresh
``mmap`` whose every page the kernel faults in and zeroes on first touch, which on a wide model costs more
than the gradients themselves (RESULTS.md section 15).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch.func import jacrev

from ntkfunc._core.buffers import Buffers
from ntkfunc._core.cache import KernelCache
from ntkfunc._core.memory import planned_budget
from ntkfunc._core.ops import keeps_graph, transform_friendly_attention
from ntkfunc._core.problem import Problem
from ntkfunc._core.types import MemoryBudget, PyTree, VMapAxes
from ntkfunc._engines.rows import outputs
from ntkfunc._engines.rows.jacobian import JacobianRows
from ntkfunc._engines.rows.source import SampleBytes, Slots, block_size, chunk_size, chunks
from ntkfunc._engines.rows.structured import VMAP, StructuredRows
from ntkfunc._engines.structured import kernel as structured
from ntkfunc._engines.structured import routes


def source(rp: Problem, captures: bool, auto: bool) -> JacobianRows | StructuredRows:
    """The row source of every parameter for ``rp`` (see the module docstring); auto's choice is made once per
    input signature and number of samples, and so are the rules' measured ways (``Buffers.seconds``): a kernel
    function called again with the same shapes takes the faster ways from its first calls."""
    if not captures:
        return JacobianRows(rp)
    if auto and rp.remember("rows_unprobed", lambda: routes.unprobed(None, structured.implementation1_price(rp)) is not None, rp.n1):
        return JacobianRows(rp)
    # the ways measured faster (per layer shape, per chunk size) carry over to the next call with these shapes
    seconds: dict[Any, dict[str, float]] = rp.remember("rows_seconds", dict, rp.n1)
    if auto and StructuredRows.measured_way(seconds, rp.n1) == VMAP:
        return JacobianRows(rp)  # the whole batch in one chunk was measured faster by vmap(jacrev): the rules' set-up is skipped
    src = StructuredRows(rp, routes="rows")
    src.buffers = borrow_buffers(rp)
    src.buffers.seconds = seconds
    return src


def _buffers_key(rp: Problem) -> tuple:
    return ("rows_buffers", rp.signature, rp.n1)


def borrow_buffers(rp: Problem) -> Buffers:
    """The rules' work buffers (im2col patches, products) left by the last call with ``rp``'s input signature, taken
    out of the kernel function's cache for this call (a call running at the same time gets fresh ones), or new ones.

    Kept from call to call (:func:`return_buffers`) because allocating them again costs page faults and copies
    into cold memory (about 5 % of a small CNN's call, RESULTS.md section 14); their size is the rules' work
    memory, which the budget's transient share bounds.
    """
    if rp.cache is None or rp.signature is None:
        return Buffers()
    return rp.cache.derived.pop(_buffers_key(rp), None) or Buffers()


def return_buffers(rp: Problem, src: JacobianRows | StructuredRows) -> None:
    """Hand the work buffers of ``src`` back to the kernel function's cache for the next call with these shapes."""
    if isinstance(src, StructuredRows) and rp.cache is not None and rp.signature is not None:
        rp.cache.derived[_buffers_key(rp)] = src.buffers


@dataclasses.dataclass(frozen=True)
class Jacobians:
    """One output leaf's per-sample Jacobians: per differentiated parameter ``(N, *out_leaf, numel)`` (``pieces``),
    and the same numbers as one ``(N, *out_leaf, P)`` tensor where they were formed so (``rows``; the pieces are
    its views)."""

    pieces: list[torch.Tensor]
    rows: torch.Tensor | None = None

    def flat(self) -> torch.Tensor:
        """``(N, *out_leaf, P)``: the parameters side by side (a copy only where they were formed apart)."""
        return self.rows if self.rows is not None else torch.cat(self.pieces, -1)


def jacobians(p0: Problem, x: PyTree, params: PyTree, vmap_axes: VMapAxes, memory_budget: MemoryBudget, *, captures: bool,
              auto: bool, flat: bool = True, cache: KernelCache | None = None, cat_cache: KernelCache | None = None,
              differentiable: bool | None = None, out: torch.Tensor | None = None) -> list[Jacobians]:
    """Per output leaf of ``p0`` (the checked problem of ``f`` on ``x``, nothing traced): its per-sample Jacobians.

    ``memory_budget``: what the gradient passes may hold on top of the result, as the user gave it
    (:func:`~ntkfunc._core.memory.planned_budget`: the default is not read where the whole batch fits
    any budget); ``captures``/``auto``: the engine's (see :func:`source`); ``flat``: the caller wants
    one tensor (a row buffer is filled directly); otherwise, where ``vmap(jacrev)`` is the way taken on
    the whole batch, its per-parameter results are kept as they are (no copy into a row buffer);
    ``cache``/``cat_cache``: the caller's caches of ``f`` and of its concatenated outputs
    (:func:`~.outputs.rows_problem`); ``differentiable``: whether the result may be differentiated (a
    leaf of ``x`` or ``params`` requires grad or is wrapped by a ``torch.func`` transform), where the
    caller has found it already; ``out``: a tensor ``(N, *out, P)`` the rows are written into (see
    :func:`check_out`), whose views the result then holds.
    """
    full = not any(lay.trace or lay.diagonal for lay in p0.layouts) and p0.x2_leaves is None
    rp = p0 if full and outputs.direct(p0) else outputs.rows_problem(p0, x, params, vmap_axes, cache, cat_cache)
    if differentiable is None:
        tensors = [t for t in torch.utils._pytree.tree_leaves((x, params)) if isinstance(t, torch.Tensor)]
        differentiable = keeps_graph(tensors)
    if out is not None:
        check_out(out, p0, rp, (x, params), differentiable)
    with transform_friendly_attention(rp.attention):  # the routing changes nothing for an f that calls no attention
        if not rp.vmapped:
            return _cut(whole_batch(rp), p0, rp)
        if differentiable:  # the row buffers are written in place: neither transforms nor autograd see through them
            return _cut(_differentiable(rp, memory_budget), p0, rp)
        src = source(rp, captures, auto)
    # the rules' passes each enter the routing: once around them all (one setting of the flags, not one a pass)
    with transform_friendly_attention(rp.attention or isinstance(src, StructuredRows)):
        return _rows(p0, rp, src, memory_budget, flat, out)


def out_shape_of(rp: Problem) -> tuple[int, ...]:
    """The shape of the rows of ``rp``'s samples: ``(N, *out, P)``, ``P`` every differentiated parameter's numel."""
    return (rp.n1, *rp.sample_out_shapes(1)[0], sum(t.numel() for t in rp.params.diff_leaves))


def check_out(out: Any, p0: Problem, rp: Problem, inputs: PyTree, differentiable: bool) -> None:
    """Refuse an ``out`` the rows cannot be written into, saying what was given and what was expected.

    It must be a tensor of the rows' shape (:func:`out_shape_of`), dtype and device, contiguous, not
    requiring grad and sharing no memory with ``inputs``; ``f`` must have one output tensor with its
    batch axis first (``vmap_axes`` not None) and the result must not be differentiable.
    """
    api = p0.api
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{api}: out must be a torch.Tensor (or None), got {type(out).__name__}")
    if not p0.vmapped:
        raise ValueError(f"{api}: out= needs per-sample Jacobians (vmap_axes not None); with vmap_axes=None the Jacobian of "
                         "the whole batch is returned as a new tensor")
    if rp is not p0:
        raise ValueError(f"{api}: out= needs f to return one tensor with its batch axis first; this f returns "
                         f"{len(p0.layouts)} output leaves with batch axes {p0.fx_axes}: call jac(x, params) without out")
    if differentiable:
        raise ValueError(f"{api}: out= cannot hold differentiable Jacobians (an input or parameter requires grad, or a "
                         "torch.func transform wraps one); call jac(x, params) without out, or detach them")
    want = out_shape_of(rp)
    if tuple(out.shape) != want or out.dtype != rp.out_dtype or out.device != rp.device:
        raise ValueError(f"{api}: out is {tuple(out.shape)} {out.dtype} on {out.device}; expected {want} {rp.out_dtype} on "
                         f"{rp.device} (N, *out, P)")
    if not out.is_contiguous():
        raise ValueError(f"{api}: out must be contiguous (strides {out.stride()}); expected a tensor like "
                         f"torch.empty({want}, dtype={rp.out_dtype})")
    if out.requires_grad:
        raise ValueError(f"{api}: out requires grad; expected a plain buffer (the Jacobians are written into it in place)")
    mine = out.untyped_storage().data_ptr()
    for t in torch.utils._pytree.tree_leaves(inputs):
        if isinstance(t, torch.Tensor) and t.device == out.device and t.untyped_storage().data_ptr() == mine:
            raise ValueError(f"{api}: out shares memory with an input or parameter of shape {tuple(t.shape)}; expected a "
                             "buffer of its own")


def _rows(p0: Problem, rp: Problem, src: JacobianRows | StructuredRows, memory_budget: MemoryBudget, flat: bool,
          out: torch.Tensor | None = None) -> list[Jacobians]:
    """The rows path of :func:`jacobians` (nothing will differentiate them), from ``src``, into ``out`` where given."""
    sample = rp.remember("rows_sample_bytes", src.sample_bytes, type(src).__name__)  # per sample: shapes alone
    budget = _planned(memory_budget, rp, sample)
    chunk = chunk_size(budget, sample, cap=rp.n1)
    if isinstance(src, StructuredRows):
        src.chunk_budget = budget  # vmap(jacrev) is tried wherever a chunk of it fits this budget too
    pieces = None
    if not flat and out is None and chunk >= rp.n1:  # one pass: vmap(jacrev)'s own results, where it is the way taken
        if isinstance(src, StructuredRows):
            src.rows_wanted = False  # both ways compared at what they cost here
        pieces = src.pieces(rp.x1_leaves) if isinstance(src, JacobianRows) else src.vmap_pieces(rp.x1_leaves, rp.n1)
    if pieces is not None:
        return_buffers(rp, src)
        per_leaf = [outputs.split(piece, p0, rp) for piece in pieces]
        return [Jacobians([leaf[j] for leaf in per_leaf]) for j in range(len(per_leaf[0]))] if per_leaf else []
    rows = torch.empty((rp.n1, *src.out_shape, src.slots.width), dtype=rp.out_dtype, device=rp.device) if out is None else out
    src.compute(rp.x1_leaves, rows, chunk)
    return_buffers(rp, src)
    return _cut(rows, p0, rp, src.slots)


def _cut(rows: torch.Tensor, p0: Problem, rp: Problem, slots: Slots | None = None) -> list[Jacobians]:
    """Rows ``(N, *out, P)`` of ``rp`` as :class:`Jacobians` of ``p0``'s output leaves (views)."""
    slots = slots or Slots.of(rp, range(len(rp.params.diff_leaves)))
    return [Jacobians([r[..., slots.slot(k)] for k in slots.leaves], r) for r in outputs.split(rows, p0, rp)]


def _planned(memory_budget: MemoryBudget, rp: Problem, sample: SampleBytes) -> float:
    """The bytes the gradient passes of ``rp``'s samples may hold (the default budget is read only where the whole
    batch in one pass might not fit: :func:`~ntkfunc._core.memory.planned_budget`)."""
    return planned_budget(memory_budget, rp.device, enough=lambda b: chunk_size(b, sample, cap=rp.n1) >= rp.n1)


def _differentiable(rp: Problem, memory_budget: MemoryBudget) -> torch.Tensor:
    """``(N, *out, P)`` by ``vmap(jacrev)`` per chunk and ``torch.cat``: differentiable in ``x`` and the parameters."""
    src = JacobianRows(rp)
    axes: list[Any] = rp.x_axes or []
    n = block_size(rp.x1_leaves, axes)
    leaves = rp.params.diff_leaves
    parts = []
    sample = src.sample_bytes()
    for s, e, xc in chunks(rp.x1_leaves, axes, n, chunk_size(_planned(memory_budget, rp, sample), sample, cap=n)):
        jac = src.fn(leaves, xc)
        parts.append(torch.cat([j.reshape(e - s, *src.out_shape, -1) for j in jac], -1))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def whole_batch(rp: Problem) -> torch.Tensor:
    """``(*out, P)``: the Jacobian of ``f`` on the whole batch as one unit (``vmap_axes=None``)."""
    out_shape = rp.out_shapes1[0]
    jac = jacrev(rp.batch_fn(), argnums=0)(rp.params.diff_leaves, rp.x1_leaves)[0]
    return torch.cat([j.reshape(*out_shape, -1) for j in jac], -1)

