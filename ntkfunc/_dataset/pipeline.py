"""``kernel_matrix``: the eNTK of a whole dataset, tile by tile, under a memory budget.

The kernel ``K(x1, x2)`` is cut into tiles of ``B x B`` samples (``B`` from the budget or
``batch_size``), each computed with one implementation and committed to the output (a
tensor, or a ``.npy`` file that survives interruption: see :mod:`ntkfunc._dataset.store`).
With ``x2=None`` only tiles on and above the diagonal are computed; the others are their
mirror images. Only the samples of a tile are loaded (tensors, numpy memmaps, Datasets).
Tiles are split over devices (``devices``) and over ``torchrun`` ranks.

:func:`kernel_matrix` is a pipeline of named steps: :func:`validate` the arguments,
:func:`probe` the function on one sample, with ``sketch=`` compute the features
(:func:`ntkfunc._dataset.features.compute`), :func:`plan` the tiles and the rows' source under the
budget, :func:`open_output` (memory or a resumable file, agreed by all ranks, locked for this
run), :func:`run` the pending tiles, and :func:`finish` (check that every tile is committed,
record it, return the kernel). Steps pass small frozen records (:mod:`ntkfunc._dataset.job`:
:class:`Job`, :class:`Output`, :class:`Workers`, :class:`Shape`; here :class:`Planned`).

The data path of ``kernel_matrix(f, params, x, sketch=Sketch(k), out="K.npy")``, from the call to
a tile on disk (25 hops, 21 functions in 8 modules: the features stage and the kernel stage share
the runner and the writer; the set-up steps :func:`validate`, :func:`probe` and :func:`open_output`
/ :func:`~ntkfunc._dataset.store.open_store` are off the path):

1. :func:`kernel_matrix` -> :func:`ntkfunc._dataset.features.compute` (a ``ProjectedRows`` source; each side's features file)
2. ``Runner.run`` -> ``Runner._work`` -> ``features.Chunks.compute`` -> ``ProjectedRows.compute``: a chunk's features
3. ``Runner.commit`` (the background thread) -> ``Chunks.writes`` -> ``NpyStore.commit``: entries, ``fsync``, the chunk's marker
4. :func:`~ntkfunc._dataset.store.settle` -> ``NpyStore.finish``: ``features-<key>.npy`` complete, its samples handed back
5. :func:`rows_of` (``StoredRows`` over the features) -> :func:`plan` -> :func:`run`
6. ``Runner.run`` -> ``Runner._work`` -> :func:`tile_kernel` (a ``RowPanels``) -> ``Tiles.compute`` -> ``RowPanels.tiles``
7. ``RowPanels._fill`` -> ``StoredRows.compute`` (feature rows into the panel) -> ``precision.product``: the tiles' blocks
8. ``Runner.commit`` -> ``Tiles.writes`` -> ``NpyStore.commit``: the tile and its mirror in ``K.npy.partial``, then its marker
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import torch

from ntkfunc._core.checks import as_axes_tuple, check_bool, check_positive_int, explained_f_errors, refuse_batch_coupled, split_vmap_axes
from ntkfunc._core.finite import NonFinite, check_mode, nonfinite_message, report
from ntkfunc._core.memory import SAFETY, fmt_bytes, itemsize, parse_budget
from ntkfunc._core.problem import Problem
from ntkfunc._core.pytree import tree_map
from ntkfunc._core.tiles import Tile, grid
from ntkfunc._core.types import ApplyFn, Axes, MemoryBudget, PyTree, VMapAxes
from ntkfunc._dataset import features as featuring
from ntkfunc._dataset.data import Samples
from ntkfunc._dataset.distributed import Devices, Ranks, ranks, resolve_devices, to_device
from ntkfunc._dataset.fileformat import kernel_grid
from ntkfunc._dataset.fingerprint import differences, job_fingerprint
from ntkfunc._dataset.job import API, WITHOUT_VMAP, Job, Output, Shape, Workers, problem_on
from ntkfunc._dataset.kernel_file import verify_kernel
from ntkfunc._dataset.panels import PerTileKernel, RowPanels, TileKernel
from ntkfunc._dataset.plan import MEASURE_FLOPS, Costs, DatasetPlan, Sizes, assign, choose_block, measured_rates, panel_cost, partition, plan_tiles
from ntkfunc._dataset.precision import Precision, check_precision, matmul_precision, storage_dtype
from ntkfunc._dataset.progress import make_progress
from ntkfunc._dataset.runner import Runner, Tiles
from ntkfunc._dataset.store import MemoryStore, NpyStore, Store, open_store, settle
from ntkfunc._engines import Implementation, get_engine, refuse_without_rows
from ntkfunc._engines.rows.source import RowsFactory, RowSource
from ntkfunc._engines.rows.stored import StoredRows
from ntkfunc.sketch import Sketch


@dataclasses.dataclass(frozen=True)
class Rows:
    """Where the panels' rows come from: a row source per device (``make(problem, n1, n2, budget)``) over ``data``."""

    make: RowsFactory
    data: tuple[Samples, Samples]


