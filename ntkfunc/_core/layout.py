"""The kernel's output layout (trace / diagonal axes) as einsum subscripts.

The layout rule (neural-tangents' ``empirical_ntk_fn``): for an output leaf of shape
``(d0, d1, ..., dk)`` (one axis of which is the batch axis), the kernel has, for
each axis ``i`` in order, nothing if ``i`` is in ``trace_axes`` (the pair is traced
and *averaged*), one axis ``d_i`` if ``i`` is in ``diagonal_axes``, and two axes
``(d_i, d_i)`` (x1's then x2's) otherwise. So an ``(N, C, H, W)`` output with
``trace_axes=(1,)`` and ``diagonal_axes=(2, 3)`` gives ``(N1, N2, H, W)``.

Every implementation expresses its final contraction through :class:`Layout`, which
turns that rule into einsum subscripts: one letter per axis, shared by the two
operands when the axis is traced (summed) or diagonal (kept once).
"""

from __future__ import annotations

import dataclasses
import math
import string
from collections.abc import Callable, Sequence

import torch

from ntkfunc._core.checks import as_axes_tuple
from ntkfunc._core.types import Axes

_LETTERS = string.ascii_letters

BLOCK_ROWS = 80
"""Diagonal-tile contractions are split into sample blocks of at least this many rows of their matrix
product (samples x kept, non-diagonal output entries), at most :data:`MAX_BLOCKS` of them, and only the
blocks on and above the diagonal are contracted (the rest mirrored). Measured, one CPU thread, ``J Jᵀ``
over K = 432 to 65,536 columns: 160 rows in 2 blocks 0.78-0.86x the full product's time; 640 rows in
4 blocks 0.67-0.79x (in 2: 0.77-0.87x)."""

MAX_BLOCKS = 4
"""At most this many sample blocks (:data:`BLOCK_ROWS`): more made the products too small to gain."""


def canonical_axes(axes: Axes, ndim: int, what: str, api: str = "ntk_fn") -> tuple[int, ...]:
    """Sorted non-negative axes; ``what`` names the argument and ``api`` the caller in error messages.

    >>> canonical_axes((-1, 0), 3, "trace_axes")
    (0, 2)
    """
    given: tuple = (axes,) if isinstance(axes, int) else tuple(axes)
    out = []
    for a in given:
        if isinstance(a, bool) or not isinstance(a, int):
            raise TypeError(f"{api}({what}={axes!r}): axes must be ints, got {type(a).__name__}")
        if not -ndim <= a < ndim:
            raise ValueError(
                f"{api}({what}={given}): axis {a} out of range for an output of "
                f"ndim {ndim}; expected -{ndim} <= axis < {ndim}"
            )
        out.append(a % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"{api}({what}={given}): repeated axis")
    return tuple(sorted(out))


