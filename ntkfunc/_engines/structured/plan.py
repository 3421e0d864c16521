"""Equations and prices of the structured engine: each built once, each priced once, in one place.

For one covered parameter θ and one pair of sample blocks there are two exact routes:

- **Gram**: one contraction of both sides' factors (cotangents ``c₁``, ``c₂`` and the rule's
  operands) sharing θ's letters, e.g. ``Σ (c₁c₂ᵀ) ⊙ (x₁x₂ᵀ)`` for a linear layer; its cost
  does not grow with θ's size;
- **Jacobian**: each side's ``∂f/∂θ = c ∂y/∂θ`` formed from the rule (once per block, kept
  for the other tiles of its row), then ``J₁ J₂ᵀ`` as implementation 1 contracts it.

:func:`gram_equation` and :func:`jacobian_equation` build the einsums (with the output-axis
letters of :class:`~ntkfunc._core.layout.Layout`: traced axes summed, diagonal axes shared);
:func:`flops` prices an equation with opt_einsum's ``contract_path`` (cached per equation and
shapes), :func:`contract` runs it along a path cached the same way, and :class:`RouteCost`
holds the one decision "which route is cheaper". The structured engine, ``"auto"`` and
``explain`` all read their prices from :func:`prices`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import opt_einsum
import torch

from ntkfunc._core.layout import Layout
from ntkfunc.rules import Structure

Shapes = tuple[tuple[int, ...], ...]


@dataclasses.dataclass(frozen=True)
class Equation:
    """An einsum equation and its operands (not yet presummed)."""

    eq: str
    tensors: tuple[torch.Tensor, ...]

    @property
    def shapes(self) -> Shapes:
        return tuple(tuple(t.shape) for t in self.tensors)

    @property
    def flops(self) -> int:
        """opt_einsum's FLOP count for contracting it (after summing lone axes)."""
        eq, shapes, _ = presum_plan(self.eq, self.shapes)
        return flops(eq, shapes)

    @property
    def out_shape(self) -> tuple[int, ...]:
        lhs, out = self.eq.split("->")
        sizes = {ch: d for term, shape in zip(lhs.split(","), self.shapes) for ch, d in zip(term, shape)}
        return tuple(sizes[ch] for ch in out)

    def run(self, memory_limit: int | None) -> torch.Tensor:
        """The contraction, along opt_einsum's path cached per equation and shapes."""
        return contract(self.eq, self.tensors, memory_limit)


class _Symbols:
    """Fresh einsum letters, after those of the output layout."""

    def __init__(self, start: int) -> None:
        self.next = start

    def new(self) -> str:
        s = opt_einsum.get_symbol(self.next)
        self.next += 1
        return s


def _factors(s: Structure, c: torch.Tensor, lhs: str, local: dict[str, str], vmapped: bool, sym: _Symbols) -> tuple[list[str], list[torch.Tensor]]:
    """One side's terms: the cotangent ``c`` (viewed as ``y``) and the rule's operands."""
    for ch in s.y + "".join(sub for sub, _ in s.operands):
        if ch not in local:
            local[ch] = sym.new()
    if not vmapped:  # the whole batch is one unit: a size-1 sample axis with its own letter
        c, lhs = c.unsqueeze(0), sym.new() + lhs
    terms = [lhs + "".join(local[ch] for ch in s.y)]
    tensors = [c.reshape(*c.shape[: len(lhs)], *s.y_shape)]
    for sub, t in s.operands:
        letters = "".join(local[ch] for ch in sub)
        if t.shape[0] == 1 and c.shape[0] != 1:
            t = t.squeeze(0)  # shared by all samples
        else:
            letters = lhs[0] + letters
        terms.append(letters)
        tensors.append(t if t.dtype == c.dtype else t.to(c.dtype))
    return terms, tensors


def gram_equation(lay: Layout, vmapped: bool, s1: Structure, s2: Structure, c1: torch.Tensor, c2: torch.Tensor) -> Equation:
    """One parameter's kernel contribution as one einsum: both samples' factors sharing θ's letters.

    ``c1``/``c2``: cotangents ``(b, *out_sample, *y)`` (``(*out, *y)`` when not vmapped).
    """
    lhs1, lhs2, out = lay.operand_subscripts(0)
    if sorted(s1.theta) != sorted(s2.theta):
        raise RuntimeError(f"rule structures disagree on parameter axes: {s1.theta!r} vs {s2.theta!r}")
    sym = _Symbols(2 * lay.ndim)
    theta = {ch: sym.new() for ch in s1.theta}
    terms1, tensors1 = _factors(s1, c1, lhs1, dict(theta), vmapped, sym)
    terms2, tensors2 = _factors(s2, c2, lhs2, dict(theta), vmapped, sym)
    return Equation(",".join(terms1 + terms2) + "->" + out, tuple(tensors1 + tensors2))


def jacobian_equation(lay: Layout, vmapped: bool, s: Structure, c: torch.Tensor) -> Equation:
    """The einsum forming one side's ``∂f/∂θ = c ∂y/∂θ``: ``(b, *out_sample, *θ)`` (``(*out, *θ)`` unvmapped)."""
    lhs, _, _ = lay.operand_subscripts(0)
    sym = _Symbols(2 * lay.ndim)
    local = {ch: sym.new() for ch in s.theta}
    terms, tensors = _factors(s, c, lhs, local, vmapped, sym)
    return Equation(",".join(terms) + "->" + lhs + "".join(local[ch] for ch in s.theta), tuple(tensors))


