"""Where a whole-dataset kernel goes: memory, or a ``.npy`` file that survives interruption and is checked before reuse.

:class:`NpyStore` writes the kernel of ``out="K.npy"`` into these files:

- ``K.npy.partial`` while tiles are missing, renamed to ``K.npy`` once every tile is in: an
  unfinished kernel cannot be opened as ``K.npy`` (``np.load`` fails, :func:`load_kernel` says
  how far it got). A standard ``.npy``; its disk blocks are reserved when it is created;
- ``K.npy.manifest.json``: format, fingerprint of the job (``fingerprint.py``), shape and dtype,
  tile grid, a random id of this file, whether it is complete (and then the list of its tiles),
  and a checksum of all that (an edited manifest is refused);
- ``K.npy.tiles/``: one marker per committed tile, written only after the tile's entries are
  flushed and ``fsync``-ed: the file id, the regions written and a checksum of each;
- ``K.npy.lock``: one writer at a time (:mod:`ntkfunc._dataset.lock`).

A process killed at any moment (SIGKILL included) never leaves a tile marked done that is
not on disk, and a restart recomputes exactly the tiles without a valid marker. Before a
resume relies on the file, it checks that the manifest is intact and describes the same
job (else refused, naming what changed), that the file's header, shape and size are the
manifest's (else refused), and every marker's file id and checksum against the file (a
tile that fails is computed again, with a warning). Before every commit a writer checks
that its file and manifest are still the ones it opened (else it stops), so two runs can
never mix their kernels in one file. Ranks of one ``torchrun`` job share rank 0's lock and
commit their own tiles.

:class:`MemoryStore` keeps the kernel as a tensor (``out=None``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import secrets
import tempfile
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from ntkfunc._dataset import npyfile
from ntkfunc._dataset.distributed import Ranks
from ntkfunc._dataset.fingerprint import differences
from ntkfunc._dataset.lock import OutputLock

Index = tuple[slice, ...]
FORMAT = 2
"""Manifest format; a manifest of another format is not resumed."""


class Store(Protocol):
    """Where committed tiles go; ``result()`` is the finished kernel."""

    def done_keys(self) -> set[str]: ...

    def commit(self, key: str, writes: Iterable[tuple[Index, torch.Tensor]]) -> None: ...

    def finish(self, keys: list[str]) -> None: ...

    def result(self) -> torch.Tensor: ...

    def close(self) -> None: ...


def atomic_write(path: Path, text: str) -> None:
    """``text`` into ``path`` through a temporary file, fsync-ed then renamed over it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class MemoryStore:
    """The kernel as one tensor; tiles are written in place (``out=None``)."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.tensor = torch.zeros(shape, dtype=dtype)
        self.done: set[str] = set()

    def done_keys(self) -> set[str]:
        return set(self.done)

    def commit(self, key: str, writes: Iterable[tuple[Index, torch.Tensor]]) -> None:
        for index, block in writes:
            self.tensor[index] = block.to(self.tensor.dtype)
        self.done.add(key)

    def finish(self, keys: list[str]) -> None:
        """Nothing to record: the tensor is the result."""

    def result(self) -> torch.Tensor:
        return self.tensor

    def close(self) -> None:
        """Nothing to release."""


# --- the files of an output ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OutputFiles:
    """The paths that make up the output ``out``."""

    out: Path

    @property
    def partial(self) -> Path:
        return Path(str(self.out) + ".partial")

    @property
    def manifest(self) -> Path:
        return Path(str(self.out) + ".manifest.json")

    @property
    def tiles(self) -> Path:
        return Path(str(self.out) + ".tiles")

    def data(self, manifest: dict[str, Any]) -> Path | None:
        """The data file of ``manifest``: ``out`` when complete, else the partial file (or whichever exists)."""
        order = (self.out, self.partial) if manifest.get("complete") else (self.partial, self.out)
        return next((p for p in order if p.exists()), None)


def _checksum(manifest: dict[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def write_manifest(files: OutputFiles, manifest: dict[str, Any]) -> None:
    manifest = dict(manifest, checksum=_checksum(manifest))
    atomic_write(files.manifest, json.dumps(manifest, indent=1, sort_keys=True))


def read_manifest(files: OutputFiles, what: str) -> dict[str, Any]:
    """The manifest of ``files``, checked for format and integrity; ValueError naming ``what``."""
    try:
        manifest = json.loads(files.manifest.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{what}: cannot read its manifest {files.manifest.name} ({err})") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else None
        raise ValueError(
            f"{what}: {files.manifest.name} has format {got!r}; expected format {FORMAT} (written by an earlier "
            "ntkfunc: start over with resume=False / --no-resume)"
        )
    if manifest.get("checksum") != _checksum(manifest):
        raise ValueError(
            f"{what}: {files.manifest.name} does not match its checksum (it was edited or damaged); expected the "
            "manifest as kernel_matrix wrote it: start over with resume=False / --no-resume"
        )
    return manifest


def _regions(writes: list[tuple[Index, Any]], shape: tuple[int, ...]) -> list[list[list[int]]]:
    return [[list(s.indices(n)[:2]) for s, n in zip(_full(index, len(shape)), shape)] for index, _ in writes]


def _full(index: Index, ndim: int) -> tuple[slice, ...]:
    return tuple(index) + (slice(None),) * (ndim - len(index))


def region_index(region: list[list[int]]) -> Index:
    return tuple(slice(a, b) for a, b in region)


def read_marker(path: Path, file_id: str, shape: tuple[int, ...]) -> dict[str, Any] | None:
    """The marker at ``path`` if it is a well-formed marker of the file ``file_id`` within ``shape``, else None."""
    try:
        marker = json.loads(path.read_text())
        regions, digests = marker["regions"], marker["digests"]
        ok = (
            marker.get("file") == file_id and isinstance(regions, list) and len(regions) == len(digests)
            and all(len(r) == len(shape) and all(0 <= a <= b <= n for (a, b), n in zip(r, shape)) for r in regions)
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return marker if ok else None


def marker_matches(values: np.ndarray, marker: dict[str, Any]) -> bool:
    """Whether the entries of ``values`` (the data, memory-mapped) in the marker's regions have its checksums."""
    return all(npyfile.digest(values[region_index(r)]) == d for r, d in zip(marker["regions"], marker["digests"]))


