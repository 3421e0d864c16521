"""How a whole-dataset kernel is cut: block size, parameter groups and panels, from the memory budget.

For an engine that reuses Jacobians (implementation 1), per-sample Jacobians flattened over
parameters (``(b, *out, P)``) are computed per block of samples; the budget holds a *panel*
of x1 blocks plus one streamed x2 block, so each x1 Jacobian is computed once and each x2
block once per panel (with everything in one panel, every Jacobian is computed exactly
once). When even one sample's Jacobian does not fit, parameters are split into groups and
nothing is kept across tiles. Other engines get tiles of :data:`DEFAULT_BLOCK` samples and
plan their own memory inside each tile.
"""

from __future__ import annotations

import dataclasses
import math

from ntkfunc._core.memory import backward_transient
from ntkfunc._core.problem import Problem
from ntkfunc._core.tiles import Tile
from ntkfunc._engines import Engine
from ntkfunc._engines.jacobian import jacobian_bytes, pack_groups

DEFAULT_BLOCK = 256
"""Tile side for engines that plan their own memory."""

TARGET_BLOCK = 128
"""Samples per block when memory allows: large enough for efficient batched Jacobians."""


@dataclasses.dataclass(frozen=True)
class DatasetPlan:
    """How tiles are computed.

    Attributes:
      block: samples per block (x1 and x2): tiles are ``block x block``.
      groups: parameter groups (indices into the differentiated leaves).
      panel: x1 blocks whose Jacobians are held together (0: none kept across tiles).
    """

    block: int
    groups: list[list[int]]
    panel: int

    def panel_of(self, i0: int) -> int:
        return (i0 // self.block) // max(self.panel, 1)

    def order(self, t: Tile) -> tuple[int, int, int]:
        """Tile order: panel of x1 blocks, then x2 block, then x1 block (each x2 block loaded once per panel)."""
        return (self.panel_of(t.i0), t.j0, t.i0)

    def for_grid(self, block: int, n1: int) -> DatasetPlan:
        """This plan on a tile grid of ``block`` samples (a resumed run keeps its grid) for ``n1`` rows."""
        panel = min(self.panel, -(-n1 // self.block)) if self.panel else 0  # never more blocks than x1 has
        if block != self.block:
            panel = max(1, panel * self.block // block) if panel else 0
        return dataclasses.replace(self, block=block, panel=panel)


def plan_tiles(problem: Problem, engine: Engine, usable: float, n_max: int, pair_bytes: int, batch_size: int | None) -> DatasetPlan:
    """Block size, parameter groups and panel size for ``usable`` bytes.

    Memory (per-sample Jacobian ``J`` bytes, ``A`` activations while computing): a panel of ``k``
    x1 blocks plus one streamed x2 block (``(k + 1) b J``), the block being computed (its
    Jacobian and the flattened copy plus activations: ``b (2 J + A)``) and the tile
    (``3 b² pair``). Each x1 Jacobian is computed once and each x2 block once per panel, so
    about ``N1 + N2 * N1 / (k b)`` per-sample Jacobians in all (``N + N² / (2 k b)`` when symmetric).
    """
    everything = list(range(len(problem.params.diff_leaves)))
    if not engine.reuses_jacobians:
        return DatasetPlan(batch_size or min(n_max, DEFAULT_BLOCK), [everything], 0)
    sizes = jacobian_bytes(problem)
    transient = backward_transient(problem) + max(sizes)  # + backward temporaries
    total = sum(sizes)
    fit = largest_block(usable, 3 * total + transient, pair_bytes)  # a panel of one block
    if fit < 1:
        groups = pack_groups(sizes, max((usable - transient) / 3, 0), problem)
        largest = max(sum(sizes[k] for k in g) for g in groups)
        block = max(1, largest_block(usable, 3 * largest + transient, pair_bytes))
        return DatasetPlan(min(block, n_max, batch_size or n_max), groups, 0)
    block = min(n_max, batch_size or max(1, min(TARGET_BLOCK, fit // 2 if fit >= 2 else 1)))
    rest = usable - block * (3 * total + transient) - 3 * block * block * pair_bytes
    panel = max(1, int(rest // max(block * total, 1)) + 1) if rest >= 0 else 0
    return DatasetPlan(block, [everything], panel)


def largest_block(usable: float, per_sample: float, pair_bytes: float) -> int:
    """Largest ``b`` with ``b * per_sample + 3 b² pair_bytes <= usable``.

    >>> largest_block(1000.0, 10.0, 0.0)
    100
    """
    a, c = 3 * pair_bytes, per_sample
    b = (-c + math.sqrt(c * c + 4 * a * usable)) / (2 * a) if a > 0 else usable / max(c, 1)
    return int(b)