@dataclasses.dataclass(frozen=True)
class Planned:
    """What :func:`plan` decided: the bytes left for the work, the tiles, the rows (None: ``ntk_fn`` per tile),
    their source on the first device and their storage dtype."""

    usable: float
    tiles: DatasetPlan
    rows: Rows | None
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
    overwrite: bool = False,
    vmap_axes: VMapAxes = 0,
) -> torch.Tensor:
    """The empirical NTK of ``f`` over whole datasets ``x1`` (rows) and ``x2`` (columns).

    Same kernel as ``ntk_fn(f, trace_axes, diagonal_axes, vmap_axes)(x1, x2, params)``,
    computed in tiles so that it scales to datasets that do not fit in memory.

    Args:
      f: ``f(params, x)``, one output tensor with a batch axis (given by ``vmap_axes``; ``pntk=True``
        also takes a pytree of outputs).
      x1, x2: what ``ntk_fn`` takes at dataset scale: a tensor, a numpy array (``np.memmap`` /
        ``np.load(mmap_mode="r")`` too) or any pytree of them (a dict of keyword inputs with an
        attention mask, a tuple for several inputs, nested) whose leaves share the batch axis;
        or a ``Dataset`` / ``DataLoader`` whose items are inputs (a tensor, an array or a pytree of
        them, one sample each) or ``(input, ...)`` tuples. Only a tile's samples are loaded.
        ``x2=None``: ``K(x1, x1)``, upper tiles computed and mirrored. x2 has x1's structure.
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
        f, params, buffers, data or settings changed, if the file is of another results format,
        or if the files were damaged); False starts over. A resumed run keeps the recorded tile
        grid (a smaller budget then computes each tile in smaller pieces), checks every committed
        tile's marker and checksum first, and reports the committed tiles that hold non-finite
        entries as ``nonfinite`` says. See :mod:`ntkfunc._dataset.fingerprint` for what is compared.
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
        sketch, so another kernel of the same data reuses them, as it reuses those of
        :func:`ntkfunc.feature_matrix` with ``out=`` this folder). Default: ``<out>.features``
        with ``out``, memory without. The output's manifest records the sketch, its resolved
        plan and an error estimate (:meth:`ntkfunc.Sketch.error_estimate`). Needs ``sketch``.
      overwrite: replace a file at ``out`` (or a features file) that no manifest describes; by
        default such a file (an array of yours) is refused and left as it is. (``resume=False``
        starts over on kernel_matrix's own outputs, with or without it.)
      vmap_axes: as ``ntk_fn``'s: the batch axis of the inputs and the output, an int, a pytree of
        ints (or None for a leaf shared by every sample) matching x, or ``(x_axes, fx_axes, {})``.
        Every block of samples is sliced along these axes. ``vmap_axes=None`` (samples that interact)
        is refused: no tile of such a kernel can be computed without the whole batch; use
        ``ntk_fn(f, vmap_axes=None)`` for one batch.

    Shapes: an ``(N, O)`` output gives ``(N1, N2)`` with the default trace; the layout is
    ``ntk_fn``'s. CUDA out-of-memory errors halve the computed block and retry.
    Under ``torchrun`` the ranks first compare the fingerprint of their f, params, buffers, data
    and settings with rank 0's (all refuse, naming what differs, before any work); then each rank
    computes its share of the tiles, and every rank returns the kernel. The kernel is not
    differentiable: params and inputs are detached.

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
    job = validate(f, params, x1, x2, trace_axes, diagonal_axes, implementation, pntk, batch_size, nonfinite, precision, sketch,
                   vmap_axes)
    output = check_output(out, features, sketch, resume, verify, overwrite)
    workers = place(devices, job.params, progress)
    shape = probe(job, workers.devices[0])
    budget = check_budget(memory_budget, workers.devices[0])
    fingerprint = job_fingerprint(job, shape) if out is not None or workers.rk.world > 1 else None
    agree(fingerprint, workers.rk)
    featured = featuring.compute(job, shape.problem, budget, output, workers) if job.sketch is not None else None
    planned = plan(job, shape, rows_of(job, featured), budget, batch_size, in_memory=out is None, device=workers.devices[0])
    store, grid_block = open_output(job, shape, planned, output, workers.rk, fingerprint, featured)
    try:  # the store holds the output's lock until the kernel is returned (or the run fails)
        tiles = list(grid(shape.n1, shape.n2, grid_block, grid_block, symmetric=job.symmetric, paired=shape.layout.batch_paired))
        committed = store.committed()  # by earlier runs: every marker read once
        recheck_committed(job, shape, store, tiles, committed)
        with explained_f_errors(API, job.params, {}, job.vmap_axes, without_vmap=WITHOUT_VMAP):
            passes = run(job, shape, store, planned, grid_block, tiles, workers, set(committed))
        record = {**(featured.run_record() if featured is not None else {}), **passes}
        return finish(store, tiles, workers.rk, verify=output.verify, record=record or None)
    finally:
        store.close()


def validate(f: ApplyFn, params: PyTree, x1: Any, x2: Any, trace_axes: Axes, diagonal_axes: Axes,
             implementation: None | int | str | Implementation, pntk: bool, batch_size: int | None, nonfinite: str,
             precision: str = "highest", sketch: Sketch | None = None, vmap_axes: VMapAxes = 0) -> Job:
    """Check the arguments (before anything runs) and wrap the data as :class:`Samples` (sliced along ``vmap_axes``)."""
    check_mode(nonfinite, API)
    check_precision(precision, API)
    check_positive_int(batch_size, "batch_size", API, allow_none=True)
    engine = get_engine("auto" if implementation is None else implementation, api=API)
    if sketch is not None and not isinstance(sketch, Sketch):
        raise TypeError(f"{API}(sketch={sketch!r}): expected None or ntkfunc.Sketch(dim, seed=0, kind='auto')")
    if sketch is not None:
        refuse_without_rows(engine, API, "sketch=..., ")
    split_vmap_axes(vmap_axes, API)  # its leaves are axes
    refuse_batch_coupled(f, vmap_axes, API)
    s1 = Samples(x1, "x1", vmap_axes)
    s2 = s1 if x2 is None else Samples(x2, "x2", vmap_axes)
    if s2.spec != s1.spec:
        raise ValueError(f"{API}: x1 and x2 have different structures: {s1.spec} vs {s2.spec}; expected x2 to hold the same "
                         "inputs as x1 (the same keys and leaves)")
    detached = tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, params)  # the kernel is not differentiable
    return Job(f, detached, engine, s1, s2, as_axes_tuple(trace_axes), as_axes_tuple(diagonal_axes), bool(pntk), nonfinite, precision,
               sketch, vmap_axes)


def check_output(out: None | str | os.PathLike[str], features: None | str | os.PathLike[str], sketch: Sketch | None,
                 resume: bool, verify: bool, overwrite: bool) -> Output:
    """Where the results go, checked before anything runs: ``verify`` needs ``out``, ``features`` a sketch and a folder."""
    if check_bool(verify, "verify", API) and out is None:
        raise ValueError(f"{API}(verify=True, out=None): verify reads the kernel file back; expected out='K.npy'")
    check_bool(overwrite, "overwrite", API)
    if features is not None and sketch is None:
        raise ValueError(f"{API}(features={str(features)!r}): features= is where the features of sketch= are written, and there "
                         "is no sketch; expected sketch=ntkfunc.Sketch(dim) with it (or no features=)")
    if features is not None and os.path.exists(features) and not os.path.isdir(features):
        raise ValueError(f"{API}(features={str(features)!r}): {features} is a file; expected a folder (features-<key>.npy files "
                         "are written into it) or a path where one can be made")
    return Output(out, features, resume, bool(verify), bool(overwrite))


def check_budget(memory_budget: MemoryBudget, device: torch.device, api: str = API) -> int:
    """The budget in bytes, refused when it leaves nothing for the work (before anything runs or is written)."""
    budget = parse_budget(memory_budget, device)
    if int(budget * SAFETY) < 1:
        raise MemoryError(f"{api}(memory_budget={memory_budget!r}): {fmt_bytes(budget)} leaves {fmt_bytes(int(budget * SAFETY))} "
                          f"for the work once the safety margin ({1 - SAFETY:.0%}) is kept; expected a budget of at least 2 bytes "
                          "(e.g. '4GB')")
    return budget


def agree(fingerprint: dict[str, Any] | None, rk: Ranks, api: str = API, result: str = "one kernel") -> None:
    """Under ``torchrun``: refuse on every rank, before any work, when a rank's fingerprint is not rank 0's.

    Rank 0 broadcasts its fingerprint (f, params, buffers, data and settings: see
    :mod:`ntkfunc._dataset.fingerprint`), every rank compares its own with it, and all ranks
    raise the same ``ValueError`` naming, per rank, what differs: the tiles of ranks that
    disagree would otherwise be summed (or written) into a kernel of neither.
    """
    if rk.world == 1:
        return
    assert fingerprint is not None
    reference = rk.broadcast_object(fingerprint)
    everyone = rk.gather_objects(differences(reference, fingerprint) if rk.rank else [])
    bad = [(r, d) for r, d in enumerate(everyone) if d]
    if bad:
        detail = "; ".join(f"rank {r} has different {', '.join(d)}" for r, d in bad)
        raise ValueError(
            f"{api}: the {rk.world} torchrun ranks would not compute {result}: {detail} than rank 0; expected every rank to "
            "hold the same f, params, buffers, data and settings (build the model after the same torch.manual_seed, or load "
            "the same weights, and give every rank the same x1 and x2). Nothing was computed"
        )

def place(devices: Devices, params: PyTree, progress: bool) -> Workers:
    """This process's devices and rank; a progress bar on rank 0 only."""
    rk = ranks()
    return Workers(resolve_devices(devices, params, rk, API), rk, bool(progress) and rk.rank == 0)


