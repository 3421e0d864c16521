"""The row interface: what every source of per-sample rows gives, and the helpers they share.

A *row* is one sample's gradient of every output entry, flattened over parameters:
``rows[n, *out, :]`` for samples ``n`` of a block, ``out`` the per-sample output shape
(batch axis removed) and the last axis the parameters, in the **documented order**:

  the differentiated (floating) leaves of ``params`` in pytree-flatten order
  (``torch.utils._pytree.tree_flatten``; for :func:`ntkfunc.from_module` params that is
  ``model.named_parameters()`` order), each leaf flattened row-major (C order), i.e.
  ``torch.cat([g.reshape(*out, -1) for g in grads], -1)`` of ``torch.func.jacrev``.

A source's row may also be a projection of that gradient (:class:`~ntkfunc._engines.rows.projected.ProjectedRows`,
width ``dim``) or stored features (:class:`~ntkfunc._engines.rows.stored.StoredRows`):
:class:`RowSource` is what the dataset layer runs, whatever the rows are.
:class:`Slots` records where each parameter sits (``offset``, ``size``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import torch

from ntkfunc._core.problem import Problem
from ntkfunc._engines.structured import plan
from ntkfunc.rules import Structure


@dataclasses.dataclass(frozen=True)
class Slots:
    """Where each parameter's gradient sits in a row: ``rows[..., offset:offset + size]``.

    Attributes:
      leaves: indices into ``problem.params.diff_leaves``, in row order (increasing).
      offsets / sizes: start and number of elements of each leaf's slot.

    >>> s = Slots((0, 2), (0, 6), (6, 4))
    >>> s.width, s.slot(2)
    (10, slice(6, 10, None))
    """

    leaves: tuple[int, ...]
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]

    @staticmethod
    def of(problem: Problem, leaves: Sequence[int]) -> Slots:
        """Slots for ``leaves`` (sorted: the documented order) of ``problem``'s differentiated parameters."""
        order = sorted(leaves)
        sizes = [problem.params.diff_leaves[k].numel() for k in order]
        offsets = [0]
        for s in sizes[:-1]:
            offsets.append(offsets[-1] + s)
        return Slots(tuple(order), tuple(offsets[: len(order)]), tuple(sizes))

    @property
    def width(self) -> int:
        return sum(self.sizes)

    def slot(self, leaf: int) -> slice:
        i = self.leaves.index(leaf)
        return slice(self.offsets[i], self.offsets[i] + self.sizes[i])

    def names(self, problem: Problem) -> list[str]:
        """The parameter names in row order (``params`` keys / pytree paths)."""
        return [problem.params.diff_names[k] for k in self.leaves]


@dataclasses.dataclass(frozen=True)
class SampleBytes:
    """Memory per sample of a row source: ``rows`` (one row, model dtype), ``kept`` (Gram-route
    factors held with it) and ``transient`` (while its gradients are computed)."""

    rows: int
    kept: int
    transient: int


@dataclasses.dataclass(frozen=True)
class Flops:
    """Estimated FLOPs of a row source: per row (a forward pass and one backward per output entry),
    and per sample pair of the rows' product and of the Gram-route contractions."""

    row: float
    product: float
    gram: float

    @property
    def pair(self) -> float:
        return self.product + self.gram


@dataclasses.dataclass
class Factors:
    """What a block keeps for its Gram-route parameters: per parameter ``(structure, cotangent)``.

    Structures' operands are contiguous with the parameter's letters last, so that the Gram
    contraction of two blocks is plain matrix products.
    """

    terms: list[tuple[Structure, torch.Tensor]]

    @staticmethod
    def cat(parts: Sequence[Factors]) -> Factors:
        """The factors of consecutive chunks of samples as one block."""
        if len(parts) == 1:
            return parts[0]
        terms = []
        for k in range(len(parts[0].terms)):
            sts = [p.terms[k][0] for p in parts]
            ops = []
            for i, (letters, _) in enumerate(sts[0].operands):
                pieces = [s.operands[i][1] for s in sts]
                shared = all(p.shape[0] == 1 for p in pieces) and any(c.shape[0] > 1 for c in (p.terms[k][1] for p in parts))
                ops.append((letters, pieces[0] if shared else torch.cat(pieces)))
            window = sts[0].window  # a convolution's input, for the Gram route from the input's own Gram
            if window is not None:
                window = None if any(s.window is None for s in sts) else dataclasses.replace(
                    window, x=torch.cat([s.window.x for s in sts if s.window is not None]))
            terms.append((dataclasses.replace(sts[0], operands=ops, window=window), torch.cat([p.terms[k][1] for p in parts])))
        return Factors(terms)

    def nbytes(self) -> int:
        return sum(c.numel() * c.element_size() + sum(t.numel() * t.element_size() for _, t in s.operands)
                   + (0 if s.window is None else s.window.x.numel() * s.window.x.element_size()) for s, c in self.terms)


