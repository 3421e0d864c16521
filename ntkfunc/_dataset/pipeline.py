"""``kernel_matrix``: the eNTK of a whole dataset, tile by tile, under a memory budget.

The kernel ``K(x1, x2)`` is cut into tiles of ``B x B`` samples (``B`` from the budget or
``batch_size``), each computed with one implementation and committed to the output (a
tensor, or a ``.npy`` file that survives interruption: see :mod:`ntkfunc._dataset.store`).
With ``x2=None`` only tiles on and above the diagonal are computed; the others are their
mirror images. Only the samples of a tile are loaded (tensors, numpy memmaps, Datasets).
Tiles are split over devices (``devices``) and over ``torchrun`` ranks.

:func:`kernel_matrix` is a pipeline of named steps: :func:`validate` the arguments,
:func:`probe` the function on one sample, :func:`plan` the tiles under the budget,
:func:`open_output` (memory or a resumable file, agreed by all ranks, locked for this run), :func:`run`
the pending tiles, and :func:`finish` (check that every tile is committed, record it, return the kernel).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import torch

from ntkfunc._core.checks import as_axes_tuple, check_bool, check_positive_int, explained_f_errors, refuse_batch_coupled
from ntkfunc._core.finite import NonFinite, check_mode
from ntkfunc._core.layout import Layout
from ntkfunc._core.memory import SAFETY, fmt_bytes, itemsize, parse_budget
from ntkfunc._core.ops import transform_friendly_attention
from ntkfunc._core.problem import Problem, make_problem
from ntkfunc._core.tiles import Tile, grid
from ntkfunc._core.types import ApplyFn, Axes, MemoryBudget, PyTree
from ntkfunc._dataset import features as featuring
from ntkfunc._dataset.data import Samples
from ntkfunc._dataset.distributed import Devices, Ranks, ranks, resolve_devices, to_device
from ntkfunc._dataset.fingerprint import job_fingerprint
from ntkfunc._dataset.kernel_file import verify_kernel
from ntkfunc._dataset.panels import PerTileKernel, RowPanels, TileKernel
from ntkfunc._dataset.plan import MEASURE_FLOPS, Costs, DatasetPlan, Sizes, assign, choose_block, measured_rates, panel_cost, partition, plan_tiles
from ntkfunc._dataset.precision import Precision, check_precision, matmul_precision, storage_dtype
from ntkfunc._dataset.progress import make_progress
from ntkfunc._dataset.runner import Runner
from ntkfunc._dataset.store import MemoryStore, NpyStore, Store, open_store
from ntkfunc._engines import Engine, Implementation, get_engine, refuse_without_rows
from ntkfunc._engines.rows.source import RowSource
from ntkfunc._engines.rows.stored import feature_rows
from ntkfunc.pntk import sum_of_logits
from ntkfunc.sketch import Sketch

API = "kernel_matrix"


@dataclasses.dataclass(frozen=True)
class Job:
    """A validated request: the function whose kernel is computed, the engine, the data and the settings."""

    f: ApplyFn  # the user's function (named in the fingerprint)
    fn: ApplyFn  # the function differentiated (the sum of logits with pntk=True)
    params: PyTree
    engine: Engine
    s1: Samples
    s2: Samples
    trace: tuple
    diag: tuple
    pntk: bool
    nonfinite: str
    precision: str = "highest"
    sketch: Sketch | None = None
    sketch_record: dict | None = None  # the resolved sketch (kind per parameter), for the fingerprint
    rows_data: tuple[Samples, Samples] | None = None  # what the panels' rows come from (the features, with a sketch)

    @property
    def symmetric(self) -> bool:
        return self.s2 is self.s1


@dataclasses.dataclass(frozen=True)
class Shape:
    """The probed kernel: its layout, shape, dtype and bytes per sample pair."""

    problem: Problem
    layout: Layout
    kshape: tuple[int, ...]
    n1: int
    n2: int

    @property
    def dtype(self) -> torch.dtype:
        return self.problem.out_dtype

    @property
    def pair_bytes(self) -> int:
        pairs = max(1, self.n1 * (1 if self.layout.batch_paired else self.n2))
        return math.prod(self.kshape) // pairs * itemsize(self.dtype)

    def sizes(self, symmetric: bool) -> Sizes:
        return Sizes(self.n1, self.n2, symmetric, self.layout.batch_paired)


@dataclasses.dataclass(frozen=True)
class Planned:
    """What :func:`plan` decided: the bytes left for the work, the tiles, and the rows' source and storage dtype."""

    usable: float
    tiles: DatasetPlan
    source: RowSource | None
    storage: torch.dtype


