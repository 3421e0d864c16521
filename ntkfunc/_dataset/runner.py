"""Running the tiles of a whole-dataset kernel: over devices, splitting on CUDA OOM, checked, committed.

A :class:`Runner` takes the pending tiles in plan order, groups consecutive tiles that share
an x2 block (computed as one product by :class:`~ntkfunc._dataset.panels.JacobianPanels`),
computes them on one worker per device, checks each block for non-finite entries, and
commits it with its mirror image (``x2=None``) to the store.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from ntkfunc._core.finite import nonfinite_message, report
from ntkfunc._core.layout import Layout
from ntkfunc._core.tiles import Tile
from ntkfunc._dataset.panels import TileKernel
from ntkfunc._dataset.plan import DatasetPlan
from ntkfunc._dataset.progress import Progress
from ntkfunc._dataset.store import Index, Store


class Runner:
    """Computes tiles (splitting them on CUDA OOM), checks them, commits them with their mirrors.

    ``serial``: the engine is not thread-safe, so workers on several devices take turns.
    """

    def __init__(self, layout: Layout, symmetric: bool, store: Store, limit: int, nonfinite: str, kshape: tuple,
                 plan: DatasetPlan, serial: bool = False) -> None:
        self.layout, self.symmetric, self.store = layout, symmetric, store
        self.paired = layout.batch_paired
        self.limit = max(1, limit)
        self.nonfinite = nonfinite
        self.pos = layout.batch_positions()
        self.ndim = len(kshape)
        self.plan = plan
        self.lock = threading.Lock()
        self.compute_lock: Any = threading.Lock() if serial else contextlib.nullcontext()

    def groups(self, todo: list[Tile]) -> list[list[Tile]]:
        """Consecutive tiles of one x2 block and panel with adjacent x1 blocks: computed together."""
        out: list[list[Tile]] = []
        for t in todo:
            last = out[-1][-1] if out else None
            if (
                last is not None and not self.paired and last.j0 == t.j0 and last.i1 == t.i0
                and self.plan.panel_of(last.i0) == self.plan.panel_of(t.i0)
            ):
                out[-1].append(t)
            else:
                out.append([t])
        return out

    def run(self, todo: list[Tile], devices: list[torch.device], make_engine: Callable[[torch.device], TileKernel], bar: Progress) -> None:
        """Every tile of ``todo``, on one worker thread per device (the caller's thread for one device)."""
        groups = self.groups(todo)
        if len(devices) == 1:
            engine = make_engine(devices[0])
            for g in groups:
                self._group(engine, g, devices[0], bar)
            return
        work: queue.Queue[list[Tile]] = queue.Queue()
        for g in groups:
            work.put(g)
        errors: list[BaseException] = []

        def worker(dev: torch.device) -> None:
            try:
                engine = make_engine(dev)
                while not errors:
                    try:
                        g = work.get_nowait()
                    except queue.Empty:
                        return
                    self._group(engine, g, dev, bar)
            except BaseException as err:  # re-raised in the caller's thread
                errors.append(err)

        threads = [threading.Thread(target=worker, args=(d,), daemon=True) for d in devices]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        if errors:
            raise errors[0]

    def _group(self, engine: TileKernel, ts: list[Tile], dev: torch.device, bar: Progress) -> None:
        start = time.perf_counter()
        blocks: list[torch.Tensor] | None = None
        with self.compute_lock:
            if len(ts) > 1 and hasattr(engine, "tiles") and max(t.i1 - t.i0 for t in ts) <= self.limit:
                try:
                    blocks = engine.tiles(ts)
                except torch.OutOfMemoryError:
                    if dev.type == "cuda":
                        torch.cuda.empty_cache()
            if blocks is None:
                blocks = [self._compute(engine, t, dev) for t in ts]
        seconds = (time.perf_counter() - start) / len(ts)
        for t, block in zip(ts, blocks):
            self._commit(t, block.detach().cpu(), bar, seconds)

    def _commit(self, t: Tile, block: torch.Tensor, bar: Progress, seconds: float) -> None:
        self._check_finite(block, t)
        writes = [(self._index(t.i0, t.i1, t.j0, t.j1), block)]
        entries = t.entries
        if self.symmetric and not self.paired and t.i0 != t.j0:
            writes.append((self._index(t.j0, t.j1, t.i0, t.i1), block.permute(self.layout.swap_perm())))
            entries *= 2
        with self.lock:
            self.store.commit(t.key, writes)
            bar.advance(entries, seconds)

    def _compute(self, engine: TileKernel, t: Tile, dev: torch.device) -> torch.Tensor:
        bi, bj = t.i1 - t.i0, t.j1 - t.j0
        if max(bi, bj) <= self.limit:
            try:
                return engine.tile(t)
            except torch.OutOfMemoryError:
                if max(bi, bj) == 1:
                    raise
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
                self.limit = max(1, (max(bi, bj) + 1) // 2)
        # split the longer side (both sides when the batch axis is diagonal) and concatenate
        if self.paired or bi >= bj:
            mid = t.i0 + (bi + 1) // 2
            parts = [Tile(t.i0, mid, t.j0 if not self.paired else t.i0, t.j1 if not self.paired else mid),
                     Tile(mid, t.i1, t.j0 if not self.paired else mid, t.j1)]
            return torch.cat([self._compute(engine, p, dev) for p in parts], dim=self.pos[0])
        mid = t.j0 + (bj + 1) // 2
        parts = [Tile(t.i0, t.i1, t.j0, mid), Tile(t.i0, t.i1, mid, t.j1)]
        return torch.cat([self._compute(engine, p, dev) for p in parts], dim=self.pos[1])

    def _index(self, i0: int, i1: int, j0: int, j1: int) -> Index:
        index = [slice(None)] * self.ndim
        index[self.pos[0]] = slice(i0, i1)
        if len(self.pos) == 2:
            index[self.pos[1]] = slice(j0, j1)
        return tuple(index)

    def _check_finite(self, block: torch.Tensor, t: Tile) -> None:
        where = f" in the tile x1[{t.i0}:{t.i1}] x x2[{t.j0}:{t.j1}]"
        message = nonfinite_message(block, self.pos, "kernel_matrix", where, offsets=(t.i0, t.j0))
        report(message, self.nonfinite, stacklevel=2, raised="; the tile was not written")
