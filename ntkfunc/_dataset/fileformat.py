"""The file format of everything ``kernel_matrix`` writes: kernel outputs and features files alike.

A file ``F`` (``K.npy``, or ``<dir>/features-<key>.npy`` for the features of ``sketch=``) is

- ``F.partial`` while units are missing, renamed to ``F`` once every unit is in: an unfinished
  file cannot be opened as ``F`` (``np.load`` fails). A standard ``.npy`` (:mod:`.npyfile`);
  its disk blocks are reserved when it is created;
- ``F.manifest.json``: :data:`FORMAT`, what the file holds (:class:`Content`), the fingerprint
  of what computed it (``fingerprint.py``, with its results format), the ntkfunc version that
  wrote it, shape and dtype, the grid of its units (:func:`unit_regions`), a random id of this
  file, whether it is complete (and then the list of its units), and a checksum of all that (an
  edited manifest is refused);
- ``F.tiles/`` (kernels) or ``F.chunks/`` (features): one marker per committed unit, named by the
  unit's key and written only after the unit's entries are written and ``fsync``-ed: the file id,
  the regions written (exactly the unit's: :func:`unit_regions`), a checksum of each and the
  number of non-finite entries of the unit (:func:`marker`);
- ``F.lock``: one writer at a time (:mod:`.lock`).

Every file here is replaced atomically (:func:`atomic_write`) and made readable as the data file
is (its permission bits: another user who can read the kernel can verify it). :mod:`.store`
writes these files; :mod:`.kernel_file` reads finished kernels back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ntkfunc._core.tiles import grid as tiles_grid
from ntkfunc._dataset import npyfile
from ntkfunc._version import __version__

Index = tuple[slice, ...]
FORMAT = 3
"""Manifest format; a manifest of another format is refused (features files were format 1: no checksum, other markers;
format 2 had no unit grid in its markers' checks, no non-finite counts and no results format)."""


@dataclasses.dataclass(frozen=True)
class Content:
    """What a file holds, as its manifest records it and its messages name it.

    Attributes:
      name: recorded in the manifest (``"kernel"`` when absent: kernels written before features had one).
      arg: the argument of ``kernel_matrix`` that places the file: messages start ``kernel_matrix(out='K.npy')``,
        or ``kernel_matrix(features='DIR')`` for a features file ``DIR/features-<key>.npy`` (a folder holds several).
      noun: the file in messages (``"output"``, ``"features file"``).
      unit: what one marker covers (``"tile"``, ``"chunk"``); the markers' folder is ``F.<unit>s``.
      same: what reusing the file needs.
      elsewhere: the way around a file that cannot be reused.
      api: the public function whose argument ``arg`` placed the file (``kernel_matrix``; ``feature_matrix``, whose
        ``out=`` folder holds the same features files).
      verb: the ``ntkfunc`` command that writes it (``compute``, ``features``).
    """

    name: str
    arg: str
    noun: str
    unit: str
    same: str
    elsewhere: str
    api: str = "kernel_matrix"
    verb: str = "compute"

    def what(self, path: str | os.PathLike[str], api: str | None = None) -> str:
        """The start of every message about the file at ``path``: the call and the argument that placed it."""
        place = path if self is KERNEL else Path(path).parent
        return f"{api or self.api}({self.arg}={str(place)!r})"

    def named(self, path: str | os.PathLike[str]) -> str:
        """`` <file name>`` where messages must say which file of a folder (features), else nothing."""
        return "" if self is KERNEL else f" {Path(path).name}"


KERNEL = Content("kernel", "out", "output", "tile", "the same params, data and settings to resume", "choose another out")
FEATURES = Content("features", "features", "features file", "chunk", "the same model, params, data and sketch to reuse it",
                   "pass another features= folder")
FEATURE_FILE = dataclasses.replace(FEATURES, arg="out", elsewhere="pass another out= folder", api="feature_matrix",
                                   verb="features")
"""The same features files, written by :func:`ntkfunc.feature_matrix` (only its messages differ)."""


@dataclasses.dataclass(frozen=True)
class OutputFiles:
    """The paths that make up the file ``out`` holding ``content``."""

    out: Path
    content: Content = KERNEL

    @property
    def partial(self) -> Path:
        return Path(str(self.out) + ".partial")

    @property
    def manifest(self) -> Path:
        return Path(str(self.out) + ".manifest.json")

    @property
    def markers(self) -> Path:
        return Path(f"{self.out}.{self.content.unit}s")

    def data(self, manifest: dict[str, Any]) -> Path | None:
        """The data file of ``manifest``: ``out`` when complete, else the partial file (or whichever exists)."""
        order = (self.out, self.partial) if manifest.get("complete") else (self.partial, self.out)
        return next((p for p in order if p.exists()), None)


# --- generic I/O -----------------------------------------------------------------------------


def atomic_write(path: Path, text: str, mode: int | None = None) -> None:
    """``text`` into ``path`` through a temporary file, fsync-ed then renamed over it.

    ``mode``: its permission bits (those of the data file it describes); None: the temporary
    file's (readable by its owner only).
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems cannot sync a directory
        pass
    finally:
        os.close(fd)


_NUMPY = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}


def numpy_dtype(dtype: torch.dtype, content: Content = KERNEL) -> Any:
    """The numpy dtype a file of ``content`` stores ``dtype`` as; TypeError for what a ``.npy`` cannot hold here."""
    if dtype not in _NUMPY:
        raise TypeError(
            f"{content.api}({content.arg}=...): {'kernels' if content is KERNEL else content.name} of dtype {dtype} cannot be "
            "stored in a .npy file; expected float16, float32 or float64 outputs of f (or out=None"
            f"{', features=None' if content is FEATURES else ''})"
        )
    return _NUMPY[dtype]


# --- the manifest ----------------------------------------------------------------------------


def _checksum(manifest: dict[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def new_manifest(files: OutputFiles, file_id: str, shape: tuple[int, ...], np_dtype: Any, fingerprint: dict[str, Any],
                 grid: dict[str, Any]) -> dict[str, Any]:
    """The manifest of a file just created (not complete)."""
    manifest = {"format": FORMAT, "file": file_id, "shape": list(shape), "dtype": np.dtype(np_dtype).name,
                "fingerprint": fingerprint, "grid": grid, "complete": False, "written_by": f"ntkfunc {_version()}"}
    if files.content is not KERNEL:  # kernel manifests stay as they were (absent means a kernel)
        manifest["content"] = files.content.name
    return manifest


def _version() -> str:
    return __version__


def write_manifest(files: OutputFiles, manifest: dict[str, Any], mode: int | None = None) -> None:
    """``manifest`` with its checksum, written atomically (``mode``: the data file's permission bits)."""
    manifest = dict(manifest, checksum=_checksum(manifest))
    atomic_write(files.manifest, json.dumps(manifest, indent=1, sort_keys=True), mode)


def read_manifest(files: OutputFiles, what: str) -> dict[str, Any]:
    """The manifest of ``files``, checked for format, content and integrity; ValueError naming ``what``."""
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
            "manifest as ntkfunc wrote it: start over with resume=False / --no-resume"
        )
    holds = manifest.get("content", KERNEL.name)
    if holds != files.content.name:
        raise ValueError(f"{what}: {files.manifest.name} describes a {holds} file; expected a {files.content.name} file")
    return manifest


def manifest_file_id(files: OutputFiles) -> str | None:
    """The file id the manifest on disk records now (None if it cannot be read): is it still ours?"""
    try:
        return json.loads(files.manifest.read_text()).get("file")
    except (OSError, ValueError, AttributeError):
        return None


# --- units and their markers ------------------------------------------------------------------


Regions = list[list[list[int]]]


def full_index(index: Index, ndim: int) -> tuple[slice, ...]:
    """``index`` with a full slice for every axis it leaves out."""
    return tuple(index) + (slice(None),) * (ndim - len(index))


def region_index(region: list[list[int]]) -> Index:
    return tuple(slice(a, b) for a, b in region)


def kernel_grid(block: int, axes: Iterable[int], symmetric: bool) -> dict[str, Any]:
    """The grid of a kernel file: tiles of ``block`` samples along the batch ``axes`` (x1's, x2's; one when paired);
    ``symmetric``: only tiles on and above the diagonal are units, each written with its mirror image."""
    return {"block": int(block), "axes": [int(a) for a in axes], "symmetric": bool(symmetric)}


def features_grid(chunk: int) -> dict[str, Any]:
    """The grid of a features file: chunks of ``chunk`` samples along axis 0."""
    return {"chunk": int(chunk)}


def _tile_bounds(grid: dict[str, Any], shape: tuple[int, ...]) -> tuple[int, list[int], int, int, bool]:
    block, axes = int(grid["block"]), [int(a) for a in grid["axes"]]
    return block, axes, shape[axes[0]], shape[axes[-1]], bool(grid.get("symmetric"))


def unit_regions(grid: dict[str, Any], key: str, shape: tuple[int, ...]) -> Regions | None:
    """The regions unit ``key`` of a file cut by ``grid`` covers, in the order its marker lists them; None: no such unit.

    Features (:func:`features_grid`): chunk ``"c"`` is samples ``[c S, (c + 1) S)`` along axis 0.
    Kernels (:func:`kernel_grid`): tile ``"i0_j0"`` is x1 samples ``[i0, i0 + B)`` against x2 samples
    ``[j0, j0 + B)`` along the batch axes (one shared axis when the batch axis is diagonal: then
    ``i0 == j0``), then, for a symmetric kernel off the diagonal, its mirror image.

    >>> unit_regions(features_grid(4), "1", (6, 2))
    [[[4, 6], [0, 2]]]
    >>> unit_regions(kernel_grid(2, (0, 1), symmetric=True), "0_2", (3, 3))
    [[[0, 2], [2, 3]], [[2, 3], [0, 2]]]
    >>> unit_regions(kernel_grid(2, (0, 1), symmetric=True), "2_0", (3, 3)) is None  # below the diagonal: a mirror
    True
    """
    full = [[0, n] for n in shape]
    try:
        if "chunk" in grid:
            size, c = int(grid["chunk"]), int(key)
            if str(c) != key or not 0 <= c * size < shape[0]:
                return None
            return [[[c * size, min((c + 1) * size, shape[0])], *full[1:]]]
        block, axes, n1, n2, symmetric = _tile_bounds(grid, shape)
        i0, j0 = (int(v) for v in key.split("_"))
    except (KeyError, TypeError, ValueError, IndexError):
        return None
    paired = len(axes) == 1
    if (f"{i0}_{j0}" != key or i0 % block or j0 % block or not 0 <= i0 < n1 or not 0 <= j0 < n2
            or (paired and i0 != j0) or (symmetric and j0 < i0)):
        return None
    rows, cols = [i0, min(i0 + block, n1)], [j0, min(j0 + block, n2)]
    regions = []
    for a, b in [(rows, cols)] + ([(cols, rows)] if symmetric and not paired and i0 != j0 else []):
        region = [list(r) for r in full]
        region[axes[0]] = a
        if not paired:
            region[axes[1]] = b
        regions.append(region)
    return regions


def unit_keys(grid: dict[str, Any], shape: tuple[int, ...]) -> list[str]:
    """The keys of every unit of a file cut by ``grid``: together their regions cover every entry exactly once.

    >>> unit_keys(kernel_grid(2, (0, 1), symmetric=True), (3, 3, 4)), unit_keys(features_grid(4), (6, 2))
    (['0_0', '0_2', '2_2'], ['0', '1'])
    """
    if "chunk" in grid:
        return [str(c) for c in range(-(-shape[0] // int(grid["chunk"])))]
    block, axes, n1, n2, symmetric = _tile_bounds(grid, shape)
    return [t.key for t in tiles_grid(n1, n2, block, block, symmetric=symmetric, paired=len(axes) == 1)]


def marker(file_id: str, writes: list[tuple[Index, Any]], digests: list[str], shape: tuple[int, ...], nonfinite: int = 0) -> str:
    """The marker of a committed unit: the file id, the regions written, the checksum of each, and how many of the
    unit's entries (its first region) are NaN or infinite."""
    regions = [[list(s.indices(n)[:2]) for s, n in zip(full_index(index, len(shape)), shape)] for index, _ in writes]
    return json.dumps({"file": file_id, "regions": regions, "digests": digests, "nonfinite": int(nonfinite)})


def read_marker(path: Path, file_id: str, shape: tuple[int, ...], grid: dict[str, Any]) -> dict[str, Any] | None:
    """The marker at ``path`` if it is a well-formed marker of the file ``file_id`` whose regions are exactly those of
    the unit it is named after (:func:`unit_regions`), else None."""
    try:
        m = json.loads(path.read_text())
        regions, digests = m["regions"], m["digests"]
        ok = (
            m.get("file") == file_id and isinstance(regions, list) and isinstance(digests, list) and len(regions) == len(digests)
            and isinstance(m.get("nonfinite"), int) and m["nonfinite"] >= 0 and regions == unit_regions(grid, path.name, shape)
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return m if ok else None


def committed_units(files: OutputFiles, file_id: str, shape: tuple[int, ...], grid: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{key: marker}`` of the units with a well-formed marker of the file ``file_id`` (see :func:`read_marker`)."""
    if not files.markers.exists():
        return {}
    found = {p.name: read_marker(p, file_id, shape, grid) for p in files.markers.iterdir() if not p.name.startswith(".")}
    return {k: m for k, m in found.items() if m is not None}


def marker_matches(values: np.ndarray, m: dict[str, Any]) -> bool:
    """Whether the entries of ``values`` (the data, memory-mapped) in the marker's regions have its checksums."""
    return all(npyfile.digest(values[region_index(r)]) == d for r, d in zip(m["regions"], m["digests"]))


def open_values(path: Path, header: npyfile.Header) -> np.memmap:
    """The entries of the ``.npy`` at ``path``, memory-mapped read-only."""
    return np.memmap(path, dtype=header.dtype, mode="r", offset=header.offset, shape=header.shape)


def entries_covered(markers: Iterable[dict[str, Any]]) -> int:
    """Entries the markers' regions cover (units are disjoint: the sum)."""
    return sum(math.prod(b - a for a, b in r) for m in markers for r in m["regions"])