def kernel_matrix(
    f: ApplyFn,
    params: PyTree,
    x1: Any,
    x2: Any = None,
    *,
    trace_axes: Axes = (-1,),
    diagonal_axes: Axes = (),
    implementation: None | int | str | Implementation = None,
    pntk: bool = False,
    batch_size: int | None = None,
    memory_budget: MemoryBudget = None,
    out: None | str | os.PathLike[str] = None,
    resume: bool = True,
    progress: bool = True,
    devices: Devices = None,
    nonfinite: NonFinite = "raise",
    precision: Precision = "highest",
    verify: bool = False,
    sketch: Sketch | None = None,
    features: None | str | os.PathLike[str] = None,
) -> torch.Tensor:
    """The empirical NTK of ``f`` over whole datasets ``x1`` (rows) and ``x2`` (columns).

    Same kernel as ``ntk_fn(f, trace_axes, diagonal_axes)(x1, x2, params)`` (batch axis 0),
    computed in tiles so that it scales to datasets that do not fit in memory.

    Args:
      f: ``f(params, x) -> (N, ...)``, one output tensor with the batch axis first.
      x1, x2: tensors, numpy arrays (``np.memmap`` / ``np.load(mmap_mode="r")`` too), or a
        ``Dataset`` / ``DataLoader`` whose items are inputs or ``(input, ...)`` tuples; only a
        tile's samples are loaded. ``x2=None``: ``K(x1, x1)``, upper tiles computed and mirrored.
      trace_axes, diagonal_axes: as in ``ntk_fn`` (traces are averaged); the batch axis may be
        diagonal (then only diagonal tiles are computed) but not traced.
      implementation: an ``ntk_fn`` implementation; None picks ``"auto"``. Implementations 1, 3 and
        ``"auto"`` keep per-sample gradients ("rows") in panels across tiles and multiply them with
        one matrix product per x2 block (:mod:`ntkfunc._dataset.plan`); 3 and ``"auto"`` form them
        from the structured rules at batched-backward speed and give parameters whose Gram
        contraction is cheaper no row at all (:mod:`ntkfunc._engines.rows.structured`).
      pntk: the kernel of ``Σ_o f_o(x) / sqrt(O)`` (one output per sample, as :func:`ntkfunc.pntk_fn`)
        instead of ``f``.
      batch_size: samples per tile side (default: from the budget).
      memory_budget: bytes (or ``"2GB"``) this process may use for Jacobians, caches, tiles and,
        with ``out=None``, the kernel itself; per device with several devices. Default as ``ntk_fn``.
      out: None returns an in-memory tensor; a path writes a ``.npy`` file (``<out>.partial``
        until every tile is in, plus ``<out>.manifest.json``, ``<out>.tiles/`` and ``<out>.lock``)
        and returns a tensor over a copy-on-write memory map of it. One writer per output: a
        second run on the same ``out`` is refused while the first is alive.
      resume: continue an interrupted run with the same ``out`` (refused, with the reason, if
        f, params, buffers, data or settings changed, or if the files were damaged); False
        starts over. A resumed run keeps the recorded tile grid (a smaller budget then computes
        each tile in smaller pieces) and checks every committed tile's checksum first. See
        :mod:`ntkfunc._dataset.fingerprint` for what is compared.
      progress: a tqdm bar (tiles, ETA, kernel entries/s) on stderr when it is a terminal.
      devices: None (params' device; ``cuda:LOCAL_RANK`` under torchrun with CUDA), ``"all"``
        (every CUDA device, one worker thread each), or a list of devices.
      nonfinite: ``"raise"`` (FloatingPointError naming the samples; the tile is not
        committed), ``"warn"`` (warning naming them, the tile is kept) or ``"ignore"``.
      precision: ``"highest"`` (IEEE float32 products), ``"tf32"`` (CUDA TF32) or ``"bf16"``
        (bfloat16 inputs, float32 accumulation) for the float32 matrix products of the run
        (:mod:`ntkfunc._dataset.precision`; measured errors in benchmarks/RESULTS.md).
      verify: with ``out``, read the finished file back and check every tile against its
        checksum (:func:`ntkfunc.verify_kernel`) before returning.
      sketch: an :class:`ntkfunc.Sketch`: the sketched kernel ``(J(x1) Π)(J(x2) Π)ᵀ`` (as
        :func:`ntkfunc.sketched_ntk_fn`, unbiased) instead of the exact one. The features
        ``J(x) Π`` ``(N, *out, dim)`` are computed first, once per sample
        (:mod:`ntkfunc._dataset.features`), then multiplied tile by tile exactly as per-sample
        rows are, with the same tiling, output, resume and progress. Needs per-sample
        gradients: implementation 1, 3 or ``"auto"``.
      features: with ``sketch``: a folder where the features are written as
        ``features-<key>.npy`` (``np.load`` opens them; ``<key>`` hashes model, params, data and
        sketch, so another kernel of the same data reuses them). Default: ``<out>.features``
        with ``out``, memory without. The output's manifest records the sketch, its resolved
        plan and an error estimate (:meth:`ntkfunc.Sketch.error_estimate`).

    Shapes: an ``(N, O)`` output gives ``(N1, N2)`` with the default trace; the layout is
    ``ntk_fn``'s. CUDA out-of-memory errors halve the computed block and retry.
    Under ``torchrun`` each rank computes its share of the tiles; every rank returns the kernel.

    Example:
      >>> import torch, ntkfunc
      >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
      >>> f, params = ntkfunc.from_module(model)
      >>> x = torch.randn(10, 4)
      >>> k = ntkfunc.kernel_matrix(f, params, x, batch_size=3, progress=False)
      >>> k.shape
      torch.Size([10, 10])
      >>> torch.allclose(k, ntkfunc.ntk_fn(f)(x, None, params), atol=1e-5)
      True
      >>> ntkfunc.kernel_matrix(f, params, x, x[:4], trace_axes=(), progress=False).shape
      torch.Size([10, 4, 3, 3])
    """
    job = validate(f, params, x1, x2, trace_axes, diagonal_axes, implementation, pntk, batch_size, nonfinite, precision, sketch)
    check_verify(verify, out)
    rk = ranks()
    device = resolve_devices(devices, params, rk, API)
    shape = probe(job, device[0])
    budget = parse_budget(memory_budget, device[0])
    featured = None
    if job.sketch is not None:
        featured = featuring.compute(job, shape.problem, job.sketch, budget, out, features, resume, device, rk, progress_bar_wanted(progress, rk))
        job = sketched(job, featured)
    planned = plan(job, shape, budget, batch_size, in_memory=out is None, device=device[0])
    store, grid_block = open_output(job, shape, out, planned.tiles, resume, rk)
    try:  # the store holds the output's lock until the kernel is returned (or the run fails)
        tiles = list(grid(shape.n1, shape.n2, grid_block, grid_block, symmetric=job.symmetric, paired=shape.layout.batch_paired))
        with explained_f_errors(API, job.params, {}, without_vmap=_WITHOUT_VMAP):
            run(job, shape, store, planned, grid_block, tiles, device, progress_bar=progress_bar_wanted(progress, rk), rk=rk)
        if featured is not None and isinstance(store, NpyStore):
            store.manifest["sketch_run"] = {"error_estimate": featured.error, "features": list(featured.paths)}
        return finish(store, tiles, rk, verify=verify)
    finally:
        store.close()


