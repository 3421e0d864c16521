"""The one writer: where committed units (kernel tiles, feature chunks) go, in memory or in a file that survives interruption.

:class:`NpyStore` writes a ``.npy`` of the format of :mod:`.fileformat`, keyed by unit: a kernel
output (``out="K.npy"``, units = tiles) or a features file of ``sketch=`` (units = chunks of
samples). A process killed at any moment (SIGKILL included) never leaves a unit marked done
that is not on disk, and a restart recomputes exactly the units without a valid marker. Before
a resume (or a reuse of features) relies on the file, it checks that the manifest is intact, of
this ntkfunc's results format, and describes the same job (else refused, naming what changed),
that the file's header, shape and size are the manifest's (else refused), and every marker's file
id, regions (exactly its unit's) and checksums against the file (a unit that fails is computed
again, with a warning). Before every commit a writer checks that its file and manifest are still
the ones it opened (else it stops), so two runs can never mix their results in one file. A file
at the path that no manifest describes (an array of the user's) is never deleted without
``overwrite=True``. :func:`open_store` opens a file for every rank of a ``torchrun``
job: rank 0 under the file's lock, the others after it; they commit their own units.

:class:`MemoryStore` keeps the result as a tensor (``out=None``; features that fit in memory).
"""

from __future__ import annotations

import os
import secrets
import stat
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from ntkfunc._dataset import npyfile
from ntkfunc._dataset.distributed import Ranks
from ntkfunc._dataset.fileformat import (
    KERNEL,
    Content,
    Index,
    OutputFiles,
    atomic_write,
    committed_units,
    fsync_dir,
    full_index,
    manifest_file_id,
    marker,
    marker_matches,
    new_manifest,
    numpy_dtype,
    open_values,
    read_manifest,
    read_marker,
    region_index,
    write_manifest,
)
from ntkfunc._dataset.fingerprint import RESULTS_KEY, differences
from ntkfunc._dataset.lock import OutputLock


class Store(Protocol):
    """Where committed units go; ``result()`` is the finished tensor."""

    def done_keys(self) -> set[str]: ...

    def committed(self) -> dict[str, int]: ...

    def commit(self, key: str, writes: Iterable[tuple[Index, torch.Tensor]]) -> None: ...

    def finish(self, keys: list[str], record: dict[str, Any] | None = None) -> None: ...

    def result(self) -> torch.Tensor: ...

    def close(self) -> None: ...


