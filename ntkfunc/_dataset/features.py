"""``kernel_matrix(..., sketch=Sketch(...))``: the features of a dataset, written once, then the kernel from them.

Stage 1 (this module) computes the sketched per-sample gradients ``J(x) Π`` of x1 (and x2)
in chunks of samples (:class:`~ntkfunc._engines.rows.projected.ProjectedRows`: one batched gradient
pass per chunk, no full gradient row held) and keeps them

- in memory (``out=None`` and ``features=None``, when they fit the budget), or
- in a :class:`FeatureStore`: ``<dir>/features-<key>.npy`` (any numpy opens it:
  ``np.load(path, mmap_mode="r")``, shape ``(N, *out, dim)``), its
  ``.manifest.json`` (the fingerprint: ``f``, params, data, sketch with its resolved plan,
  ``pntk``, dtype, shape) and ``.chunks/`` (one marker per finished chunk holding the sha256
  of its bytes). ``<dir>`` is ``features=`` or, by default with ``out=``, ``<out>.features``;
  ``<key>`` hashes the fingerprint, so the same model, data and sketch find the same file
  (``K(train, train)`` and ``K(test, train)`` compute the training features once).

A killed run resumes at the first unmarked chunk. A file computed with anything else
(another model, data, seed, kind, dim) is refused with what changed (``resume=False``
starts over); a chunk whose bytes no longer match its recorded hash is recomputed with a
warning; a file whose shape or dtype does not match is refused. Ranks take every
``world``-th chunk; the devices of one process take chunks from a shared queue.

Stage 2 is the exact kernel's pipeline on the features: :class:`~ntkfunc._engines.rows.stored.StoredRows` is a row
source whose rows are the stored features (width ``dim`` instead of ``P``), so tiling,
panels, the out-of-core output, resume and progress are ``kernel_matrix``'s own.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import queue
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ntkfunc._core.memory import SAFETY, fmt_bytes, itemsize
from ntkfunc._core.problem import Problem
from ntkfunc._dataset.data import Samples
from ntkfunc._dataset.distributed import Ranks, to_device
from ntkfunc._dataset.fingerprint import function_identity, probe_fingerprint, probes_match
from ntkfunc._dataset.lock import OutputLock
from ntkfunc._dataset.store import _numpy_dtype, atomic_write
from ntkfunc._engines.rows.projected import ProjectedRows
from ntkfunc._engines.sketch.error import resketch, spread

API = "kernel_matrix"
_FORMAT = 1
CHUNK_SAMPLES = 256
"""Samples per committed chunk of a features file (each marked once written and synced)."""


# --- stage 1: the store --------------------------------------------------------------------------


def _sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).view(np.uint8).reshape(-1).data).hexdigest()


class FeatureStore:
    """Features of one dataset in ``path`` (``.npy``), its manifest and per-chunk markers (see the module doc)."""

    def __init__(self, path: Path, shape: tuple[int, ...], chunk: int, manifest: dict[str, Any]) -> None:
        self.path, self.shape, self.chunk, self.manifest = path, shape, chunk, manifest
        self.marks = Path(str(path) + ".chunks")

    @staticmethod
    def manifest_path(path: Path) -> Path:
        return Path(str(path) + ".manifest.json")

    @property
    def n_chunks(self) -> int:
        return -(-self.shape[0] // self.chunk)

    @classmethod
    def open(cls, path: str | os.PathLike[str], shape: tuple[int, ...], dtype: torch.dtype, fingerprint: dict[str, Any],
             resume: bool, create: bool = True, chunk: int | None = None, probe: dict[str, Any] | None = None) -> FeatureStore:
        """Create the features file (or reopen it to reuse / resume); ``create=False``: only reopen (other ranks).

        ``chunk``: samples per committed chunk (default :data:`CHUNK_SAMPLES`); a reopened file keeps its own.
        ``probe``: what ``f`` computes on a few samples (``fingerprint.probe_fingerprint``); a file
        whose recorded probe differs beyond round-off was computed by another function and is refused.
        """
        path = Path(path)
        chunk = CHUNK_SAMPLES if chunk is None else chunk
        np_dtype = _numpy_dtype(dtype)
        mpath = cls.manifest_path(path)
        if (resume or not create) and mpath.exists() and path.exists():
            return cls._reopen(path, shape, np_dtype, fingerprint, probe)
        if not create:
            raise RuntimeError(f"{API}: the features file {path} was not created by rank 0")
        path.parent.mkdir(parents=True, exist_ok=True)
        marks = Path(str(path) + ".chunks")
        if marks.exists():
            for m in marks.iterdir():
                m.unlink()
        marks.mkdir(exist_ok=True)
        for old in (mpath, path):
            if old.exists():
                old.unlink()
        mm = np.lib.format.open_memmap(path, mode="w+", dtype=np_dtype, shape=shape)
        del mm
        manifest = {"format": _FORMAT, "shape": list(shape), "dtype": np.dtype(np_dtype).name, "chunk": chunk, "fingerprint": fingerprint,
                    "probe": probe}
        atomic_write(mpath, json.dumps(manifest, indent=1, sort_keys=True))
        return cls(path, shape, chunk, manifest)

    @classmethod
    def _reopen(cls, path: Path, shape: tuple[int, ...], np_dtype: Any, fingerprint: dict[str, Any],
                probe: dict[str, Any] | None) -> FeatureStore:
        mpath = cls.manifest_path(path)
        try:
            manifest = json.loads(mpath.read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"{API}(features=...): cannot read the features manifest {mpath} ({err}); expected the JSON "
                             "ntkfunc wrote (pass resume=False to recompute the features)") from err
        old = manifest.get("fingerprint", {})
        if old != fingerprint:
            changed = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
            raise ValueError(
                f"{API}(features=...): the features file {path} was computed with different {', '.join(changed)} "
                f"(recorded in {mpath.name}); expected the same model, params, data and sketch to reuse it. Pass "
                "resume=False to recompute it, or another features= folder"
            )
        if probe is not None and not probes_match(manifest.get("probe"), probe):
            raise ValueError(
                f"{API}(features=...): the features file {path} was computed by a function that gives other outputs on the "
                f"same samples (probe recorded in {mpath.name}); expected the same f to reuse it. Pass resume=False to "
                "recompute it, or another features= folder"
            )
        try:
            header = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as err:
            raise ValueError(f"{API}(features=...): {path} is not a readable .npy file ({err}); pass resume=False to recompute it") from err
        if tuple(header.shape) != tuple(shape) or header.dtype != np.dtype(np_dtype) or tuple(manifest.get("shape", ())) != tuple(shape):
            raise ValueError(
                f"{API}(features=...): {path} holds {header.dtype}{list(header.shape)}; expected "
                f"{np.dtype(np_dtype).name}{list(shape)} (pass resume=False to recompute it)"
            )
        del header
        store = cls(path, shape, int(manifest["chunk"]), manifest)
        store.marks.mkdir(exist_ok=True)
        return store

    def done(self) -> set[int]:
        """Chunks marked done (not verified)."""
        return {int(p.name) for p in self.marks.iterdir() if p.name.isdigit()}

    def verified(self) -> set[int]:
        """Chunks whose bytes match their recorded sha256; the markers of the others are dropped (with a warning)."""
        good, bad = set(), []
        mm = np.load(self.path, mmap_mode="r")
        for c in sorted(self.done()):
            a, b = c * self.chunk, min((c + 1) * self.chunk, self.shape[0])
            if (self.marks / str(c)).read_text().strip() == _sha(mm[a:b]):
                good.add(c)
            else:
                bad.append(c)
                (self.marks / str(c)).unlink()
        del mm
        if bad:
            warnings.warn(f"{API}: features file {self.path}: chunks {bad[:10]} do not match their recorded hashes "
                          "(corrupted on disk); they are recomputed", RuntimeWarning, stacklevel=3)
        return good

    def commit(self, c: int, block: np.ndarray) -> None:
        """Write chunk ``c``, make it durable, then mark it with its hash (atomically)."""
        a = c * self.chunk
        mm = np.load(self.path, mmap_mode="r+")
        try:
            mm[a : a + block.shape[0]] = block
            mm.flush()
        finally:
            del mm
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        atomic_write(self.marks / str(c), _sha(block))

    def finish(self) -> None:
        self.manifest["complete"] = True
        atomic_write(self.manifest_path(self.path), json.dumps(self.manifest, indent=1, sort_keys=True))

    def samples(self, name: str) -> Samples:
        """The stored features as a sample source (memory-mapped, read a tile at a time)."""
        return Samples(np.load(self.path, mmap_mode="r"), name)


# --- stage 1: computing -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Featured:
    """What the features stage hands to the kernel stage: the features of x1 and x2, the plan record, an error estimate."""

    s1: Samples
    s2: Samples
    record: dict[str, Any]
    error: dict[str, Any]
    paths: tuple[str | None, str | None]


def fingerprint(job: Any, problem: Problem, samples: Samples, record: dict[str, Any], shape: tuple[int, ...]) -> dict[str, Any]:
    """What a features file must match exactly to be reused (its file name hashes it).

    The module's structure and constants are part of it (as in the kernel's own fingerprint,
    :mod:`ntkfunc._dataset.fingerprint`); what ``f`` computes on probe samples is compared
    with a tolerance, so it is stored beside it in the manifest (see :meth:`FeatureStore.open`).
    """
    return {
        **function_identity(job.f, problem),
        "data": samples.fingerprint(),
        "pntk": bool(job.pntk),
        "sketch": record,
        "dtype": str(problem.out_dtype),
        "shape": list(shape),
    }


def feature_path(folder: str | os.PathLike[str], fp: dict[str, Any]) -> Path:
    """``<folder>/features-<key>.npy``, the key a hash of the fingerprint."""
    key = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]
    return Path(folder) / f"features-{key}.npy"


def compute(job: Any, problem: Problem, sketch: Any, budget: int, out: Any, folder: Any, resume: bool,
            devices: list[torch.device], rk: Ranks, bar: bool) -> Featured:
    """The features of ``job``'s x1 (and x2): from their files when already computed, else computed now."""
    usable = budget * SAFETY
    source = ProjectedRows(problem, sketch.kind, sketch.dim, sketch.seed, job.engine.captures)
    record = source.plan.record()
    shape_of = lambda n: (n, *source.out_shape, sketch.dim)  # noqa: E731
    if folder is None and out is not None:
        folder = str(out) + ".features"
    sides = [("x1", job.s1)] + ([] if job.symmetric else [("x2", job.s2)])
    results: list[Samples] = []
    paths: list[str | None] = []
    for name, samples in sides:
        shape = shape_of(len(samples))
        if folder is None:
            need = math.prod(shape) * itemsize(problem.out_dtype) * len(sides)
            if need > usable:
                raise MemoryError(f"{API}(sketch=...): the features {shape} of {name} need {fmt_bytes(need)} in memory and "
                                  f"memory_budget allows {fmt_bytes(budget)}; pass features='DIR' (or out='K.npy') to keep them on disk")
            tensor = torch.empty(shape, dtype=problem.out_dtype)
            _run(job, problem, sketch, samples, range(-(-len(samples) // CHUNK_SAMPLES)), CHUNK_SAMPLES, devices, usable, bar, name,
                 lambda c, block, t=tensor: t[c * CHUNK_SAMPLES : c * CHUNK_SAMPLES + block.shape[0]].copy_(block), source)
            results.append(Samples(tensor, name))
            paths.append(None)
            continue
        fp = fingerprint(job, problem, samples, record, shape)
        path = feature_path(folder, fp)
        # one writer per features file, as per kernel output (rank 0 holds it for the ranks of a torchrun job)
        if rk.rank == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
        lock = OutputLock.acquire(path, API) if rk.rank == 0 else None
        try:
            store = _open(path, shape, problem.out_dtype, fp, resume, rk, probe_fingerprint(problem, samples))
            todo = [c for c in range(store.n_chunks) if rk.mine(c) and c not in store.verified()] if store.manifest.get("complete") is not True \
                or rk.world > 1 else [c for c in range(store.n_chunks) if c not in store.verified()]
            if todo:
                _run(job, problem, sketch, samples, todo, store.chunk, devices, usable, bar, name,
                     lambda c, block, s=store: s.commit(c, block.numpy()), source)
            rk.barrier()
            if rk.rank == 0 and len(store.done()) == store.n_chunks:
                store.finish()
            rk.barrier()
        finally:
            if lock is not None:
                lock.release()
        results.append(store.samples(name))
        paths.append(str(path))
    s1 = results[0]
    s2 = s1 if job.symmetric else results[1]
    error = estimate(s1, s2, problem, sketch, job.symmetric)
    return Featured(s1, s2, record, error, (paths[0], paths[1] if len(paths) > 1 else None))


def _open(path: Path, shape: tuple[int, ...], dtype: torch.dtype, fp: dict[str, Any], resume: bool, rk: Ranks,
          probe: dict[str, Any]) -> FeatureStore:
    store = None
    if rk.rank == 0:
        try:
            store = FeatureStore.open(path, shape, dtype, fp, resume, probe=probe)
        except BaseException:
            rk.broadcast_int(0)
            raise
    if not rk.broadcast_int(1):
        raise RuntimeError(f"{API}: rank 0 could not open the features file {path} (see its error)")
    return store if store is not None else FeatureStore.open(path, shape, dtype, fp, resume=True, create=False)


def _run(job: Any, problem: Problem, sketch: Any, samples: Samples, chunks: Any, size: int, devices: list[torch.device],
         usable: float, bar: bool, name: str, commit: Any, source: ProjectedRows) -> None:
    """Features of the ``chunks`` (of ``size`` samples) on every device, each committed as it is done."""
    from ntkfunc._dataset.progress import make_progress

    chunks = list(chunks)
    progress = make_progress(bar, len(chunks), 0)
    if progress.bar is not None:
        progress.bar.set_description(f"features {name}")
        progress.bar.unit = "chunk"
    lock = threading.Lock()
    work: queue.Queue[int] = queue.Queue()
    for c in chunks:
        work.put(c)
    errors: list[BaseException] = []

    def worker(dev: torch.device, src: ProjectedRows) -> None:
        pass_size = src.chunk_for(usable / max(len(devices), 1))
        buf = torch.empty((size, *src.out_shape, sketch.dim), dtype=problem.out_dtype, device=dev)
        while not errors:
            try:
                c = work.get_nowait()
            except queue.Empty:
                return
            a, b = c * size, min((c + 1) * size, len(samples))
            x = samples.get(a, b).to(dev)
            block = buf[: b - a]
            src.compute([x], block, pass_size)
            with lock:
                commit(c, block.detach().cpu())
                progress.advance(b - a, 0.0)

    def guarded(dev: torch.device) -> None:
        try:
            if dev == devices[0]:
                src = source
            else:
                from ntkfunc._core.problem import make_problem

                p = to_device(job.params, dev)
                prob = make_problem(job.fn, job.s1.get(0, 1).to(dev), None, p, 0, job.trace, job.diag, api=API)
                src = ProjectedRows(prob, sketch.kind, sketch.dim, sketch.seed, job.engine.captures)
            worker(dev, src)
        except BaseException as err:
            errors.append(err)

    try:
        if len(devices) == 1:
            guarded(devices[0])
        else:
            threads = [threading.Thread(target=guarded, args=(d,), daemon=True) for d in devices]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
    finally:
        progress.close()
    if errors:
        raise errors[0]


def estimate(s1: Samples, s2: Samples, problem: Problem, sketch: Any, symmetric: bool, samples: int = 1024) -> dict[str, Any]:
    """The re-sketch estimate (:mod:`ntkfunc._engines.sketch.error`) on up to ``samples`` spread rows of the features."""
    lay = problem.layouts[0]
    if lay.batch_paired:
        return {}

    def rows(s: Samples) -> torch.Tensor:
        return torch.stack([s.get(i, i + 1)[0] for i in spread(len(s), samples)])

    a1 = rows(s1)
    return resketch(a1, a1 if symmetric else rows(s2), lay, sketch.dim, sketch.seed).record()