def validate(f: ApplyFn, params: PyTree, x1: Any, x2: Any, trace_axes: Axes, diagonal_axes: Axes,
             implementation: None | int | str | Implementation, pntk: bool, batch_size: int | None, nonfinite: str,
             precision: str = "highest", sketch: Sketch | None = None) -> Job:
    """Check the arguments (before anything runs) and wrap the data as :class:`Samples`."""
    check_mode(nonfinite, API)
    check_precision(precision, API)
    check_positive_int(batch_size, "batch_size", API, allow_none=True)
    engine = get_engine("auto" if implementation is None else implementation, api=API)
    if sketch is not None and not isinstance(sketch, Sketch):
        raise TypeError(f"{API}(sketch={sketch!r}): expected None or ntkfunc.Sketch(dim, seed=0, kind='auto')")
    if sketch is not None:
        refuse_without_rows(engine, API, "sketch=..., ")
    refuse_batch_coupled(f, 0, API)
    fn = sum_of_logits(f, 0, api=f"{API}(pntk=True)", keepdim=True) if pntk else f
    s1 = Samples(x1, "x1")
    s2 = s1 if x2 is None else Samples(x2, "x2")
    return Job(f, fn, params, engine, s1, s2, as_axes_tuple(trace_axes), as_axes_tuple(diagonal_axes), bool(pntk), nonfinite, precision,
               sketch)