def probe(job: Job, device: torch.device) -> Shape:
    """``f`` on the first sample of each side: the kernel's layout and shape, checked for a matrix."""
    problem = problem_on(job, device, job.params)
    if len(problem.layouts) != 1 or problem.fx_axes is None:
        raise ValueError(
            f"{API}: f returned {len(problem.layouts)} output tensors; expected one tensor with a batch axis (use ntk_fn for "
            "pytree outputs, or pntk=True for the kernel of the sum of all of them)"
        )
    layout = problem.layouts[0]
    batch = problem.fx_axes[0]
    if batch in layout.trace:
        raise ValueError(
            f"{API}(trace_axes={job.trace}): the batch axis {batch} is traced, which sums the kernel over samples "
            f"instead of forming a sample-by-sample matrix; expected trace_axes without axis {batch} (use ntk_fn for that sum)"
        )
    n1, n2 = len(job.s1), len(job.s2)
    if layout.batch_paired and n1 != n2:
        raise ValueError(
            f"{API}(diagonal_axes={job.diag}): the batch axis is diagonal, which pairs x1[n] with x2[n]; "
            f"expected x1 and x2 of equal lengths, got {n1} and {n2}"
        )
    shape1 = tuple(problem.out_shapes1[0][:batch]) + (n1,) + tuple(problem.out_shapes1[0][batch + 1:])
    shape2 = tuple(problem.out_shapes2[0][:batch]) + (n2,) + tuple(problem.out_shapes2[0][batch + 1:])
    return Shape(problem, layout, layout.kernel_shape(shape1, shape2), n1, n2)


