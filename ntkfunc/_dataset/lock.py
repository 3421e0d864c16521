"""One writer per file: an advisory lock on ``<out>.lock`` that dies with its process.

The process that creates or resumes a file (a kernel output or a features file; rank 0 of a
``torchrun`` job, whose other ranks write under its lock) holds an exclusive ``flock`` on
``<out>.lock`` until it is done with it (a kernel output: until its ``kernel_matrix`` call returns). A second writer, in another process or another thread, is
refused at once with the holder's pid. The operating system drops the lock when the
holder dies, SIGKILL included, so a killed run never blocks its resume. The lock file
stays on disk (deleting it would let two writers lock two different files); it holds the
pid and host of the last writer. Where ``fcntl`` does not exist (Windows) there is no
lock, and the store's other check (its file replaced under it) still applies.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from ntkfunc._dataset.fileformat import KERNEL, Content

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]


class OutputLock:
    """An exclusive lock on ``<out>.lock``; :meth:`release` (or the process's death) frees it.

    >>> import tempfile, os
    >>> out = os.path.join(tempfile.mkdtemp(), "K.npy")
    >>> lock = OutputLock.acquire(out, "kernel_matrix")
    >>> OutputLock.acquire(out, "kernel_matrix")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    RuntimeError: kernel_matrix(out='...K.npy'): another writer (pid ...) holds K.npy.lock; expected one writer per output...
    >>> lock.release()
    >>> OutputLock.acquire(out, "kernel_matrix").release()
    """

    def __init__(self, fd: int | None, path: Path) -> None:
        self.fd, self.path = fd, path

    @staticmethod
    def path_for(out: str | os.PathLike[str]) -> Path:
        return Path(str(out) + ".lock")

    @classmethod
    def acquire(cls, out: str | os.PathLike[str], api: str, content: Content = KERNEL) -> OutputLock:
        """Take the lock of ``out`` (a file holding ``content``) or raise a RuntimeError naming the process that holds it."""
        path = cls.path_for(out)
        if fcntl is None:  # pragma: no cover - not POSIX
            return cls(None, path)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RuntimeError(
                f"{content.what(out, api)}: another writer ({holder}) holds {path.name}; expected one writer per "
                f"{content.noun}: wait until it finishes (then resume), or {content.elsewhere}"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        return cls(fd, path)

    def release(self) -> None:
        """Free the lock (idempotent)."""
        if self.fd is not None and fcntl is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
        self.fd = None

    def __del__(self) -> None:  # a store dropped without close(): still free the lock
        try:
            self.release()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode(errors="replace").strip()
    except OSError:  # pragma: no cover
        text = ""
    return text or "pid unknown"