def sketched(job: Job, featured: featuring.Featured) -> Job:
    """The job of the kernel stage: rows are the stored features (width ``dim``), multiplied as per-sample rows are."""
    assert job.sketch is not None
    engine = dataclasses.replace(job.engine, rows=feature_rows(job.sketch.dim))
    return dataclasses.replace(job, engine=engine, rows_data=(featured.s1, featured.s2), sketch_record=featured.record)


def check_verify(verify: bool, out: None | str | os.PathLike[str]) -> None:
    """``verify=True`` checks an output file: it needs ``out``."""
    if check_bool(verify, "verify", API) and out is None:
        raise ValueError(f"{API}(verify=True, out=None): verify reads the kernel file back; expected out='K.npy'")


def probe(job: Job, device: torch.device) -> Shape:
    """``f`` on the first sample of each side: the kernel's layout and shape, checked for a matrix."""
    problem = _problem(job, device, job.params)
    if len(problem.layouts) != 1 or problem.fx_axes != [0]:
        raise ValueError(
            f"{API}: f returned {len(problem.layouts)} output tensors with batch axes {problem.fx_axes}; "
            "expected one tensor with the batch axis first (use ntk_fn for pytree outputs)"
        )
    layout = problem.layouts[0]
    if layout.batch_axis in layout.trace:
        raise ValueError(
            f"{API}(trace_axes={job.trace}): the batch axis 0 is traced, which sums the kernel over samples "
            "instead of forming a sample-by-sample matrix; expected trace_axes without axis 0 (use ntk_fn for that sum)"
        )
    n1, n2 = len(job.s1), len(job.s2)
    if layout.batch_paired and n1 != n2:
        raise ValueError(
            f"{API}(diagonal_axes={job.diag}): the batch axis is diagonal, which pairs x1[n] with x2[n]; "
            f"expected x1 and x2 of equal lengths, got {n1} and {n2}"
        )
    shape1 = (n1,) + tuple(problem.out_shapes1[0][1:])
    shape2 = (n2,) + tuple(problem.out_shapes2[0][1:])
    return Shape(problem, layout, layout.kernel_shape(shape1, shape2), n1, n2)


_WITHOUT_VMAP = "use ntk_fn(f, vmap_axes=None) for the kernel of a whole batch without vmap (kernel_matrix needs per-sample outputs)"


def _problem(job: Job, device: torch.device, params: PyTree) -> Problem:
    """The problem on the first sample of each side, copied out of its source (a view of a dataset
    tensor would make every tensor saved for backward count the whole dataset's storage)."""
    with transform_friendly_attention():
        x1 = job.s1.get(0, 1).to(device).clone()
        x2 = None if job.symmetric else job.s2.get(0, 1).to(device).clone()
        with explained_f_errors(API, params, {"x1": x1, "x2": x2}, without_vmap=_WITHOUT_VMAP):
            return make_problem(job.fn, x1, x2, params, 0, job.trace, job.diag, api=API)


