"""Equations and prices of the structured engine: each built once, each priced once, in one place.

For one covered parameter θ and one pair of sample blocks there are two exact routes:

- **Gram**: one contraction of both sides' factors (cotangents ``c₁``, ``c₂`` and the rule's
  operands) sharing θ's letters, e.g. ``Σ (c₁c₂ᵀ) ⊙ (x₁x₂ᵀ)`` for a linear layer; its cost
  does not grow with θ's size;
- **Jacobian**: each side's ``∂f/∂θ = c ∂y/∂θ`` formed from the rule (once per block, kept
  for the other tiles of its row), then ``J₁ J₂ᵀ`` as implementation 1 contracts it.

:func:`gram_equation` and :func:`jacobian_equation` build the einsums (with the output-axis
letters of :class:`~ntkfunc._core.layout.Layout`: traced axes summed, diagonal axes shared);
:func:`paths` gives the contraction paths an equation may take (opt_einsum's optimal one and, for
a Gram equation, :data:`PAIRED`: one GEMM per pair of matching factors; for a convolution kernel's Gram
equation also :data:`INPUT_GRAM`: the input's own Gram and shifted sums of it), each priced step by step
with opt_einsum's ``contract_path`` (cached per equation and shapes): :func:`flops`, and
:func:`price`, which adds what its non-BLAS steps write (:data:`TRAFFIC_FLOPS`),
:func:`contract` runs it along a path cached the same way (inside :class:`Sharing`, the
contractions of one primitive reuse each other's steps), and :class:`RouteCost` holds both
routes' prices and their comparison. Which route a parameter takes, and which path a contraction
runs along, is decided in :mod:`~ntkfunc._engines.structured.routes` alone, from these prices (and
its measured :class:`~ntkfunc._engines.structured.routes.Rates`); the structured engine,
``"auto"``, the per-sample rows and ``explain`` read it there.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import opt_einsum
import torch
from torch.overrides import TorchFunctionMode

from ntkfunc._core.layout import Layout
from ntkfunc.rules import Structure, Window, expansion, window_offset_range, window_out_size

Shapes = tuple[tuple[int, ...], ...]


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
            return run_input_gram(self, path.how, memory_limit, sharing)
        return contract(self.eq, self.tensors, memory_limit, sharing, None if path is None else path.steps)

    def form(self, memory_limit: int | None) -> torch.Tensor:
        """The contraction as a contiguous tensor (a side's ``∂f/∂θ``), by :func:`broadcast_matmul` where that copies less."""
        new_eq, _, how = presum_plan(self.eq, self.shapes)
        if len(self.tensors) == 2:
            ready = [_prepare(t, sq, sm) for t, (sq, sm) in zip(self.tensors, how)]
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
        windows = windowed(eq, tuple(tensors1 + tensors2), side, _window_side(s1.window, terms1, tensors1, local1),
                           _window_side(s2.window, terms2, tensors2, local2))
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
    how: InputGram | None = None
    """:data:`INPUT_GRAM`'s plan (its steps are no opt_einsum path)."""


@functools.lru_cache(maxsize=8192)
def _path(eq: str, shapes: Shapes, name: str, steps: Steps | None) -> Path:
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
    found = [_path(new_eq, new_shapes, OPTIMAL, None)]
    if side >= 2:
        found.append(_path(new_eq, new_shapes, PAIRED, paired_steps(side)))
    return tuple(found)


INPUT_GRAM = "input gram"
"""A :class:`Path`'s name, Gram equations of a convolution's kernel only (:class:`Windowed`): the patch Gram
``x₁x₂ᵀ`` over ``C_in·k`` patch columns is the input's own Gram over its ``C_in`` channels (one GEMM over the
unpadded positions; with a stride, one per phase, pairing only positions that a window offset reads together),
summed over the window's ``k`` offsets as shifted (strided) views:
``patches₁[s]·patches₂[s'] = Σ_o x₁[stride s + dilation o]·x₂[stride s' + dilation o]`` with the zero padding
left out of the sums; then the cotangent factors and that patch Gram are contracted as :data:`PAIRED` would
(``c₁c₂ᵀ``, elementwise product, summed over position pairs). About ``k`` times fewer FLOPs for the patch Gram
of a stride-1 convolution (a 3x3 kernel: 9)."""

Geometry = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[tuple[int, int], ...]]
"""A window's ``(kernel, stride, dilation, pads)``, per spatial axis (pads ``(left, right)``)."""