def open_values(path: Path, header: npyfile.Header) -> np.memmap:
    """The entries of the ``.npy`` at ``path``, memory-mapped read-only."""
    return np.memmap(path, dtype=header.dtype, mode="r", offset=header.offset, shape=header.shape)


class NpyStore:
    """A kernel in a ``.npy`` file with its manifest and per-tile markers; see the module doc.

    >>> import tempfile, os
    >>> out = os.path.join(tempfile.mkdtemp(), "K.npy")
    >>> s = NpyStore.open(out, (2, 2), torch.float32, {"seed": 0}, {"block": 1}, resume=True)
    >>> s.commit("0_0", [((slice(0, 1), slice(0, 2)), torch.ones(1, 2))])
    >>> s.done_keys(), os.path.exists(out)  # still K.npy.partial
    ({'0_0'}, False)
    >>> s.commit("1_0", [((slice(1, 2), slice(0, 2)), torch.full((1, 2), 2.0))])
    >>> s.finish(["0_0", "1_0"]); s.close()
    >>> np.load(out).tolist()
    [[1.0, 1.0], [2.0, 2.0]]
    """

    def __init__(self, files: OutputFiles, shape: tuple[int, ...], manifest: dict[str, Any], data: Path,
                 header: npyfile.Header, lock: OutputLock | None) -> None:
        self.files, self.shape, self.manifest, self.data, self.header, self.lock = files, shape, manifest, data, header, lock
        self.what = f"kernel_matrix(out={str(files.out)!r})"
        self.fd: int | None = os.open(data, os.O_RDWR)

    @property
    def path(self) -> Path:
        return self.files.out

    @property
    def file_id(self) -> str:
        return str(self.manifest["file"])

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
    ) -> NpyStore:
        """Create the output (or reopen it to resume), holding its lock; ``create=False``: only reopen (other ranks).

        Refuses to resume when the manifest's fingerprint differs from ``fingerprint``, or when the
        manifest or the data file are not what kernel_matrix wrote.
        """
        files = OutputFiles(Path(path))
        np_dtype = _numpy_dtype(dtype)
        what = f"kernel_matrix(out={str(files.out)!r})"
        if files.out.is_dir():
            raise ValueError(f"{what}: {files.out} is a directory; expected the path of a .npy file to write")
        if not create:
            return cls._reopen(files, shape, np_dtype, fingerprint, None, check_tiles=False)
        files.out.parent.mkdir(parents=True, exist_ok=True)
        lock = OutputLock.acquire(files.out, "kernel_matrix")
        try:
            if resume and files.manifest.exists():
                manifest = read_manifest(files, what)
                if files.data(manifest) is not None:
                    return cls._reopen(files, shape, np_dtype, fingerprint, lock, check_tiles=True, manifest=manifest)
            return cls._create(files, shape, np_dtype, fingerprint, grid, lock)
        except BaseException:
            lock.release()
            raise

    @classmethod
    def _create(cls, files: OutputFiles, shape: tuple[int, ...], np_dtype: Any, fingerprint: dict[str, Any],
                grid: dict[str, Any], lock: OutputLock) -> NpyStore:
        files.manifest.unlink(missing_ok=True)  # first: no manifest ever describes a file it did not create
        files.tiles.mkdir(exist_ok=True)
        for m in files.tiles.iterdir():
            m.unlink()
        for old in (files.partial, files.out):  # a new inode: earlier results mapping the old file stay intact
            old.unlink(missing_ok=True)
        header = npyfile.create(files.partial, shape, np_dtype, "kernel_matrix")
        manifest = {
            "format": FORMAT,
            "file": secrets.token_hex(8),
            "shape": list(shape),
            "dtype": np.dtype(np_dtype).name,
            "fingerprint": fingerprint,
            "grid": grid,
            "complete": False,
        }
        write_manifest(files, manifest)
        return cls(files, shape, manifest, files.partial, header, lock)

    @classmethod
    def _reopen(cls, files: OutputFiles, shape: tuple[int, ...], np_dtype: Any, fingerprint: dict[str, Any],
                lock: OutputLock | None, *, check_tiles: bool, manifest: dict[str, Any] | None = None) -> NpyStore:
        what = f"kernel_matrix(out={str(files.out)!r}, resume=True)"
        manifest = read_manifest(files, what) if manifest is None else manifest
        changed = differences(manifest.get("fingerprint", {}), fingerprint)
        if changed:
            raise ValueError(
                f"{what}: the existing output was computed with different {', '.join(changed)} (recorded in "
                f"{files.manifest.name}); expected the same params, data and settings to resume. Pass resume=False "
                "(or --no-resume) to start over, or choose another out"
            )
        if tuple(manifest["shape"]) != tuple(shape) or manifest["dtype"] != np.dtype(np_dtype).name:
            raise ValueError(
                f"{what}: the existing file holds {manifest['dtype']}{manifest['shape']}; expected {np.dtype(np_dtype).name}{list(shape)}"
            )
        data = files.data(manifest)
        if data is None:
            raise ValueError(f"{what}: neither {files.partial.name} nor {files.out.name} exists; expected the file its manifest describes")
        header = npyfile.check(data, shape, np_dtype, what)
        files.tiles.mkdir(exist_ok=True)
        store = cls(files, shape, manifest, data, header, lock)
        if check_tiles:
            store._drop_bad_markers()
        return store

    def _drop_bad_markers(self) -> None:
        """Check every marker against the file; remove those that fail (their tiles are computed again)."""
        bad = []
        for m in sorted(self.files.tiles.iterdir()):
            if m.name.startswith("."):
                continue
            marker = read_marker(m, self.file_id, self.shape)
            ok = False
            if marker is not None:
                values = open_values(self.data, self.header)
                ok = marker_matches(values, marker)
                del values
            if not ok:
                bad.append(m.name)
                m.unlink()
        if bad:
            warnings.warn(
                f"{self.what}: {len(bad)} committed tile(s) {bad[:5]} do not match their markers (the data or the "
                "markers changed after they were written); computing them again",
                RuntimeWarning, stacklevel=4,
            )

    @property
    def grid(self) -> dict[str, Any]:
        return dict(self.manifest["grid"])

    def is_done(self, key: str) -> bool:
        return read_marker(self.files.tiles / key, self.file_id, self.shape) is not None

    def done_keys(self) -> set[str]:
        """Tiles with a well-formed marker of this file (their checksums were checked when the store was opened)."""
        return {p.name for p in self.files.tiles.iterdir()
                if not p.name.startswith(".") and read_marker(p, self.file_id, self.shape) is not None}

    def _check_still_ours(self) -> None:
        """Stop before writing if the data file or the manifest at our paths are no longer the ones we opened."""
        assert self.fd is not None
        mine = os.fstat(self.fd)
        try:
            there = os.stat(self.data)
            same = (there.st_dev, there.st_ino) == (mine.st_dev, mine.st_ino)
            current = json.loads(self.files.manifest.read_text()).get("file")
        except (OSError, ValueError):
            same, current = False, None
        if not same or current != self.file_id:
            raise RuntimeError(
                f"{self.what}: the output was replaced while this run was writing it ({self.data.name} or "
                f"{self.files.manifest.name} is now another run's); stopped without writing into it. Expected one "
                "writer per output: run again (resume) once the other run has finished, or choose another out"
            )

    def commit(self, key: str, writes: Iterable[tuple[Index, torch.Tensor]]) -> None:
        """Write the tile's blocks, make them durable, then mark the tile done with their checksums (atomically)."""
        self._check_still_ours()
        writes = list(writes)
        assert self.fd is not None
        with open(self.fd, "r+b", closefd=False) as fh:
            values = np.memmap(fh, dtype=self.header.dtype, mode="r+", offset=self.header.offset, shape=self.shape)
            try:
                digests = []
                for index, block in writes:
                    values[index] = block.detach().cpu().numpy()
                    digests.append(npyfile.digest(values[index]))
                values.flush()
            finally:
                del values
        os.fsync(self.fd)
        marker = {"file": self.file_id, "regions": _regions(writes, self.shape), "digests": digests}
        atomic_write(self.files.tiles / key, json.dumps(marker))

    def finish(self, keys: list[str]) -> None:
        """Move the data file to ``out`` and record completion and the tiles in the manifest."""
        if self.data != self.files.out:
            self._check_still_ours()
            assert self.fd is not None
            os.fsync(self.fd)
            os.replace(self.data, self.files.out)
            _fsync_dir(self.files.out.parent)
            self.data = self.files.out
        self.manifest = dict(self.manifest, complete=True, tiles=sorted(keys))
        write_manifest(self.files, self.manifest)

    def result(self) -> torch.Tensor:
        """The kernel as a tensor over a copy-on-write memory map: pages load on access, the file never changes."""
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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems cannot sync a directory
        pass
    finally:
        os.close(fd)


