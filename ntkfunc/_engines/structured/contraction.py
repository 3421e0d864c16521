"""One einsum contraction: the paths it may run along, their prices, and running it along one.

:func:`paths` gives the contraction paths an equation may take (opt_einsum's optimal one and, for a Gram equation,
:data:`PAIRED`: one GEMM per pair of matching factors), each priced step by step with opt_einsum's
``contract_path`` (cached per equation and shapes): :func:`flops`, and :func:`price`, which adds what its non-BLAS
steps write (:data:`TRAFFIC_FLOPS`); :func:`contract` runs it along a path cached the same way (inside
:class:`Sharing`, the contractions of one primitive reuse each other's steps). Trivial axes are removed first
(:func:`presum_plan`). Which path a contraction runs along is decided in
:mod:`~ntkfunc._engines.structured.routes` alone.

>>> import torch
>>> a, b = torch.randn(4, 5), torch.randn(5, 6)
>>> [p.name for p in paths("ab,bc->ac", ((4, 5), (5, 6)))]
['optimal']
>>> bool(torch.allclose(contract("ab,bc->ac", (a, b), None), a @ b))
True
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import opt_einsum
import torch

Shapes = tuple[tuple[int, ...], ...]


TRAFFIC_FLOPS = 300
"""FLOPs one element written by a contraction step that is no matrix product costs as much time as.