def rows_of(job: Job, featured: featuring.Featured | None) -> Rows | None:
    """The rows the panels multiply: the stored features (``sketch=``), the engine's per-sample gradients, or none."""
    if featured is not None:
        assert job.sketch is not None
        dim = job.sketch.dim

        def stored(problem: Problem, n1: int, n2: int, budget: int) -> RowSource:
            return StoredRows(problem, dim)

        return Rows(stored, featured.samples)
    return Rows(job.engine.rows, (job.s1, job.s2)) if job.engine.rows is not None else None


def plan(job: Job, shape: Shape, rows: Rows | None, budget: int, batch_size: int | None, *, in_memory: bool,
         device: torch.device) -> Planned:
    """The budget left for the work once an in-memory kernel is held, the tiles, and the rows' source."""
    kernel_bytes = math.prod(shape.kshape) * itemsize(shape.dtype) if in_memory else 0
    usable = budget * SAFETY - kernel_bytes
    if usable <= 0:
        raise MemoryError(
            f"{API}: the kernel {tuple(shape.kshape)} alone needs {fmt_bytes(kernel_bytes)} in memory and "
            f"memory_budget allows {fmt_bytes(budget)}; pass out='K.npy' to write it to disk, or raise memory_budget"
        )
    sizes = shape.sizes(job.symmetric)
    storage = storage_dtype(job.precision, shape.dtype, device)
    source = rows.make(shape.problem, shape.n1, shape.n2, int(usable)) if rows is not None else None
    ratio = itemsize(storage) / itemsize(shape.dtype)
    sample = source.sample_bytes() if source is not None else None
    hint = None
    if source is not None and sample is not None and batch_size is None and not sizes.paired:
        pairs = shape.n1 * (shape.n1 + 1) / 2 if job.symmetric else shape.n1 * shape.n2
        if pairs * source.flops().pair >= MEASURE_FLOPS:  # worth measuring: the block from rates and memory
            rates = measured_rates(device, storage if storage != torch.bfloat16 else shape.dtype, min(1024, shape.n1))
            hint = choose_block(sample, ratio, usable, sizes, shape.pair_bytes, rates, source.flops(), on_disk=not in_memory)
    tiles = plan_tiles(sample, ratio, usable, sizes, shape.pair_bytes, batch_size, hint)
    if job.sketch is not None and not tiles.panel:
        raise MemoryError(f"{API}(sketch=...): memory_budget={fmt_bytes(budget)} holds not even one block of features and "
                          "its kernel tile; raise memory_budget or pass a smaller batch_size")
    return Planned(usable, tiles, rows, source, storage)


