"""How one tile of a whole-dataset kernel is computed: the :class:`TileKernel` the runner calls.

- :class:`RowPanels` (per-sample rows, :class:`ntkfunc._engines.rows.source.RowSource`: an
  engine's gradients, or the stored features of ``sketch=``): rows of the current panel's x1
  blocks live in ONE preallocated buffer ``(panel * block, *out, P)``, reused for every panel
  (fresh allocations of this size would page-fault on every use); x2 blocks are computed into a
  second reused buffer. All tiles of one x2 block within a panel are ONE matrix product of the
  panel rows with that block (at the ``precision`` of the run); Gram-route parameters add their
  factor contractions per tile.
- :class:`PerTileKernel` (any engine): ``ntk_fn`` on the tile's samples.

Both give ``tile(t) -> kernel block`` (already divided by the trace size), ``tiles(ts)`` for a
run of tiles that share one x2 block, and ``release()`` of their buffers after a CUDA
out-of-memory error.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from ntkfunc._core.heap import settle_heap
from ntkfunc._core.pytree import tree_unflatten
from ntkfunc._core.tiles import Tile
from ntkfunc._core.types import PyTree
from ntkfunc._dataset.data import Samples, narrow
from ntkfunc._dataset.job import Job, Shape
from ntkfunc._dataset.plan import DatasetPlan
from ntkfunc._dataset.precision import product
from ntkfunc._engines.rows.source import Factors, RowSource
from ntkfunc.ntk import ntk_fn


class TileKernel(Protocol):
    """What the runner calls (:class:`ntkfunc._dataset.runner.Tiles`)."""

    def tile(self, t: Tile) -> torch.Tensor:
        """One tile's kernel block (any tile: a CUDA out-of-memory split gives sub-tiles)."""
        ...

    def tiles(self, ts: Sequence[Tile]) -> list[torch.Tensor]:
        """The blocks of consecutive tiles of one x2 block (a group of the runner)."""
        ...

    def release(self) -> None:
        """Drop what is held across tiles (after a CUDA out-of-memory error)."""
        ...


