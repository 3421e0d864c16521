"""Where a whole-dataset kernel goes: memory, or a ``.npy`` file that survives interruption.

:class:`NpyStore` writes the kernel into a standard ``.npy`` file (any numpy opens it,
``np.load(path, mmap_mode="r")`` included) and keeps beside it

- ``<out>.manifest.json``: the fingerprint of params, data and settings, the kernel's
  shape and dtype, and the tile grid (written once, atomically, by whoever creates the file);
- ``<out>.tiles/``: one empty marker file per finished tile.

A tile is committed by writing its entries into the file through a short-lived memory
map, flushing it (``msync``) and ``fsync``-ing the file, and only then creating its
marker (written to a temporary name and ``os.replace``-d). A process killed at any
moment (SIGKILL included) therefore never leaves a tile marked done that is not fully
on disk; a restart recomputes exactly the unmarked tiles. Markers are per tile, so
several processes (``torch.distributed`` ranks) commit to the same output safely.

:class:`MemoryStore` keeps the kernel as a tensor (``out=None``).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from ntkfunc._dataset.distributed import Ranks

Index = tuple[slice, ...]


class Store(Protocol):
    """Where committed tiles go; ``result()`` is the finished kernel."""

    def done_keys(self) -> set[str]: ...

    def commit(self, key: str, writes: Iterable[tuple[Index, torch.Tensor]]) -> None: ...

    def finish(self) -> None: ...

    def result(self) -> torch.Tensor: ...

_FORMAT = 1


def _atomic_write(path: Path, text: str) -> None:
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

    def finish(self) -> None:
        """Nothing to record: the tensor is the result."""

    def result(self) -> torch.Tensor:
        return self.tensor


class NpyStore:
    """A kernel in ``path`` (``.npy``) with a manifest and per-tile markers; see the module doc.

    >>> import tempfile, os
    >>> d = tempfile.mkdtemp()
    >>> s = NpyStore.open(os.path.join(d, "K.npy"), (2, 2), torch.float32, {"seed": 0}, {"block": 1}, resume=True)
    >>> s.commit("0_0", [((slice(0, 1), slice(0, 2)), torch.ones(1, 2))])
    >>> s.is_done("0_0"), s.is_done("1_0")
    (True, False)
    >>> np.load(os.path.join(d, "K.npy")).tolist()
    [[1.0, 1.0], [0.0, 0.0]]
    """

    def __init__(self, path: Path, shape: tuple[int, ...], manifest: dict[str, Any]) -> None:
        self.path = path
        self.shape = shape
        self.manifest = manifest
        self.marks = Path(str(path) + ".tiles")

    @staticmethod
    def manifest_path(path: Path) -> Path:
        return Path(str(path) + ".manifest.json")

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
        """Create the output (or reopen it to resume); ``create=False``: only reopen (other ranks).

        Refuses to resume when the manifest's fingerprint differs from ``fingerprint``.
        """
        path = Path(path)
        np_dtype = _numpy_dtype(dtype)
        mpath = cls.manifest_path(path)
        marks = Path(str(path) + ".tiles")
        if create:
            if resume and mpath.exists() and path.exists():
                return cls._reopen(path, shape, np_dtype, fingerprint)
            path.parent.mkdir(parents=True, exist_ok=True)
            if marks.exists():
                for m in marks.iterdir():
                    m.unlink()
            marks.mkdir(exist_ok=True)
            for old in (mpath, path):  # a new inode: earlier results mapping the old file stay intact
                if old.exists():
                    old.unlink()
            mm = np.lib.format.open_memmap(path, mode="w+", dtype=np_dtype, shape=shape)
            del mm  # sparse zeros; entries written tile by tile
            manifest = {
                "format": _FORMAT,
                "shape": list(shape),
                "dtype": np.dtype(np_dtype).name,
                "fingerprint": fingerprint,
                "grid": grid,
            }
            _atomic_write(mpath, json.dumps(manifest, indent=1, sort_keys=True))
            return cls(path, shape, manifest)
        return cls._reopen(path, shape, np_dtype, fingerprint)

    @classmethod
    def _reopen(cls, path: Path, shape: tuple[int, ...], np_dtype: Any, fingerprint: dict[str, Any]) -> NpyStore:
        mpath = cls.manifest_path(path)
        try:
            manifest = json.loads(mpath.read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"kernel_matrix(out={str(path)!r}): cannot read its manifest {mpath} ({err})") from err
        old = manifest.get("fingerprint", {})
        if old != fingerprint:
            changed = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
            raise ValueError(
                f"kernel_matrix(out={str(path)!r}, resume=True): the existing output was computed with different "
                f"{', '.join(changed)} (recorded in {mpath.name}); expected the same params, data and settings to "
                "resume. Pass resume=False (or --no-resume) to start over, or choose another out"
            )
        if tuple(manifest["shape"]) != tuple(shape) or manifest["dtype"] != np.dtype(np_dtype).name:
            raise ValueError(
                f"kernel_matrix(out={str(path)!r}): the existing file holds {manifest['dtype']}{manifest['shape']}; "
                f"expected {np.dtype(np_dtype).name}{list(shape)}"
            )
        marks = Path(str(path) + ".tiles")
        marks.mkdir(exist_ok=True)
        return cls(path, shape, manifest)

    @property
    def grid(self) -> dict[str, Any]:
        return dict(self.manifest["grid"])

    def is_done(self, key: str) -> bool:
        return (self.marks / key).exists()

    def done_keys(self) -> set[str]:
        return {p.name for p in self.marks.iterdir() if not p.name.startswith(".")}

    def commit(self, key: str, writes: Iterable[tuple[Index, torch.Tensor]]) -> None:
        """Write the tile's blocks, make them durable, then mark the tile done (atomically)."""
        mm = np.load(self.path, mmap_mode="r+")
        try:
            for index, block in writes:
                mm[index] = block.detach().cpu().numpy()
            mm.flush()
        finally:
            del mm
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        _atomic_write(self.marks / key, "")

    def finish(self) -> None:
        """Record completion in the manifest (the markers stay: they are the record of tiles)."""
        self.manifest["complete"] = True
        _atomic_write(self.manifest_path(self.path), json.dumps(self.manifest, indent=1, sort_keys=True))

    def result(self) -> torch.Tensor:
        """The kernel as a tensor over a copy-on-write memory map: pages load on access, the file never changes."""
        return torch.from_numpy(np.load(self.path, mmap_mode="c"))


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

    Rank 0 creates (or reopens, to resume) the file; the others wait for it and reopen it.
    If rank 0 fails, the others stop with an error instead of waiting forever.
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
