"""``kernel_matrix(..., sketch=Sketch(...))``: the features of a dataset, written once, then the kernel from them.

Stage 1 (this module) computes the sketched per-sample gradients ``J(x) Π`` of x1 (and x2)
in chunks of :data:`CHUNK_SAMPLES` samples (:class:`~ntkfunc._engines.rows.projected.ProjectedRows`:
one batched gradient pass per few samples, no full gradient row held) and keeps them

- in memory (``out=None`` and ``features=None``, when they fit the budget), or
- in ``<dir>/features-<key>.npy``, written by the kernel's own writer (:mod:`.store`: the file
  format of :mod:`.fileformat`, one marker per chunk, one writer, resumable): any numpy opens
  it (``np.load(path, mmap_mode="r")``, shape ``(N, *out, dim)``) once complete; its manifest
  records the fingerprint (``f``, params, data, sketch with its resolved plan, ``pntk``, dtype,
  shape, and ``f``'s outputs on probe samples). ``<dir>`` is ``features=`` or, by default with
  ``out=``, ``<out>.features``; ``<key>`` hashes the fingerprint (all but the probe), so the same
  model, data and sketch find the same file (``K(train, train)`` and ``K(test, train)`` compute
  the training features once).

A killed run resumes at the chunks without a valid marker. A file computed with anything else
(another model, data, seed, kind, dim, or an ``f`` whose probe outputs differ) is refused with
what changed (``resume=False`` starts over); a chunk whose entries no longer match their
checksum is recomputed with a warning. Chunks are run by the kernel's own runner
(:mod:`.runner`: devices, background commits, progress); ranks take every ``world``-th chunk.

:func:`write` computes (or reuses, or resumes) the features of one side; :func:`ntkfunc.feature_matrix`
(:mod:`.feature_writer`) calls it on its own, with the same fingerprint and file name, so that its files
and ``kernel_matrix``'s are the same files.

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
from pathlib import Path
from typing import Any

import torch

from ntkfunc._core.memory import SAFETY, fmt_bytes, itemsize
from ntkfunc._core.problem import Problem
from ntkfunc._dataset.data import Samples
from ntkfunc._dataset.distributed import to_device
from ntkfunc._dataset.fileformat import FEATURES, Content, features_grid
from ntkfunc._dataset.fingerprint import PROBE_KEY, function_identity, probe_fingerprint, results_format
from ntkfunc._dataset.job import API, Job, Output, Workers, problem_on
from ntkfunc._dataset.progress import make_progress
from ntkfunc._dataset.runner import Runner, Writes
from ntkfunc._dataset.store import MemoryStore, Store, open_store, settle
from ntkfunc._engines.rows.projected import ProjectedRows
from ntkfunc._engines.sketch.error import resketch, spread

CHUNK_SAMPLES = 256
"""Samples per committed chunk of a features file (each marked once written and synced)."""


@dataclasses.dataclass(frozen=True)
class Featured:
    """What the features stage hands to the kernel stage: the features of x1 and x2, the plan record, an error estimate."""

    samples: tuple[Samples, Samples]  # the same Samples twice with x2=None
    record: dict[str, Any]  # the resolved sketch (kind per parameter), for the output's fingerprint
    error: dict[str, Any]
    paths: tuple[str | None, str | None]

    def run_record(self) -> dict[str, Any]:
        """What the output's manifest records of the sketch's run."""
        return {"sketch_run": {"error_estimate": self.error, "features": list(self.paths)}}


def fingerprint(job: Job, problem: Problem, samples: Samples, record: dict[str, Any], shape: tuple[int, ...]) -> dict[str, Any]:
    """What a features file must match to be reused: exactly (its file name hashes it), and ``f``'s
    probe outputs within round-off (as in the kernel's own fingerprint, :mod:`ntkfunc._dataset.fingerprint`)."""
    return {
        **results_format(),  # in the file's key too: a features file of another results format is never found
        **function_identity(job.f, problem),
        PROBE_KEY: probe_fingerprint(problem, samples),
        "data": samples.fingerprint(),
        "pntk": bool(job.pntk),
        "sketch": record,
        "dtype": str(problem.out_dtype),
        "shape": list(shape),
    }


def feature_path(folder: str | os.PathLike[str], fp: dict[str, Any]) -> Path:
    """``<folder>/features-<key>.npy``, the key a hash of the exact part of the fingerprint (all but the probe)."""
    exact = {k: v for k, v in fp.items() if k != PROBE_KEY}
    key = hashlib.sha256(json.dumps(exact, sort_keys=True).encode()).hexdigest()[:16]
    return Path(folder) / f"features-{key}.npy"


@dataclasses.dataclass(frozen=True)
class Pass:
    """What computes features on one device: its row source, and samples per gradient pass there."""

    source: ProjectedRows
    chunk: int


class Chunks:
    """The features of one side as the runner's units: chunk ``c`` is samples ``[c * size, (c + 1) * size)``, key ``str(c)``."""

    def __init__(self, samples: Samples, size: int, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.samples, self.size, self.shape, self.dtype = samples, size, shape, dtype

    @property
    def count(self) -> int:
        return -(-self.shape[0] // self.size)

    def span(self, c: int) -> tuple[int, int]:
        return c * self.size, min((c + 1) * self.size, self.shape[0])

    def groups(self, job: list[int]) -> list[list[int]]:
        return [[c] for c in job]

    def compute(self, engine: Pass, cs: list[int], dev: torch.device) -> list[torch.Tensor]:
        out = []
        for c in cs:
            a, b = self.span(c)
            block = torch.empty((b - a, *self.shape[1:]), dtype=self.dtype, device=dev)  # its own: committed after the next is computed
            engine.source.compute(self.samples.leaves(a, b, dev), block, engine.chunk)
            out.append(block)
        return out

    def check(self, c: int, block: torch.Tensor) -> None:
        """Nothing: non-finite features give non-finite kernel entries, reported by the kernel's tiles with their samples."""

    def writes(self, c: int, block: torch.Tensor) -> tuple[str, Writes, int]:
        a, b = self.span(c)
        return str(c), [((slice(a, b),), block)], b - a


def compute(job: Job, problem: Problem, budget: int, output: Output, workers: Workers) -> Featured:
    """The features of ``job``'s x1 (and x2): from their files when already computed, else computed now."""
    sketch = job.sketch
    assert sketch is not None
    usable = budget * SAFETY
    source = ProjectedRows(problem, sketch.kind, sketch.dim, sketch.seed, job.engine.captures)
    folder = output.features_folder
    sides = [("x1", job.s1)] + ([] if job.symmetric else [("x2", job.s2)])
    if folder is None:
        check_fits(source, [(name, len(s)) for name, s in sides], usable, budget, f"{API}(sketch=...)",
                   "pass features='DIR' (or out='K.npy') to keep them on disk")
    results: list[Samples] = []
    paths: list[str | None] = []
    for name, samples in sides:
        features, path = write(job, problem, source, samples, name, usable, folder, output, workers, FEATURES)
        results.append(Samples(features, name))
        paths.append(None if path is None else str(path))
    s1 = results[0]
    s2 = s1 if job.symmetric else results[1]
    error = estimate(s1, s2, problem, sketch.dim, sketch.seed, job.symmetric)
    return Featured((s1, s2), source.plan.record(), error, (paths[0], paths[1] if len(paths) > 1 else None))


def check_fits(source: ProjectedRows, sides: list[tuple[str, int]], usable: float, budget: int, api: str, hint: str) -> None:
    """Refuse (MemoryError, before anything runs) features of ``sides`` (``(name, samples)``) that do not fit in memory together."""
    size = itemsize(source.problem.out_dtype)
    shapes = [(name, (n, *source.out_shape, source.dim)) for name, n in sides]
    need = sum(math.prod(shape) for _, shape in shapes) * size
    if need > usable:
        what = " and ".join(f"{shape} of {name}" for name, shape in shapes)
        raise MemoryError(f"{api}: the features {what} need {fmt_bytes(need)} in memory and memory_budget allows "
                          f"{fmt_bytes(budget)}; {hint}")


def write(job: Job, problem: Problem, source: ProjectedRows, samples: Samples, name: str, usable: float,
          folder: None | str | os.PathLike[str], output: Output, workers: Workers, content: Content) -> tuple[torch.Tensor, Path | None]:
    """The features ``(N, *out, dim)`` of ``samples``: in memory (``folder=None``), or in ``<folder>/features-<key>.npy``,
    reused when complete, resumed when not (this rank's pending chunks computed and committed), returned as a tensor
    over a copy-on-write memory map of it. ``content``: the public function (and its argument) that placed the file,
    named in messages."""
    sketch = job.sketch
    assert sketch is not None
    shape = (len(samples), *source.out_shape, sketch.dim)
    store: Store
    if folder is None:
        store, size, path = MemoryStore(shape, problem.out_dtype), CHUNK_SAMPLES, None
    else:
        fp = fingerprint(job, problem, samples, source.plan.record(), shape)
        path = feature_path(folder, fp)
        store = open_store(path, shape, problem.out_dtype, fp, features_grid(CHUNK_SAMPLES), output.resume, workers.rk, content,
                           output.overwrite)
        size = int(store.grid["chunk"])
    try:
        chunks = Chunks(samples, size, shape, problem.out_dtype)
        done = store.done_keys()
        # a file is shared by the ranks (each takes every world-th chunk); memory is each rank's own
        mine = [c for c in range(chunks.count) if path is None or workers.rk.mine(c)]
        todo = [c for c in mine if str(c) not in done]
        if todo:
            run(job, chunks, store, todo, source, usable, workers, name, len(mine), content.api)
        if path is not None:
            settle(store, [str(c) for c in range(chunks.count)], workers.rk)
        return store.result(), path
    finally:
        store.close()


def run(job: Job, chunks: Chunks, store: Store, todo: list[int], source: ProjectedRows, usable: float, workers: Workers,
        name: str, total: int, api: str = API) -> None:
    """The ``todo`` chunks (of this rank's ``total``) on every device of ``workers``, each committed to ``store`` as it is done."""
    devices = workers.devices
    sketch = job.sketch
    assert sketch is not None

    def make_engine(dev: torch.device) -> Pass:  # one device: the probed source; several: one each (their workspaces)
        src = source if len(devices) == 1 else ProjectedRows(
            problem_on(job, dev, to_device(job.params, dev), api), sketch.kind, sketch.dim, sketch.seed, job.engine.captures)
        return Pass(src, src.chunk_for(usable / len(devices)))

    runner = Runner(chunks, store, serial=not job.engine.thread_safe, background=not isinstance(store, MemoryStore))
    bar = make_progress(workers.progress, total, total - len(todo), f"features {name}", "chunk", "samples")
    try:
        runner.run([[c] for c in todo], devices, make_engine, bar)
    finally:
        bar.close()


def estimate(s1: Samples, s2: Samples, problem: Problem, dim: int, seed: int, symmetric: bool, samples: int = 1024) -> dict[str, Any]:
    """The re-sketch estimate (:mod:`ntkfunc._engines.sketch.error`) on up to ``samples`` spread rows of the features."""
    lay = problem.layouts[0]
    if lay.batch_paired:
        return {}

    def rows(s: Samples) -> torch.Tensor:
        return torch.stack([s.get(i, i + 1)[0] for i in spread(len(s), samples)])

    a1 = rows(s1)
    return resketch(a1, a1 if symmetric else rows(s2), lay, dim, seed).record()
