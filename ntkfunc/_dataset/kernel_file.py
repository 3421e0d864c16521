"""Reading a kernel file written by ``kernel_matrix(out=...)`` or ``ntkfunc compute``, checked first.

:func:`verify_kernel` checks everything a finished output promises: its manifest is intact
and complete, the ``.npy`` has the manifest's header, shape and size, the manifest lists every
tile of its grid (so the tiles cover every kernel entry exactly once), every tile has its marker
and each marker describes exactly its own tile's regions (a marker copied over another tile's is
refused), and (``data=True``) every tile's entries still have the checksum written with them. :func:`load_kernel` returns
the kernel after those checks and refuses an incomplete, damaged or foreign file with a
message that says which. ``np.load("K.npy")`` still opens any finished kernel (an unfinished
one is ``K.npy.partial`` and cannot be mistaken for it).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import numpy as np
import torch

from ntkfunc._dataset import npyfile
from ntkfunc._dataset.fileformat import (
    FEATURES,
    KERNEL,
    Content,
    OutputFiles,
    entries_covered,
    marker_matches,
    open_values,
    read_manifest,
    read_marker,
    unit_keys,
)


@dataclasses.dataclass(frozen=True)
class KernelFileReport:
    """What :func:`verify_kernel` checked: the file, its shape and dtype, its units (tiles of a kernel, chunks of a
    features file) and what it holds (``"kernel"`` or ``"features"``)."""

    path: Path
    shape: tuple[int, ...]
    dtype: str
    tiles: int
    data_checked: bool
    content: str = "kernel"

    def __str__(self) -> str:
        checked = "entries match their checksums" if self.data_checked else "entries not read"
        if self.content == FEATURES.name:
            return f"{self.path}: complete {self.dtype}{list(self.shape)} features file, {self.tiles} chunks, {checked}"
        return f"{self.path}: complete {self.dtype}{list(self.shape)} kernel, {self.tiles} tiles, {checked}"


def _content_of(files: OutputFiles) -> Content:
    """What the manifest says the file holds (a kernel when it does not say, or cannot be read: checked afterwards)."""
    try:
        holds = json.loads(files.manifest.read_text()).get("content")
    except (OSError, ValueError, AttributeError):
        return KERNEL
    return FEATURES if holds == FEATURES.name else KERNEL


def verify_kernel(path: str | os.PathLike[str], *, data: bool = True, api: str = "verify_kernel") -> KernelFileReport:
    """Check the kernel file ``path`` (``K.npy``), or a features file of ``feature_matrix`` / ``kernel_matrix(sketch=)``
    (``features-<key>.npy``: the same checks, chunk by chunk); a ValueError says what is wrong.

    ``data=False`` skips reading the entries (manifest, header, size and markers only).

    Example:
      >>> import os, tempfile, torch, ntkfunc
      >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
      >>> f, params = ntkfunc.from_module(model)
      >>> out = os.path.join(tempfile.mkdtemp(), "K.npy")
      >>> k = ntkfunc.kernel_matrix(f, params, torch.randn(7, 4), batch_size=3, out=out, progress=False)
      >>> report = ntkfunc.verify_kernel(out)
      >>> str(report).split(": ", 1)[1]
      'complete float32[7, 7] kernel, 6 tiles, entries match their checksums'
      >>> with open(out, "r+b") as fh:  # set the last entry to 0
      ...     _ = fh.seek(-4, 2); _ = fh.write(bytes(4))
      >>> ntkfunc.verify_kernel(out)  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      ValueError: verify_kernel('...K.npy'): the entries of 1 tiles (['6_6']) do not match the checksums written with them; ...
    """
    return check_file(path, data=data, api=api, features=True)


def check_file(path: str | os.PathLike[str], *, data: bool, api: str, features: bool) -> KernelFileReport:
    """:func:`verify_kernel`'s checks; ``features=False``: a features file is refused (:func:`load_kernel` loads kernels)."""
    files = OutputFiles(Path(path))
    if features:
        files = OutputFiles(files.out, _content_of(files))
    what = f"{api}({str(path)!r})"
    kernel = files.content is KERNEL
    noun, units, rerun = ("kernel", "tiles", "kernel_matrix call (or ntkfunc compute)") if kernel else (
        "features file", "chunks", "feature_matrix or kernel_matrix call (or ntkfunc features / compute)")
    if not files.manifest.exists():
        if files.out.exists():
            raise ValueError(f"{what}: {files.manifest.name} is missing, so nothing records what the file holds; "
                             "expected a kernel written by kernel_matrix(out=...) (np.load reads any .npy file)")
        raise FileNotFoundError(f"{what}: no kernel there ({files.out.name} and {files.manifest.name} do not exist)")
    manifest = read_manifest(files, what)
    shape, dtype = tuple(manifest["shape"]), np.dtype(manifest["dtype"])
    file_id, grid = str(manifest["file"]), dict(manifest["grid"])
    if not manifest.get("complete"):
        done = sum(1 for p in files.markers.iterdir() if read_marker(p, file_id, shape, grid) is not None) if files.markers.exists() else 0
        raise ValueError(
            f"{what}: the {noun} is incomplete ({done} {units} committed to {files.partial.name} so far); expected a "
            f"finished {noun}: run the same {rerun} again to resume it"
        )
    header = npyfile.check(files.out, shape, dtype, what)
    keys = list(manifest.get(units, []))
    expected = unit_keys(grid, shape)
    if sorted(keys) != sorted(expected):
        size = f"block {grid.get('block')}" if kernel else f"chunk {grid.get('chunk')}"
        raise ValueError(f"{what}: its manifest lists {len(keys)} {units}; expected the {len(expected)} {units} of its grid "
                         f"({size}), each once (the manifest was edited)")
    markers = [read_marker(files.markers / k, file_id, shape, grid) for k in keys]
    missing = [k for k, m in zip(keys, markers) if m is None]
    if missing:
        one = units[:-1]
        raise ValueError(f"{what}: {len(missing)} of {len(keys)} {units} have no valid marker in {files.markers.name}/ "
                         f"({missing[:5]}); expected one per {one}, describing that {one} (the markers were removed, edited "
                         "or copied over one another)")
    covered = entries_covered(m for m in markers if m is not None)
    if covered != math.prod(shape):
        raise ValueError(f"{what}: the {units} cover {covered:,} of the {noun}'s {math.prod(shape):,} entries; expected every "
                         "entry exactly once (the markers were edited)")
    if data:
        values = open_values(files.out, header)
        try:
            bad = [k for k, m in zip(keys, markers) if m is not None and not marker_matches(values, m)]
        finally:
            del values
        if bad:
            writer = "kernel_matrix" if kernel else "ntkfunc"
            raise ValueError(f"{what}: the entries of {len(bad)} {units} ({bad[:5]}) do not match the checksums written with "
                             f"them; expected the file as {writer} wrote it (it was modified or damaged)")
    return KernelFileReport(files.out, shape, dtype.name, len(keys), data, files.content.name)


def load_kernel(path: str | os.PathLike[str], *, verify: bool = True) -> torch.Tensor:
    """The kernel in ``path`` as a tensor over a read-only, copy-on-write memory map, after checking it.

    Refuses (ValueError) a file that is incomplete (its run was interrupted: resume it),
    damaged, or not the one its manifest describes; ``verify=False`` skips reading every
    entry for its checksum (the manifest, header, size and tile markers are still checked).

    Example:
      >>> import os, tempfile, torch, ntkfunc
      >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
      >>> f, params = ntkfunc.from_module(model)
      >>> out = os.path.join(tempfile.mkdtemp(), "K.npy")
      >>> k = ntkfunc.kernel_matrix(f, params, torch.randn(7, 4), out=out, progress=False)
      >>> torch.equal(ntkfunc.load_kernel(out), k)
      True
    """
    report = check_file(path, data=verify, api="load_kernel", features=False)
    return torch.from_numpy(np.load(report.path, mmap_mode="c"))
