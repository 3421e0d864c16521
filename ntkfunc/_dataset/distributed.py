"""Where a whole-dataset kernel runs: the devices of this process and the ranks of a ``torchrun`` job.

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) the default process group
is created on first use, NCCL when CUDA is available and gloo otherwise, and kept for
the rest of the process (destroyed at exit): destroying it after every call and creating
it again on the next one made the ranks race through a second gloo rendezvous, where one
rank could wait forever for peers that had already connected (seen as a hang of a job
that calls ``kernel_matrix`` twice). Rank ``r`` of ``W`` takes the tile rows
``r, r + W, r + 2W, ...``; all ranks write to the same output on a shared filesystem.
Outside ``torchrun`` everything is a single rank.
"""

from __future__ import annotations

import atexit
import dataclasses
import datetime
import gc
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, Union

import torch
import torch.distributed as dist

from ntkfunc._core.pytree import tree_leaves, tree_map
from ntkfunc._core.types import PyTree

Devices = Union[None, str, torch.device, Sequence[str | torch.device]]
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Ranks:
    rank: int
    world: int

    def mine(self, index: int) -> bool:
        """Whether item ``index`` (a tile row) belongs to this rank: ranks take every W-th."""
        return index % self.world == self.rank

    def broadcast_int(self, value: int) -> int:
        """Rank 0's ``value`` on every rank."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return int(box[0])

    def broadcast_object(self, value: T) -> T:
        """Rank 0's ``value`` (any picklable object) on every rank."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_objects(self, value: T) -> list[T]:
        """Every rank's ``value``, in rank order, on every rank."""
        if self.world == 1:
            return [value]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def rank0_first(self, first: Callable[[], T], then: Callable[[], T], failed: str) -> T:
        """``first()`` on rank 0; the other ranks wait for it, then call ``then()``.

        If rank 0 fails, the others raise ``RuntimeError(failed)`` instead of waiting forever
        (rank 0 raises its own error). How every file is opened: rank 0 creates or reopens it
        under its lock, the others reopen what it made.
        """
        result = None
        if self.rank == 0:
            try:
                result = first()
            except BaseException:
                self.broadcast_int(0)  # let the other ranks stop instead of waiting
                raise
        if not self.broadcast_int(1):
            raise RuntimeError(failed)
        return then() if result is None else result

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (tiles are disjoint, so this assembles an in-memory kernel)."""
        if self.world == 1:
            return t
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def local_device(self) -> torch.device:
        """``cuda:LOCAL_RANK`` when CUDA is available, else the CPU."""
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        return torch.device("cpu")


def ranks() -> Ranks:
    """This process's rank and the world size; joins torchrun's group on first use (left at exit)."""
    if not dist.is_available():
        return Ranks(0, 1)
    if dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or "RANK" not in os.environ or "MASTER_ADDR" not in os.environ:
        return Ranks(0, 1)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    # A bounded wait: a rank that cannot reach the others fails with an error instead of hanging.
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=10))
    atexit.register(_leave)
    return Ranks(dist.get_rank(), dist.get_world_size())


def _leave() -> None:
    """At exit: leave the group and collect it at once, while Python is still alive.

    A gloo worker thread can still be releasing the tensors of the last collective (which takes
    the GIL) when the main thread reaches the end of the script. Left to Python's final garbage
    collection, that thread asks for the GIL during interpreter finalisation and the process
    aborts ("terminate called without an active exception", SIGABRT) after its work is done: 2
    of 30 two-rank runs of ``tests/blocked_job.py``. Collected here, the group's threads finish first.
    """
    if dist.is_initialized():
        dist.destroy_process_group()
        gc.collect()


def resolve_devices(devices: Devices, params: PyTree, rk: Ranks, api: str = "kernel_matrix") -> list[torch.device]:
    """The devices tiles run on: params' device (``cuda:LOCAL_RANK`` under torchrun), every GPU, or a list."""
    leaves = [t for t in tree_leaves(params) if isinstance(t, torch.Tensor)]
    home = leaves[0].device if leaves else torch.device("cpu")
    if devices is None:
        return [rk.local_device() if rk.world > 1 and home.type == "cuda" else home]
    if devices == "all":
        n = torch.cuda.device_count()
        return [torch.device("cuda", i) for i in range(n)] if n else [home]
    items = [devices] if isinstance(devices, (str, torch.device)) else list(devices)
    try:
        result = [torch.device(d) for d in items]
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"{api}(devices={devices!r}): {err}; expected None, 'all' or a list of devices like ['cuda:0', 'cuda:1']") from err
    if not result:
        raise ValueError(f"{api}(devices={devices!r}): expected at least one device")
    return result


def to_device(params: PyTree, dev: torch.device) -> PyTree:
    """``params`` with every tensor moved to ``dev``."""
    return tree_map(lambda t: t.to(dev) if isinstance(t, torch.Tensor) else t, params)