@dataclasses.dataclass(frozen=True)
class Layout:
    """Kernel layout of one output leaf.

    Attributes:
      ndim: ndim of the output leaf, batch axis included.
      batch_axis: position of the batch (vmap) axis in the output, or None when the
        output is not split into samples (``vmap_axes=None``).
      trace: canonical traced axes. diagonal: canonical diagonal axes.

    Per-sample tensors (Jacobians, cotangents) are stored *batch-first*: axis 0 is the
    sample, then the remaining output axes in order, then anything else (parameter
    axes). ``operand_subscripts`` gives their einsum letters.
    """

    ndim: int
    batch_axis: int | None
    trace: tuple[int, ...]
    diagonal: tuple[int, ...]

    @staticmethod
    def make(ndim: int, batch_axis: int | None, trace_axes: Axes, diagonal_axes: Axes, api: str = "ntk_fn") -> Layout:
        """The layout of an ndim-``ndim`` output; ``api`` names the caller in error messages."""
        trace = canonical_axes(trace_axes, ndim, "trace_axes", api)
        diagonal = canonical_axes(diagonal_axes, ndim, "diagonal_axes", api)
        if set(trace) & set(diagonal):
            raise ValueError(
                f"{api}(trace_axes={as_axes_tuple(trace_axes)}, diagonal_axes={as_axes_tuple(diagonal_axes)}): "
                f"axes {sorted(set(trace) & set(diagonal))} of the ndim-{ndim} output are in both; an axis "
                "is either traced (averaged away) or diagonal (kept once), not both"
            )
        return Layout(ndim, batch_axis, trace, diagonal)

    # --- letters ------------------------------------------------------------------
    def _letters(self) -> tuple[list[str], list[str]]:
        """Letters of each output axis for the x1 side and the x2 side."""
        a1 = [_LETTERS[i] for i in range(self.ndim)]
        a2 = [a if i in self.trace or i in self.diagonal else _LETTERS[self.ndim + i] for i, a in enumerate(a1)]
        return a1, a2

    def order(self) -> list[int]:
        """Axis order of batch-first tensors: batch axis, then the others."""
        if self.batch_axis is None:
            return list(range(self.ndim))
        return [self.batch_axis] + [i for i in range(self.ndim) if i != self.batch_axis]

    def out_subscript(self) -> str:
        a1, a2 = self._letters()
        out = []
        for i in range(self.ndim):
            if i in self.trace:
                continue
            out.append(a1[i])
            if i not in self.diagonal:
                out.append(a2[i])
        return "".join(out)

    def operand_subscripts(self, n_extra: int) -> tuple[str, str, str]:
        """``(lhs1, lhs2, out)`` for two batch-first operands with ``n_extra`` shared trailing axes.

        The trailing axes (parameter axes, or a flattened parameter axis) are summed.
        """
        a1, a2 = self._letters()
        extra = _LETTERS[2 * self.ndim : 2 * self.ndim + n_extra]
        if len(extra) != n_extra:
            raise ValueError(f"too many axes for einsum: output ndim {self.ndim} + {n_extra} extra")
        order = self.order()
        lhs1 = "".join(a1[i] for i in order) + extra
        lhs2 = "".join(a2[i] for i in order) + extra
        return lhs1, lhs2, self.out_subscript()

    def full_kernel_subscript(self) -> str:
        """Einsum reducing a full kernel ``(batch-first out1..., batch-first out2...)``."""
        lhs1, lhs2, out = self.operand_subscripts(0)
        return f"{lhs1}{lhs2}->{out}"

    def trace_size(self, shape: Sequence[int]) -> int:
        """Product of the traced axes' sizes (the kernel is divided by it)."""
        return math.prod(shape[i] for i in self.trace)

    def contract(self, j1: torch.Tensor, j2: torch.Tensor, n_extra: int) -> torch.Tensor:
        """Kernel contribution of two batch-first operands, *not* divided by the trace size."""
        lhs1, lhs2, out = self.operand_subscripts(n_extra)
        return torch.einsum(f"{lhs1},{lhs2}->{out}", j1, j2)

    def matrices(self, a: torch.Tensor, b: torch.Tensor, n_extra: int) -> tuple[torch.Tensor, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
        """``contract(a, b, n_extra)`` as one batched matrix product: ``(x, y, finish)``, ``x`` ``(d, m1, k)`` and ``y``
        ``(d, m2, k)``, with ``finish(torch.bmm(x, y.mT))`` the contraction.

        The diagonal axes are the batch ``d`` of the product, x1's and x2's kept axes its rows ``m1`` and
        columns ``m2`` (x1's batch axis first, where kept), the traced axes and the ``n_extra`` trailing axes
        the summed ``k``. Operands whose axes are already in that order (batch-first Jacobians of a full or
        traced layout) are only viewed, not copied.

        >>> lay = Layout.make(3, 0, (1,), (2,))
        >>> a, b = torch.randn(4, 5, 3, 7), torch.randn(2, 5, 3, 7)
        >>> x, y, finish = lay.matrices(a, b, 1)
        >>> tuple(x.shape), tuple(y.shape)      # (diagonal, x1's kept, traced x parameters)
        ((3, 4, 35), (3, 2, 35))
        >>> bool(torch.allclose(finish(torch.bmm(x, y.mT)), lay.contract(a, b, 1), atol=1e-5))
        True
        """
        lhs1, lhs2, out = self.operand_subscripts(n_extra)
        diag = [ch for ch in lhs1 if ch in lhs2 and ch in out]
        summed = [ch for ch in lhs1 if ch in lhs2 and ch not in out]
        free1 = [ch for ch in lhs1 if ch not in lhs2]
        free2 = [ch for ch in lhs2 if ch not in lhs1]
        size = dict(zip(lhs1 + lhs2, tuple(a.shape) + tuple(b.shape)))

        def arrange(t: torch.Tensor, lhs: str, free: list[str]) -> torch.Tensor:
            order = [lhs.index(ch) for ch in diag + free + summed]
            d, m = math.prod(size[ch] for ch in diag), math.prod(size[ch] for ch in free)
            return t.permute(order).reshape(d, m, math.prod(size[ch] for ch in summed))

        have = diag + free1 + free2
        perm = [have.index(ch) for ch in out]

        def finish(k: torch.Tensor) -> torch.Tensor:
            return k.reshape([size[ch] for ch in have]).permute(perm)

        return arrange(a, lhs1, free1), arrange(b, lhs2, free2), finish

    def contract_sum(self, pairs: Sequence[tuple[torch.Tensor, torch.Tensor, int]]) -> torch.Tensor:
        """``Σ contract(a, b, n_extra)`` over ``(a, b, n_extra)`` pairs with the same samples and output axes (one
        parameter each, say): the products accumulated into one result (``baddbmm``, out of place: differentiable
        and ``vmap``-able), not one einsum and one sum each (an einsum costs about 15 small ops of its own).

        >>> lay = Layout.make(2, 0, (), ())
        >>> a, b, c = torch.randn(3, 2, 4), torch.randn(5, 2, 4), torch.randn(3, 2, 6, 7)
        >>> d = torch.randn(5, 2, 6, 7)
        >>> bool(torch.allclose(lay.contract_sum([(a, b, 1), (c, d, 2)]), lay.contract(a, b, 1) + lay.contract(c, d, 2), atol=1e-5))
        True
        """
        acc: torch.Tensor | None = None
        finish: Callable[[torch.Tensor], torch.Tensor] | None = None
        for a, b, n_extra in pairs:
            x, y, finish = self.matrices(a, b, n_extra)
            acc = torch.bmm(x, y.mT) if acc is None else torch.baddbmm(acc, x, y.mT)
        if acc is None or finish is None:
            raise ValueError("Layout.contract_sum: no pairs to contract")
        return finish(acc)

    def contract_self(self, j: torch.Tensor, n_extra: int) -> torch.Tensor:
        """``contract(j, j, n_extra)`` for the diagonal tile of a symmetric kernel (``x2=None``):
        :meth:`contract_self_sum` of one operand.

        >>> lay = Layout.make(2, 0, (), ())
        >>> j = torch.randn(200, 3, 50, dtype=torch.float64)
        >>> bool(torch.allclose(lay.contract_self(j, 1), lay.contract(j, j, 1)))
        True
        """
        return self.contract_self_sum([(j, n_extra)])

    def contract_self_sum(self, operands: Sequence[tuple[torch.Tensor, int]]) -> torch.Tensor:
        """``Σ contract(j, j, n_extra)`` over ``(j, n_extra)`` operands with the same samples and output axes, for the
        diagonal tile of a symmetric kernel (``x2=None``), accumulated as :meth:`contract_sum` does.

        When both batch axes are kept and the product has enough rows (:data:`BLOCK_ROWS`), the samples
        are split into ``k`` blocks (at most :data:`MAX_BLOCKS`): block ``i`` is contracted with blocks
        ``i..k-1`` in one product per operand, and the blocks below the diagonal are the mirror images of
        those above, ``(k + 1) / 2k`` of the FLOPs.

        >>> lay = Layout.make(2, 0, (), ())
        >>> j, h = torch.randn(200, 3, 50, dtype=torch.float64), torch.randn(200, 3, 4, 5, dtype=torch.float64)
        >>> bool(torch.allclose(lay.contract_self_sum([(j, 1), (h, 2)]), lay.contract(j, j, 1) + lay.contract(h, h, 2)))
        True
        """
        if not operands:
            raise ValueError("Layout.contract_self_sum: no operands to contract")
        b = operands[0][0].shape[0]
        mats = [self.matrices(j, j, n_extra) for j, n_extra in operands]
        finish = mats[0][2]
        rows = mats[0][0].shape[1]  # x1's kept entries: samples x kept output entries
        parts = min(MAX_BLOCKS, b, rows // BLOCK_ROWS)
        if len(self.batch_positions()) != 2 or parts < 2:
            return self.contract_sum([(j, j, n_extra) for j, n_extra in operands])
        per = rows // b  # rows per sample (x1's batch axis leads the rows)
        size = -(-b // parts) * per
        starts = list(range(0, rows, size))
        above = []  # block row i against the columns from its first row on
        for r0 in starts:
            acc: torch.Tensor | None = None
            for x, _, _ in mats:
                part = x[:, r0 : r0 + size]
                acc = torch.bmm(part, x[:, r0:].mT) if acc is None else torch.baddbmm(acc, part, x[:, r0:].mT)
            assert acc is not None
            above.append(acc)
        band = []
        for i, r0 in enumerate(starts):
            height = min(size, rows - r0)
            left = [above[k].narrow(2, r0 - k0, height).mT for k, k0 in enumerate(starts[:i])]
            band.append(torch.cat([*left, above[i]], dim=2) if left else above[i])
        return finish(torch.cat(band, dim=1))

    def reduce_full(self, full: torch.Tensor) -> torch.Tensor:
        """Trace / diagonal of a full batch-first kernel, *not* divided by the trace size."""
        return torch.einsum(self.full_kernel_subscript(), full)

    # --- shapes and positions -----------------------------------------------------
    def kernel_shape(self, shape1: Sequence[int], shape2: Sequence[int]) -> tuple[int, ...]:
        """Shape of the kernel for outputs of shapes ``shape1`` and ``shape2`` (original order)."""
        out: list[int] = []
        for i in range(self.ndim):
            if i in self.trace:
                continue
            out.append(shape1[i])
            if i not in self.diagonal:
                out.append(shape2[i])
        return tuple(out)

    def batch_positions(self) -> tuple[int, ...]:
        """Positions of the batch axes in the kernel: (x1's, x2's), (shared,) or ()."""
        if self.batch_axis is None or self.batch_axis in self.trace:
            return ()
        pos = 0
        for i in range(self.batch_axis):
            if i not in self.trace:
                pos += 1 if i in self.diagonal else 2
        return (pos,) if self.batch_axis in self.diagonal else (pos, pos + 1)

    @property
    def batch_paired(self) -> bool:
        """True when the batch axis is traced or diagonal: only pairs (x1[n], x2[n]) count."""
        return self.batch_axis is not None and (self.batch_axis in self.trace or self.batch_axis in self.diagonal)

    def swap_perm(self) -> list[int]:
        """Permutation turning ``K(x1, x2)`` into ``K(x2, x1)``: swap every (d1, d2) pair."""
        perm: list[int] = []
        pos = 0
        for i in range(self.ndim):
            if i in self.trace:
                continue
            if i in self.diagonal:
                perm.append(pos)
                pos += 1
            else:
                perm += [pos + 1, pos]
                pos += 2
        return perm

