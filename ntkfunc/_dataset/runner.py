"""The one runner: units of work over devices, committed to a store as they are done, with progress.

A :class:`Runner` takes *jobs* (lists of units: the pending tiles of one panel, or one chunk
of samples of a features file), computes them on one worker per device (each worker takes
whole jobs from a shared queue; the caller's thread for one device), and commits every
unit's result to its store through :meth:`Runner.commit`. What a unit is, how units are
grouped, computed and checked, and what a commit writes is the :class:`Work`'s:

- :class:`Tiles`: the kernel's tiles; consecutive tiles that share an x2 block are computed as
  one product (:class:`~ntkfunc._dataset.panels.RowPanels`), a CUDA out-of-memory error halves
  the block and retries, every block is checked for non-finite entries and committed with its
  mirror image (``x2=None``);
- ``features.Chunks``: the features of ``sketch=``, a chunk of samples per unit.

One group is in flight per worker: its results are fetched only after the next group's work
was issued, so that a GPU (whose work queues asynchronously) keeps computing while the host
checks and writes. Commits to a file run in a background thread (``background=True``), in
order, so that writing and ``fsync`` overlap the next computations.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Generic, Protocol, TypeVar

import torch

from ntkfunc._core.finite import nonfinite_message, report
from ntkfunc._core.layout import Layout
from ntkfunc._core.tiles import Tile
from ntkfunc._dataset.fileformat import Index
from ntkfunc._dataset.panels import TileKernel
from ntkfunc._dataset.plan import DatasetPlan
from ntkfunc._dataset.progress import Progress
from ntkfunc._dataset.store import Store

E = TypeVar("E")  # what a worker computes with: one per device
E_contra = TypeVar("E_contra", contravariant=True)
U = TypeVar("U")  # a unit of work (a tile, a chunk index)

Writes = list[tuple[Index, torch.Tensor]]


class Work(Protocol[E_contra, U]):
    """What a :class:`Runner` runs: units grouped, computed with a per-device engine, checked, written."""

    def groups(self, job: list[U]) -> list[list[U]]:
        """The units of ``job`` cut into groups, each computed at once."""
        ...

    def compute(self, engine: E_contra, units: list[U], dev: torch.device) -> list[torch.Tensor]:
        """The result of each unit of a group (possibly still being computed on ``dev``)."""
        ...

    def check(self, unit: U, block: torch.Tensor) -> None:
        """Raise (or warn) before a unit's fetched result is committed."""
        ...

    def writes(self, unit: U, block: torch.Tensor) -> tuple[str, Writes, int]:
        """The unit's key in the store, the blocks written, and the entries it counts for in the progress."""
        ...


class Runner(Generic[E, U]):
    """Computes jobs of units on every device and commits the results to ``store``.

    ``serial``: the engine is not thread-safe, so workers on several devices take turns.
    ``background``: commits run in one background thread (file outputs).
    """

    def __init__(self, work: Work[E, U], store: Store, *, serial: bool = False, background: bool = False) -> None:
        self.work, self.store = work, store
        self.lock = threading.Lock()
        self.compute_lock: Any = threading.Lock() if serial else contextlib.nullcontext()
        self.background = background

    def run(self, jobs: list[list[U]], devices: list[torch.device], make_engine: Callable[[torch.device], E], bar: Progress) -> None:
        """Every unit of ``jobs``, on one worker thread per device (the caller's thread for one device)."""
        commits = _Commits(self, bar) if self.background else None
        try:
            self._run(jobs, devices, make_engine, bar, commits)
        except BaseException:
            if commits is not None:
                commits.close(quiet=True)  # the units already queued are committed; the first error stands
            raise
        if commits is not None:
            commits.close()

    def _run(self, jobs: list[list[U]], devices: list[torch.device], make_engine: Callable[[torch.device], E],
             bar: Progress, commits: _Commits | None) -> None:
        if len(devices) == 1:
            self._work(make_engine(devices[0]), iter(jobs), devices[0], bar, commits, lambda: False)
            return
        work: queue.Queue[list[U]] = queue.Queue()
        for job in jobs:
            work.put(job)
        errors: list[BaseException] = []

        def take() -> Iterator[list[U]]:
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

    def _work(self, engine: E, jobs: Iterator[list[U]], dev: torch.device, bar: Progress,
              commits: _Commits | None, stop: Callable[[], bool]) -> None:
        """The groups of ``jobs`` one after the other, one group in flight: a group's results are
        fetched (and committed) after the next group's work was issued, so that an accelerator
        computes the next units while the host checks and writes the previous ones."""
        pending: tuple[list[U], list[torch.Tensor], float] | None = None
        for job in jobs:
            for g in self.work.groups(job):
                if stop():
                    return
                start = time.perf_counter()
                with self.compute_lock:
                    blocks = self.work.compute(engine, g, dev)
                if pending is not None:
                    self._finish(*pending, bar, commits)
                pending = (g, blocks, (time.perf_counter() - start) / len(g))
        if pending is not None:
            self._finish(*pending, bar, commits)

    def _finish(self, units: list[U], blocks: list[torch.Tensor], seconds: float, bar: Progress, commits: _Commits | None) -> None:
        """Fetch, check and commit (or queue the commit of) each unit of a computed group."""
        for u, block in zip(units, blocks):
            block = block.detach().cpu()
            self.work.check(u, block)
            if commits is not None:
                commits.put(u, block, seconds)
            else:
                self.commit(u, block, bar, seconds)

    def commit(self, unit: U, block: torch.Tensor, bar: Progress, seconds: float) -> None:
        """Write one unit's result to the store (marked done once durable) and advance the progress."""
        key, writes, entries = self.work.writes(unit, block)
        with self.lock:
            self.store.commit(key, writes)
            bar.advance(entries, seconds)


