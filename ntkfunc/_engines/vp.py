"""Implementation 2: NTK-vector products, ``Θ(x1, x2) v = J(x1) (J(x2)ᵀ v)``.

For a block of x2 samples, VJPs at ``x2`` turn every output cotangent (the columns of the
identity, one per output component of x2) into parameter cotangents ``J(x2)ᵀ e``; these
are pushed forward as tangents, all at once, through one JVP of ``f`` on a block of x1
samples: ``vmap`` over the tangents (outside) of ``vmap`` over the x1 samples (inside) of
``jvp``. In that order the parameter tangents are batched over the tangent axis only, so
the batching rules contract them with the whole x1 block (one matmul or convolution per
layer) instead of copying them for every x1 sample, and ``f`` still receives one sample
at a time (its batch axis of size 1), as in every implementation. The parameter axis is
never contracted explicitly, which is why this wins for models whose parameters are
reused across many positions when N is small. Cost ``N1 N2 O [FP]``.

With ``x2=None`` the kernel is symmetric: x2 is split into column blocks and each block's
tangents are pushed through the x1 rows up to that block only (the tiles below the
diagonal are mirrored), which saves up to half of the JVPs. On CPU the blocks' width is
priced (:func:`column_width`): narrow blocks push fewer pairs in more JVP calls, each with a
fixed cost (:data:`PUSH_CALL_FLOPS`) set against the FLOPs of one pair (:func:`pair_flops`).

Memory, planned by :func:`plan` with the terms of :mod:`ntkfunc._core.memory`: a column
block's cotangents (``b2 x O x P``, split into parameter groups with one JVP pass each if
one sample's do not fit) and, while they are pushed, the activation tangents of
``rows x chunk`` (x1 sample, tangent) pairs, held to :data:`WORKING_SET` so that they stay
in cache (on CPU this is 2-3x faster than pushing all tangents through all rows at once).
The shape of those calls is planned per column block (:func:`push_shape`), in equal parts
(:func:`balanced`): each call has a fixed cost (the primal forward, the ops' dispatch through
``vmap`` and forward mode), so a short column fills its calls rather than copying the full block's.
The cotangents are formed for as many x2 samples per ``vmap(jacrev)`` call as the budget holds
(``Plan.cotangents``, several column blocks: the triangle's narrow columns would otherwise pay that
call's fixed cost once each; attention setup of ``bench_vs_nt.py``, 3 calls -> 2). The pushes run
inside :class:`~ntkfunc._core.forward_ad.ScalarOverloads` (``h / 4.0`` costs 0.4 ms per call under
forward mode otherwise).

Per-parameter kernels (``per_param=True``) come from the same algorithm with one parameter
per group: each group's JVP carries only that parameter's tangents, so its output is that
parameter's term of the kernel. That costs one JVP pass per parameter tensor (each pass
shorter: the tangents start at the parameter's layer), so it only pays where
implementation 1's per-parameter contraction ``N1 N2 O² P`` costs more:
:func:`per_param_cost` prices both from FLOP counts of one sample (torch's
``FlopCounterMode``, once per input signature) and the cheaper one runs. Measured (one
thread, full 10x10 kernels, ``x2=None``): a 64-512-512-10 MLP on 64 inputs, 1.13 s by JVPs
against 1.92 s by Jacobian contraction; a small CNN 0.74 s against 0.09 s, and
self-attention (T=16, d=64) 0.46 s against 0.02 s, where the model picks Jacobian contraction.

Forward mode keeps process-wide state in torch: the JVPs run inside
:func:`~ntkfunc._core.forward_ad.forward_ad_section`, which makes this engine safe to call
from several threads. Ops without a forward-mode derivative fall back to
:func:`~ntkfunc._core.forward_ad.jvp_by_double_vjp`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.func import jvp, vmap

from ntkfunc._core.forward_ad import ScalarOverloads, forward_ad_section, jvp_by_double_vjp
from ntkfunc._core.memory import SAFETY, backward_transient, fmt_bytes, itemsize, per_sample_activation_bytes
from ntkfunc._core.ops import load_forward_ad_decompositions
from ntkfunc._core.problem import Problem
from ntkfunc._core.tiles import Accumulator, Tile, tiles
from ntkfunc._engines import jacobian

__all__ = ["PerParamCost", "Plan", "jvp_by_double_vjp", "kernel", "per_param_cost", "plan"]

WORKING_SET = 64 * 2**20
"""Bytes of activation tangents one push may keep alive: (x1 samples x tangents) per JVP call."""

MIN_TANGENTS = 64
"""A push's rows are chosen for at least this many tangents each (:func:`push_shape`); off CPU, with
``x2=None``, column blocks also hold at least this many tangents (samples x outputs) ..."""

MAX_COLUMNS = 8
"""... and there are at most this many of them (more columns save little: (k + 1) / 2k of the JVPs)."""

PUSH_CALL_FLOPS = 1e8
"""On CPU, the fixed cost of one JVP call (the primal forward's dispatch, every op through two ``vmap``
levels and forward mode) in FLOPs of push arithmetic: about 2 ms against 25-80 µs per (x1 sample, tangent)
pair of 1.2-5 MFLOP on the attention and residual-block setups of ``bench_vs_nt.py`` (one thread).
:func:`column_width` prices the triangle's column blocks with it."""

