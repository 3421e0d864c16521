"""``kernel_matrix``: the eNTK of a whole dataset, tile by tile, under a memory budget.

The kernel ``K(x1, x2)`` is cut into tiles of ``B x B`` samples (``B`` from the budget or
``batch_size``), each computed with one implementation and committed to the output
(a tensor, or a ``.npy`` file that survives interruption: see ``ntkfunc._store``).
With ``x2=None`` only tiles on and above the diagonal are computed; the others are
their mirror images. Only the samples of a tile are loaded (tensors, numpy memmaps,
Datasets). Tiles are split over devices (``devices``) and over ``torchrun`` ranks.

Reuse (implementation 1, Jacobian contraction): per-sample Jacobians, flattened over
parameters (``(b, *out, P)``), are computed per block of samples. The memory budget holds
a *panel* of x1 blocks plus one streamed x2 block; tiles run panel by panel, so each x1
Jacobian is computed once and each x2 block once per panel (with everything in one
panel, every Jacobian is computed exactly once). Each tile is then one matrix product
over all parameters. When even one sample's Jacobian does not fit, parameters are
split into groups and nothing is kept across tiles. Other implementations are called
per tile through ``ntk_fn``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import queue
import sys
import threading
import time
import warnings
from typing import Any, Callable, Literal, Optional, Sequence, Union

import torch
from torch.func import jacrev, vmap

from ntkfunc import api
from ntkfunc._data import Samples, tensor_fingerprint
from ntkfunc._distributed import Ranks, ranks
from ntkfunc._jacobian import _pack, per_sample_activation_bytes
from ntkfunc._memory import fmt_bytes, parse_budget
from ntkfunc._ops import transform_friendly_attention
from ntkfunc._problem import Problem, make_problem
from ntkfunc._store import Index, MemoryStore, NpyStore
from ntkfunc._tree import Layout, as_axes_tuple
from ntkfunc._typing import ApplyFn, Axes, Implementation, MemoryBudget, PyTree

_SAFETY = 0.7  # fraction of the budget planned tensors may use
_DEFAULT_BLOCK = 256  # tile size for implementations that plan their own memory

Devices = Union[None, str, torch.device, Sequence[Union[str, torch.device]]]


def default_implementation() -> Union[int, str]:
    """The implementation ``implementation=None`` picks: ``"auto"``, else 3, else 1, whichever is registered."""
    if Implementation.AUTO in api._IMPLS:
        return "auto"
    for choice in (3, 1):
        if choice in api._IMPLS:
            return choice
    return api.available_implementations()[0]


def _pntk_function(f: ApplyFn) -> ApplyFn:
    """``g(params, x) = Σ_o f(params, x)[:, o] / sqrt(O)``: one output per sample (the pNTK's function)."""

    def g(params: PyTree, x: PyTree) -> torch.Tensor:
        y = f(params, x)
        if not isinstance(y, torch.Tensor) or y.ndim != 2:
            got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(f"kernel_matrix(pntk=True): f returned {got}; expected one tensor of shape (N, O)")
        return y.sum(-1, keepdim=True) / math.sqrt(y.shape[-1])

    g.__name__ = f"pntk({getattr(f, '__name__', 'f')})"
    return g


@dataclasses.dataclass(frozen=True)
class _Tile:
    i0: int
    i1: int
    j0: int
    j1: int

    @property
    def key(self) -> str:
        return f"{self.i0}_{self.j0}"

    @property
    def entries(self) -> int:
        return (self.i1 - self.i0) * (self.j1 - self.j0)


def _tiles(n1: int, n2: int, block: int, symmetric: bool, paired: bool) -> list[_Tile]:
    out = []
    for i0 in range(0, n1, block):
        i1 = min(i0 + block, n1)
        if paired:
            out.append(_Tile(i0, i1, i0, i1))
            continue
        for j0 in range(i0 if symmetric else 0, n2, block):
            out.append(_Tile(i0, i1, j0, min(j0 + block, n2)))
    return out


@dataclasses.dataclass(frozen=True)
class _Plan:
    block: int  # samples per block (x1 and x2): tiles are block x block
    groups: list[list[int]]  # parameter groups (indices into the differentiated leaves)
    panel: int  # x1 blocks whose Jacobians are held together (0: none kept across tiles)

    def panel_of(self, i0: int) -> int:
        return (i0 // self.block) // max(self.panel, 1)

    def order(self, t: "_Tile") -> tuple[int, int, int]:
        """Tile order: panel of x1 blocks, then x2 block, then x1 block (each x2 block loaded once per panel)."""
        return (self.panel_of(t.i0), t.j0, t.i0)


_TARGET_BLOCK = 128  # samples per block when memory allows: large enough for efficient batched Jacobians


def _plan(problem: Problem, impl: Any, usable: float, n_max: int, pair_bytes: int, batch_size: Optional[int]) -> _Plan:
    """Block size, parameter groups and panel size for ``usable`` bytes.

    Memory (implementation 1, per-sample Jacobian ``J`` bytes, ``A`` activations while computing):
    a panel of ``k`` x1 blocks plus one streamed x2 block (``(k + 1) b J``), the block being computed
    (its Jacobian and the flattened copy plus activations: ``b (2 J + A)``) and the tile (``3 b² pair``).
    Each x1 Jacobian is computed once and each x2 block once per panel, so about
    ``N1 + N2 * N1 / (k b)`` per-sample Jacobians in all (``N + N² / (2 k b)`` when symmetric).
    """
    leaves = problem.params.diff_leaves
    everything = list(range(len(leaves)))
    if impl != 1:
        block = batch_size or min(n_max, _DEFAULT_BLOCK)
        return _Plan(block, [everything], 0)
    itemsize = torch.empty((), dtype=problem.out_dtype).element_size()
    o = max(sum(math.prod(s) for s in problem.sample_out_shapes(w)) for w in (1, 2))
    sizes = [o * t.numel() * itemsize for t in leaves]
    transient = (2 * o + 1) * per_sample_activation_bytes(problem) + max(sizes)  # + backward temporaries
    total = sum(sizes)
    fit = _largest_block(usable, 3 * total + transient, pair_bytes)  # a panel of one block
    if fit < 1:
        groups = _pack(sizes, max((usable - transient) / 3, 0), problem)
        largest = max(sum(sizes[k] for k in g) for g in groups)
        block = max(1, _largest_block(usable, 3 * largest + transient, pair_bytes))
        return _Plan(min(block, n_max, batch_size or n_max), groups, 0)
    block = min(n_max, batch_size or max(1, min(_TARGET_BLOCK, fit // 2 if fit >= 2 else 1)))
    rest = usable - block * (3 * total + transient) - 3 * block * block * pair_bytes
    panel = max(1, int(rest // max(block * total, 1)) + 1) if rest >= 0 else 0
    return _Plan(block, [everything], panel)


def _largest_block(usable: float, per_sample: float, pair_bytes: float) -> int:
    """Largest ``b`` with ``b * per_sample + 3 b² pair_bytes <= usable``."""
    a, c = 3 * pair_bytes, per_sample
    b = (-c + math.sqrt(c * c + 4 * a * usable)) / (2 * a) if a > 0 else usable / max(c, 1)
    return int(b)


class _JacobianEngine:
    """Implementation 1 with reuse: block Jacobians flattened over parameters, held per panel.

    The current panel's x1 Jacobians live in one buffer ``(panel * block, *out, P)``,
    filled block by block as tiles need them; x2 blocks are streamed (the latest is kept).
    :meth:`tiles` computes all tiles of one x2 block within a panel as ONE matrix product
    of the panel rows with that block, so the contraction runs at matmul speed.
    """

    def __init__(self, problem: Problem, sources: tuple[Samples, Samples], plan: _Plan, device: torch.device, symmetric: bool, n1: int) -> None:
        self.problem, self.sources, self.plan, self.device = problem, sources, plan, device
        self.symmetric, self.n1 = symmetric, n1
        self.layout: Layout = problem.layouts[0]
        self.pos = self.layout.batch_positions()
        self.trace_size = self.layout.trace_size(problem.out_shapes1[0])
        self.keep = plan.panel > 0 and len(plan.groups) == 1 and not self.layout.batch_paired
        self.buf: Optional[torch.Tensor] = None
        self.loaded: set[int] = set()
        self.panel_id: Optional[int] = None
        self.stream: Optional[tuple[tuple, torch.Tensor]] = None
        self.jacobians_computed = 0
        self.fns = [vmap(jacrev(problem.sample_fn(g), argnums=0), in_dims=(None, problem.x_axes)) for g in plan.groups]

    def _compute(self, src: int, i0: int, i1: int, g: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
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
        b = self.plan.block
        base = self.panel_id * self.plan.panel * b  # type: ignore[operator]
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
        return self.buf[i0 - base : i1 - base]  # type: ignore[index]

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

    def tiles(self, ts: list[_Tile]) -> list[torch.Tensor]:
        """Tiles sharing one x2 block and consecutive x1 blocks of one panel: one product."""
        if not self.keep or not all(self._aligned(t.i0, t.i1) for t in ts):
            return [self.tile(t) for t in ts]
        self._enter_panel(ts[0].i0)
        rows = self._panel_rows(ts[0].i0, ts[-1].i1)
        k = self.layout.contract(rows, self._column(ts[0].j0, ts[0].j1), 1) / self.trace_size
        return list(torch.split(k, [t.i1 - t.i0 for t in ts], dim=self.pos[0]))

    def tile(self, t: _Tile) -> torch.Tensor:
        if self.keep and self._aligned(t.i0, t.i1):
            return self.tiles([t])[0]
        total: Optional[torch.Tensor] = None  # no reuse: sub-tiles (after OOM), parameter groups
        same = self.symmetric and (t.i0, t.i1) == (t.j0, t.j1)
        for g in range(len(self.plan.groups)):
            j1 = self._compute(1, t.i0, t.i1, g)
            j2 = j1 if same else self._compute(1 if self.symmetric else 2, t.j0, t.j1, g)
            part = self.layout.contract(j1, j2, 1)
            total = part if total is None else total + part
        assert total is not None
        return total / self.trace_size


class _CoreEngine:
    """Any implementation: ``ntk_fn`` on the tile's samples (the implementation tiles further if needed)."""

    def __init__(self, f: ApplyFn, params: PyTree, sources: tuple[Samples, Samples], impl: Any, trace: tuple, diag: tuple, budget: int, device: torch.device, symmetric: bool) -> None:
        self.kernel = api.ntk_fn(f, trace, diag, 0, impl, memory_budget=budget)
        self.params, self.sources, self.device, self.symmetric = params, sources, device, symmetric

    def tile(self, t: _Tile) -> torch.Tensor:
        x1 = self.sources[0].get(t.i0, t.i1).to(self.device)
        if self.symmetric and (t.i0, t.i1) == (t.j0, t.j1):
            return self.kernel(x1, None, self.params)
        src = self.sources[0] if self.symmetric else self.sources[1]
        return self.kernel(x1, src.get(t.j0, t.j1).to(self.device), self.params)


def kernel_matrix(
    f: ApplyFn,
    params: PyTree,
    x1: Any,
    x2: Any = None,
    *,
    trace_axes: Axes = (-1,),
    diagonal_axes: Axes = (),
    implementation: Union[None, int, str] = None,
    pntk: bool = False,
    batch_size: Optional[int] = None,
    memory_budget: MemoryBudget = None,
    out: Union[None, str, "os.PathLike[str]"] = None,
    resume: bool = True,
    progress: bool = True,
    devices: Devices = None,
    nonfinite: Literal["raise", "warn"] = "raise",
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
      implementation: an ``ntk_fn`` implementation; None picks :func:`default_implementation`.
        Implementation 1 reuses per-sample Jacobians across tiles (see the module doc).
      pntk: the kernel of ``Σ_o f_o(x) / sqrt(O)`` (one output per sample) instead of ``f``.
      batch_size: samples per tile side (default: from the budget).
      memory_budget: bytes (or ``"2GB"``) this process may use for Jacobians, caches, tiles and,
        with ``out=None``, the kernel itself; per device with several devices. Default as ``ntk_fn``.
      out: None returns an in-memory tensor; a path writes a ``.npy`` file (plus
        ``<out>.manifest.json`` and ``<out>.tiles/``) and returns a tensor over a
        copy-on-write memory map of it.
      resume: continue an interrupted run with the same ``out`` (refused, with the reason, if
        params, data or settings changed); False starts over. A resumed run keeps the recorded
        tile grid (a smaller budget then computes each tile in smaller pieces). The fingerprint
        hashes every byte of tensor/array inputs but only the length and 64 spread items of a
        Dataset.
      progress: a tqdm bar (tiles, ETA, kernel entries/s) on stderr when it is a terminal.
      devices: None (params' device; ``cuda:LOCAL_RANK`` under torchrun with CUDA), ``"all"``
        (every CUDA device, one worker thread each), or a list of devices.
      nonfinite: ``"raise"`` (FloatingPointError naming the samples; the tile is not
        committed) or ``"warn"`` (warning naming them, the tile is kept).

    Shapes: an ``(N, O)`` output gives ``(N1, N2)`` with the default trace; the layout is
    ``ntk_fn``'s. CUDA out-of-memory errors halve the computed block and retry.
    Under ``torchrun`` each rank computes its share of the tiles; every rank returns the kernel.

    Example:
      >>> import torch, ntkfunc
      >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
      >>> f, params = ntkfunc.from_module(model)
      >>> x = torch.randn(10, 4)
      >>> k = kernel_matrix(f, params, x, batch_size=3, progress=False)
      >>> k.shape
      torch.Size([10, 10])
      >>> torch.allclose(k, ntkfunc.ntk_fn(f)(x, None, params), atol=1e-5)
      True
      >>> kernel_matrix(f, params, x, x[:4], trace_axes=(), progress=False).shape
      torch.Size([10, 4, 3, 3])
    """
    if nonfinite not in ("raise", "warn"):
        raise ValueError(f"kernel_matrix(nonfinite={nonfinite!r}): expected 'raise' or 'warn'")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"kernel_matrix(batch_size={batch_size!r}): expected a positive int or None")
    impl = default_implementation() if implementation is None else implementation
    if impl not in api._IMPLS:
        api._check_implementation(impl)  # raises, listing the valid ones
    api._refuse_batch_coupled(f, 0)
    fn = _pntk_function(f) if pntk else f
    trace, diag = as_axes_tuple(trace_axes), as_axes_tuple(diagonal_axes)
    s1 = Samples(x1, "x1")
    s2 = s1 if x2 is None else Samples(x2, "x2")
    symmetric = x2 is None

    with ranks() as rk:
        device = _devices(devices, params, rk)
        with transform_friendly_attention():
            problem = make_problem(fn, s1.get(0, 1).to(device[0]), None if symmetric else s2.get(0, 1).to(device[0]), params, 0, trace, diag)
        layout = _check_layout(problem, trace, diag)
        n1, n2 = len(s1), len(s2)
        paired = layout.batch_paired
        if paired and n1 != n2:
            raise ValueError(
                f"kernel_matrix(diagonal_axes={diag}): the batch axis is diagonal, which pairs x1[n] with x2[n]; "
                f"expected x1 and x2 of equal lengths, got {n1} and {n2}"
            )
        shape1 = (n1,) + tuple(problem.out_shapes1[0][1:])
        shape2 = (n2,) + tuple(problem.out_shapes2[0][1:])
        kshape = layout.kernel_shape(shape1, shape2)
        dtype = problem.out_dtype
        itemsize = torch.empty((), dtype=dtype).element_size()
        budget = parse_budget(memory_budget, device[0])
        in_memory = math.prod(kshape) * itemsize if out is None else 0
        usable = budget * _SAFETY - in_memory
        if usable <= 0:
            raise MemoryError(
                f"kernel_matrix: the kernel {tuple(kshape)} alone needs {fmt_bytes(in_memory)} in memory and "
                f"memory_budget allows {fmt_bytes(budget)}; pass out='K.npy' to write it to disk, or raise memory_budget"
            )
        pair_bytes = math.prod(kshape) // max(1, n1 * (1 if paired else n2)) * itemsize
        plan = _plan(problem, impl, usable, max(n1, n2), pair_bytes, batch_size)

        if out is None:
            store: Union[MemoryStore, NpyStore] = MemoryStore(kshape, dtype)
            block = rk.broadcast_int(plan.block)  # every rank must cut the same tiles
        else:
            grid = {"block": plan.block}
            fingerprint = _fingerprint(f, params, problem, s1, None if symmetric else s2, trace, diag, pntk, impl, kshape)
            opened = 1
            if rk.rank == 0:
                try:
                    store = NpyStore.open(out, kshape, dtype, fingerprint, grid, resume)
                except BaseException:
                    rk.broadcast_int(0)  # let the other ranks stop instead of waiting
                    raise
            opened = rk.broadcast_int(opened)
            if not opened:
                raise RuntimeError(f"kernel_matrix(out={str(out)!r}): rank 0 could not open the output (see its error)")
            if rk.rank != 0:
                store = NpyStore.open(out, kshape, dtype, fingerprint, grid, resume=True, create=False)
            block = int(store.grid["block"])  # the grid of the run being resumed
        limit = plan.block
        if plan.panel:  # a panel never needs more blocks than x1 has
            plan = dataclasses.replace(plan, panel=min(plan.panel, -(-n1 // plan.block)))
        if block != plan.block:
            plan = dataclasses.replace(plan, block=block, panel=max(1, plan.panel * plan.block // block) if plan.panel else 0)
        tiles = _tiles(n1, n2, block, symmetric, paired)
        done = store.done_keys() if isinstance(store, NpyStore) else set()
        # rank r takes the tile rows r, r + W, ...; tiles run panel by panel (see _Plan.order)
        todo = sorted((t for t in tiles if rk.mine(t.i0 // block) and t.key not in done), key=plan.order)

        def make_engine(dev: torch.device) -> Any:
            p = params if dev == device[0] and len(device) == 1 else _to(params, dev)
            if impl == 1:
                with transform_friendly_attention():
                    prob = problem if p is params else make_problem(fn, s1.get(0, 1).to(dev), None if symmetric else s2.get(0, 1).to(dev), p, 0, trace, diag)
                return _JacobianEngine(prob, (s1, s2), plan, dev, symmetric, n1)
            return _CoreEngine(fn, p, (s1, s2), impl, trace, diag, int(usable), dev, symmetric)

        runner = _Runner(layout, symmetric, paired, store, limit, nonfinite, kshape, plan)
        bar = _progress(progress and rk.rank == 0, len(tiles), len(done & {t.key for t in tiles}))
        try:
            runner.run(todo, device, make_engine, bar)
        finally:
            bar.close()
        rk.barrier()
        if isinstance(store, NpyStore):
            if rk.rank == 0:
                missing = [t.key for t in tiles if not store.is_done(t.key)]
                if missing:  # pragma: no cover - an invariant: every rank committed its tiles
                    raise RuntimeError(f"kernel_matrix: tiles {missing[:5]} were not committed")
                store.finish()
            rk.barrier()
            return store.result()
        return rk.all_reduce_sum(store.result())


class _Runner:
    """Computes tiles (splitting them on CUDA OOM), checks them, commits them with their mirrors."""

    def __init__(self, layout: Layout, symmetric: bool, paired: bool, store: Any, limit: int, nonfinite: str, kshape: tuple, plan: _Plan) -> None:
        self.layout, self.symmetric, self.paired, self.store = layout, symmetric, paired, store
        self.limit = max(1, limit)
        self.nonfinite = nonfinite
        self.pos = layout.batch_positions()
        self.ndim = len(kshape)
        self.plan = plan
        self.lock = threading.Lock()

    def groups(self, todo: list[_Tile]) -> list[list[_Tile]]:
        """Consecutive tiles of one x2 block and panel with adjacent x1 blocks: computed together."""
        out: list[list[_Tile]] = []
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

    def run(self, todo: list[_Tile], devices: list[torch.device], make_engine: Callable[[torch.device], Any], bar: Any) -> None:
        groups = self.groups(todo)
        if len(devices) == 1:
            engine = make_engine(devices[0])
            for g in groups:
                self._group(engine, g, devices[0], bar)
            return
        work: "queue.Queue[list[_Tile]]" = queue.Queue()
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

    def _group(self, engine: Any, ts: list[_Tile], dev: torch.device, bar: Any) -> None:
        start = time.perf_counter()
        blocks: Optional[list[torch.Tensor]] = None
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

    def _commit(self, t: _Tile, block: torch.Tensor, bar: Any, seconds: float) -> None:
        self._check_finite(block, t)
        writes = [(self._index(t.i0, t.i1, t.j0, t.j1), block)]
        entries = t.entries
        if self.symmetric and not self.paired and t.i0 != t.j0:
            writes.append((self._index(t.j0, t.j1, t.i0, t.i1), block.permute(self.layout.swap_perm())))
            entries *= 2
        with self.lock:
            self.store.commit(t.key, writes)
            bar.advance(entries, seconds)

    def _compute(self, engine: Any, t: _Tile, dev: torch.device) -> torch.Tensor:
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
            parts = [_Tile(t.i0, mid, t.j0 if not self.paired else t.i0, t.j1 if not self.paired else mid),
                     _Tile(mid, t.i1, t.j0 if not self.paired else mid, t.j1)]
            return torch.cat([self._compute(engine, p, dev) for p in parts], dim=self.pos[0])
        mid = t.j0 + (bj + 1) // 2
        parts = [_Tile(t.i0, t.i1, t.j0, mid), _Tile(t.i0, t.i1, mid, t.j1)]
        return torch.cat([self._compute(engine, p, dev) for p in parts], dim=self.pos[1])

    def _index(self, i0: int, i1: int, j0: int, j1: int) -> Index:
        index = [slice(None)] * self.ndim
        index[self.pos[0]] = slice(i0, i1)
        if len(self.pos) == 2:
            index[self.pos[1]] = slice(j0, j1)
        return tuple(index)

    def _check_finite(self, block: torch.Tensor, t: _Tile) -> None:
        bad = ~torch.isfinite(block)
        if not bool(bad.any()):
            return
        keep1 = [d for d in range(block.ndim) if d != self.pos[0]]
        rows = (t.i0 + torch.nonzero(bad.any(dim=keep1) if keep1 else bad).flatten()).tolist()
        if len(self.pos) == 2:
            keep2 = [d for d in range(block.ndim) if d != self.pos[1]]
            cols = (t.j0 + torch.nonzero(bad.any(dim=keep2)).flatten()).tolist()
        else:
            cols = rows
        msg = (
            f"kernel_matrix: {int(bad.sum())} non-finite kernel entries in the tile x1[{t.i0}:{t.i1}] x "
            f"x2[{t.j0}:{t.j1}], from x1 samples {_few(rows)} and x2 samples {_few(cols)}; expected finite values "
            "(check these samples' inputs and f's outputs on them for NaN/inf or overflow)"
        )
        if self.nonfinite == "raise":
            raise FloatingPointError(msg + "; the tile was not written")
        warnings.warn(msg, RuntimeWarning, stacklevel=2)


def _few(idx: list[int], k: int = 10) -> str:
    return str(idx[:k])[:-1] + (f", ... ({len(idx)} in all)]" if len(idx) > k else "]")


class _Progress:
    """tqdm bar: tiles done, ETA, and kernel entries per second."""

    def __init__(self, enabled: bool, total: int, initial: int) -> None:
        self.bar = None
        self.entries = 0
        self.seconds = 0.0
        self.start = time.perf_counter()
        if enabled and total:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="tile", desc="kernel_matrix", file=sys.stderr, dynamic_ncols=True)

    def advance(self, entries: int, seconds: float) -> None:
        self.entries += entries
        if self.bar is not None:
            rate = self.entries / max(time.perf_counter() - self.start, 1e-9)
            self.bar.set_postfix_str(f"{rate:.3g} entries/s", refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _progress(enabled: bool, total: int, initial: int) -> _Progress:
    return _Progress(enabled and sys.stderr.isatty(), total, initial)


def _check_layout(problem: Problem, trace: tuple, diag: tuple) -> Layout:
    if len(problem.layouts) != 1 or problem.fx_axes != [0]:
        raise ValueError(
            f"kernel_matrix: f returned {len(problem.layouts)} output tensors with batch axes {problem.fx_axes}; "
            "expected one tensor with the batch axis first (use ntk_fn for pytree outputs)"
        )
    layout = problem.layouts[0]
    if layout.batch_axis in layout.trace:
        raise ValueError(
            f"kernel_matrix(trace_axes={trace}): the batch axis 0 is traced, which sums the kernel over samples "
            "instead of forming a sample-by-sample matrix; expected trace_axes without axis 0 (use ntk_fn for that sum)"
        )
    return layout


def _devices(devices: Devices, params: PyTree, rk: Ranks) -> list[torch.device]:
    leaves = [t for t in torch.utils._pytree.tree_leaves(params) if isinstance(t, torch.Tensor)]
    home = leaves[0].device if leaves else torch.device("cpu")
    if devices is None:
        return [rk.local_device() if rk.world > 1 and home.type == "cuda" else home]
    if devices == "all":
        n = torch.cuda.device_count()
        return [torch.device("cuda", i) for i in range(n)] if n else [home]
    items = [devices] if isinstance(devices, (str, torch.device)) else list(devices)
    try:
        result = [torch.device(d) for d in items]
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"kernel_matrix(devices={devices!r}): {err}; expected None, 'all' or a list of devices like ['cuda:0', 'cuda:1']") from err
    if not result:
        raise ValueError(f"kernel_matrix(devices={devices!r}): expected at least one device")
    return result


def _to(params: PyTree, dev: torch.device) -> PyTree:
    return torch.utils._pytree.tree_map(lambda t: t.to(dev) if isinstance(t, torch.Tensor) else t, params)


def _fingerprint(fn: ApplyFn, params: PyTree, problem: Problem, s1: Samples, s2: Optional[Samples], trace: tuple, diag: tuple, pntk: bool, impl: Any, kshape: tuple) -> dict[str, Any]:
    p = problem.params
    return {
        "f": f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', type(fn).__name__)}",
        "params": tensor_fingerprint([t.detach() for t in p.leaves], p.names),
        "x1": s1.fingerprint(),
        "x2": None if s2 is None else s2.fingerprint(),
        "trace_axes": list(trace),
        "diagonal_axes": list(diag),
        "pntk": bool(pntk),
        "implementation": str(impl),
        "kernel_shape": list(kshape),
        "dtype": str(problem.out_dtype),
    }