opt_einsum runs such steps through ``torch.einsum``, which permutes and copies its operands
and writes a large intermediate; a matrix product (BLAS) writes its output at little cost
next to its FLOPs. Measured on this project's CPU (one thread, float32, the bench_vs_nt
models): matrix products run at about 1e11 FLOP/s and a non-BLAS step costs about 3 ns per
element of its output on top of its FLOPs, e.g. the Gram route of a 512 x 128 linear layer on
64 tokens (4.2 GFLOP with a 21 M-element intermediate) takes 170 ms and its Jacobian route
(4.7 GFLOP, all matrix products but for a 10 M-element Jacobian) 82 ms. Pure FLOP counts pick
the first, this weighting the second."""


CALL_FLOPS = 1e7
"""FLOPs one contraction call costs as much time as, whatever its size: measured on this project's CPU, a
Gram equation of a small linear layer (``contract``: opt_einsum's cached path, torch's ``einsum``) takes
about 95 µs, 0.3 MFLOP of work, at about 1e11 FLOP/s. Charged to the extra calls of a parameter used by
several primitives (a recurrent weight used once per step: one Gram equation per pair of steps), which
FLOP counts alone price as almost free."""


@dataclasses.dataclass(frozen=True)
class Price:
    """What one contraction costs: its FLOPs, the elements its non-BLAS steps write, and extra ``calls``.

    Scaling a price (``price * k``: the same contraction for ``k`` samples or pairs, batched into the same
    calls) scales FLOPs and traffic, not calls.
    """

    flops: float
    traffic: float = 0.0
    calls: float = 0.0

    @property
    def cost(self) -> float:
        """The time estimate in FLOP units that routes are compared by (see :data:`TRAFFIC_FLOPS`, :data:`CALL_FLOPS`)."""
        return self.flops + TRAFFIC_FLOPS * self.traffic + CALL_FLOPS * self.calls

    def __add__(self, other: Price) -> Price:
        return Price(self.flops + other.flops, self.traffic + other.traffic, self.calls + other.calls)

    def __mul__(self, k: float) -> Price:
        return Price(self.flops * k, self.traffic * k, self.calls)


FREE = Price(0.0)
NONE = Price(math.inf)  # a route that does not exist


@functools.lru_cache(maxsize=8192)
def presum_plan(eq: str, shapes: Shapes) -> tuple[str, Shapes, tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]]:
    """``(equation, shapes, (squeeze, sum) axes per operand)`` once trivial axes are removed.

    Size-1 axes absent from the output are squeezed (a view), then axes that only one
    operand has are summed: opt_einsum contracts pairs and would carry such axes along,
    and removing them first is exact. Squeezing instead of summing keeps an operand shared
    by several equations the same view (:class:`Sharing` reuses it).

    >>> presum_plan("ab,bc->a", ((2, 3), (3, 4)))
    ('ab,b->a', ((2, 3), (3,)), (((), ()), ((), (1,))))
    >>> presum_plan("agb,gc->ac", ((2, 1, 3), (1, 4)))
    ('a,c->ac', ((2,), (4,)), (((1,), (1,)), ((0,), ())))
    """
    lhs, out = eq.split("->")
    terms = lhs.split(",")
    sizes = {ch: d for term, shape in zip(terms, shapes) for ch, d in zip(term, shape)}
    unit = {ch for ch, d in sizes.items() if d == 1 and ch not in out}
    terms1 = ["".join(ch for ch in term if ch not in unit) for term in terms]
    new_terms, new_shapes, how = [], [], []
    for i, (term, term1) in enumerate(zip(terms, terms1)):
        squeeze = tuple(d for d, ch in enumerate(term) if ch in unit)
        others = set(out).union(*[set(u) for j, u in enumerate(terms1) if j != i])
        how.append((squeeze, tuple(d for d, ch in enumerate(term1) if ch not in others)))
        new_terms.append("".join(ch for ch in term1 if ch in others))
        new_shapes.append(tuple(sizes[ch] for ch in new_terms[-1]))
    return ",".join(new_terms) + "->" + out, tuple(new_shapes), tuple(how)


Steps = tuple[tuple[int, ...], ...]

OPTIMAL = "optimal"
"""A :class:`Path`'s name: opt_einsum's optimal path (fewest FLOPs within the memory limit)."""

PAIRED = "paired"
"""A :class:`Path`'s name, Gram equations only: each x1 factor contracted with its x2 counterpart first (one GEMM
each, e.g. ``c₁c₂ᵀ`` over a convolution's output channels and ``x₁x₂ᵀ`` over its patches, both
``(b·positions) x (b·positions)``), then their elementwise product summed over the position pairs. opt_einsum
may instead form the per-sample gradient first (a 1x1 convolution on 4x4 maps: fewer FLOPs, no GEMM)."""


@dataclasses.dataclass(frozen=True)
class Path:
    """One way of contracting an equation: ``steps`` in opt_einsum's format (None: its optimal path), priced.

    ``largest``: the largest intermediate's elements.
    """

    name: str
    steps: Steps | None
    price: Price
    largest: int
    how: Any = None
    """A path that is no opt_einsum path: its own plan (:class:`~ntkfunc._engines.structured.input_gram.InputGram`
    for :data:`~ntkfunc._engines.structured.input_gram.INPUT_GRAM`)."""


@functools.lru_cache(maxsize=8192)
def priced_path(eq: str, shapes: Shapes, name: str, steps: Steps | None) -> Path:
    """``eq`` on ``shapes`` along ``steps`` (None: opt_einsum's optimal path), priced step by step."""
    info = opt_einsum.contract_path(eq, *shapes, shapes=True, optimize=list(steps) if steps is not None else "auto")[1]
    sizes = {ch: d for term, shape in zip(eq.split("->")[0].split(","), shapes) for ch, d in zip(term, shape)}
    flops = traffic = 0.0
    for _, removed, step, _, blas in info.contraction_list:
        inputs, output = step.split("->")
        letters = set(inputs.replace(",", ""))
        flops += opt_einsum.helpers.flop_count(letters, bool(removed), len(inputs.split(",")), sizes)
        if not blas:
            traffic += math.prod(sizes[ch] for ch in output)
    return Path(name, steps, Price(flops, traffic), int(info.largest_intermediate))


def paired_steps(side: int) -> Steps:
    """opt_einsum's path of :data:`PAIRED` for ``side`` factors a side: factor ``i`` of x1 with factor ``i`` of x2, then the pairs.

    >>> paired_steps(2)   # [c1, x1, c2, x2] -> [x1, x2, c1c2] -> [c1c2, x1x2] -> result
    ((0, 2), (0, 1), (0, 1))
    """
    ids: list[object] = list(range(2 * side))
    steps: list[tuple[int, ...]] = []
    for i in range(side):
        a, b = ids.index(i), ids.index(side + i)
        steps.append((a, b))
        ids = [j for j in ids if j not in (i, side + i)] + [("pair", i)]
    if side > 1:
        steps.append(tuple(range(side)))
    return tuple(steps)


def paths(eq: str, shapes: Shapes, side: int = 0) -> tuple[Path, ...]:
    """The paths ``eq`` on ``shapes`` may run along (trivial axes removed first, as :func:`contract` does):
    opt_einsum's optimal one and, for a Gram equation of ``side`` factors a side (two or more), :data:`PAIRED`."""
    new_eq, new_shapes, _ = presum_plan(eq, shapes)
    found = [priced_path(new_eq, new_shapes, OPTIMAL, None)]
    if side >= 2:
        found.append(priced_path(new_eq, new_shapes, PAIRED, paired_steps(side)))
    return tuple(found)


def price(eq: str, shapes: Shapes) -> Price:
    """The :class:`Price` of contracting ``eq`` on ``shapes`` along opt_einsum's optimal path (trivial axes removed first)."""
    return paths(eq, shapes)[0].price


def flops(eq: str, shapes: Shapes) -> int:
    """opt_einsum's FLOP count of ``eq`` on ``shapes`` along its optimal path."""
    return int(price(eq, shapes).flops)


@functools.lru_cache(maxsize=4096)
def expression(eq: str, shapes: Shapes, memory_limit: int | None, steps: Steps | None = None) -> Any:
    """opt_einsum's compiled contraction of ``eq`` on ``shapes`` along ``steps`` (None: its optimal path, found once)."""
    if steps is not None:
        return opt_einsum.contract_expression(eq, *shapes, optimize=list(steps))
    return opt_einsum.contract_expression(eq, *shapes, memory_limit=memory_limit)


class Sharing:
    """Contractions run inside ``with Sharing() as sh`` (and given ``sharing=sh``) reuse common work.

    Within the block, opt_einsum's ``shared_intermediates`` reuses every pairwise step already
    computed on the same operand objects, and trivial-axis removal returns the same view for
    the same operand: the roles of one primitive (a linear layer's weight and bias) share the
    cotangent Gram ``c₁ c₂ᵀ``. Everything is released on exit.
    """

    def __init__(self) -> None:
        self._prepared: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._context: Any = None

    def __enter__(self) -> Sharing:
        self._context = opt_einsum.shared_intermediates()
        self._context.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._context.__exit__(*exc)
        self._prepared.clear()

    def prepare(self, t: torch.Tensor, squeeze: tuple[int, ...], summed: tuple[int, ...]) -> torch.Tensor:
        """``t`` without its trivial axes; the same object for every view of the same data and layout."""
        try:  # equations build their own views of one cotangent: recognise them by their memory
            where: tuple = (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype)
        except RuntimeError:  # a tensor under an outer transform has no storage of its own
            where = (id(t),)
        key = (where, squeeze, summed)
        if key not in self._prepared:
            self._prepared[key] = (t, prepare(t, squeeze, summed))  # t kept alive: its id stays its own
        return self._prepared[key][1]


def prepare(t: torch.Tensor, squeeze: tuple[int, ...], summed: tuple[int, ...]) -> torch.Tensor:
    """``t`` with the size-1 axes ``squeeze`` removed and the axes ``summed`` (numbered after that) summed (:func:`presum_plan`)."""
    if squeeze:
        t = t.squeeze(squeeze)
    return t.sum(summed) if summed else t


def broadcast_matmul(eq: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """``einsum(eq, a, b)`` (contiguous) as one ``torch.matmul`` that broadcasts ``b``, or None when that copies more.

    ``torch.einsum`` lays ``a`` out as ``(batch, a's free axes, contracted)``, a copy of ``a``
    unless its memory already has that order; a cotangent ``(b, O, T, d_out)`` contracted
    over its positions ``T`` never has. Here all but the last of ``a``'s free axes become
    batch axes of the product and ``b`` is broadcast over them (a copy of ``b`` times their
    size), so ``a`` is read in place as a transposed matrix. Forming a linear layer's
    ``∂f/∂W = Σ_t c_t x_tᵀ`` for 16 samples, 10 outputs and 64 tokens this way is 1.3-2.5x faster.

    >>> a, b = torch.randn(2, 3, 5, 40), torch.randn(2, 5, 6)
    >>> bool(torch.allclose(broadcast_matmul("abte,atf->abef", a, b), torch.einsum("abte,atf->abef", a, b)))
    True
    """
    lhs, out = eq.split("->")
    ta, tb = lhs.split(",")
    batch = [ch for ch in out if ch in ta and ch in tb]
    left = [ch for ch in out if ch in ta and ch not in tb]
    right = [ch for ch in out if ch in tb and ch not in ta]
    summed = [ch for ch in ta if ch in tb and ch not in out]
    if not left or not right or not summed or len(set(ta)) != len(ta) or len(set(tb)) != len(tb):
        return None
    size = {ch: d for term, t in ((ta, a), (tb, b)) for ch, d in zip(term, t.shape)}
    outer = left[:-1]
    if b.numel() * math.prod(size[ch] for ch in outer) >= a.numel():
        return None
    k = math.prod(size[ch] for ch in summed)
    r = math.prod(size[ch] for ch in right)
    am = a.permute([ta.index(ch) for ch in batch + left + summed])
    am = am.reshape(*(size[ch] for ch in batch + left), k)
    bm = b.permute([tb.index(ch) for ch in batch + summed + right]).reshape(*(size[ch] for ch in batch), *([1] * len(outer)), k, r)
    y = torch.matmul(am, bm).reshape(*(size[ch] for ch in batch + left + right))  # order: batch, left, right
    order = batch + left + right
    return y.permute([order.index(ch) for ch in out]).contiguous()


def contract(eq: str, tensors: Sequence[torch.Tensor], memory_limit: int | None, sharing: Sharing | None = None,
             steps: Steps | None = None) -> torch.Tensor:
    """``eq`` on ``tensors``, trivial axes removed first, along ``steps`` (None: opt_einsum's optimal path), cached per
    equation and shapes."""
    new_eq, shapes, how = presum_plan(eq, tuple(tuple(t.shape) for t in tensors))
    if sharing is None:
        ready = [prepare(t, sq, sm) for t, (sq, sm) in zip(tensors, how)]
    else:
        ready = [sharing.prepare(t, sq, sm) for t, (sq, sm) in zip(tensors, how)]
    return expression(new_eq, shapes, memory_limit, steps)(*ready, backend="torch")
