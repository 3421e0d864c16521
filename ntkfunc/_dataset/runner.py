"""Running the tiles of a whole-dataset kernel: over devices, splitting on CUDA OOM, checked, committed.

A :class:`Runner` takes *jobs* (the pending tiles of one panel each, in plan order), groups
consecutive tiles that share an x2 block (computed as one product by
:class:`~ntkfunc._dataset.panels.RowPanels`), computes them on one worker per device (each
worker takes whole panels, the dearest first, so that a panel's rows are computed by one
device only), checks each block for non-finite entries, and commits it with its mirror
image (``x2=None``) to the store. One group is in flight per worker: its results are
fetched only after the next group's work was issued, so that a GPU (whose work queues
asynchronously) keeps computing while the host checks and writes. Commits to a file run in a background thread
(``background=True``), so that writing and ``fsync`` overlap the next products.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterator
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
    ``background``: commits run in one background thread (file outputs).
    """

    def __init__(self, layout: Layout, symmetric: bool, store: Store, limit: int, nonfinite: str, kshape: tuple,
                 plan: DatasetPlan, serial: bool = False, background: bool = False) -> None:
        self.layout, self.symmetric, self.store = layout, symmetric, store
        self.paired = layout.batch_paired
        self.limit = max(1, limit)
        self.nonfinite = nonfinite
        self.pos = layout.batch_positions()
        self.ndim = len(kshape)
        self.plan = plan
        self.lock = threading.Lock()
        self.compute_lock: Any = threading.Lock() if serial else contextlib.nullcontext()
        self.background = background

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

    def jobs(self, todo: list[Tile]) -> list[list[Tile]]:
        """``todo`` (in plan order) cut into panels: the unit a worker takes whole."""
        out: dict[int, list[Tile]] = {}
        for t in todo:
            out.setdefault(self.plan.panel_of(t.i0), []).append(t)
        return list(out.values())

    def run(self, jobs: list[list[Tile]], devices: list[torch.device], make_engine: Callable[[torch.device], TileKernel], bar: Progress) -> None:
        """Every tile of ``jobs``, on one worker thread per device (the caller's thread for one device)."""
        commits = _Commits(self, bar) if self.background else None
        try:
            self._run(jobs, devices, make_engine, bar, commits)
        except BaseException:
            if commits is not None:
                commits.close(quiet=True)  # the tiles already queued are committed; the first error stands
            raise
        if commits is not None:
            commits.close()

    def _run(self, jobs: list[list[Tile]], devices: list[torch.device], make_engine: Callable[[torch.device], TileKernel],
             bar: Progress, commits: _Commits | None) -> None:
        if len(devices) == 1:
            self._work(make_engine(devices[0]), iter(jobs), devices[0], bar, commits, lambda: False)
            return
        work: queue.Queue[list[Tile]] = queue.Queue()
        for job in jobs:
            work.put(job)
        errors: list[BaseException] = []

        def take() -> Iterator[list[Tile]]:
            while not errors:
                try:
                    yield work.get_nowait()
                except queue.Empty:
                    return

        def worker(dev: torch.device) -> None:
            try:
                self._work(make_engine(dev), take(), dev, bar, commits, lambda: bool(errors))
            except BaseException as err:  # re-raised in the caller's thread
                errors.append(err)

        threads = [threading.Thread(target=worker, args=(d,), daemon=True) for d in devices]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        if errors:
            raise errors[0]

    def _work(self, engine: TileKernel, jobs: Iterator[list[Tile]], dev: torch.device, bar: Progress,
              commits: _Commits | None, stop: Callable[[], bool]) -> None:
        """The groups of ``jobs`` one after the other, one group in flight: a group's results are
        fetched (and committed) after the next group's work was issued, so that an accelerator
        computes the next rows and products while the host checks and writes the previous tiles."""
        pending: tuple[list[Tile], list[torch.Tensor], float] | None = None
        for job in jobs:
            for g in self.groups(job):
                if stop():
                    return
                start = time.perf_counter()
                blocks = self._group(engine, g, dev)
                if pending is not None:
                    self._finish(*pending, bar, commits)
                pending = (g, blocks, (time.perf_counter() - start) / len(g))
        if pending is not None:
            self._finish(*pending, bar, commits)

    def _group(self, engine: TileKernel, ts: list[Tile], dev: torch.device) -> list[torch.Tensor]:
        blocks: list[torch.Tensor] | None = None
        with self.compute_lock:
            if hasattr(engine, "tiles") and max(t.i1 - t.i0 for t in ts) <= self.limit:
                try:
                    blocks = engine.tiles(ts)
                except torch.OutOfMemoryError:
                    release = getattr(engine, "release", None)
                    if release is not None:
                        release()
                    if dev.type == "cuda":
                        torch.cuda.empty_cache()
            if blocks is None:
                blocks = [self._compute(engine, t, dev) for t in ts]
        return blocks

    def _finish(self, ts: list[Tile], blocks: list[torch.Tensor], seconds: float, bar: Progress, commits: _Commits | None) -> None:
        """Fetch, check and commit (or queue the commit of) each tile of a computed group."""
        for t, block in zip(ts, blocks):
            block = block.detach().cpu()
            self._check_finite(block, t)
            if commits is not None:
                commits.put(t, block, seconds)
            else:
                self._commit(t, block, bar, seconds)

    def _commit(self, t: Tile, block: torch.Tensor, bar: Progress, seconds: float) -> None:
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
                release = getattr(engine, "release", None)
                if release is not None:
                    release()
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


class _Commits:
    """Commits in one background thread, in order; the first error stops it and is raised to the workers."""

    def __init__(self, runner: Runner, bar: Progress, depth: int = 8) -> None:
        self.runner, self.bar = runner, bar
        self.queue: queue.Queue[tuple[Tile, torch.Tensor, float] | None] = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.error is None:
                try:
                    self.runner._commit(item[0], item[1], self.bar, item[2])
                except BaseException as err:  # raised to the workers at their next commit, or at close
                    self.error = err

    def put(self, t: Tile, block: torch.Tensor, seconds: float) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put((t, block, seconds))

    def close(self, quiet: bool = False) -> None:
        """Wait for every queued commit; raise the first error (unless ``quiet``)."""
        self.queue.put(None)
        self.thread.join()
        if self.error is not None and not quiet:
            raise self.error