def open_output(job: Job, shape: Shape, planned: Planned, output: Output, rk: Ranks, fingerprint: dict[str, Any] | None = None,
                featured: featuring.Featured | None = None) -> tuple[Store, int]:
    """``(store, tile side)``: every rank's store, and the tile grid of the run being resumed (or this plan's).

    ``fingerprint``: the job's (:func:`job_fingerprint`, computed once), with the resolved sketch of ``featured``.
    """
    if output.out is None:
        return MemoryStore(shape.kshape, shape.dtype), rk.broadcast_int(planned.tiles.block)  # every rank cuts the same tiles
    fingerprint = job_fingerprint(job, shape) if fingerprint is None else fingerprint
    if featured is not None:
        fingerprint = {**fingerprint, "sketch": featured.record}
    grid_record = kernel_grid(planned.tiles.block, shape.layout.batch_positions(), job.symmetric)
    store = open_store(output.out, shape.kshape, shape.dtype, fingerprint, grid_record, output.resume, rk, overwrite=output.overwrite)
    return store, int(store.grid["block"])


def recheck_committed(job: Job, shape: Shape, store: Store, tiles: list[Tile], committed: dict[str, int]) -> None:
    """Committed tiles whose entries are not all finite (``committed``: ``{tile: non-finite entries}``, by an earlier run
    with ``nonfinite="warn"`` or ``"ignore"``) are reported as this run's ``nonfinite`` says, as if computed now: with
    ``"raise"`` nothing is returned."""
    if job.nonfinite == "ignore":
        return
    for t in tiles:
        if committed.get(t.key):
            assert isinstance(store, NpyStore)
            where = f" in the tile x1[{t.i0}:{t.i1}] x x2[{t.j0}:{t.j1}] committed to {store.data.name} by an earlier run"
            message = nonfinite_message(torch.from_numpy(store.read(t.key)), shape.layout.batch_positions(), API, where, offsets=(t.i0, t.j0))
            report(message, job.nonfinite, stacklevel=3, raised=" (pass resume=False to compute the kernel again)")