class RowSource(Protocol):
    """What ``kernel_matrix``'s panels need: rows of a block of samples, and Gram terms of the rest.

    ``slots`` says which parameters have rows (``slots.width`` columns); ``out_shape`` the
    per-sample output shape. ``compute(x, out, chunk)`` fills ``out`` ``(b, *out_shape, width)``
    for the block whose input leaves are ``x`` (``chunk`` samples per pass) and returns the
    block's :class:`Factors` (None without Gram-route parameters); ``gram(f1, f2)`` is their
    kernel block (batch-first layout of ``layout.contract``, not divided by the trace size).
    """

    slots: Slots
    out_shape: tuple[int, ...]

    def sample_bytes(self) -> SampleBytes: ...

    def compute(self, x: list[Any], out: torch.Tensor, chunk: int) -> Factors | None: ...

    def gram(self, f1: Factors, f2: Factors) -> torch.Tensor | None: ...

    def flops(self) -> Flops: ...


RowsFactory = Callable[[Problem, int, int, int], RowSource]
"""``rows(problem, n1, n2, budget) -> RowSource`` for a probed one-sample ``problem`` of a kernel of
``n1 x n2`` samples, whose contractions keep their intermediates within ``budget`` bytes."""


CHUNK = 32
"""Samples per batched gradient pass at most."""


def chunk_size(budget: float, sample: SampleBytes, cap: int = CHUNK) -> int:
    """Samples per gradient pass: a quarter of ``budget`` bytes for the pass's transient memory, at most ``cap``.

    >>> chunk_size(4e6, SampleBytes(rows=0, kept=0, transient=100_000)), chunk_size(1e9, SampleBytes(0, 0, 1000))
    (10, 32)
    >>> chunk_size(1e9, SampleBytes(0, 0, 1000), cap=500)   # jacobian_fn: its whole batch, where it fits
    500
    """
    return max(1, min(cap, int(0.25 * budget // max(sample.transient, 1))))


def row_flops(problem: Problem, out_shape: tuple[int, ...]) -> float:
    """FLOPs of one sample's rows: a forward pass and one backward (twice a forward) per output entry."""
    return (1 + 2 * math.prod(out_shape)) * forward_flops(problem)


def forward_flops(problem: Problem) -> float:
    """FLOPs of ``f`` on one sample (``torch.utils.flop_counter``: matrix products and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = problem.x_block(1, 0, 1)
    xs = [a if ax is None else a.squeeze(ax) for a, ax in zip(x, problem.x_axes or [])]
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        problem.sample_fn()(problem.params.diff_leaves, xs)
    return float(counter.get_total_flops())


def pair_flops(problem: Problem, out_shape: tuple[int, ...], width: int) -> float:
    """FLOPs of one sample pair's row product (``layout.contract`` of two rows)."""
    return float(plan.jacobian_contraction_flops(problem.layouts[0], 1, out_shape, (width,))) if width else 0.0


def chunks(x: list[Any], axes: list[int | None], b: int, chunk: int) -> Iterator[tuple[int, int, list[Any]]]:
    for s in range(0, b, chunk):
        e = min(s + chunk, b)
        yield s, e, [t if a is None else t.narrow(a, s, e - s) for t, a in zip(x, axes)]


def block_size(x: list[Any], axes: list[int | None]) -> int:
    return next(t.shape[a] for t, a in zip(x, axes) if a is not None)


def out_shape(problem: Problem) -> tuple[int, ...]:
    if len(problem.layouts) != 1:
        raise ValueError(f"{problem.api}: per-sample rows need one output tensor; f returned {len(problem.layouts)}")
    return tuple(problem.sample_out_shapes(1)[0])