def pair_equation(lay: Layout, n_param_axes: int) -> str:
    """``J₁ J₂ᵀ`` for batch-first Jacobians with ``n_param_axes`` trailing parameter axes (implementation 1's contraction)."""
    lhs1, lhs2, out = lay.operand_subscripts(n_param_axes)
    return f"{lhs1},{lhs2}->{out}"


@functools.lru_cache(maxsize=8192)
def presum_plan(eq: str, shapes: Shapes) -> tuple[str, Shapes, tuple[tuple[int, ...], ...]]:
    """``(equation, shapes, axes to sum per operand)`` once axes that only one operand has are summed out.

    opt_einsum contracts pairs and would carry such axes along; summing them first is exact.

    >>> presum_plan("ab,bc->a", ((2, 3), (3, 4)))
    ('ab,b->a', ((2, 3), (3,)), ((), (1,)))
    """
    lhs, out = eq.split("->")
    terms = lhs.split(",")
    new_terms, new_shapes, alone = [], [], []
    for i, (term, shape) in enumerate(zip(terms, shapes)):
        others = set(out).union(*[set(u) for j, u in enumerate(terms) if j != i])
        alone.append(tuple(d for d, ch in enumerate(term) if ch not in others))
        new_terms.append("".join(ch for ch in term if ch in others))
        new_shapes.append(tuple(d for ch, d in zip(term, shape) if ch in others))
    return ",".join(new_terms) + "->" + out, tuple(new_shapes), tuple(alone)


@functools.lru_cache(maxsize=8192)
def flops(eq: str, shapes: Shapes) -> int:
    """opt_einsum's optimal-path FLOP count (``PathInfo.opt_cost``) of ``eq`` on ``shapes``."""
    return int(opt_einsum.contract_path(eq, *shapes, shapes=True)[1].opt_cost)


@functools.lru_cache(maxsize=4096)
def expression(eq: str, shapes: Shapes, memory_limit: int | None) -> Any:
    """opt_einsum's compiled contraction of ``eq`` on ``shapes`` (its path found once)."""
    return opt_einsum.contract_expression(eq, *shapes, memory_limit=memory_limit)


def contract(eq: str, tensors: Sequence[torch.Tensor], memory_limit: int | None) -> torch.Tensor:
    """``eq`` on ``tensors``, lone axes summed first, along a path cached per equation and shapes."""
    new_eq, shapes, alone = presum_plan(eq, tuple(tuple(t.shape) for t in tensors))
    summed = [t.sum(a) if a else t for t, a in zip(tensors, alone)]
    return expression(new_eq, shapes, memory_limit)(*summed, backend="torch")


@dataclasses.dataclass(frozen=True)
class RouteCost:
    """FLOPs of one parameter's kernel block by each route, and the decision between them."""

    gram: float
    jacobian: float

    @property
    def use_gram(self) -> bool:
        """The Gram route when it costs no more than the Jacobian route: the one place this is decided."""
        return self.gram <= self.jacobian

    @property
    def flops(self) -> float:
        return self.gram if self.use_gram else self.jacobian


@dataclasses.dataclass(frozen=True)
class Prices:
    """opt_einsum's FLOPs of the pieces of both routes for one parameter and one pair of blocks.

    ``form1``/``form2``: forming each side's ``∂f/∂θ`` from the rule; ``pair``: ``J₁ J₂ᵀ``
    (infinite when the two sides' structures disagree on θ's axes: no Jacobian route).
    """

    gram: int
    form1: float
    form2: float
    pair: float

    def at_tile(self, formed1: bool, formed2: bool) -> RouteCost:
        """Costs for a tile whose side Jacobians may already be formed (and kept for their row)."""
        return RouteCost(self.gram, (0 if formed1 else self.form1) + (0 if formed2 else self.form2) + self.pair)

    def scaled(self, n1: int, n2: int, n_jacobians: int) -> RouteCost:
        """Costs for a whole ``n1 x n2`` kernel from one-sample prices (Jacobians formed ``n_jacobians`` times)."""
        return RouteCost(self.gram * n1 * n2, self.form1 * n_jacobians + self.pair * n1 * n2)

    def __add__(self, other: Prices) -> Prices:
        return Prices(self.gram + other.gram, self.form1 + other.form1, self.form2 + other.form2, self.pair + other.pair)


def prices(lay: Layout, vmapped: bool, s1: Structure, s2: Structure, c1: torch.Tensor, c2: torch.Tensor,
           gram: Equation | None = None, forms: tuple[Equation | None, Equation | None] = (None, None)) -> Prices:
    """The :class:`Prices` of one parameter's block (``gram``/``forms``: the equations if already built)."""
    gram = gram or gram_equation(lay, vmapped, s1, s2, c1, c2)
    if s1.theta != s2.theta:
        return Prices(gram.flops, math.inf, math.inf, math.inf)
    f1 = forms[0] or jacobian_equation(lay, vmapped, s1, c1)
    f2 = forms[1] or jacobian_equation(lay, vmapped, s2, c2)
    pair = flops(pair_equation(lay, len(s1.theta)), (f1.out_shape, f2.out_shape))
    return Prices(gram.flops, f1.flops, f2.flops, pair)


def jacobian_contraction_flops(lay: Layout, n: int | None, out_shape: Sequence[int], param_shape: Sequence[int]) -> int:
    """FLOPs of implementation 1's ``J₁ J₂ᵀ`` for one parameter on ``n`` samples against themselves.

    ``out_shape``: one sample's output shape; ``n=None`` when not vmapped (the batch is one unit).
    """
    shape = (() if n is None else (n,)) + tuple(out_shape) + tuple(param_shape)
    return flops(pair_equation(lay, len(param_shape)), (shape, shape))