def plan(job: Job, shape: Shape, budget: int, batch_size: int | None, *, in_memory: bool, device: torch.device) -> Planned:
    """The budget left for the work once an in-memory kernel is held, the tiles, and the engine's row source."""
    kernel_bytes = math.prod(shape.kshape) * itemsize(shape.dtype) if in_memory else 0
    usable = budget * SAFETY - kernel_bytes
    if usable <= 0:
        raise MemoryError(
            f"{API}: the kernel {tuple(shape.kshape)} alone needs {fmt_bytes(kernel_bytes)} in memory and "
            f"memory_budget allows {fmt_bytes(budget)}; pass out='K.npy' to write it to disk, or raise memory_budget"
        )
    sizes = shape.sizes(job.symmetric)
    storage = storage_dtype(job.precision, shape.dtype, device)
    source = job.engine.rows(shape.problem, shape.n1, shape.n2, int(usable)) if job.engine.rows is not None else None
    ratio = itemsize(storage) / itemsize(shape.dtype)
    sample = source.sample_bytes() if source is not None else None
    hint = None
    if source is not None and sample is not None and batch_size is None and not sizes.paired:
        pairs = shape.n1 * (shape.n1 + 1) / 2 if job.symmetric else shape.n1 * shape.n2
        if pairs * source.flops().pair >= MEASURE_FLOPS:  # worth measuring: the block from rates and memory
            rates = measured_rates(device, storage if storage != torch.bfloat16 else shape.dtype, min(1024, shape.n1))
            hint = choose_block(sample, ratio, usable, sizes, shape.pair_bytes, rates, source.flops())
    tiles = plan_tiles(sample, ratio, usable, sizes, shape.pair_bytes, batch_size, hint)
    if job.rows_data is not None and not tiles.panel:
        raise MemoryError(f"{API}(sketch=...): memory_budget={fmt_bytes(budget)} holds not even one block of features and "
                          "its kernel tile; raise memory_budget or pass a smaller batch_size")
    return Planned(usable, tiles, source, storage)


def open_output(job: Job, shape: Shape, out: None | str | os.PathLike[str], dataset_plan: DatasetPlan,
                resume: bool, rk: Ranks) -> tuple[Store, int]:
    """``(store, tile side)``: every rank's store, and the tile grid of the run being resumed (or this plan's)."""
    if out is None:
        return MemoryStore(shape.kshape, shape.dtype), rk.broadcast_int(dataset_plan.block)  # every rank cuts the same tiles
    fingerprint = job_fingerprint(
        job.f, job.params, shape.problem, job.s1, None if job.symmetric else job.s2, job.trace, job.diag, job.pntk,
        job.engine, shape.kshape,
    )
    if job.precision != "highest":  # reduced-precision products differ from IEEE ones: never mixed in one file
        fingerprint["precision"] = job.precision
    if job.sketch_record is not None:  # kind, dim, seed and the resolved kind of every parameter
        fingerprint["sketch"] = job.sketch_record
    store = open_store(out, shape.kshape, shape.dtype, fingerprint, {"block": dataset_plan.block}, resume, rk)
    assert isinstance(store, NpyStore)
    return store, int(store.grid["block"])