class _Commits:
    """Commits in one background thread, in order; the first error stops it and is raised to the workers."""

    def __init__(self, runner: Runner[Any, Any], bar: Progress, depth: int = 8) -> None:
        self.runner, self.bar = runner, bar
        self.queue: queue.Queue[tuple[Any, torch.Tensor, float] | None] = queue.Queue(maxsize=depth)
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
                    self.runner.commit(item[0], item[1], self.bar, item[2])
                except BaseException as err:  # raised to the workers at their next commit, or at close
                    self.error = err

    def put(self, unit: Any, block: torch.Tensor, seconds: float) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put((unit, block, seconds))

    def close(self, quiet: bool = False) -> None:
        """Wait for every queued commit; raise the first error (unless ``quiet``)."""
        self.queue.put(None)
        self.thread.join()
        if self.error is not None and not quiet:
            raise self.error


class Tiles:
    """The kernel's tiles as the runner's units: grouped by x2 block, split on CUDA OOM, checked, mirrored.

    ``limit``: the largest block side planned to fit (a resumed grid may be larger: its tiles are
    computed in pieces); halved on a CUDA out-of-memory error.
    """

    def __init__(self, layout: Layout, symmetric: bool, ndim: int, limit: int, nonfinite: str, plan: DatasetPlan) -> None:
        self.layout, self.symmetric, self.ndim, self.plan = layout, symmetric, ndim, plan
        self.paired = layout.batch_paired
        self.pos = layout.batch_positions()
        self.limit = max(1, limit)
        self.nonfinite = nonfinite

    def jobs(self, todo: list[Tile]) -> list[list[Tile]]:
        """``todo`` (in plan order) cut into panels: the unit of work a worker takes whole."""
        out: dict[int, list[Tile]] = {}
        for t in todo:
            out.setdefault(self.plan.panel_of(t.i0), []).append(t)
        return list(out.values())

    def groups(self, job: list[Tile]) -> list[list[Tile]]:
        """Consecutive tiles of one x2 block and panel with adjacent x1 blocks: computed together."""
        out: list[list[Tile]] = []
        for t in job:
            last = out[-1][-1] if out else None
            if (
                last is not None and not self.paired and last.j0 == t.j0 and last.i1 == t.i0
                and self.plan.panel_of(last.i0) == self.plan.panel_of(t.i0)
            ):
                out[-1].append(t)
            else:
                out.append([t])
        return out

    def compute(self, engine: TileKernel, ts: list[Tile], dev: torch.device) -> list[torch.Tensor]:
        """A group in one call of ``engine.tiles``; tile by tile (split on OOM) if one tile or that fails."""
        if len(ts) > 1 and max(t.i1 - t.i0 for t in ts) <= self.limit:
            try:
                return engine.tiles(ts)
            except torch.OutOfMemoryError:
                self._release(engine, dev)
        return [self._compute(engine, t, dev) for t in ts]

    def _release(self, engine: TileKernel, dev: torch.device) -> None:
        engine.release()
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    def _compute(self, engine: TileKernel, t: Tile, dev: torch.device) -> torch.Tensor:
        bi, bj = t.i1 - t.i0, t.j1 - t.j0
        if max(bi, bj) <= self.limit:
            try:
                return engine.tile(t)
            except torch.OutOfMemoryError:
                if max(bi, bj) == 1:
                    raise
                self._release(engine, dev)
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

    def check(self, t: Tile, block: torch.Tensor) -> None:
        where = f" in the tile x1[{t.i0}:{t.i1}] x x2[{t.j0}:{t.j1}]"
        message = nonfinite_message(block, self.pos, "kernel_matrix", where, offsets=(t.i0, t.j0))
        report(message, self.nonfinite, stacklevel=2, raised="; the tile was not written")

    def writes(self, t: Tile, block: torch.Tensor) -> tuple[str, Writes, int]:
        """The tile and, with ``x2=None`` off the diagonal, its mirror image."""
        writes = [(self._index(t.i0, t.i1, t.j0, t.j1), block)]
        entries = t.entries
        if self.symmetric and not self.paired and t.i0 != t.j0:
            writes.append((self._index(t.j0, t.j1, t.i0, t.i1), block.permute(self.layout.swap_perm())))
            entries *= 2
        return t.key, writes, entries

    def _index(self, i0: int, i1: int, j0: int, j1: int) -> Index:
        index = [slice(None)] * self.ndim
        index[self.pos[0]] = slice(i0, i1)
        if len(self.pos) == 2:
            index[self.pos[1]] = slice(j0, j1)
        return tuple(index)
