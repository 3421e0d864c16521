"""How one tile of a whole-dataset kernel is computed.

- :class:`JacobianPanels` (engines that reuse Jacobians): block Jacobians flattened over
  parameters, held per panel; each tile is one matrix product of panel rows with a block.
- :class:`PerTileKernel` (any engine): ``ntk_fn`` on the tile's samples.

Both expose ``tile(t) -> kernel block`` (already divided by the trace size); the panels also
``tiles(ts)`` for a run of tiles that share one x2 block.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch.func import jacrev, vmap

from ntkfunc._core.layout import Layout
from ntkfunc._core.problem import Problem
from ntkfunc._core.tiles import Tile
from ntkfunc._core.types import ApplyFn, PyTree
from ntkfunc._dataset.data import Samples
from ntkfunc._dataset.plan import DatasetPlan
from ntkfunc._engines import Engine
from ntkfunc.ntk import ntk_fn


class TileKernel(Protocol):
    """What the runner asks for: one tile's kernel block."""

    def tile(self, t: Tile) -> torch.Tensor: ...


class JacobianPanels:
    """Per-sample Jacobians flattened over parameters, held per panel of x1 blocks.

    The current panel's x1 Jacobians live in one buffer ``(panel * block, *out, P)``,
    filled block by block as tiles need them; x2 blocks are streamed (the latest is kept).
    :meth:`tiles` computes all tiles of one x2 block within a panel as ONE matrix product
    of the panel rows with that block, so the contraction runs at matmul speed.
    """

    def __init__(self, problem: Problem, sources: tuple[Samples, Samples], plan: DatasetPlan, device: torch.device, symmetric: bool, n1: int) -> None:
        self.problem, self.sources, self.plan, self.device = problem, sources, plan, device
        self.symmetric, self.n1 = symmetric, n1
        self.layout: Layout = problem.layouts[0]
        self.pos = self.layout.batch_positions()
        self.trace_size = self.layout.trace_size(problem.out_shapes1[0])
        self.keep = plan.panel > 0 and len(plan.groups) == 1 and not self.layout.batch_paired
        self.buf: torch.Tensor | None = None
        self.loaded: set[int] = set()
        self.panel_id: int | None = None
        self.stream: tuple[tuple, torch.Tensor] | None = None
        self.jacobians_computed = 0
        self.fns = [vmap(jacrev(problem.sample_fn(g), argnums=0), in_dims=(None, problem.x_axes)) for g in plan.groups]

    def _compute(self, src: int, i0: int, i1: int, g: int, out: torch.Tensor | None = None) -> torch.Tensor:
        x = self.sources[src - 1].get(i0, i1).to(self.device)
        leaves = self.problem.params.diff_leaves
        jac = self.fns[g]([leaves[k] for k in self.plan.groups[g]], [x])[0]
        shape = jac[0].shape[: jac[0].ndim - leaves[self.plan.groups[g][0]].ndim]
        pieces = [j.reshape(*shape, -1) for j in jac]
        self.jacobians_computed += i1 - i0
        if out is not None:
            return torch.cat(pieces, dim=-1, out=out)
        return torch.cat(pieces, dim=-1) if len(pieces) > 1 else pieces[0]

    def _aligned(self, i0: int, i1: int) -> bool:
        return i0 % self.plan.block == 0 and i1 == min(i0 + self.plan.block, self.n1)

    def _panel_rows(self, i0: int, i1: int) -> torch.Tensor:
        """Rows ``i0:i1`` (whole blocks of the current panel) of the panel buffer, computed if missing."""
        assert self.panel_id is not None
        b = self.plan.block
        base = self.panel_id * self.plan.panel * b
        for s in range(i0, i1, b):
            e = min(s + b, self.n1)
            if s not in self.loaded:
                if self.buf is None:
                    first = self._compute(1, s, e, 0)
                    self.buf = first.new_empty((self.plan.panel * b, *first.shape[1:]))
                    self.buf[s - base : e - base] = first
                    del first
                else:
                    self._compute(1, s, e, 0, out=self.buf[s - base : e - base])
                self.loaded.add(s)
        assert self.buf is not None
        return self.buf[i0 - base : i1 - base]

    def _column(self, j0: int, j1: int) -> torch.Tensor:
        if self.symmetric and self.plan.panel_of(j0) == self.panel_id:
            return self._panel_rows(j0, j1)
        key = (j0, j1)
        if self.stream is None or self.stream[0] != key:
            self.stream = None  # free the previous block first
            self.stream = (key, self._compute(1 if self.symmetric else 2, j0, j1, 0))
        return self.stream[1]

    def _enter_panel(self, i0: int) -> None:
        pid = self.plan.panel_of(i0)
        if pid != self.panel_id:
            self.panel_id, self.loaded = pid, set()

    def tiles(self, ts: Sequence[Tile]) -> list[torch.Tensor]:
        """Tiles sharing one x2 block and consecutive x1 blocks of one panel: one product."""
        if not self.keep or not all(self._aligned(t.i0, t.i1) for t in ts):
            return [self.tile(t) for t in ts]
        self._enter_panel(ts[0].i0)
        rows = self._panel_rows(ts[0].i0, ts[-1].i1)
        k = self.layout.contract(rows, self._column(ts[0].j0, ts[0].j1), 1) / self.trace_size
        return list(torch.split(k, [t.i1 - t.i0 for t in ts], dim=self.pos[0]))

    def tile(self, t: Tile) -> torch.Tensor:
        if self.keep and self._aligned(t.i0, t.i1):
            return self.tiles([t])[0]
        total: torch.Tensor | None = None  # no reuse: sub-tiles (after OOM), parameter groups
        same = self.symmetric and (t.i0, t.i1) == (t.j0, t.j1)
        for g in range(len(self.plan.groups)):
            j1 = self._compute(1, t.i0, t.i1, g)
            j2 = j1 if same else self._compute(1 if self.symmetric else 2, t.j0, t.j1, g)
            part = self.layout.contract(j1, j2, 1)
            total = part if total is None else total + part
        assert total is not None
        return total / self.trace_size


class PerTileKernel:
    """Any engine: ``ntk_fn`` on the tile's samples (the engine tiles further if needed)."""

    def __init__(self, f: ApplyFn, params: PyTree, sources: tuple[Samples, Samples], engine: Engine, trace: tuple, diag: tuple,
                 budget: int, device: torch.device, symmetric: bool) -> None:
        self.kernel = ntk_fn(f, trace, diag, 0, engine.implementation, memory_budget=budget, nonfinite="ignore")  # the runner checks
        self.params, self.sources, self.device, self.symmetric = params, sources, device, symmetric

    def tile(self, t: Tile) -> torch.Tensor:
        x1 = self.sources[0].get(t.i0, t.i1).to(self.device)
        if self.symmetric and (t.i0, t.i1) == (t.j0, t.j1):
            return self.kernel(x1, None, self.params)
        src = self.sources[0] if self.symmetric else self.sources[1]
        return self.kernel(x1, src.get(t.j0, t.j1).to(self.device), self.params)
