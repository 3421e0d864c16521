"""The ``.npy`` file a kernel (or features file) is written into: created with its blocks reserved, checked before reuse.

- :func:`create` writes the header and reserves the data's disk blocks (``posix_fallocate``),
  so that a full disk is an ``OSError`` naming the size needed when the run starts, not a
  ``SIGBUS`` when a memory-mapped tile is first written.
- :func:`check` compares a file's header (dtype, order, shape) and size with what its
  manifest recorded, before a resume or a load relies on it.
- :func:`digest` is the checksum of a region of the file as stored (a tile's entries).
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import math
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from ntkfunc._core.memory import fmt_bytes


@dataclasses.dataclass(frozen=True)
class Header:
    """What a ``.npy`` header says: dtype, shape, Fortran order, where the data starts."""

    dtype: np.dtype
    shape: tuple[int, ...]
    fortran: bool
    offset: int

    @property
    def size(self) -> int:
        """The file's size in bytes: header and data."""
        return self.offset + math.prod(self.shape) * self.dtype.itemsize


def create(path: Path, shape: tuple[int, ...], dtype: Any, api: str, arg: str = "out", noun: str = "kernel file") -> Header:
    """A new ``.npy`` of zeros at ``path``, its data blocks reserved on disk.

    A full disk is an OSError starting ``api(arg=...): no room for the <noun> <name>``.

    >>> import tempfile
    >>> p = Path(tempfile.mkdtemp()) / "K.npy.partial"
    >>> h = create(p, (3, 2), np.float32, "kernel_matrix")
    >>> h.shape, os.path.getsize(p) == h.size, float(np.load(p, allow_pickle=False).sum())
    ((3, 2), True, 0.0)
    """
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.dtype(dtype), shape=shape)
    del mm  # a sparse file so far
    header = read_header(path)
    if not hasattr(os, "posix_fallocate"):  # pragma: no cover - macOS, Windows: the file stays sparse
        return header
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, header.size)
        os.fsync(fd)
    except OSError as err:
        os.close(fd)
        path.unlink(missing_ok=True)
        if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            free = shutil.disk_usage(path.parent).free
            raise OSError(
                err.errno,
                f"{api}({arg}=...): no room for the {noun} {path.name}: it needs {fmt_bytes(header.size)} "
                f"({header.size:,} bytes) and {path.parent} has {fmt_bytes(free)} free ({os.strerror(err.errno)}); "
                f"expected enough free space (free some, or choose {'an out' if arg == 'out' else f'a {arg}= folder'} "
                "on another filesystem)",
            ) from err
        if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # cannot reserve here: stay sparse
            raise
    else:
        os.close(fd)
    return header


def read_header(path: Path) -> Header:
    """The header of the ``.npy`` at ``path``; a ValueError if it is not one."""
    with open(path, "rb") as fh:
        try:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
        except (ValueError, OSError, SyntaxError) as err:
            raise ValueError(f"{path.name} is not a .npy file ({err})") from err
        return Header(np.dtype(dtype), tuple(shape), bool(fortran), fh.tell())


def check(path: Path, shape: tuple[int, ...], dtype: Any, what: str) -> Header:
    """The header of ``path`` after checking that it holds ``dtype[shape]`` and is complete in size.

    ``what`` starts every message (the call and its output). Raises ValueError.
    """
    try:
        header = read_header(path)
    except FileNotFoundError as err:
        raise ValueError(f"{what}: its data file {path.name} is missing") from err
    except ValueError as err:
        raise ValueError(f"{what}: {err}; expected the .npy file its manifest describes") from err
    expected = np.dtype(dtype)
    if header.dtype != expected or header.shape != tuple(shape) or header.fortran:
        order = ", Fortran order" if header.fortran else ""
        raise ValueError(
            f"{what}: {path.name} holds {header.dtype.name}{list(header.shape)}{order}; expected "
            f"{expected.name}{list(shape)} as recorded in its manifest (the file was replaced)"
        )
    size = path.stat().st_size
    if size != header.size:
        raise ValueError(
            f"{what}: {path.name} is {size:,} bytes; expected {header.size:,} for {expected.name}{list(shape)} "
            f"(the file was {'truncated' if size < header.size else 'extended'})"
        )
    return header


def digest(values: np.ndarray) -> str:
    """Checksum of an array's entries as stored (dtype and C-order bytes).

    >>> digest(np.zeros((2, 2), np.float32)) == digest(np.zeros((2, 2), np.float32)), digest(np.ones(1)) == digest(np.zeros(1))
    (True, False)
    """
    h = hashlib.blake2b(digest_size=16)
    h.update(np.ascontiguousarray(values).view(np.uint8).reshape(-1).data)
    return h.hexdigest()
