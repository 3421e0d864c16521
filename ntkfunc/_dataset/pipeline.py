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
from ntkfunc._dataset.data import Samples
from ntkfunc._dataset.distributed import Devices, Ranks, ranks, resolve_devices, to_device
from ntkfunc._dataset.fingerprint import job_fingerprint
from ntkfunc._dataset.kernel_file import verify_kernel
from ntkfunc._dataset.panels import JacobianPanels, PerTileKernel, TileKernel
from ntkfunc._dataset.plan import DatasetPlan, plan_tiles
from ntkfunc._dataset.progress import make_progress
from ntkfunc._dataset.runner import Runner
from ntkfunc._dataset.store import MemoryStore, NpyStore, Store, open_store
from ntkfunc._engines import Engine, Implementation, get_engine
from ntkfunc.pntk import sum_of_logits

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
    verify: bool = False,
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
      implementation: an ``ntk_fn`` implementation; None picks ``"auto"``. Implementation 1
        reuses per-sample Jacobians across tiles (see :mod:`ntkfunc._dataset.plan`).
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
      verify: with ``out``, read the finished file back and check every tile against its
        checksum (:func:`ntkfunc.verify_kernel`) before returning.

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
    job = validate(f, params, x1, x2, trace_axes, diagonal_axes, implementation, pntk, batch_size, nonfinite)
    check_verify(verify, out)
    rk = ranks()
    device = resolve_devices(devices, params, rk, API)
    shape = probe(job, device[0])
    budget = parse_budget(memory_budget, device[0])
    usable, dataset_plan = plan(job, shape, budget, batch_size, in_memory=out is None)
    store, grid_block = open_output(job, shape, out, dataset_plan, resume, rk)
    try:  # the store holds the output's lock until the kernel is returned (or the run fails)
        tiles = list(grid(shape.n1, shape.n2, grid_block, grid_block, symmetric=job.symmetric, paired=shape.layout.batch_paired))
        with explained_f_errors(API, job.params, {}, without_vmap=_WITHOUT_VMAP):
            run(job, shape, store, dataset_plan, grid_block, tiles, device, int(usable), progress_bar=progress_bar_wanted(progress, rk), rk=rk)
        return finish(store, tiles, rk, verify=verify)
    finally:
        store.close()


def validate(f: ApplyFn, params: PyTree, x1: Any, x2: Any, trace_axes: Axes, diagonal_axes: Axes,
             implementation: None | int | str | Implementation, pntk: bool, batch_size: int | None, nonfinite: str) -> Job:
    """Check the arguments (before anything runs) and wrap the data as :class:`Samples`."""
    check_mode(nonfinite, API)
    check_positive_int(batch_size, "batch_size", API, allow_none=True)
    engine = get_engine("auto" if implementation is None else implementation, api=API)
    refuse_batch_coupled(f, 0, API)
    fn = sum_of_logits(f, 0, api=f"{API}(pntk=True)", keepdim=True) if pntk else f
    s1 = Samples(x1, "x1")
    s2 = s1 if x2 is None else Samples(x2, "x2")
    return Job(f, fn, params, engine, s1, s2, as_axes_tuple(trace_axes), as_axes_tuple(diagonal_axes), bool(pntk), nonfinite)


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
    with transform_friendly_attention():
        x1 = job.s1.get(0, 1).to(device)
        x2 = None if job.symmetric else job.s2.get(0, 1).to(device)
        with explained_f_errors(API, params, {"x1": x1, "x2": x2}, without_vmap=_WITHOUT_VMAP):
            return make_problem(job.fn, x1, x2, params, 0, job.trace, job.diag, api=API)


def plan(job: Job, shape: Shape, budget: int, batch_size: int | None, *, in_memory: bool) -> tuple[float, DatasetPlan]:
    """``(usable bytes, plan)``: the budget left for the work once an in-memory kernel is held."""
    kernel_bytes = math.prod(shape.kshape) * itemsize(shape.dtype) if in_memory else 0
    usable = budget * SAFETY - kernel_bytes
    if usable <= 0:
        raise MemoryError(
            f"{API}: the kernel {tuple(shape.kshape)} alone needs {fmt_bytes(kernel_bytes)} in memory and "
            f"memory_budget allows {fmt_bytes(budget)}; pass out='K.npy' to write it to disk, or raise memory_budget"
        )
    return usable, plan_tiles(shape.problem, job.engine, usable, max(shape.n1, shape.n2), shape.pair_bytes, batch_size)


def open_output(job: Job, shape: Shape, out: None | str | os.PathLike[str], dataset_plan: DatasetPlan,
                resume: bool, rk: Ranks) -> tuple[Store, int]:
    """``(store, tile side)``: every rank's store, and the tile grid of the run being resumed (or this plan's)."""
    if out is None:
        return MemoryStore(shape.kshape, shape.dtype), rk.broadcast_int(dataset_plan.block)  # every rank cuts the same tiles
    fingerprint = job_fingerprint(
        job.f, job.params, shape.problem, job.s1, None if job.symmetric else job.s2, job.trace, job.diag, job.pntk,
        job.engine, shape.kshape,
    )
    store = open_store(out, shape.kshape, shape.dtype, fingerprint, {"block": dataset_plan.block}, resume, rk)
    assert isinstance(store, NpyStore)
    return store, int(store.grid["block"])


def run(job: Job, shape: Shape, store: Store, dataset_plan: DatasetPlan, grid_block: int, tiles: list[Tile],
        devices: list[torch.device], usable: int, *, progress_bar: bool, rk: Ranks) -> None:
    """Compute and commit this rank's pending tiles, panel by panel, on ``devices``."""
    limit = dataset_plan.block  # the largest block planned to fit; a resumed grid may be larger
    on_grid = dataset_plan.for_grid(grid_block, shape.n1)
    done = store.done_keys()
    # rank r takes the tile rows r, r + W, ...; tiles run panel by panel (see DatasetPlan.order)
    todo = sorted((t for t in tiles if rk.mine(t.i0 // grid_block) and t.key not in done), key=on_grid.order)

    def make_engine(dev: torch.device) -> TileKernel:
        p = job.params if dev == devices[0] and len(devices) == 1 else to_device(job.params, dev)
        if job.engine.reuses_jacobians:
            problem = shape.problem if p is job.params else _problem(job, dev, p)
            return JacobianPanels(problem, (job.s1, job.s2), on_grid, dev, job.symmetric, shape.n1)
        return PerTileKernel(job.fn, p, (job.s1, job.s2), job.engine, job.trace, job.diag, usable, dev, job.symmetric)

    runner = Runner(shape.layout, job.symmetric, store, limit, job.nonfinite, shape.kshape, on_grid,
                    serial=not job.engine.thread_safe)
    bar = make_progress(progress_bar, len(tiles), len(done & {t.key for t in tiles}))
    try:
        runner.run(todo, devices, make_engine, bar)
    finally:
        bar.close()


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