CANDIDATE_COLUMNS = 64
""":func:`column_width` considers splits of ``x2=None`` into at most this many column blocks."""

SAMPLE_BY_SAMPLE = 64 * 2**20
"""Bytes of one x2 sample's cotangents (outputs x parameters) from which they are formed one sample per
``vmap(jacrev)`` call, and pushed sample by sample, instead of one call per column block: batching samples
then saves no per-call overhead and costs the batching rules' per-sample weight gradients (ResNet-18,
447 MB per sample: 1.8 s -> 1.24 s for two samples; an MLP 64-2048-2048-10, 172 MB: 0.34 s -> 0.32 s; below
a few MB the batched call is faster: a Transformer block, 8 MB, 0.048 s against 0.065 s)."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """How implementation 2 runs.

    Attributes:
      groups: parameter groups (indices into the differentiated leaves); one JVP pass each.
      b1 / b2: x1 rows and x2 columns per tile (equal with ``x2=None``).
      rows: x1 samples per JVP call (for a full column block; see :func:`push_shape`).
      chunk: tangents per JVP call (``vmap(chunk_size=...)``; the same).
      pairs: (x1 sample, tangent) pairs one JVP call may push (:data:`WORKING_SET` over their activation tangents).
      cotangents: x2 samples whose cotangents one ``vmap(jacrev)`` call forms (a multiple of ``b2``, what the
        memory budget holds): the column blocks take theirs from it (:class:`_Cotangents`).
    """

    groups: list[list[int]]
    b1: int
    b2: int
    rows: int
    chunk: int
    pairs: int = 1
    cotangents: int = 0


def plan(problem: Problem, budget: int, per_param: bool = False) -> Plan:
    """Groups, block sizes and push sizes whose tensors fit ``budget`` bytes (see the module docstring)."""
    leaves = problem.params.diff_leaves
    size = itemsize(problem.out_dtype)
    o1 = sum(math.prod(s) for s in problem.sample_out_shapes(1))
    o2 = sum(math.prod(s) for s in problem.sample_out_shapes(2))
    n_kernels = len(leaves) if per_param else 1
    kernel_bytes = n_kernels * sum(math.prod(s) for s in problem.kernel_shapes()) * size
    usable = max(budget * SAFETY - 2 * kernel_bytes, budget * 0.25)
    everything = list(range(len(leaves)))
    if not problem.vmapped:  # one whole-batch unit: nothing to tile, only the tangents to chunk
        groups = [[k] for k in everything] if per_param else [everything]
        act = problem.remember("activation_bytes", lambda: per_sample_activation_bytes(problem)) + o1 * size
        pairs = max(1, WORKING_SET // max(act, 1))
        return Plan(groups, 1, 1, 1, min(o2, pairs), pairs)
    transient = problem.remember("backward_transient", lambda: backward_transient(problem))
    sizes = [o2 * t.numel() * size for t in leaves]  # one x2 sample's cotangents, per parameter
    capacity = usable / 2  # the cotangents of a column block; the other half for computing and pushing them
    if max(sizes) > capacity:
        k = max(everything, key=lambda i: sizes[i])
        raise MemoryError(
            f"{problem.api}(implementation=2): one sample's cotangents of {problem.params.diff_names[k]} need "
            f"{fmt_bytes(sizes[k])} (outputs x numel x itemsize) and the memory budget allows {fmt_bytes(capacity)}; "
            "raise memory_budget"
        )
    if per_param:
        groups = [[k] for k in everything]
    elif sum(sizes) + transient <= capacity:
        groups = [everything]
    else:
        groups = jacobian.pack_groups(sizes, capacity, problem)
    largest = max(sum(sizes[k] for k in g) for g in groups)
    fits = min(max(1, int(capacity // (largest + transient))), problem.n2)  # x2 samples whose cotangents fit
    b2 = fits
    act = problem.remember("activation_bytes", lambda: per_sample_activation_bytes(problem)) + o1 * size
    pairs = max(1, WORKING_SET // max(act, 1))  # (x1 sample, tangent) pairs per push
    if problem.symmetric:  # columns for the triangle
        flops = pair_flops(problem) if problem.device.type == "cpu" else None
        if flops is None:  # ceil(n / MAX_COLUMNS) samples, at least MIN_TANGENTS tangents
            b2 = min(b2, max(math.ceil(problem.n2 / MAX_COLUMNS), math.ceil(MIN_TANGENTS / max(o2, 1))))
        else:
            b2 = column_width(problem.n2, o2, pairs, flops, b2)
    b1 = problem.n1 if not problem.symmetric else b2
    rows, chunk = push_shape(pairs, problem.n1, b2 * o2)
    return Plan(groups, b1, b2, rows, chunk, pairs, fits // b2 * b2)


def column_width(n: int, outputs: int, pairs: int, flops: float, most: int) -> int:
    """Samples per column block of the ``x2=None`` triangle (at most ``most``): the width whose pushes cost
    least, priced as JVP calls x :data:`PUSH_CALL_FLOPS` + (x1 sample, tangent) pairs x ``flops``.

    Narrow columns push fewer pairs (the triangle's ``n (n + 1) / 2`` samples' rows, not ``n²``) in more calls.
    Each column block's calls are those :func:`push_shape` plans for it (``pairs`` per call at most).

    >>> column_width(16, 10, 777, 1.2e6, 16), column_width(16, 10, 681, 5e6, 16), column_width(64, 10, 10**4, 0.0, 8)
    (4, 2, 8)
    """
    best: tuple[float, int] | None = None
    for width in sorted({max(1, math.ceil(n / k)) for k in range(1, CANDIDATE_COLUMNS + 1)} & set(range(1, most + 1))):
        cost = 0.0
        for j0 in range(0, n, width):
            j1 = min(j0 + width, n)
            tangents = (j1 - j0) * outputs
            rows, chunk = push_shape(pairs, j1, tangents)
            calls = math.ceil(j1 / rows) * math.ceil(tangents / balanced(tangents, chunk))
            cost += calls * PUSH_CALL_FLOPS + j1 * tangents * flops
        if best is None or cost < best[0]:
            best = (cost, width)
    return best[1] if best is not None else 1


def pair_flops(problem: Problem) -> float | None:
    """FLOPs (matrix products, convolutions) of pushing one tangent through one x1 sample: one sample's JVP
    with respect to every differentiated parameter less its forward pass; cached per input signature.
    None where torch's counter cannot run ``f`` so."""

    def count() -> float | None:
        leaves = problem.params.diff_leaves
        x = [a if ax is None else a.narrow(ax, 0, 1).squeeze(ax) for a, ax in zip(problem.x_block(1, 0, 1), problem.x_axes or [])]
        g = problem.sample_fn()
        load_forward_ad_decompositions()
        try:
            with forward_ad_section(), ScalarOverloads():
                both = _flops(lambda: jvp(lambda p: g(p, x), (leaves,), (leaves,)))
            return float(max(both - _flops(lambda: g(leaves, x)), 0))
        except Exception:  # an op without forward mode, or one the counter cannot run
            return None

    return problem.remember("pair_flops", count)


