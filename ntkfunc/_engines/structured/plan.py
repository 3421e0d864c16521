"""Equations and prices of the structured engine: each built once, each priced once, in one place.

For one covered parameter θ and one pair of sample blocks there are two exact routes:

- **Gram**: one contraction of both sides' factors (cotangents ``c₁``, ``c₂`` and the rule's
  operands) sharing θ's letters, e.g. ``Σ (c₁c₂ᵀ) ⊙ (x₁x₂ᵀ)`` for a linear layer; its cost
  does not grow with θ's size;
- **Jacobian**: each side's ``∂f/∂θ = c ∂y/∂θ`` formed from the rule (once per block, kept
  for the other tiles of its row), then ``J₁ J₂ᵀ`` as implementation 1 contracts it.

:func:`gram_equation` and :func:`jacobian_equation` build the einsums (with the output-axis
letters of :class:`~ntkfunc._core.layout.Layout`: traced axes summed, diagonal axes shared) as
:class:`Equation` objects, whose paths and prices come from
:mod:`~ntkfunc._engines.structured.contraction` (opt_einsum's optimal path and PAIRED) and, for a
convolution kernel's Gram equation, :mod:`~ntkfunc._engines.structured.input_gram` (INPUT_GRAM);
:class:`RouteCost` holds both routes' prices and their comparison, :func:`parameter_calls_price` the
price of running ``f`` itself. Which route a parameter takes, and which path a contraction runs
along, is decided in :mod:`~ntkfunc._engines.structured.routes` alone, from these prices (and its
measured :class:`~ntkfunc._engines.structured.routes.Rates`); the structured engine, ``"auto"``, the
per-sample rows and ``explain`` read it there.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import opt_einsum
import torch
from torch.overrides import TorchFunctionMode

from ntkfunc._core.layout import Layout
from ntkfunc._engines.structured.contraction import (
    FREE,
    NONE,
    Path,
    Price,
    Shapes,
    Sharing,
    broadcast_matmul,
    contract,
    flops,
    paths,
    prepare,
    presum_plan,
    price,
)
from ntkfunc._engines.structured.input_gram import INPUT_GRAM, InputGram, Windowed, input_gram_path, run_input_gram, window_side, windowed
from ntkfunc.rules import Structure, expansion


@dataclasses.dataclass(frozen=True)
class Equation:
    """An einsum equation and its operands (not yet presummed)."""

    eq: str
    tensors: tuple[torch.Tensor, ...]
    side: int = 0
    """A Gram equation's operands per side (its first ``side`` operands are x1's, the next ``side`` x2's, in the
    same order); 0 for other equations and for Gram equations whose sides have different numbers of factors (tied
    structures such as weight_norm's), which have no :data:`PAIRED` path."""
    windows: Windowed | None = None
    """A Gram equation whose factor ``windows.spec.index`` of each side is a convolution's patches: their inputs and
    window, for the :data:`INPUT_GRAM` path (None: no such path)."""

    @property
    def shapes(self) -> Shapes:
        return tuple(tuple(t.shape) for t in self.tensors)

    @property
    def paths(self) -> tuple[Path, ...]:
        """The contraction paths it may run along (:func:`paths`, and :data:`INPUT_GRAM` where it has ``windows``), priced."""
        found = paths(self.eq, self.shapes, self.side)
        if self.windows is None:
            return found
        return (*found, input_gram_path(self.eq, self.shapes, self.side, self.windows.spec))

    @property
    def price(self) -> Price:
        """What contracting it costs along its cheapest path (after removing trivial axes): FLOPs and non-BLAS traffic."""
        return min(self.paths, key=lambda q: q.price.cost).price

    @property
    def flops(self) -> int:
        """opt_einsum's FLOP count for contracting it (after removing trivial axes)."""
        return int(self.price.flops)

    @property
    def out_shape(self) -> tuple[int, ...]:
        lhs, out = self.eq.split("->")
        sizes = {ch: d for term, shape in zip(lhs.split(","), self.shapes) for ch, d in zip(term, shape)}
        return tuple(sizes[ch] for ch in out)

    def run(self, memory_limit: int | None, sharing: Sharing | None = None, path: Path | None = None) -> torch.Tensor:
        """The contraction along ``path`` (one of :attr:`paths`; default: opt_einsum's optimal path within ``memory_limit``).

        Which of its paths an equation runs along is :func:`~ntkfunc._engines.structured.routes.contract`'s choice.
        """
        if path is not None and path.name == INPUT_GRAM:
            assert self.windows is not None and isinstance(path.how, InputGram)
            return run_input_gram(self.tensors, self.side, self.windows, path.how, memory_limit, sharing)
        return contract(self.eq, self.tensors, memory_limit, sharing, None if path is None else path.steps)

    def form(self, memory_limit: int | None) -> torch.Tensor:
        """The contraction as a contiguous tensor (a side's ``∂f/∂θ``), by :func:`broadcast_matmul` where that copies less."""
        new_eq, _, how = presum_plan(self.eq, self.shapes)
        if len(self.tensors) == 2:
            ready = [prepare(t, sq, sm) for t, (sq, sm) in zip(self.tensors, how)]
            out = broadcast_matmul(new_eq, ready[0], ready[1])
            if out is not None:
                return out
        return self.run(memory_limit).contiguous()


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
    local1, local2 = dict(theta), dict(theta)
    terms1, tensors1 = _factors(s1, c1, lhs1, local1, vmapped, sym)
    terms2, tensors2 = _factors(s2, c2, lhs2, local2, vmapped, sym)
    side = len(terms1) if len(terms1) == len(terms2) else 0  # tied structures (weight_norm's g and v) may differ in factors
    eq = ",".join(terms1 + terms2) + "->" + out
    windows = None
    if side and s1.window is not None and s2.window is not None:
        windows = windowed(eq, tuple(tensors1 + tensors2), side, window_side(s1.window, terms1, tensors1, local1),
                           window_side(s2.window, terms2, tensors2, local2))
    return Equation(eq, tuple(tensors1 + tensors2), side, windows)


def probe_equation(gram: Equation, samples: int) -> Equation:
    """``gram`` (a Gram equation of one sample a side, batch-first) on random factors of ``samples`` samples a side.

    Its sample letters are the first of each side's first term; an operand shared by all samples keeps its shape.

    >>> g = Equation("ai,aj,bi,bj->ab", (torch.ones(1, 3), torch.ones(1, 2), torch.ones(1, 3), torch.ones(1, 2)), 2)
    >>> probe_equation(g, 4).shapes
    ((4, 3), (4, 2), (4, 3), (4, 2))
    """
    terms = gram.eq.split("->")[0].split(",")
    if not gram.side:
        raise ValueError(f"probe_equation: {gram.eq!r} is no Gram equation (side=0)")
    letters = {terms[0][0], terms[gram.side][0]}

    def like(t: torch.Tensor, batched: bool) -> torch.Tensor:
        return torch.randn((samples, *t.shape[1:]) if batched else tuple(t.shape), dtype=t.dtype, device=t.device)

    tensors = tuple(like(t, bool(term) and term[0] in letters) for term, t in zip(terms, gram.tensors))
    w = gram.windows
    if w is not None:  # the inputs too (random: a probe is timed, never read)
        a, b = w.sides
        w = windowed(gram.eq, tensors, gram.side, a._replace(x=like(a.x, a.letters[:1] in letters)),
                     b._replace(x=like(b.x, b.letters[:1] in letters)))
    return Equation(gram.eq, tensors, gram.side, w)


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


@dataclasses.dataclass(frozen=True)
class RouteCost:
    """What one parameter's kernel block costs by the Gram route and by a Jacobian route (``J₁ J₂ᵀ``).

    Read by :mod:`~ntkfunc._engines.structured.routes`, which decides.
    """

    gram: Price
    jacobian: Price

    @property
    def use_gram(self) -> bool:
        """The comparison: the Gram route's time estimate is no larger."""
        return self.gram.cost <= self.jacobian.cost


@dataclasses.dataclass(frozen=True)
class Prices:
    """The pieces of both routes for one parameter and one pair of blocks, priced.

    ``form1``/``form2``: forming each side's ``∂f/∂θ`` from the rule; ``pair``: ``J₁ J₂ᵀ``
    (:data:`NONE` when the two sides' structures disagree on θ's axes: no Jacobian route).
    """

    gram: Price
    form1: Price
    form2: Price
    pair: Price

    def at_tile(self, formed1: bool, formed2: bool) -> RouteCost:
        """Costs for a tile whose side Jacobians may already be formed (and kept for their row)."""
        return RouteCost(self.gram, (FREE if formed1 else self.form1) + (FREE if formed2 else self.form2) + self.pair)

    def scaled(self, n1: int, n2: int, n_jacobians: int) -> RouteCost:
        """Costs for a whole ``n1 x n2`` kernel from one-sample prices (Jacobians formed ``n_jacobians`` times)."""
        return RouteCost(self.gram * (n1 * n2), self.form1 * n_jacobians + self.pair * (n1 * n2))

    def __add__(self, other: Prices) -> Prices:
        return Prices(self.gram + other.gram, self.form1 + other.form1, self.form2 + other.form2, self.pair + other.pair)


ZERO = Prices(FREE, FREE, FREE, FREE)


def prices(lay: Layout, vmapped: bool, s1: Structure, s2: Structure, c1: torch.Tensor, c2: torch.Tensor,
           gram: Equation | None = None, forms: tuple[Equation | None, Equation | None] = (None, None)) -> Prices:
    """The :class:`Prices` of one parameter's block (``gram``/``forms``: the equations if already built)."""
    gram = gram or gram_equation(lay, vmapped, s1, s2, c1, c2)
    if s1.theta != s2.theta:
        return Prices(gram.price, NONE, NONE, NONE)
    f1 = forms[0] or jacobian_equation(lay, vmapped, s1, c1)
    f2 = forms[1] or jacobian_equation(lay, vmapped, s2, c2)
    pair = price(pair_equation(lay, len(s1.theta)), (f1.out_shape, f2.out_shape))
    return Prices(gram.price, f1.price, f2.price, pair)


def _arg(args: tuple, kwargs: dict, i: int, names: tuple[str, ...]) -> Any:
    """Argument ``i`` of a call, passed by position or by one of its ``names``."""
    if len(args) > i:
        return args[i]
    return next((kwargs[n] for n in names if n in kwargs), None)


def _einsum_flops(y: torch.Tensor, args: tuple, kwargs: dict) -> float:
    """Twice the product of every letter's size (one pass over all index combinations: an upper estimate)."""
    ops = args[1:]
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = tuple(ops[0])
    if not args or not isinstance(args[0], str):
        return 0.0
    sizes = {ch: d for term, t in zip(args[0].split("->")[0].split(","), ops) for ch, d in zip(term.strip(), getattr(t, "shape", ()))}
    return 2.0 * math.prod(sizes.values())


def _inner(i: int, *names: str, batched: bool = False) -> Any:
    """FLOPs of a product whose argument ``i``'s last axis is contracted (and first, if ``batched``): ``2 numel(y) k``."""
    def count(y: torch.Tensor, args: tuple, kwargs: dict) -> float:
        a = _arg(args, kwargs, i, names)
        if not isinstance(a, torch.Tensor) or not a.ndim:
            return 0.0
        return 2.0 * y.numel() * a.shape[-1] * (a.shape[0] if batched else 1)
    return count


def _conv(transposed: bool) -> Any:
    """A convolution reads ``numel(weight[0])`` inputs per output element (a transposed one writes as many outputs per input)."""
    def count(y: torch.Tensor, args: tuple, kwargs: dict) -> float:
        x, w = _arg(args, kwargs, 0, ("input",)), _arg(args, kwargs, 1, ("weight",))
        if not isinstance(x, torch.Tensor) or not isinstance(w, torch.Tensor):
            return 0.0
        return 2.0 * (x if transposed else y).numel() * w[0].numel()
    return count


_F = torch.nn.functional
PRODUCT_FLOPS: dict[Any, Any] = {
    _F.linear: _inner(1, "weight"),  # weight (out, in)
    **{fn: _inner(0, "input", "self") for fn in (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm,
                                                 torch.Tensor.mm, torch.bmm, torch.Tensor.bmm)},
    torch.Tensor.__rmatmul__: _inner(1, "other"),  # other @ self
    **{fn: _inner(1, "mat1", "batch1", "mat") for fn in (torch.addmm, torch.Tensor.addmm, torch.baddbmm, torch.Tensor.baddbmm,
                                                         torch.addmv, torch.Tensor.addmv)},
    **{fn: _inner(1, "batch1", batched=True) for fn in (torch.addbmm, torch.Tensor.addbmm)},
    torch.einsum: _einsum_flops,
    **{fn: _conv(False) for fn in (_F.conv1d, _F.conv2d, _F.conv3d)},
    **{fn: _conv(True) for fn in (_F.conv_transpose1d, _F.conv_transpose2d, _F.conv_transpose3d)},
}
"""``func -> flops(y, args, kwargs)``: the FLOPs of the products the rules handle. The other calls that
consume a parameter are elementwise (their output is counted as traffic), or have no rule and so
nothing for a rule to save."""


def _tensor_args(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The tensors among a call's arguments and in their lists and tuples (one level: what torch functions take)."""
    out = []
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out.extend(t for t in a if isinstance(t, torch.Tensor))
    return out


class _ParameterCalls(TorchFunctionMode):
    """Prices the calls of ``f`` that consume a parameter (or a tensor computed from parameters alone:
    ``W.T``, ``W.to(dtype)``, ``torch.cat([W1, W2])``) together with anything else; other calls run untouched."""

    def __init__(self, params: Sequence[torch.Tensor]) -> None:
        super().__init__()
        self.derived = {id(t) for t in params}
        self.keep: list[torch.Tensor] = []  # the derived tensors, alive so that their ids stay theirs
        self.flops = 0.0
        self.elements = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = _tensor_args(args, kwargs)
        n_derived = sum(id(t) in self.derived for t in tensors)
        if not n_derived:
            return func(*args, **kwargs)
        if n_derived == len(tensors):  # parameters alone: a view, a cast, a concatenation of parameters
            out = func(*args, **kwargs)
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.derived.add(id(t))
                    self.keep.append(t)
            return out
        fused = expansion(func)
        if fused is not None:  # a fused op (attention): its expansion into the ruled ops, seen by this mode
            with self:
                return fused(*args, **kwargs)
        out = func(*args, **kwargs)
        formula = PRODUCT_FLOPS.get(func)
        if formula is not None and isinstance(out, torch.Tensor):
            self.flops += formula(out, args, kwargs)
        self.elements += sum(t.numel() for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor))
        return out


def parameter_calls_price(fn: Any, params: Sequence[torch.Tensor], *args: Any) -> Price:
    """The :class:`Price` of the calls in ``fn(params, *args)`` (run without gradients) that consume a
    parameter: the FLOPs of the products among them (:data:`PRODUCT_FLOPS`; fused ops that the rules expand,
    such as attention, through their expansion) and the elements they return as traffic. A call that
    torch's function mode cannot see (a custom autograd function) is not counted: it has no rule either.

    >>> w, b = torch.randn(8, 4), torch.randn(4)
    >>> parameter_calls_price(lambda p, x: torch.tanh(x @ p[0].T.T + p[1]), [w, b], torch.randn(3, 8))  # 2*3*8*4 FLOPs
    Price(flops=192.0, traffic=24.0, calls=0.0)
    """
    counter = _ParameterCalls(params)
    with torch.no_grad(), counter:
        fn(params, *args)
    return Price(float(counter.flops), float(counter.elements))


def jacobian_contraction_flops(lay: Layout, n: int | None, out_shape: Sequence[int], param_shape: Sequence[int]) -> int:
    """FLOPs of implementation 1's ``J₁ J₂ᵀ`` for one parameter on ``n`` samples against themselves.

    ``out_shape``: one sample's output shape; ``n=None`` when not vmapped (the batch is one unit).
    """
    shape = (() if n is None else (n,)) + tuple(out_shape) + tuple(param_shape)
    return flops(pair_equation(lay, len(param_shape)), (shape, shape))