class WindowSide(NamedTuple):
    """One side's windowed factor in a Gram equation: its position within the side, the input ``x`` and its letters
    in the equation (the sample letter first where the factor has one; the spatial letters last, those of the
    patches' output positions), the patches' window-offset letters, and the window."""

    factor: int
    x: torch.Tensor
    letters: str
    offsets: str
    geometry: Geometry


@dataclasses.dataclass(frozen=True)
class WindowSpec:
    """What :func:`input_gram_path` needs of a :class:`Windowed` (no tensors: hashable, cached)."""

    index: int
    letters1: str
    letters2: str
    shape1: tuple[int, ...]
    shape2: tuple[int, ...]
    geometry: Geometry


@dataclasses.dataclass(frozen=True)
class Windowed:
    """Both sides' windowed factors of a Gram equation (checked by :func:`windowed`): the inputs and their spec."""

    x1: torch.Tensor
    x2: torch.Tensor
    spec: WindowSpec
    offsets: tuple[str, str]

    @property
    def sides(self) -> tuple[WindowSide, WindowSide]:
        sp = self.spec
        return (WindowSide(sp.index, self.x1, sp.letters1, self.offsets[0], sp.geometry),
                WindowSide(sp.index, self.x2, sp.letters2, self.offsets[1], sp.geometry))


def _window_side(w: Window, terms: Sequence[str], tensors: Sequence[torch.Tensor], local: dict[str, str]) -> WindowSide | None:
    """A structure's :class:`~ntkfunc.rules.Window` in the letters of its side's ``terms`` (:func:`_factors`), or None."""
    i = 1 + w.operand  # the side's first term is the cotangent
    if i >= len(terms) or any(ch not in local for ch in w.batch + w.positions + w.offsets):
        return None
    t, term = tensors[i], terms[i]
    sample = len(term) == len(w.batch + w.positions + w.offsets) + 1  # else the operand was shared, its sample axis squeezed
    x = w.x
    if not sample:  # shared by all samples: _factors squeezed the operand's sample axis
        if x.shape[0] != 1:
            return None
        x = x.squeeze(0)
    letters = (term[0] if sample else "") + "".join(local[ch] for ch in w.batch + w.positions)
    return WindowSide(i, x if x.dtype == t.dtype else x.to(t.dtype), letters, "".join(local[ch] for ch in w.offsets),
                      (w.kernel, w.stride, w.dilation, w.pads))


def windowed(eq: str, tensors: Sequence[torch.Tensor], side: int, w1: WindowSide | None, w2: WindowSide | None) -> Windowed | None:
    """Both sides' windowed factors of the Gram equation ``eq`` on ``tensors`` (``side`` factors a side), checked; None
    where the :data:`INPUT_GRAM` path does not apply: the windows differ, a letter's size disagrees with the input and
    the window, the offsets are not shared by the two sides (a view summed them per side), a spatial or offset letter
    occurs elsewhere, or the two inputs share a spatial letter."""
    if w1 is None or w2 is None or w1.factor != w2.factor or w1.geometry != w2.geometry:
        return None
    kernel, stride, dilation, pads = w1.geometry
    d = len(kernel)
    lhs, out = eq.split("->")
    terms = lhs.split(",")
    if len(terms) != 2 * side or len(tensors) != 2 * side:
        return None
    sizes: dict[str, int] = {}
    for term, t in zip(terms, tensors):
        for ch, n in zip(term, t.shape):
            sizes.setdefault(ch, int(n))
    p1, p2 = terms[w1.factor], terms[side + w2.factor]
    elsewhere = set(out).union(*(set(term) for j, term in enumerate(terms) if j not in (w1.factor, side + w2.factor)))
    for w, p in ((w1, p1), (w2, p2)):
        if w.x.ndim != len(w.letters) or len(w.offsets) != d or len(set(w.letters + w.offsets)) != len(w.letters) + d:
            return None
        if set(p) != set(w.letters + w.offsets) or any(ch in elsewhere for ch in w.offsets):
            return None
        batch, spatial = w.letters[:-d], w.letters[-d:]
        if any(sizes[ch] != n for ch, n in zip(batch, w.x.shape)):
            return None
        for j in range(d):
            if sizes[w.offsets[j]] != kernel[j] or sizes[spatial[j]] != window_out_size(w.x.shape[-d + j], kernel[j], stride[j], dilation[j], pads[j]):
                return None
    if any(a != b and k != 1 for a, b, k in zip(w1.offsets, w2.offsets, kernel)):
        return None  # an offset summed on each side alone: no shifted sum
    shared = set(w1.letters) & set(w2.letters)
    if shared & set(w1.letters[-d:] + w2.letters[-d:]):
        return None
    spec = WindowSpec(w1.factor, w1.letters, w2.letters, tuple(w1.x.shape), tuple(w2.x.shape), w1.geometry)
    return Windowed(w1.x, w2.x, spec, (w1.offsets, w2.offsets))