class RowPanels:
    """Per-sample rows held per panel of x1 blocks; x2 blocks streamed; one product per x2 block.

    ``storage``: the dtype rows are kept in (bfloat16 for ``precision="bf16"`` on CUDA, else the
    kernel's ``dtype``). ``rows_computed`` counts the per-sample rows formed (each a batched
    gradient pass's worth of work), for benchmarks and tests. Settles glibc's heap
    (:func:`~ntkfunc._core.heap.settle_heap`, as ``ntk_fn`` and ``jacobian_fn`` calls do): without it
    more of each chunk's temporaries (the batched pass's activations and cotangents) came from fresh
    mappings, faulted in again by every chunk.
    """

    def __init__(self, source: RowSource, sources: tuple[Samples, Samples], plan: DatasetPlan, device: torch.device,
                 shape: Shape, symmetric: bool, storage: torch.dtype) -> None:
        self.source, self.sources, self.plan, self.device = source, sources, plan, device
        self.symmetric, self.n1, self.layout, self.trace_size = symmetric, shape.n1, shape.layout, shape.trace_size
        self.dtype, self.storage = shape.dtype, storage
        self.pos = self.layout.batch_positions()
        self.row_shape = (*source.out_shape, source.slots.width)
        self.buf: torch.Tensor | None = None  # the panel's rows
        self.col: torch.Tensor | None = None  # the streamed block's rows
        self.staging: torch.Tensor | None = None  # a chunk's rows in the kernel's dtype before bf16 storage
        self.loaded: dict[int, Factors | None] = {}  # block start -> its Gram factors (rows in buf)
        self.panel_id: int | None = None
        self.stream_key: tuple[int, int] | None = None
        self.stream_factors: Factors | None = None
        self.rows_computed = 0
        settle_heap()  # as every kernel call: each chunk's batched pass reuses the last one's freed memory, not faulted in again
        b, n1 = plan.block, shape.n1
        self.n_blocks = -(-n1 // b)
        n_panels = plan.panel_of((self.n_blocks - 1) * b) + 1 if plan.panel else 0
        spans = [plan.panel_blocks(p, self.n_blocks) for p in range(n_panels)]
        self.panel_size = max([min(c * b, n1) - a * b for a, c in spans] or [0])

    # --- rows ------------------------------------------------------------------------------
    def _fill(self, src: int, i0: int, i1: int, target: torch.Tensor) -> Factors | None:
        """Rows of samples ``i0:i1`` of x1 (``src=1``) or x2 into ``target``; their Gram factors."""
        samples = self.sources[src - 1]
        x = samples.leaves(i0, i1, self.device, pin=True)  # pinned, asynchronous on CUDA: no wait for queued work
        self.rows_computed += i1 - i0
        if target.dtype == self.dtype:
            return self.source.compute(x, target, self.plan.chunk)
        factors = []  # bfloat16 storage: compute a chunk at a time in the kernel's dtype, then store
        for s in range(0, i1 - i0, self.plan.chunk):
            e = min(s + self.plan.chunk, i1 - i0)
            if self.staging is None or self.staging.shape[0] < e - s:
                self.staging = torch.empty((self.plan.chunk, *self.row_shape), dtype=self.dtype, device=self.device)
            part = self.source.compute(narrow(x, samples.axes, s, e), self.staging[: e - s], self.plan.chunk)
            target[s:e].copy_(self.staging[: e - s])
            if part is not None:
                factors.append(part)
        return Factors.cat(factors) if factors else None

    def _rows(self, n: int) -> torch.Tensor:
        return torch.empty((n, *self.row_shape), dtype=self.storage, device=self.device)

    def _aligned(self, i0: int, i1: int) -> bool:
        return i0 % self.plan.block == 0 and i1 == min(i0 + self.plan.block, self.n1)

    def _enter_panel(self, i0: int) -> int:
        """Switch to the panel of block ``i0`` (its rows go into the same buffer); its first row."""
        pid = self.plan.panel_of(i0)
        first, _ = self.plan.panel_blocks(pid, self.n_blocks)
        if pid != self.panel_id:
            self.panel_id, self.loaded = pid, {}
            if self.buf is None:
                self.buf = self._rows(self.panel_size)
        return first * self.plan.block

    def _panel_rows(self, i0: int, i1: int) -> torch.Tensor:
        """Rows ``i0:i1`` (whole blocks of the current panel) of the panel buffer, computed if missing."""
        base = self._enter_panel(i0)
        assert self.buf is not None
        b = self.plan.block
        for s in range(i0, i1, b):
            e = min(s + b, self.n1)
            if s in self.loaded:
                continue
            if self.symmetric and self.stream_key == (s, e) and self.col is not None:
                self.buf[s - base : e - base].copy_(self.col[: e - s])  # streamed last by the previous panel
                self.loaded[s] = self.stream_factors
            else:
                self.loaded[s] = self._fill(1, s, e, self.buf[s - base : e - base])
        return self.buf[i0 - base : i1 - base]

    def _panel_factors(self, i0: int, i1: int) -> list[Factors | None]:
        return [self.loaded[s] for s in range(i0, i1, self.plan.block)]

    def _column(self, j0: int, j1: int) -> tuple[torch.Tensor, Factors | None]:
        """Rows and factors of the x2 block ``j0:j1``: from the panel (``x2=None``, same panel) or streamed."""
        if self.symmetric and self.plan.panel_of(j0) == self.panel_id:
            rows = self._panel_rows(j0, j1)
            return rows, self.loaded[j0]
        key = (j0, j1)
        if self.stream_key != key:
            if self.col is None:
                self.col = self._rows(self.plan.block)
            self.stream_key = None
            self.stream_factors = self._fill(1 if self.symmetric else 2, j0, j1, self.col[: j1 - j0])
            self.stream_key = key
        assert self.col is not None
        return self.col[: j1 - j0], self.stream_factors

    # --- products ----------------------------------------------------------------------------
    def _gram(self, f1: Factors | None, f2: Factors | None) -> torch.Tensor | None:
        return None if f1 is None or f2 is None else self.source.gram(f1, f2)

    def tiles(self, ts: Sequence[Tile]) -> list[torch.Tensor]:
        """Tiles sharing one x2 block and consecutive x1 blocks of one panel: one product (plus Gram terms)."""
        if self.layout.batch_paired or not all(self._aligned(t.i0, t.i1) for t in ts):
            return [self.tile(t) for t in ts]
        rows = self._panel_rows(ts[0].i0, ts[-1].i1)
        col, col_factors = self._column(ts[0].j0, ts[0].j1)
        k = product(self.layout, rows, col, self.dtype)
        blocks = list(torch.split(k, [t.i1 - t.i0 for t in ts], dim=self.pos[0]))
        for n, f1 in enumerate(self._panel_factors(ts[0].i0, ts[-1].i1)):
            extra = self._gram(f1, col_factors)
            if extra is not None:
                blocks[n] = blocks[n] + extra
        return [blk / self.trace_size for blk in blocks]

    def tile(self, t: Tile) -> torch.Tensor:
        if not self.layout.batch_paired and self._aligned(t.i0, t.i1) and (t.j1 - t.j0 <= self.plan.block):
            return self.tiles([t])[0]
        # sub-tiles (after a CUDA out-of-memory split) and paired tiles: rows of these samples only
        r1 = self._rows(t.i1 - t.i0)
        f1 = self._fill(1, t.i0, t.i1, r1)
        if self.symmetric and (t.i0, t.i1) == (t.j0, t.j1):
            r2, f2 = r1, f1
        else:
            r2 = self._rows(t.j1 - t.j0)
            f2 = self._fill(1 if self.symmetric else 2, t.j0, t.j1, r2)
        k = product(self.layout, r1, r2, self.dtype) if not self.layout.batch_paired else self.layout.contract(
            r1.to(self.dtype), r2.to(self.dtype), 1)
        extra = self._gram(f1, f2)
        return (k if extra is None else k + extra) / self.trace_size

    def release(self) -> None:
        """Drop the panel and stream buffers (after a CUDA out-of-memory error)."""
        self.buf = self.col = self.staging = None
        self.loaded, self.panel_id, self.stream_key = {}, None, None


class PerTileKernel:
    """Any engine: ``ntk_fn`` on the tile's samples (the engine tiles further if needed)."""

    def __init__(self, job: Job, params: PyTree, budget: int, device: torch.device) -> None:
        self.kernel = ntk_fn(job.fn, job.trace, job.diag, job.fn_axes, job.engine.implementation, memory_budget=budget,
                             nonfinite="ignore")  # the runner checks
        self.params, self.sources, self.device, self.symmetric = params, (job.s1, job.s2), device, job.symmetric

    def _x(self, samples: Samples, start: int, stop: int) -> PyTree:
        return tree_unflatten(samples.leaves(start, stop, self.device), samples.spec)

    def tile(self, t: Tile) -> torch.Tensor:
        x1 = self._x(self.sources[0], t.i0, t.i1)
        if self.symmetric and (t.i0, t.i1) == (t.j0, t.j1):
            return self.kernel(x1, None, self.params)
        src = self.sources[0] if self.symmetric else self.sources[1]
        return self.kernel(x1, self._x(src, t.j0, t.j1), self.params)

    def tiles(self, ts: Sequence[Tile]) -> list[torch.Tensor]:
        return [self.tile(t) for t in ts]

    def release(self) -> None:
        """Nothing is held across tiles."""