class MemoryStore:
    """The result as one tensor; units are written in place (``out=None``)."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.tensor = torch.zeros(shape, dtype=dtype)
        self.done: set[str] = set()

    def done_keys(self) -> set[str]:
        return set(self.done)

    def committed(self) -> dict[str, int]:
        """``{unit: non-finite entries}``: none counted (an in-memory result is this run's own)."""
        return dict.fromkeys(self.done, 0)

    def commit(self, key: str, writes: Iterable[tuple[Index, torch.Tensor]]) -> None:
        for index, block in writes:
            self.tensor[index] = block.to(self.tensor.dtype)
        self.done.add(key)

    def finish(self, keys: list[str], record: dict[str, Any] | None = None) -> None:
        """Nothing to record: the tensor is the result."""

    def result(self) -> torch.Tensor:
        return self.tensor

    def close(self) -> None:
        """Nothing to release."""


class NpyStore:
    """A ``.npy`` file with its manifest and per-unit markers; see the module doc and :mod:`.fileformat`.

    >>> import tempfile, os
    >>> out = os.path.join(tempfile.mkdtemp(), "K.npy")
    >>> from ntkfunc._dataset.fileformat import kernel_grid
    >>> s = NpyStore.open(out, (2, 2), torch.float32, {"seed": 0}, kernel_grid(2, (0,), symmetric=False), resume=True)
    >>> s.commit("0_0", [((slice(0, 2),), torch.tensor([[1.0, 1.0], [2.0, 2.0]]))])  # one tile: a paired batch axis
    >>> s.done_keys(), os.path.exists(out)  # still K.npy.partial
    ({'0_0'}, False)
    >>> s.finish(["0_0"]); s.close()
    >>> np.load(out).tolist()
    [[1.0, 1.0], [2.0, 2.0]]
    """

    def __init__(self, files: OutputFiles, shape: tuple[int, ...], manifest: dict[str, Any], data: Path,
                 header: npyfile.Header, lock: OutputLock | None) -> None:
        self.files, self.shape, self.manifest, self.data, self.header, self.lock = files, shape, manifest, data, header, lock
        self.what = files.content.what(files.out)
        self.fd: int | None = os.open(data, os.O_RDWR)
        self.mode = stat.S_IMODE(os.fstat(self.fd).st_mode)  # the manifest and markers are as readable as the data

    @property
    def path(self) -> Path:
        return self.files.out

    @property
    def file_id(self) -> str:
        return str(self.manifest["file"])

    @property
    def grid(self) -> dict[str, Any]:
        return dict(self.manifest["grid"])

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        shape: tuple[int, ...],
        dtype: torch.dtype,
        fingerprint: dict[str, Any],
        grid: dict[str, Any],
        resume: bool,
        create: bool = True,
        content: Content = KERNEL,
        overwrite: bool = False,
    ) -> NpyStore:
        """Create the file (or reopen it to resume), holding its lock; ``create=False``: only reopen (other ranks).

        Refuses to resume when the manifest's fingerprint differs from ``fingerprint``, or when the
        manifest or the data file are not what ntkfunc wrote. ``grid``: how the file is cut into
        units (:func:`~.fileformat.unit_regions`), recorded when it is created (a reopened file
        keeps its own). A file at ``path`` that no manifest describes is refused unless ``overwrite``.
        """
        files = OutputFiles(Path(path), content)
        np_dtype = numpy_dtype(dtype, content)
        what = content.what(files.out)
        if files.out.is_dir():
            raise ValueError(f"{what}: {files.out} is a directory; expected the path of a .npy file to write")
        if not create:
            return cls._reopen(files, shape, np_dtype, fingerprint, None, check=False)
        refuse_foreign(files, overwrite)  # before anything is written
        files.out.parent.mkdir(parents=True, exist_ok=True)
        lock = OutputLock.acquire(files.out, content.api, content)
        try:
            refuse_foreign(files, overwrite)  # again, under the lock
            if resume and files.manifest.exists():
                manifest = read_manifest(files, what)
                if files.data(manifest) is not None:
                    return cls._reopen(files, shape, np_dtype, fingerprint, lock, check=True, manifest=manifest)
            return cls._create(files, shape, np_dtype, fingerprint, grid, lock)
        except BaseException:
            lock.release()
            raise

    @classmethod
    def _create(cls, files: OutputFiles, shape: tuple[int, ...], np_dtype: Any, fingerprint: dict[str, Any],
                grid: dict[str, Any], lock: OutputLock) -> NpyStore:
        files.manifest.unlink(missing_ok=True)  # first: no manifest ever describes a file it did not create
        files.markers.mkdir(exist_ok=True)
        for m in files.markers.iterdir():
            m.unlink()
        for old in (files.partial, files.out):  # a new inode: earlier results mapping the old file stay intact
            old.unlink(missing_ok=True)
        content = files.content
        header = npyfile.create(files.partial, shape, np_dtype, content.api, content.arg, f"{content.name} file")
        manifest = new_manifest(files, secrets.token_hex(8), shape, np_dtype, fingerprint, grid)
        write_manifest(files, manifest, stat.S_IMODE(os.stat(files.partial).st_mode))
        return cls(files, shape, manifest, files.partial, header, lock)

    @classmethod
    def _reopen(cls, files: OutputFiles, shape: tuple[int, ...], np_dtype: Any, fingerprint: dict[str, Any],
                lock: OutputLock | None, *, check: bool, manifest: dict[str, Any] | None = None) -> NpyStore:
        content = files.content
        what = f"{content.what(files.out)[:-1]}, resume=True)"
        manifest = read_manifest(files, what) if manifest is None else manifest
        recorded = manifest.get("fingerprint", {})
        if recorded.get(RESULTS_KEY) != fingerprint.get(RESULTS_KEY):
            raise ValueError(
                f"{what}: the existing {content.noun}{content.named(files.out)} was written by "
                f"{manifest.get('written_by', 'an earlier ntkfunc')} in results format {recorded.get(RESULTS_KEY)}; this ntkfunc "
                f"computes results format {fingerprint.get(RESULTS_KEY)} (a fix changed what it computes since), so the file "
                f"is not reused; expected a file of results format {fingerprint.get(RESULTS_KEY)}. Pass resume=False "
                f"(or --no-resume) to compute it again, or {content.elsewhere}"
            )
        changed = differences(recorded, fingerprint)
        if changed:
            existing = f"the existing {content.noun}{content.named(files.out)}"
            raise ValueError(
                f"{what}: {existing} was computed with different {', '.join(changed)} (recorded in "
                f"{files.manifest.name}); expected {content.same}. Pass resume=False (or --no-resume) to start over, "
                f"or {content.elsewhere}"
            )
        if tuple(manifest["shape"]) != tuple(shape) or manifest["dtype"] != np.dtype(np_dtype).name:
            raise ValueError(
                f"{what}: the existing {content.noun}{content.named(files.out)} holds {manifest['dtype']}{manifest['shape']}; "
                f"expected {np.dtype(np_dtype).name}{list(shape)}"
            )
        data = files.data(manifest)
        if data is None:
            raise ValueError(f"{what}: neither {files.partial.name} nor {files.out.name} exists; expected the file its manifest describes")
        header = npyfile.check(data, shape, np_dtype, what)
        files.markers.mkdir(exist_ok=True)
        store = cls(files, shape, manifest, data, header, lock)
        if check:
            store._drop_bad_markers()
        return store

    def _drop_bad_markers(self) -> None:
        """Check every marker against the file; remove those that fail (their units are computed again)."""
        bad = []
        values = open_values(self.data, self.header)
        try:
            for m in sorted(self.files.markers.iterdir()):
                if m.name.startswith("."):
                    continue
                found = read_marker(m, self.file_id, self.shape, self.grid)
                if found is None or not marker_matches(values, found):
                    bad.append(m.name)
                    m.unlink()
        finally:
            del values
        if bad:
            content = self.files.content
            of = f" of{content.named(self.files.out)}" if content is not KERNEL else ""
            warnings.warn(
                f"{self.what}: {len(bad)} committed {content.unit}(s) {bad[:5]}{of} do not match their markers (the data or the "
                f"markers changed after they were written, or a marker describes another {content.unit}); computing them again",
                RuntimeWarning, stacklevel=5,
            )

    def done_keys(self) -> set[str]:
        """Units with a well-formed marker of this file (their checksums were checked when the store was opened)."""
        return set(self.committed())

    def committed(self) -> dict[str, int]:
        """``{unit: non-finite entries}`` of the units with a well-formed marker (the count is the marker's: units
        committed with ``nonfinite="warn"`` or ``"ignore"`` may hold NaN or infinite entries)."""
        return {k: int(m["nonfinite"]) for k, m in committed_units(self.files, self.file_id, self.shape, self.grid).items()}

    def read(self, key: str) -> np.ndarray:
        """The entries of unit ``key``'s first region (the unit itself, not its mirror image), as stored."""
        m = read_marker(self.files.markers / key, self.file_id, self.shape, self.grid)
        assert m is not None, key
        values = open_values(self.data, self.header)
        try:
            return np.array(values[region_index(m["regions"][0])])
        finally:
            del values

    def _check_still_ours(self) -> None:
        """Stop before writing if the data file or the manifest at our paths are no longer the ones we opened."""
        assert self.fd is not None
        mine = os.fstat(self.fd)
        try:
            there = os.stat(self.data)
            same = (there.st_dev, there.st_ino) == (mine.st_dev, mine.st_ino)
        except OSError:
            same = False
        if not same or manifest_file_id(self.files) != self.file_id:
            noun = self.files.content.noun
            raise RuntimeError(
                f"{self.what}: the {noun} was replaced while this run was writing it ({self.data.name} or "
                f"{self.files.manifest.name} is now another run's); stopped without writing into it. Expected one "
                f"writer per {noun}: run again (resume) once the other run has finished, or {self.files.content.elsewhere}"
            )

    def commit(self, key: str, writes: Iterable[tuple[Index, torch.Tensor]]) -> None:
        """Write the unit's blocks, make them durable, then mark the unit done with their checksums (atomically)."""
        self._check_still_ours()
        assert self.fd is not None
        ndim = len(self.shape)
        arrays = [(full_index(index, ndim), np.ascontiguousarray(block.detach().cpu().numpy(), dtype=self.header.dtype))
                  for index, block in writes]
        digests = []
        for index, values in arrays:
            npyfile.write(self.fd, self.header, index, values, f"{self.what} ({self.data.name}, {self.files.content.unit} {key})")
            digests.append(npyfile.digest(values))
        os.fsync(self.fd)
        nonfinite = int(np.count_nonzero(~np.isfinite(arrays[0][1]))) if arrays else 0
        atomic_write(self.files.markers / key, marker(self.file_id, arrays, digests, self.shape, nonfinite), self.mode)

    def finish(self, keys: list[str], record: dict[str, Any] | None = None) -> None:
        """Move the data file to ``out`` and record completion, the units and ``record`` (what the run found) in the manifest."""
        if self.data != self.files.out:
            self._check_still_ours()
            assert self.fd is not None
            os.fsync(self.fd)
            os.replace(self.data, self.files.out)
            fsync_dir(self.files.out.parent)
            self.data = self.files.out
        units = f"{self.files.content.unit}s"  # "tiles" of a kernel, "chunks" of features
        self.manifest = {**self.manifest, **(record or {}), "complete": True, units: sorted(keys)}
        write_manifest(self.files, self.manifest, self.mode)

    def result(self) -> torch.Tensor:
        """The file as a tensor over a copy-on-write memory map: pages load on access, the file never changes."""
        data = self.files.out if self.files.out.exists() else self.data
        return torch.from_numpy(np.load(data, mmap_mode="c"))

    def close(self) -> None:
        """Close the data file and release the lock (idempotent)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def refuse_foreign(files: OutputFiles, overwrite: bool) -> None:
    """Refuse (unless ``overwrite``) a file at ``files.out`` that no manifest describes: it is not ours to delete."""
    if overwrite or files.manifest.exists() or not (files.out.exists() or files.out.is_symlink()):
        return
    content = files.content
    raise ValueError(
        f"{content.what(files.out)}: {files.out} exists and is not a {content.name} file written by {content.api} (no "
        f"{files.manifest.name} describes it), so it is left as it is; expected a new path or an earlier output of "
        f"{content.api}: pass overwrite=True (ntkfunc {content.verb} --overwrite) to replace it, or {content.elsewhere}"
    )


def open_store(path: str | os.PathLike[str], shape: tuple[int, ...], dtype: torch.dtype, fingerprint: dict[str, Any],
               grid: dict[str, Any], resume: bool, rk: Ranks, content: Content = KERNEL, overwrite: bool = False) -> NpyStore:
    """The file ``path`` opened for every rank: rank 0 creates (or reopens) it under its lock, the others then reopen it."""
    return rk.rank0_first(
        lambda: NpyStore.open(path, shape, dtype, fingerprint, grid, resume, content=content, overwrite=overwrite),
        lambda: NpyStore.open(path, shape, dtype, fingerprint, grid, resume=True, create=False, content=content),
        f"{content.what(path)}: rank 0 could not open the {content.noun}{content.named(path)} (see its error)",
    )


def settle(store: Store, keys: list[str], rk: Ranks, record: dict[str, Any] | None = None) -> None:
    """Once every rank committed its units: rank 0 checks that all of ``keys`` are in and records completion; every rank waits."""
    rk.barrier()
    if rk.rank == 0:
        done = store.done_keys()
        missing = [k for k in keys if k not in done]
        if missing:  # pragma: no cover - an invariant: every rank committed its units
            raise RuntimeError(f"kernel_matrix: {missing[:5]} were not committed")
        store.finish(keys, record)
    rk.barrier()
