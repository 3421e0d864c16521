"""The ``.npy`` file a kernel (or features file) is written into: created with its blocks reserved, checked before reuse.

- :func:`create` writes the header and reserves the data's disk blocks (``posix_fallocate``),
  so that a full disk is an ``OSError`` naming the size needed when the run starts. Where the
  filesystem cannot reserve blocks (or the system has no ``posix_fallocate``) it compares the
  size with the free space instead, and refuses the same way when it does not fit.
- :func:`write` writes a unit's region with ``pwrite``: should the disk still fill up (a
  filesystem that could not reserve the blocks), that is an ``OSError`` naming the file, never
  the ``SIGBUS`` a write through a memory map gets.
- :func:`check` compares a file's header (dtype, order, shape) and size with what its
  manifest recorded, before a resume or a load relies on it.
- :func:`digest` is the checksum of a region of the file as stored (a tile's entries).
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import io
import itertools
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
    dtype = np.dtype(dtype)
    described = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)}
    text = io.BytesIO()
    try:
        np.lib.format.write_array_header_1_0(text, described)
    except ValueError:  # pragma: no cover - a header over 64 KiB (a shape of thousands of axes)
        text = io.BytesIO()
        np.lib.format.write_array_header_2_0(text, described)
    raw = text.getvalue()  # magic, version, header: what np.save writes before the entries
    header = Header(dtype, tuple(shape), False, len(raw))
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        os.write(fd, raw)
        os.ftruncate(fd, header.size)  # a sparse file so far: may be refused beyond a file size limit
        try:
            if not hasattr(os, "posix_fallocate"):  # pragma: no cover - macOS, Windows
                raise OSError(errno.EOPNOTSUPP, "posix_fallocate does not exist here")
            os.posix_fallocate(fd, 0, header.size)
            os.fsync(fd)
        except OSError as err:
            if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            # this filesystem cannot reserve blocks: the file stays sparse, so compare its size with the free space
            free = shutil.disk_usage(path.parent).free
            if header.size - os.fstat(fd).st_blocks * 512 > free:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) from err
    except OSError as err:
        os.close(fd)
        path.unlink(missing_ok=True)
        if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise OSError(err.errno, _no_room(path, header.size, api, arg, noun, err.errno)) from err
        raise
    os.close(fd)
    return header


def _no_room(path: Path, size: int, api: str, arg: str, noun: str, code: int) -> str:
    """The message of a file that does not fit: the size it needs, and the free space (or the size limit) it met."""
    elsewhere = "an out" if arg == "out" else f"a {arg}= folder"
    if code == errno.EFBIG:  # a limit on one file's size: the filesystem's, or the process's (ulimit -f)
        return (f"{api}({arg}=...): no room for the {noun} {path.name}: it needs {fmt_bytes(size)} ({size:,} bytes), more "
                f"than one file may hold there ({os.strerror(code)}: the filesystem's or this process's file size limit, "
                f"ulimit -f); expected a file size limit above that (or choose {elsewhere} on another filesystem)")
    free = shutil.disk_usage(path.parent).free
    return (f"{api}({arg}=...): no room for the {noun} {path.name}: it needs {fmt_bytes(size)} ({size:,} bytes) and "
            f"{path.parent} has {fmt_bytes(free)} free ({os.strerror(code)}); expected enough free space (free some, or "
            f"choose {elsewhere} on another filesystem)")


def write(fd: int, header: Header, index: tuple[slice, ...], values: np.ndarray, what: str) -> None:
    """Write ``values`` (the region's shape, the file's dtype) into the region ``index`` of the ``.npy`` open as ``fd``.

    One ``pwrite`` per contiguous run of the region (a row of a tile): a disk without room is an
    ``OSError`` starting ``what``, never a ``SIGBUS``. ``index``: unit-step slices, one per axis.

    >>> import tempfile
    >>> p = Path(tempfile.mkdtemp()) / "K.npy"
    >>> h = create(p, (3, 4), np.float32, "kernel_matrix")
    >>> fd = os.open(p, os.O_RDWR); write(fd, h, (slice(1, 3), slice(2, 4)), np.ones((2, 2), np.float32), "x"); os.close(fd)
    >>> np.load(p).sum(axis=0).tolist()
    [0.0, 0.0, 2.0, 2.0]
    """
    shape = header.shape
    bounds = [s.indices(n)[:2] for s, n in zip(index, shape)]
    partial = [d for d, (a, b) in enumerate(bounds) if (a, b) != (0, shape[d])]
    k = partial[-1] if partial else 0  # the axes after k are whole: each run is contiguous in the file
    strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]
    run = (bounds[k][1] - bounds[k][0]) * strides[k]
    if run == 0 or values.size == 0:
        return
    rows = np.ascontiguousarray(values, dtype=header.dtype).reshape(-1, run)
    item = header.dtype.itemsize
    for n, outer in enumerate(itertools.product(*(range(a, b) for a, b in bounds[:k]))):
        start = sum(i * strides[d] for d, i in enumerate(outer)) + bounds[k][0] * strides[k]
        view, offset = memoryview(rows[n]).cast("B"), header.offset + start * item
        try:
            while view.nbytes:
                written = os.pwrite(fd, view, offset)
                view, offset = view[written:], offset + written
        except OSError as err:
            raise OSError(err.errno, f"{what}: writing into the file failed ({os.strerror(err.errno) if err.errno else err}); "
                                     "its committed units are kept: free some space and run again to resume") from err


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
