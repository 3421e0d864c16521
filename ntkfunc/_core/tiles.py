"""Tiles: sample blocks of ``x1`` x ``x2``, and the kernel they are gathered into.

Engines and the dataset pipeline compute the kernel tile by tile: block ``i`` of x1
against block ``j`` of x2. With ``x2=None`` only tiles ``j >= i`` are computed and the
others are mirrored (``K(x2, x1)`` is ``K(x1, x2)`` with every ``(d1, d2)`` axis pair
swapped). When the batch axis is traced or diagonal only tiles ``i == j`` contribute.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import torch

from ntkfunc._core.problem import Problem


@dataclasses.dataclass(frozen=True)
class Tile:
    """Rows ``x1[i0:i1]`` against columns ``x2[j0:j1]`` of a kernel."""

    i0: int
    i1: int
    j0: int
    j1: int

    @property
    def on_diagonal(self) -> bool:
        return self.i0 == self.j0 and self.i1 == self.j1

    @property
    def key(self) -> str:
        """A name for the tile (its marker file in a resumable output)."""
        return f"{self.i0}_{self.j0}"

    @property
    def entries(self) -> int:
        """Sample pairs the tile covers."""
        return (self.i1 - self.i0) * (self.j1 - self.j0)


def grid(n1: int, n2: int, b1: int, b2: int, *, symmetric: bool, paired: bool) -> Iterator[Tile]:
    """Tiles of ``b1 x b2`` samples covering an ``n1 x n2`` kernel.

    ``symmetric``: only tiles on and above the diagonal (the others are mirror images).
    ``paired``: only diagonal tiles (the batch axis is traced or diagonal).

    >>> [t.key for t in grid(5, 5, 2, 2, symmetric=True, paired=False)]
    ['0_0', '0_2', '0_4', '2_2', '2_4', '4_4']
    """
    for i0 in range(0, n1, b1):
        i1 = min(i0 + b1, n1)
        if paired:
            yield Tile(i0, i1, i0, i1)
            continue
        for j0 in range(i0 if symmetric else 0, n2, b2):
            yield Tile(i0, i1, j0, min(j0 + b2, n2))


def tiles(problem: Problem, b1: int, b2: int) -> Iterator[Tile]:
    """Tiles covering the problem's kernel; ``b1``/``b2`` are the block sizes (forced equal when needed)."""
    n1, n2 = problem.n1, problem.n2
    paired = [lay.batch_paired for lay in problem.layouts]
    if not problem.vmapped:
        yield Tile(0, n1, 0, n2)
        return
    if any(paired) and n1 != n2:
        raise ValueError(
            f"{problem.api}: the batch axis is traced or diagonal, which pairs x1[n] with x2[n]; expected x1 and x2 "
            f"with equal batch sizes, got {n1} and {n2}"
        )
    if problem.symmetric or any(paired):
        b1 = b2 = max(1, min(b1, b2))
    yield from grid(n1, n2, b1, b2, symmetric=problem.symmetric, paired=all(paired))


class Accumulator:
    """The kernel per output leaf, gathered tile by tile and assembled with ``torch.cat``.

    Nothing is written in place, so the result stays differentiable and usable under
    ``torch.func`` transforms (``vmap`` over an ensemble of parameters, ``grad``).
    """

    def __init__(self, problem: Problem) -> None:
        self.problem = problem
        self.blocks: list[dict[tuple[int, int], torch.Tensor]] = [{} for _ in problem.layouts]
        self.bounds1: dict[int, int] = {}
        self.bounds2: dict[int, int] = {}

    def add(self, leaf: int, tile: Tile, block: torch.Tensor) -> None:
        """Add ``block``: the leaf's (untraced-size-divided) kernel restricted to ``tile``."""
        lay = self.problem.layouts[leaf]
        if lay.batch_paired and not tile.on_diagonal:
            return
        key = (tile.i0, tile.j0)
        self.bounds1[tile.i0] = tile.i1
        self.bounds2[tile.j0] = tile.j1
        prev = self.blocks[leaf].get(key)
        self.blocks[leaf][key] = block if prev is None else prev + block

    def result(self) -> list[torch.Tensor]:
        return [self._assemble(leaf) for leaf in range(len(self.blocks))]

    def _assemble(self, leaf: int) -> torch.Tensor:
        lay = self.problem.layouts[leaf]
        blocks = self.blocks[leaf]
        pos = lay.batch_positions()
        if not self.problem.vmapped or not pos:
            return sum(blocks.values())  # type: ignore[return-value]
        if len(pos) == 1:
            return torch.cat([blocks[k] for k in sorted(blocks)], dim=pos[0])
        rows = []
        for i0 in sorted(self.bounds1):
            row = []
            for j0 in sorted(self.bounds2):
                if (i0, j0) in blocks:
                    row.append(blocks[(i0, j0)])
                else:  # symmetric: the mirror image of tile (j0, i0)
                    row.append(blocks[(j0, i0)].permute(lay.swap_perm()))
            rows.append(torch.cat(row, dim=pos[1]) if len(row) > 1 else row[0])
        return torch.cat(rows, dim=pos[0]) if len(rows) > 1 else rows[0]