def run(job: Job, shape: Shape, store: Store, planned: Planned, grid_block: int, tiles: list[Tile],
        devices: list[torch.device], *, progress_bar: bool, rk: Ranks) -> None:
    """Compute and commit this rank's pending tiles, panel by panel, on ``devices``."""
    limit = planned.tiles.block  # the largest block planned to fit; a resumed grid may be larger
    on_grid, mine = schedule(planned, shape.sizes(job.symmetric), grid_block, rk, len(devices))
    done = store.done_keys()
    todo = sorted((t for t in tiles if on_grid.panel_of(t.i0) in mine and t.key not in done), key=on_grid.ordering(shape.n1, job.symmetric))
    runner = Runner(shape.layout, job.symmetric, store, limit, job.nonfinite, shape.kshape, on_grid,
                    serial=not job.engine.thread_safe, background=isinstance(store, NpyStore))
    jobs = sorted(runner.jobs(todo), key=lambda ts: mine.index(on_grid.panel_of(ts[0].i0)))

    def make_engine(dev: torch.device) -> TileKernel:
        p = job.params if dev == devices[0] and len(devices) == 1 else to_device(job.params, dev)
        if on_grid.panel and job.engine.rows is not None:
            problem = shape.problem if p is job.params else _problem(job, dev, p)
            source = planned.source if p is job.params and planned.source is not None else (
                job.engine.rows(problem, shape.n1, shape.n2, int(planned.usable)))  # one per device: workspaces
            layout = problem.layouts[0]
            return RowPanels(source, job.rows_data or (job.s1, job.s2), on_grid, dev, job.symmetric, shape.n1, layout,
                             layout.trace_size(problem.out_shapes1[0]), shape.dtype, planned.storage)
        return PerTileKernel(job.fn, p, (job.s1, job.s2), job.engine, job.trace, job.diag, int(planned.usable), dev, job.symmetric)

    bar = make_progress(progress_bar, len(tiles), len(done & {t.key for t in tiles}))
    try:
        with matmul_precision(job.precision, devices):
            runner.run(jobs, devices, make_engine, bar)
    finally:
        bar.close()


def schedule(planned: Planned, sizes: Sizes, grid_block: int, rk: Ranks, n_devices: int) -> tuple[DatasetPlan, list[int]]:
    """The plan on the run's tile grid with its panels cut, and this rank's panels (dearest first).

    Panels are cut to equal cost for all workers (``ranks x devices``) and dealt out by cost;
    every rank computes the same schedule from the same inputs (rank 0's panel size, FLOP
    counts), so no tile is left out or computed twice. A rank's devices then take its
    panels dearest first.
    """
    on_grid = planned.tiles.for_grid(grid_block, sizes.n1)
    on_grid = dataclasses.replace(on_grid, panel=rk.broadcast_int(on_grid.panel))  # budgets differ by rank: rank 0's cut for all
    workers = rk.world * n_devices
    n_blocks = -(-sizes.n1 // grid_block)
    if on_grid.panel and planned.source is not None:
        fl = planned.source.flops() if workers > 1 else None
        costs = Costs(fl.row, fl.pair) if fl is not None else Costs(1.0, 0.0)
        on_grid = dataclasses.replace(on_grid, starts=partition(n_blocks, on_grid.panel, workers, grid_block, sizes, costs))
    else:  # each block row is a unit of work; its cost is its tiles
        costs = Costs(0.0, 1.0)
        on_grid = dataclasses.replace(on_grid, panel=0, starts=tuple(range(n_blocks)))
    spans = [on_grid.panel_blocks(p, n_blocks) for p in range(len(on_grid.starts))]
    cost = [panel_cost(a, c, grid_block, sizes, costs) for a, c in spans]
    slots = assign(cost, rk.world * n_devices)
    mine = sorted((p for w in range(rk.rank * n_devices, (rk.rank + 1) * n_devices) for p in slots[w]), key=lambda p: (-cost[p], p))
    return on_grid, mine


def finish(store: Store, tiles: list[Tile], rk: Ranks, *, verify: bool = False) -> torch.Tensor:
    """Wait for every rank, check that every tile is committed, record completion (and ``verify``), return the kernel."""
    rk.barrier()
    if isinstance(store, MemoryStore):
        return rk.all_reduce_sum(store.result())
    if rk.rank == 0:
        missing = [t.key for t in tiles if t.key not in store.done_keys()]
        if missing:  # pragma: no cover - an invariant: every rank committed its tiles
            raise RuntimeError(f"{API}: tiles {missing[:5]} were not committed")
        store.finish([t.key for t in tiles])
        if verify:
            assert isinstance(store, NpyStore)
            verify_kernel(store.path, api=f"{API}(verify=True)")
    rk.barrier()
    return store.result()


def progress_bar_wanted(progress: bool, rk: Ranks) -> bool:
    """A progress bar on rank 0 only."""
    return bool(progress) and rk.rank == 0