def run(job: Job, shape: Shape, store: Store, planned: Planned, grid_block: int, tiles: list[Tile], workers: Workers,
        done: set[str]) -> dict[str, Any]:
    """Compute and commit this rank's pending tiles (those not ``done``), panel by panel, on the workers' devices.

    Returns what the output's manifest records of the rows (empty without panels of per-sample gradients): ``{"rows_run": {"rows_computed":
    per-sample rows this process formed, "passes_per_sample": that over the samples of both sides}}`` (a rank's own count
    under ``torchrun``; a resumed run counts the rows of its pending tiles only).
    """
    devices = workers.devices
    on_grid, mine = schedule(planned, shape.sizes(job.symmetric), grid_block, workers.rk, len(devices))
    todo = sorted((t for t in tiles if on_grid.panel_of(t.i0) in mine and t.key not in done), key=on_grid.ordering(shape.n1, job.symmetric))
    # the limit: the largest block planned to fit; a resumed grid may be larger
    work = Tiles(shape.layout, job.symmetric, len(shape.kshape), planned.tiles.block, job.nonfinite, on_grid)
    runner = Runner(work, store, serial=not job.engine.thread_safe, background=isinstance(store, NpyStore))
    jobs = sorted(work.jobs(todo), key=lambda ts: mine.index(on_grid.panel_of(ts[0].i0)))
    bar = make_progress(workers.progress, len(tiles), len(done & {t.key for t in tiles}))
    made: list[TileKernel] = []

    def engine(dev: torch.device) -> TileKernel:
        made.append(tile_kernel(job, shape, planned, on_grid, dev, alone=len(devices) == 1))
        return made[-1]

    try:
        with matmul_precision(job.precision, devices):
            runner.run(jobs, devices, engine, bar)
    finally:
        bar.close()
    panels = [m for m in made if isinstance(m, RowPanels)]
    if not panels or job.sketch is not None:  # sketch=: the panels load stored features, no gradient pass
        return {}
    rows = sum(m.rows_computed for m in panels)
    samples = shape.n1 + (0 if job.symmetric else shape.n2)
    return {"rows_run": {"rows_computed": rows, "passes_per_sample": rows / samples}}


def tile_kernel(job: Job, shape: Shape, planned: Planned, on_grid: DatasetPlan, dev: torch.device, *, alone: bool) -> TileKernel:
    """What computes tiles on ``dev``: panels of rows when the plan keeps them, else ``ntk_fn`` per tile.

    ``alone``: the only device, which uses the probed problem and the planned row source; each
    device of several gets its own params, problem and source (their workspaces are per device).
    """
    params = job.params if alone else to_device(job.params, dev)
    if on_grid.panel and planned.rows is not None:
        problem = shape.problem if alone else problem_on(job, dev, params)
        source = planned.source if alone and planned.source is not None else planned.rows.make(problem, shape.n1, shape.n2, int(planned.usable))
        return RowPanels(source, planned.rows.data, on_grid, dev, shape, job.symmetric, planned.storage)
    return PerTileKernel(job, params, int(planned.usable), dev)


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


def finish(store: Store, tiles: list[Tile], rk: Ranks, *, verify: bool = False, record: dict[str, Any] | None = None) -> torch.Tensor:
    """Wait for every rank, check that every tile is committed, record completion (and ``record``: what the run found),
    ``verify`` the file, return the kernel."""
    if isinstance(store, MemoryStore):
        rk.barrier()
        return rk.all_reduce_sum(store.result())
    settle(store, [t.key for t in tiles], rk, record)
    if verify and rk.rank == 0:
        assert isinstance(store, NpyStore)
        verify_kernel(store.path, api=f"{API}(verify=True)")
    return store.result()