@dataclasses.dataclass(frozen=True)
class InputGram:
    """:data:`INPUT_GRAM`'s plan for one equation and shapes (:func:`input_gram_path`).

    ``xx_eq``: the inputs' Gram (channels summed; spatial axes first, so that each shifted sum adds contiguous runs
    of all sample pairs), one per ``phases`` entry: per spatial axis, the phase ``φ`` of the input positions
    ``stride q + φ`` it pairs (a window offset reads positions of one phase on both sides, so only pairs of equal phase
    are formed: ``1/stride`` of the plain Gram per axis; stride 1 has the one phase 0); ``pp_shape``: the patch Gram's
    shape (the Gram's letters, output positions in place of input positions); ``shifts``: per window offset, ``(phase
    index, patch Gram index, phase Gram index)``, each index a ``(start, stop, step)`` per axis (None: all);
    ``first_full``: the first shift covers the whole patch Gram (a copy instead of zeros and an add); ``final_eq``: the
    side factors but the windowed ones, and the patch Gram, to the output.
    """

    xx_eq: str
    phases: tuple[tuple[int, ...], ...]
    pp_shape: tuple[int, ...]
    shifts: tuple[tuple[int, tuple[tuple[int, int, int] | None, ...], tuple[tuple[int, int, int] | None, ...]], ...]
    first_full: bool
    final_eq: str


