"""The input-Gram path of a convolution kernel's Gram equation: the patch Gram from the input's own Gram.

A convolution's Gram term ``Σ (c₁c₂ᵀ) ⊙ (patches₁ patches₂ᵀ)`` needs the patch Gram over ``C_in·k`` patch columns;
:data:`INPUT_GRAM` forms it from the inputs' Gram over their ``C_in`` channels and one shifted (strided) add per
window offset, about ``k`` times fewer FLOPs for a stride-1 kernel. :func:`windowed` checks that a Gram equation's
factors are such patches (their inputs and :class:`~ntkfunc.rules.Window` from the rule's structure),
:func:`input_gram_path` plans and prices the path (a
:class:`~ntkfunc._engines.structured.contraction.Path` beside opt_einsum's), :func:`run_input_gram` runs it.
Which path runs is decided in :mod:`~ntkfunc._engines.structured.routes` alone.

A 1-D convolution (3 input channels, kernel 3, padding 1) of two blocks of samples, its Gram term by this path:

>>> import torch
>>> x1, x2 = torch.randn(2, 3, 8, dtype=torch.float64), torch.randn(4, 3, 8, dtype=torch.float64)  # (samples, C_in, L)
>>> patches = lambda x: torch.nn.functional.pad(x, (1, 1)).unfold(2, 3, 1).permute(0, 2, 1, 3)    # (samples, L, C_in, 3)
>>> c1, c2 = torch.randn(2, 8, 5, dtype=torch.float64), torch.randn(4, 8, 5, dtype=torch.float64)  # cotangents (samples, L, C_out)
>>> eq, tensors = "asf,asik,btf,btik->ab", (c1, patches(x1), c2, patches(x2))
>>> window = ((3,), (1,), (1,), ((1, 1),))                                                         # kernel, stride, dilation, pads
>>> w = windowed(eq, tensors, 2, WindowSide(1, x1, "ais", "k", window), WindowSide(1, x2, "bit", "k", window))
>>> path = input_gram_path(eq, tuple(t.shape for t in tensors), 2, w.spec)
>>> path.name, bool(torch.allclose(run_input_gram(tensors, 2, w, path.how, None), torch.einsum(eq, *tensors)))
('input gram', True)
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from ntkfunc._engines.structured.contraction import OPTIMAL, Path, Price, Shapes, Sharing, contract, presum_plan, priced_path
from ntkfunc.rules import Window, window_offset_range, window_out_size

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


def window_side(w: Window, terms: Sequence[str], tensors: Sequence[torch.Tensor], local: dict[str, str]) -> WindowSide | None:
    """A structure's :class:`~ntkfunc.rules.Window` in the letters of its side's ``terms`` (the Gram equation's
    factors of one side, the cotangent first; ``local``: the structure's letters to the equation's), or None."""
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
    final = priced_path(new_eq, new_shapes, OPTIMAL, None)

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


def run_input_gram(tensors: Sequence[torch.Tensor], side: int, w: Windowed, how: InputGram, memory_limit: int | None,
                   sharing: Sharing | None = None) -> torch.Tensor:
    """A Gram equation's contraction along :data:`INPUT_GRAM`, planned by ``how`` (:func:`input_gram_path`):
    ``tensors`` its operands (``side`` a side), ``w`` their windowed factors' inputs (:func:`windowed`)."""
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
    windows = (w.spec.index, side + w.spec.index)
    others = [t for j, t in enumerate(tensors) if j not in windows]
    return contract(how.final_eq, (*others, pp), memory_limit, sharing)