def _numpy_dtype(dtype: torch.dtype) -> Any:
    table = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}
    if dtype not in table:
        raise TypeError(
            f"kernel_matrix(out=...): kernels of dtype {dtype} cannot be stored in a .npy file; expected "
            "float16, float32 or float64 outputs of f (or out=None)"
        )
    return table[dtype]


def open_store(
    out: None | str | os.PathLike[str],
    shape: tuple[int, ...],
    dtype: torch.dtype,
    fingerprint: dict[str, Any] | None,
    grid: dict[str, Any],
    resume: bool,
    rk: Ranks,
) -> MemoryStore | NpyStore:
    """The store of a run: memory (``out=None``), or ``out`` opened by rank 0 then by the other ranks.

    Rank 0 takes the output's lock and creates (or reopens, to resume) the file; the others wait
    for it and reopen it. If rank 0 fails, the others stop with an error instead of waiting forever.
    """
    if out is None:
        return MemoryStore(shape, dtype)
    assert fingerprint is not None
    store: NpyStore | None = None
    if rk.rank == 0:
        try:
            store = NpyStore.open(out, shape, dtype, fingerprint, grid, resume)
        except BaseException:
            rk.broadcast_int(0)  # let the other ranks stop instead of waiting
            raise
    if not rk.broadcast_int(1):
        raise RuntimeError(f"kernel_matrix(out={str(out)!r}): rank 0 could not open the output (see its error)")
    if store is None:
        store = NpyStore.open(out, shape, dtype, fingerprint, grid, resume=True, create=False)
    return store


def entries_covered(markers: Iterable[dict[str, Any]]) -> int:
    """Kernel entries the markers' regions cover (tiles are disjoint: the sum)."""
    return sum(math.prod(b - a for a, b in r) for m in markers for r in m["regions"])