@functools.lru_cache(maxsize=4096)
def input_gram_path(eq: str, shapes: Shapes, side: int, spec: WindowSpec) -> Path:
    """The :data:`INPUT_GRAM` path of the Gram equation ``eq`` on ``shapes``, planned and priced: the inputs' Gram per
    phase (GEMMs), the shifted sums (elements written), then the rest along opt_einsum's optimal path."""
    kernel, stride, dilation, pads = spec.geometry
    d = len(kernel)
    lhs, out = eq.split("->")
    terms = lhs.split(",")
    windows = (spec.index, side + spec.index)
    others = [j for j in range(2 * side) if j not in windows]
    needed = set(out).union(*(set(terms[j]) for j in others))
    l1, l2 = spec.letters1, spec.letters2
    shared = set(l1) & set(l2)
    keep = [ch for ch in l1 if ch in shared and ch in needed]
    summed = [ch for ch in l1 if ch in shared and ch not in needed]
    spatial = l1[-d:] + l2[-d:]  # first: each shift then adds runs of all samples' pairs (contiguous, vectorised)
    xx = spatial + "".join(keep + [ch for ch in l1 + l2 if ch not in shared and ch not in spatial])
    in_size = {**dict(zip(l1, spec.shape1)), **dict(zip(l2, spec.shape2))}
    size = {ch: n for term, shape in zip(terms, shapes) for ch, n in zip(term, shape)}
    pp_shape = tuple(size[ch] for ch in xx)
    rest = math.prod(size[ch] for ch in xx[2 * d:])  # the non-spatial axes (the same sizes in every Gram)
    in_spatial = spec.shape1[-d:] + spec.shape2[-d:]
    phases: list[tuple[int, ...]] = []
    shifts: list[tuple[int, tuple[tuple[int, int, int] | None, ...], tuple[tuple[int, int, int] | None, ...]]] = []
    region_total = 0
    full = None
    for offset in itertools.product(*(range(k) for k in kernel)):
        found = [window_offset_range(in_spatial[a], pp_shape[a], offset[a % d], stride[a % d], dilation[a % d], pads[a % d][0]) for a in range(2 * d)]
        if any(r is None for r in found):
            continue
        ranges = [r for r in found if r is not None]
        phase = tuple(r[0] for r in ranges[:d])
        if phase not in phases:
            phases.append(phase)
        pp_idx = tuple(r[1] for r in ranges) + (None,) * (len(xx) - 2 * d)
        xx_idx = tuple(r[2] for r in ranges) + (None,) * (len(xx) - 2 * d)
        region_total += rest * math.prod(r[1][1] - r[1][0] for r in ranges)
        if full is None and all(pp_idx[a] == (0, pp_shape[a], 1) for a in range(2 * d)):
            full = len(shifts)
        shifts.append((phases.index(phase), pp_idx, xx_idx))
    if full is not None:
        shifts.insert(0, shifts.pop(full))
    final_eq = ",".join([terms[j] for j in others] + [xx]) + "->" + out
    final_shapes = tuple(shapes[j] for j in others) + (pp_shape,)
    new_eq, new_shapes, _ = presum_plan(final_eq, final_shapes)
    final = _path(new_eq, new_shapes, OPTIMAL, None)

    def n_phase(n: int, a: int, phase: tuple[int, ...]) -> int:
        return max(0, (n - phase[a] + stride[a] - 1) // stride[a])

    xx_numels = [math.prod(n_phase(in_spatial[a], a % d, ph) for a in range(2 * d)) * rest for ph in phases]
    gram_flops = 2.0 * sum(xx_numels) * math.prod(in_size[ch] for ch in summed)
    pp_numel = math.prod(pp_shape)
    copies = sum(math.prod(n_phase(n, a, ph) for a, n in enumerate(shape[-d:])) * math.prod(shape[:-d])
                 for ph in phases for shape in (spec.shape1, spec.shape2))  # each phase's inputs, laid out for a GEMM
    traffic = copies + sum(xx_numels) + region_total + (0 if full is not None else pp_numel)
    how = InputGram(f"{l1},{l2}->{xx}", tuple(phases), pp_shape, tuple(shifts), full is not None, final_eq)
    return Path(INPUT_GRAM, None, Price(gram_flops, traffic) + final.price, max([*xx_numels, pp_numel, final.largest]), how)


def _slices(idx: tuple[tuple[int, int, int] | None, ...]) -> tuple[slice, ...]:
    return tuple(slice(None) if r is None else slice(*r) for r in idx)


def run_input_gram(eq: Equation, how: InputGram, memory_limit: int | None, sharing: Sharing | None = None) -> torch.Tensor:
    """``eq`` (with :attr:`Equation.windows`) along :data:`INPUT_GRAM`, planned by ``how``."""
    w = eq.windows
    assert w is not None
    stride = w.spec.geometry[1]

    def phase_view(x: torch.Tensor, phase: tuple[int, ...]) -> torch.Tensor:
        return x[(...,) + tuple(slice(p, None, s) for p, s in zip(phase, stride))] if any(v != 1 for v in stride) else x

    grams = [contract(how.xx_eq, (phase_view(w.x1, ph), phase_view(w.x2, ph)), None).contiguous() for ph in how.phases]
    shifts = how.shifts
    if how.first_full:
        i, _, x = shifts[0]
        pp = grams[i][_slices(x)].clone(memory_format=torch.contiguous_format)
        shifts = shifts[1:]
    else:
        pp = w.x1.new_zeros(how.pp_shape)
    for i, p, x in shifts:
        pp[_slices(p)] += grams[i][_slices(x)]
    windows = (w.spec.index, eq.side + w.spec.index)
    others = [t for j, t in enumerate(eq.tensors) if j not in windows]
    return contract(how.final_eq, (*others, pp), memory_limit, sharing)


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
            self._prepared[key] = (t, _prepare(t, squeeze, summed))  # t kept alive: its id stays its own
        return self._prepared[key][1]


def _prepare(t: torch.Tensor, squeeze: tuple[int, ...], summed: tuple[int, ...]) -> torch.Tensor:
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
        ready = [_prepare(t, sq, sm) for t, (sq, sm) in zip(tensors, how)]
    else:
        ready = [sharing.prepare(t, sq, sm) for t, (sq, sm) in zip(tensors, how)]
    return expression(new_eq, shapes, memory_limit, steps)(*ready, backend="torch")


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