def push_shape(pairs: int, n_rows: int, n_tangents: int) -> tuple[int, int]:
    """``(rows, chunk)`` of the JVP calls that push ``n_tangents`` through ``n_rows`` x1 samples, at most ``pairs``
    (x1 sample, tangent) pairs per call: rows for at least ``min(n_tangents, MIN_TANGENTS)`` tangents each, in
    equal parts, then as many tangents as fit. Planned per column block, so that a short block (the last column,
    the first rows of the triangle) fills its calls instead of taking the full block's shape.

    >>> push_shape(768, 7, 70), push_shape(768, 14, 70), push_shape(768, 16, 20), push_shape(1, 5, 9)
    ((7, 70), (7, 70), (16, 20), (1, 1))
    """
    rows = balanced(n_rows, max(1, min(n_rows, pairs // max(1, min(n_tangents, MIN_TANGENTS)))))
    return rows, max(1, min(n_tangents, pairs // rows))


@dataclasses.dataclass(frozen=True)
class PerParamCost:
    """FLOPs of the per-parameter kernels by one JVP pass per parameter, and by implementation 1's path."""

    jvp: float
    jacobian: float

    @property
    def use_jvp(self) -> bool:
        """JVP passes when they cost fewer FLOPs: the one place this is decided."""
        return self.jvp < self.jacobian


def per_param_cost(problem: Problem) -> PerParamCost:
    """Both routes' FLOPs for the whole kernel, from one sample's counts (cached per input signature).

    JVPs: ``N1 N2 O2`` pushes per parameter, each costing that parameter's one-sample JVP less
    the forward pass (computed once per push, shared by its tangents).
    Jacobian contraction: the Jacobian passes (about 3 forward passes per output and sample)
    plus ``J₁ J₂ᵀ`` per kernel entry, over every parameter and traced axis.
    """

    def count() -> tuple[list[int], int]:
        leaves = problem.params.diff_leaves
        if problem.vmapped:
            x = [a if ax is None else a.narrow(ax, 0, 1).squeeze(ax) for a, ax in zip(problem.x_block(1, 0, 1), problem.x_axes or [])]
        else:
            x = problem.x_block(1, 0, problem.n1)
        def one_jvp(k: int) -> Any:
            g = problem.sample_fn([k]) if problem.vmapped else problem.batch_fn([k])
            return jvp(lambda p: g(p, x), ([leaves[k]],), ([torch.ones_like(leaves[k])],))

        with forward_ad_section():
            per = [_flops(lambda: one_jvp(k)) for k in range(len(leaves))]  # noqa: B023 (called at once)
        g_all = problem.sample_fn() if problem.vmapped else problem.batch_fn()
        return per, _flops(lambda: g_all(leaves, x))

    try:
        per, forward = problem.remember("per_param_flops", count)
    except Exception:  # an f the counter cannot run (e.g. an op without forward mode): take the known path
        return PerParamCost(math.inf, 0.0)
    o1 = sum(math.prod(s) for s in problem.sample_out_shapes(1))
    o2 = sum(math.prod(s) for s in problem.sample_out_shapes(2))
    n_params = sum(t.numel() for t in problem.params.diff_leaves)
    pair = sum(math.prod(lay.kernel_shape(s1, s2)) * lay.trace_size(s1)
               for lay, s1, s2 in zip(problem.layouts, problem.out_shapes1, problem.out_shapes2))
    n_jacobians = problem.n1 + (0 if problem.symmetric else problem.n2)
    jacobian_flops = n_jacobians * max(o1, o2) * 3 * forward + 2 * pair * n_params
    pushes = sum(max(p - forward, 0) for p in per)
    return PerParamCost(problem.n1 * problem.n2 * o2 * float(pushes), float(jacobian_flops))


def _flops(fn: Callable[[], Any]) -> int:
    """Multiply-add FLOPs of matrix products and convolutions in ``fn()`` (torch's counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def kernel(problem: Problem, budget: int, per_param: bool = False) -> list:
    """The kernel per output leaf; with ``per_param``, per leaf a list over the differentiated parameters.

    Per-parameter kernels take one JVP pass per parameter, or implementation 1's path when
    :func:`per_param_cost` finds that cheaper.
    """
    load_forward_ad_decompositions()
    if per_param and not per_param_cost(problem).use_jvp:
        return jacobian.kernel(problem, budget, per_param=True)
    p = plan(problem, budget, per_param)
    accs = [Accumulator(problem) for _ in (p.groups if per_param else [None])]
    columns: dict[tuple[int, int], list[Tile]] = {}
    for tile in tiles(problem, p.b1, p.b2):
        columns.setdefault((tile.j0, tile.j1), []).append(tile)
    push: Callable[..., Any] = jvp
    for g, group in enumerate(p.groups):
        acc = accs[g if per_param else 0]
        cotangents = _Cotangents(problem, group, p.cotangents or p.b2)
        for (j0, j1), column in columns.items():
            tangent_pieces, shapes2 = cotangents.pieces(j0, j1)
            i0, i1 = min(t.i0 for t in column), max(t.i1 for t in column)
            pieces: list[list[torch.Tensor]] = []  # per push, per output leaf: full blocks of its rows
            rows, chunk = push_shape(p.pairs, i1 - i0, max(piece[0].shape[0] for piece in tangent_pieces))
            for r0 in range(i0, i1, rows):
                r1 = min(r0 + rows, i1)
                try:
                    outs = _push_pieces(problem, group, r0, r1, tangent_pieces, shapes2, chunk, push)
                except NotImplementedError as err:  # an op without a forward-mode derivative
                    if "forward AD" not in str(err) or push is jvp_by_double_vjp:
                        raise
                    push = jvp_by_double_vjp
                    outs = _push_pieces(problem, group, r0, r1, tangent_pieces, shapes2, chunk, push)
                pieces.append(_full_blocks(problem, outs, shapes2))
            for leaf in range(len(problem.layouts)):
                full = pieces[0][leaf] if len(pieces) == 1 else torch.cat([piece[leaf] for piece in pieces])
                for tile in column:  # rows i0:i1 of the column, tile by tile
                    acc.add(leaf, tile, _rows(problem, leaf, full, tile.i0 - i0, tile.i1 - i0))
    if per_param:
        results = [acc.result() for acc in accs]
        return [[results[k][leaf] for k in range(len(results))] for leaf in range(len(problem.layouts))]
    return accs[0].result()


def balanced(total: int, most: int) -> int:
    """The size of the fewest equal parts of ``total`` with at most ``most`` each (the last part may be smaller).

    A push of ``rows x chunk`` pairs costs a fixed part (the ops' dispatch, the primal forward) plus
    its arithmetic, so 70 tangents in chunks of at most 64 run as 35 + 35, not 64 + 6.

    >>> balanced(70, 64), balanced(14, 12), balanced(130, 64), balanced(5, 8)
    (35, 7, 44, 5)
    """
    parts = -(-total // max(most, 1))
    return -(-total // max(parts, 1))


class _Cotangents:
    """The x2 cotangents ``J(x2)ᵀ e`` of one parameter group, handed out per column block as tangents.

    Formed by one batched ``vmap(jacrev)`` call per ``block`` x2 samples (several column blocks: each call
    has a fixed cost, and the narrow columns of the triangle would pay it once each) and sliced per column,
    or one call per sample where one sample's cotangents exceed :data:`SAMPLE_BY_SAMPLE`.
    """

    def __init__(self, problem: Problem, group: Sequence[int], block: int) -> None:
        self.problem, self.group, self.block = problem, group, max(block, 1)
        self.held: tuple[int, int, list[list[torch.Tensor]]] | None = None  # (start, stop, jacobians) of one call
        leaves = problem.params.diff_leaves
        o2 = sum(math.prod(s) for s in problem.sample_out_shapes(2))
        self.by_sample = problem.vmapped and o2 * sum(leaves[k].numel() for k in group) * itemsize(problem.out_dtype) >= SAMPLE_BY_SAMPLE

    def pieces(self, j0: int, j1: int) -> tuple[list[list[torch.Tensor]], list[tuple[int, ...]]]:
        """The tangents of x2 samples ``j0:j1``, in pieces that are pushed one after the other, and ``(b2, *out2)``
        per output leaf: one piece (:func:`_tangents`), or one per sample (each its own call's tensors: nothing
        copied)."""
        problem, group = self.problem, self.group
        if self.by_sample and j1 - j0 > 1:
            pieces = []
            for j in range(j0, j1):
                tangents, shapes = _tangents(problem, group, jacobian.jacobians(problem, group, 2, j, j + 1))
                pieces.append(tangents)
            return pieces, [(j1 - j0, *s[1:]) for s in shapes]
        if not problem.vmapped or self.by_sample or j1 - j0 >= self.block:
            tangents, shapes2 = _tangents(problem, group, jacobian.jacobians(problem, group, 2, j0, j1))
            return [tangents], shapes2
        if self.held is None or not self.held[0] <= j0 < j1 <= self.held[1]:
            self.held = None  # freed before the next call
            start = j0 // self.block * self.block
            stop = max(j1, min(start + self.block, problem.n2))
            self.held = (start, stop, jacobian.jacobians(problem, group, 2, start, stop))
        start, _, cot = self.held
        part = [[c.narrow(0, j0 - start, j1 - j0) for c in per_leaf] for per_leaf in cot]
        tangents, shapes2 = _tangents(problem, group, part)
        return [tangents], shapes2


def _push_pieces(problem: Problem, group: Sequence[int], r0: int, r1: int, pieces: list[list[torch.Tensor]],
                 shapes2: list[tuple[int, ...]], chunk: int, forward: Callable[..., Any]) -> list[torch.Tensor]:
    """:func:`_push` of every piece, merged per output leaf into the order of one block's tangents
    (x2 output leaf, then sample, then output entry)."""
    if len(pieces) == 1:
        return _push(problem, group, r0, r1, pieces[0], chunk, forward)
    sizes = [math.prod(s[1:]) for s in shapes2]  # one sample's tangents per x2 output leaf
    outs = [_push(problem, group, r0, r1, piece, chunk, forward) for piece in pieces]  # per piece, per x1 leaf
    merged = []
    for leaf in range(len(outs[0])):
        parts = [o[leaf].split(sizes) for o in outs]  # per piece, per x2 leaf
        merged.append(torch.cat([parts[p][l2] for l2 in range(len(sizes)) for p in range(len(parts))]))
    return merged


def _tangents(problem: Problem, group: Sequence[int], cot: list[list[torch.Tensor]]) -> tuple[list[torch.Tensor], list[tuple[int, ...]]]:
    """Per parameter of ``group``: all output leaves' cotangents as one batch of tangents ``(T, *param)``."""
    leaves = problem.params.diff_leaves
    shapes2 = [tuple(c[0].shape[: c[0].ndim - leaves[group[0]].ndim]) for c in cot]  # (b2, *out2) per output leaf
    tangents = []
    for j, k in enumerate(group):
        parts = [c[j].reshape(math.prod(c[j].shape[: c[j].ndim - leaves[k].ndim]), *leaves[k].shape) for c in cot]  # -1 fails for 0 elements
        tangents.append(parts[0] if len(parts) == 1 else torch.cat(parts))
    return tangents, shapes2


def _push(problem: Problem, group: Sequence[int], r0: int, r1: int, tangents: list[torch.Tensor], chunk: int,
          forward: Callable[..., Any]) -> list[torch.Tensor]:
    """Per output leaf, ``(T, rows, *out1)``: every tangent pushed through x1 samples ``r0:r1`` (one JVP pass)."""
    primals = [problem.params.diff_leaves[k] for k in group]
    x1 = problem.x_block(1, r0, r1)
    if problem.vmapped:
        g = problem.sample_fn(group)

        def one(t: list[torch.Tensor]) -> list[torch.Tensor]:
            per_sample = vmap(lambda xs: forward(lambda p: g(p, xs), (primals,), (t,))[1], in_dims=(problem.x_axes,))
            return per_sample(x1)
    else:
        g = problem.batch_fn(group)

        def one(t: list[torch.Tensor]) -> list[torch.Tensor]:
            return [o.unsqueeze(0) for o in forward(lambda p: g(p, x1), (primals,), (t,))[1]]

    with forward_ad_section(), ScalarOverloads():
        n = tangents[0].shape[0]
        return vmap(one, chunk_size=balanced(n, chunk) if chunk < n else None)(tangents)


def _full_blocks(problem: Problem, outs: list[torch.Tensor], shapes2: list[tuple[int, ...]]) -> list[torch.Tensor]:
    """Per output leaf, the full batch-first kernel block ``(rows, *out1, b2, *out2)`` of one push."""
    blocks = []
    offset = 0
    for leaf in range(len(problem.layouts)):
        size = math.prod(shapes2[leaf])
        o = outs[leaf].narrow(0, offset, size)  # (b2 * O2, rows, *out1)
        offset += size
        rows, out1 = o.shape[1], o.shape[2:]
        o = o.reshape(*shapes2[leaf], rows, *out1)  # (b2, *out2, rows, *out1)
        k2 = len(shapes2[leaf])
        blocks.append(o.permute(list(range(k2, o.ndim)) + list(range(k2))))
    return blocks


def _rows(problem: Problem, leaf: int, full: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """The layout's kernel (traced / diagonal axes reduced) of rows ``lo:hi`` of a full block."""
    full = full.narrow(0, lo, hi - lo)
    if not problem.vmapped:
        full = full.squeeze(0)
    return problem.layouts[leaf].reduce_full(full)
