"""How a whole-dataset kernel is cut: tile side, panels of kept rows, gradient chunks, and who computes what.

For an engine with per-sample rows (:class:`ntkfunc._engines.rows.source.RowSource`), each
sample's row (``*out x P`` numbers: its gradient flattened over the parameters that take
rows) plus its Gram-route factors costs ``row`` bytes. The budget holds a *panel* of ``k``
x1 blocks of ``b`` samples (their rows computed once) plus one streamed x2 block, so every
x1 row is computed once and every x2 row once per panel; with all of x1 in one panel each
row is computed exactly once (``N`` rows with ``x2=None``, ``N1 + N2`` otherwise). Rows are
computed ``chunk`` samples at a time (the batched backward's activations are what the
chunk costs). Panels are the unit of work: :func:`partition` cuts the x1 blocks into
panels of equal *cost* (rows computed plus sample pairs multiplied, the upper triangle of a
symmetric kernel being what it is) and :func:`assign` deals them to workers (devices,
``torchrun`` ranks) by cost. Engines without rows get tiles of :data:`DEFAULT_BLOCK` samples
and plan their own memory inside each tile (``ntk_fn``).
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections.abc import Callable, Sequence

import torch

from ntkfunc._core.buffers import clock
from ntkfunc._core.tiles import Tile
from ntkfunc._engines.rows.source import CHUNK, Flops, SampleBytes, chunk_size

DEFAULT_BLOCK = 256
"""Tile side for engines that plan their own memory."""

TARGET_BLOCK = 128
"""Samples per block when the GEMM rates are not measured: wide enough for matmul speed on a CPU."""

MEASURE_FLOPS = 5e11
"""Gram products of at least this many FLOPs are worth measuring GEMM rates to pick the block."""


@dataclasses.dataclass(frozen=True)
class DatasetPlan:
    """How tiles are computed.

    Attributes:
      block: samples per block (x1 and x2): tiles are ``block x block``.
      panel: most x1 blocks whose rows are held together (0: nothing kept; the engine per tile).
      chunk: samples per batched gradient pass.
      starts: first x1 block of each panel (:func:`partition`); empty: panels of ``panel`` blocks.
    """

    block: int
    panel: int
    chunk: int = CHUNK
    starts: tuple[int, ...] = ()

    def panel_of(self, i0: int) -> int:
        blk = i0 // self.block
        if self.starts:
            return bisect.bisect_right(self.starts, blk) - 1
        return blk // max(self.panel, 1)

    def panel_blocks(self, pid: int, n_blocks: int) -> tuple[int, int]:
        """First and one-past-last x1 block of panel ``pid``."""
        if self.starts:
            return self.starts[pid], (self.starts[pid + 1] if pid + 1 < len(self.starts) else n_blocks)
        k = max(self.panel, 1)
        return pid * k, min((pid + 1) * k, n_blocks)

    def order(self, t: Tile) -> tuple[int, int, int]:
        """Tile order: panel of x1 blocks, then x2 block, then x1 block (each x2 block loaded once per panel)."""
        return (self.panel_of(t.i0), t.j0, t.i0)

    def ordering(self, n1: int, symmetric: bool) -> Callable[[Tile], tuple[int, int, int, int]]:
        """The tile order runs use: panel by panel, x2 block by x2 block, x1 blocks ascending.

        With ``x2=None`` a panel's own columns come first, then the later x2 blocks in
        *descending* order, so that the last block streamed is the next panel's first block
        (its rows are copied, not recomputed). Otherwise x2 runs forward in even panels and
        backward in odd ones, so that consecutive panels share their boundary x2 block.

        >>> p = DatasetPlan(1, 2)
        >>> [(t.i0, t.j0) for t in sorted([Tile(i, i + 1, j, j + 1) for i in range(4) for j in range(i, 4)], key=p.ordering(4, True))]
        [(0, 0), (0, 1), (1, 1), (0, 3), (1, 3), (0, 2), (1, 2), (2, 2), (2, 3), (3, 3)]
        """
        n_blocks = -(-n1 // self.block)

        def key(t: Tile) -> tuple[int, int, int, int]:
            pid = self.panel_of(t.i0)
            if symmetric:
                last = self.panel_blocks(pid, n_blocks)[1] * self.block
                return (pid, 0, t.j0, t.i0) if t.j0 < last else (pid, 1, -t.j0, t.i0)
            return (pid, 0, t.j0 if pid % 2 == 0 else -t.j0, t.i0)

        return key

    def for_grid(self, block: int, n1: int) -> DatasetPlan:
        """This plan on a tile grid of ``block`` samples (a resumed run keeps its grid) for ``n1`` rows."""
        panel = min(self.panel, -(-n1 // self.block)) if self.panel else 0  # never more blocks than x1 has
        if block != self.block:
            panel = max(1, panel * self.block // block) if panel else 0
        return dataclasses.replace(self, block=block, panel=panel, chunk=min(self.chunk, block), starts=())


@dataclasses.dataclass(frozen=True)
class Sizes:
    """The kernel being planned: ``n1 x n2`` samples, symmetric (``x2=None``) or paired (batch axis diagonal)."""

    n1: int
    n2: int
    symmetric: bool
    paired: bool


def plan_tiles(sample: SampleBytes | None, storage_ratio: float, usable: float, sizes: Sizes, pair_bytes: int,
               batch_size: int | None, block_hint: int | None = None) -> DatasetPlan:
    """Tile side, panel and chunk for ``usable`` bytes (``sample``: the row source's bytes per sample, None: no rows).

    ``storage_ratio``: panel bytes per computed byte (0.5 for bfloat16 panels of a float32
    kernel). Memory: a panel of ``k`` blocks plus one streamed block (``(k + 1) b row``; no
    stream when everything fits in one panel of a symmetric kernel), a chunk being computed
    (``chunk transient``), and the products (``3 k b² pair``).
    """
    n_max = max(sizes.n1, sizes.n2)
    per_tile = DatasetPlan(batch_size or min(n_max, DEFAULT_BLOCK), 0, 1)
    if sample is None:
        return per_tile
    row = sample.rows * storage_ratio + sample.kept
    chunk = chunk_size(usable, sample)
    room = usable - chunk * (sample.transient + sample.rows)  # a chunk being computed (and its rows before storage)
    block = max(1, min(batch_size or block_hint or TARGET_BLOCK, n_max))
    while True:
        k = _panel_blocks(room, row, block, sizes, pair_bytes)
        if k >= 1 or block == 1 or batch_size:
            break
        block = max(1, block // 2)
    if k < 1:
        return per_tile  # not even one block of rows and one streamed block: the engine per tile
    return DatasetPlan(block, k, min(chunk, block))


def _panel_blocks(room: float, row: float, block: int, sizes: Sizes, pair_bytes: int) -> int:
    """Most x1 blocks of ``block`` samples a panel can hold in ``room`` bytes (0: none), with the stream and products.

    >>> _panel_blocks(10.0, 1.0, 2, Sizes(8, 8, True, False), 0)  # 8 rows fit: one panel, nothing streamed
    4
    >>> _panel_blocks(7.0, 1.0, 2, Sizes(8, 8, True, False), 0)  # 2 blocks + a streamed block
    2
    """
    n_blocks = -(-sizes.n1 // block)
    per_block = block * row + 3 * block * block * pair_bytes
    if (sizes.symmetric or sizes.paired) and sizes.n1 * row + 3 * n_blocks * block * block * pair_bytes <= room:
        return n_blocks  # x2 = x1 and every row fits: nothing streamed
    return max(0, min(n_blocks, int((room - block * row) // per_block)))


COMMIT_SECONDS = 0.015
"""Seconds one tile's commit to a file output costs besides its bytes (its marker written, two ``fsync`` calls): about 15 ms
per tile measured on a shared disk (benchmarks/RESULTS.md, section 14). :func:`choose_block` prices it for outputs on disk:
a 50,000 x 50,000 kernel in 128-sample tiles is 76,636 commits (19 minutes of them), in 1,024-sample tiles 1,225."""

WIDE_BLOCKS = (1024, 2048)
"""Block widths :func:`choose_block` also prices for outputs on disk (at the widest measured width's rate)."""


# --- costs, panels and workers -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Costs:
    """Seconds (or any common unit) per row computed and per sample pair multiplied."""

    row: float
    pair: float


def panel_cost(first: int, last: int, block: int, sizes: Sizes, costs: Costs) -> float:
    """Cost of x1 blocks ``[first, last)`` as one panel: its rows, the x2 rows it streams, its pairs.

    >>> panel_cost(0, 1, 2, Sizes(4, 4, True, False), Costs(1.0, 0.0))  # rows 0-1 once, rows 2-3 streamed
    4.0
    """
    a, c = first * block, min(last * block, sizes.n1)
    rows = c - a
    if sizes.paired:
        return costs.row * rows + costs.pair * rows * block
    if sizes.symmetric:
        streamed = sizes.n1 - c
        pairs = rows * (sizes.n1 - a) - rows * (rows - block) / 2  # the panel's tiles on and above the diagonal
        return costs.row * (rows + streamed) + costs.pair * pairs
    return costs.row * (rows + sizes.n2) + costs.pair * rows * sizes.n2


def partition(n_blocks: int, cap: int, workers: int, block: int, sizes: Sizes, costs: Costs) -> tuple[int, ...]:
    """First block of each panel: at most ``cap`` blocks each, ``workers`` x an integer panels of equal cost.

    One worker: panels of ``cap`` blocks (the fewest). Several: the smallest number of panels that
    is a multiple of ``workers`` and respects ``cap``, cut where their costs are equal (a bisection
    on the cost of the dearest panel).

    >>> partition(6, 6, 1, 1, Sizes(6, 6, True, False), Costs(0.0, 1.0))
    (0,)
    >>> partition(6, 6, 2, 1, Sizes(6, 6, True, False), Costs(0.0, 1.0))  # 21 tiles: 11 + 10
    (0, 2)
    """
    cap = max(1, cap)
    if workers <= 1 or n_blocks <= 1:
        return tuple(range(0, n_blocks, cap))
    needed = -(-n_blocks // cap)  # panels the memory requires
    m = min(n_blocks, workers * -(-needed // workers))

    def cut(limit: float) -> list[int]:
        starts, a = [], 0
        while a < n_blocks:
            starts.append(a)
            c = a + 1
            while c < n_blocks and c - a < cap and panel_cost(a, c + 1, block, sizes, costs) <= limit:
                c += 1
            a = c
        return starts

    lo, hi = 0.0, panel_cost(0, n_blocks, block, sizes, costs)
    best = cut(hi)
    for _ in range(60):
        mid = (lo + hi) / 2
        starts = cut(mid)
        if len(starts) <= m:
            hi, best = mid, starts
        else:
            lo = mid
    return tuple(best)


def assign(costs: Sequence[float], workers: int) -> list[list[int]]:
    """Panels (indices) per worker: dearest first, each to the least loaded worker (deterministic).

    >>> assign([5.0, 3.0, 3.0, 1.0], 2)
    [[0, 3], [1, 2]]
    """
    load = [0.0] * workers
    out: list[list[int]] = [[] for _ in range(workers)]
    for p in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        w = min(range(workers), key=lambda r: (load[r], r))
        out[w].append(p)
        load[w] += costs[p]
    return [sorted(ps) for ps in out]


# --- measured rates --------------------------------------------------------------------------------


def gemm_seconds(device: torch.device, dtype: torch.dtype, m: int, n: int, k: int, repeats: int = 3) -> float:
    """Best-of-``repeats`` seconds of one ``(m x k) @ (k x n)`` product on ``device``: synchronized wall time on a GPU,
    the process's CPU time on the CPU (:func:`~ntkfunc._core.buffers.clock`: other jobs sharing the cores do not move it,
    where wall times of a shared machine made the widths' rates differ 2x from one measurement to the next)."""
    a = torch.randn(m, k, dtype=dtype, device=device)
    b = torch.randn(n, k, dtype=dtype, device=device)
    a @ b.T  # warm-up (allocation, kernel selection)
    best = math.inf
    for _ in range(repeats):
        t0 = clock(device)
        a @ b.T
        best = min(best, clock(device) - t0)
    return max(best, 1e-9)


def measured_rates(device: torch.device, dtype: torch.dtype, rows: int, candidates: Sequence[int] = (64, 128, 256, 512)) -> dict[int, float]:
    """FLOP/s of a panel product ``(rows x P) @ (P x b)`` for each streamed block width ``b``.

    Narrow blocks are memory-bound; measured with ``P`` cut to 8,192 columns.
    """
    k = 8192
    return {b: 2.0 * rows * b * k / gemm_seconds(device, dtype, rows, b, k) for b in candidates}


def rows_needed(sizes: Sizes, block: int, panel: int) -> float:
    """Per-sample rows computed with panels of ``panel`` blocks (x1 once, x2 once per panel).

    >>> rows_needed(Sizes(8, 8, True, False), 2, 4), rows_needed(Sizes(8, 8, True, False), 2, 2)
    (8.0, 10.0)
    """
    n_blocks = -(-sizes.n1 // block)
    total = 0.0
    for a in range(0, n_blocks, max(panel, 1)):
        total += panel_cost(a, min(a + panel, n_blocks), block, sizes, Costs(1.0, 0.0))
    if sizes.symmetric and n_blocks > panel:
        total -= block * (-(-n_blocks // panel) - 1)  # the last streamed block of a panel starts the next
    return total


def pairs_computed(sizes: Sizes, block: int) -> float:
    """Sample pairs the tiles of ``block`` samples multiply: with ``x2=None`` the tiles on and above the diagonal, whole
    (the diagonal tiles' lower halves too: about ``N b / 2`` pairs beyond ``N (N + 1) / 2``).

    >>> pairs_computed(Sizes(512, 512, True, False), 128), pairs_computed(Sizes(512, 512, True, False), 64), 512 * 513 / 2
    (163840.0, 147456.0, 131328.0)
    """
    if not sizes.symmetric:
        return float(sizes.n1 * sizes.n2)
    ends = [min(sizes.n1, a + block) for a in range(0, sizes.n1, block)]
    return float(sum(e * (e - a) for a, e in zip([0, *ends[:-1]], ends)))


def tile_count(sizes: Sizes, block: int) -> int:
    """Tiles of ``block`` samples a side (on and above the diagonal with ``x2=None``; the diagonal when paired).

    >>> tile_count(Sizes(10, 10, True, False), 4), tile_count(Sizes(10, 7, False, False), 4), tile_count(Sizes(8, 8, True, True), 4)
    (6, 6, 2)
    """
    b1, b2 = -(-sizes.n1 // block), -(-sizes.n2 // block)
    if sizes.paired:
        return b1
    return b1 * (b1 + 1) // 2 if sizes.symmetric else b1 * b2


def choose_block(sample: SampleBytes, storage_ratio: float, usable: float, sizes: Sizes, pair_bytes: int,
                 rates: dict[int, float], flops: Flops, *, on_disk: bool = False) -> int | None:
    """The block width with the least estimated time, from measured product rates and the memory.

    Each candidate ``b`` (the measured widths capped at N, and for each the width that fills the
    room it leaves with one more block, when the panel does not hold all of x1) fixes the panel
    the budget holds, hence the rows computed.
    The estimate: rows x FLOPs per row plus pairs x Gram-route FLOPs per pair at the best rate,
    plus pairs x the rows' product FLOPs at ``b``'s rate (the nearest measured width not wider),
    the pairs being those the tiles of ``b`` multiply (:func:`pairs_computed`).
    Wide blocks multiply faster; narrow ones leave room for longer panels (fewer rows recomputed)
    and waste less on the diagonal tiles of a symmetric kernel.
    ``on_disk``: the output is a file, whose tiles cost :data:`COMMIT_SECONDS` each to commit (added per
    tile); then the :data:`WIDE_BLOCKS` are candidates too.
    """
    commit_seconds = COMMIT_SECONDS if on_disk else 0.0
    fastest = max(rates.values())
    measured = sorted(rates)
    candidates = {min(b, max(sizes.n1, sizes.n2)) for b in measured + (list(WIDE_BLOCKS) if commit_seconds else [])}
    for b in measured:
        p = plan_tiles(sample, storage_ratio, usable, sizes, pair_bytes, b)
        if p.panel and p.panel * p.block < sizes.n1:  # room for about (panel + 1) blocks: fill it with one more
            candidates.add(max(1, (p.panel + 1) * p.block // (p.panel + 2)))
    best: tuple[float, int] | None = None
    for b in sorted(candidates):
        p = plan_tiles(sample, storage_ratio, usable, sizes, pair_bytes, b)
        if not p.panel:
            continue
        rate = rates[max([m for m in measured if m <= b] or [measured[0]])]
        pairs = pairs_computed(sizes, p.block)
        seconds = (rows_needed(sizes, p.block, p.panel) * flops.row + pairs * flops.gram) / fastest + pairs * flops.product / rate
        seconds += commit_seconds * tile_count(sizes, p.block)
        if best is None or seconds < best[0]:
            best = (seconds, b)
    return None if best is None else best[1]
