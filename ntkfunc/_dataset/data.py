"""Sample sources for whole-dataset kernels: only the samples of a tile are ever loaded.

A :class:`Samples` wraps the inputs ``ntk_fn`` takes, at dataset scale:

- a tensor or a numpy array (``np.memmap`` / ``np.load(..., mmap_mode="r")`` included: slicing
  reads just those rows), or any pytree of them (a dict of keyword inputs with an attention mask,
  a tuple for a multi-input model, nested), whose leaves share the batch axis given per leaf by
  ``vmap_axes`` exactly as ``ntk_fn`` reads it (:func:`ntkfunc._core.checks.split_vmap_axes`,
  :func:`ntkfunc._core.pytree.broadcast_prefix`); a leaf mapped to ``None`` is not batched and is
  passed whole with every block of samples;
- a ``torch.utils.data.Dataset`` / ``DataLoader`` (the loader's ``dataset`` is indexed directly; of
  each item the input is taken: ``item[0]`` when the item is a tuple or list, else the item). An
  item's input is one sample (no batch axis): a tensor, array or a pytree of them; a block of
  items is stacked leaf by leaf along the leaf's batch axis.

``get(start, stop)`` gives samples ``[start, stop)`` as the input pytree (batch axes kept),
``leaves(start, stop, device)`` the same as its flat list of tensors (what the row sources take).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils import _pytree as pytree
from torch.utils.data import DataLoader, Dataset

from ntkfunc._core.checks import FINGERPRINT_ATTR, split_vmap_axes
from ntkfunc._core.hashing import tensor_bytes
from ntkfunc._core.pytree import broadcast_prefix, tree_flatten, tree_unflatten
from ntkfunc._core.types import PyTree, VMapAxes

_HASH_CHUNK = 1 << 24  # bytes hashed at a time
_DATASET_HASH_BYTES = 1 << 28  # a Dataset up to this size is hashed item by item, whole
_DATASET_PROBES = 64  # at least this many spread items of a larger one
API = "kernel_matrix"


def _is_dataset(data: Any) -> bool:
    return isinstance(data, Dataset) or (
        hasattr(data, "__getitem__") and hasattr(data, "__len__")
        and not isinstance(data, (list, tuple, dict, str, torch.Tensor, np.ndarray))
    )


def _paths(spec: Any, name: str) -> list[str]:
    """``name`` followed by each leaf's pytree path (``x1['mask']``, ``x1[0]``) in flatten order."""
    dummy = tree_unflatten([0] * spec.num_leaves, spec)
    return [name + pytree.keystr(path) for path, _ in pytree.tree_flatten_with_path(dummy)[0]]


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(x.shape)


class Samples:
    """Random access to samples ``[start, stop)`` of an input pytree, each leaf sliced along its batch axis.

    Attributes:
      spec / axes / paths: the input's pytree structure, each leaf's batch axis (None: not batched, the
        same for every sample) and printed path (``x1['mask']``).
      kind: ``"tensor"`` (a tensor or a pytree of tensors and arrays), ``"array"`` (one numpy array) or
        ``"dataset"``.

    >>> s = Samples(np.arange(12, dtype=np.float32).reshape(6, 2), "x1")
    >>> len(s), s.get(1, 3).tolist()
    (6, [[2.0, 3.0], [4.0, 5.0]])
    >>> d = Samples({"x": torch.zeros(5, 3), "mask": torch.ones(2, 5)}, "x1", {"x": 0, "mask": 1})
    >>> {k: tuple(v.shape) for k, v in d.get(1, 4).items()}, d.paths
    ({'x': (3, 3), 'mask': (2, 3)}, ["x1['x']", "x1['mask']"])
    """

    def __init__(self, data: Any, name: str, vmap_axes: VMapAxes = 0, api: str = API) -> None:
        self.name, self.api = name, api
        if isinstance(data, DataLoader):
            data = data.dataset
        x_axis, _ = split_vmap_axes(vmap_axes, api)
        if x_axis is None:
            raise ValueError(
                f"{self.api}(vmap_axes=None): {self.api} cuts the data into blocks of samples, and with vmap_axes=None the "
                "samples of a batch interact, so no block can be computed without the whole batch; expected the batch axis "
                "of the inputs (an int, a pytree of them matching x, or (x_axes, fx_axes, {})). For the kernel of one "
                "batch whose samples interact use ntk_fn(f, vmap_axes=None) (it plans its memory under memory_budget)"
            )
        if _is_dataset(data):
            self.kind, self.data = "dataset", data
            self.n = len(data)
            if self.n == 0:
                raise ValueError(f"{self.api}: {name} has no samples; expected at least one")
            first = _input_of(data[0], name, 0, api)
            leaves, self.spec = tree_flatten(first)
            self.paths = _paths(self.spec, f"{name}[0]")
            self._check_leaves(leaves, of_item=True)
            self.axes = self._resolve(x_axis, first, [t.ndim + 1 for t in leaves])
            if any(a is None for a in self.axes):
                bad = [p for p, a in zip(self.paths, self.axes) if a is None]
                raise ValueError(
                    f"{self.api}(vmap_axes={vmap_axes!r}): {', '.join(bad)} of a Dataset's item is mapped to None (not batched); "
                    "expected every leaf of a Dataset's items to be batched (each item is one sample); pass a leaf shared "
                    "by all samples inside f instead"
                )
            self.leaf_data: list[Any] = []
            return
        detached = pytree.tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, data)  # not differentiable
        leaves, self.spec = tree_flatten(detached)
        self.paths = _paths(self.spec, name)
        if not leaves:
            raise ValueError(f"{self.api}: {name} is an empty {type(data).__name__}; expected a tensor, a numpy array, a pytree of "
                             "them (dict, tuple, list) or a torch.utils.data.Dataset / DataLoader")
        self._check_leaves(leaves, of_item=False)
        self.kind = "array" if isinstance(data, np.ndarray) else "tensor"
        self.data, self.leaf_data = detached, leaves
        self.axes = self._resolve(x_axis, detached, [x.ndim for x in leaves])
        sizes = {p: _shape(x)[a] for p, x, a in zip(self.paths, leaves, self.axes) if a is not None}
        if not sizes:
            raise ValueError(f"{self.api}(vmap_axes={vmap_axes!r}): maps no leaf of {name}; expected at least one batched input leaf")
        if len(set(sizes.values())) > 1:
            detail = ", ".join(f"{p} has {n}" for p, n in sizes.items())
            raise ValueError(
                f"{self.api}: the leaves of {name} hold different numbers of samples along their batch axes ({detail}; "
                f"vmap_axes={vmap_axes!r}); expected every batched leaf to hold the same samples"
            )
        self.n = next(iter(sizes.values()))
        if self.n == 0:
            raise ValueError(f"{self.api}: {name} has no samples; expected at least one")

    def _check_leaves(self, leaves: list[Any], *, of_item: bool) -> None:
        for p, x in zip(self.paths, leaves):
            if not isinstance(x, (torch.Tensor, np.ndarray)):
                what = "the input of a Dataset's item" if of_item else self.name
                raise TypeError(
                    f"{self.api}: {p} is {_a(type(x).__name__)}; expected {what} to be a torch.Tensor, a numpy array (memory-mapped "
                    "ones too) or a pytree (dict, tuple, list) of them, or x a torch.utils.data.Dataset / DataLoader"
                )
            if x.ndim == 0 and not of_item:
                raise ValueError(f"{self.api}: {p} is a 0-d {type(x).__name__}; expected samples along its batch axis")

    def _resolve(self, x_axis: Any, tree: PyTree, ndims: Sequence[int]) -> list[int | None]:
        """Each leaf's batch axis, non-negative, as ``ntk_fn`` reads ``vmap_axes`` (checked against the leaf)."""
        axes = broadcast_prefix(x_axis, tree, api=API)
        out: list[int | None] = []
        for p, a, nd in zip(self.paths, axes, ndims):
            if a is not None and not -nd <= a < nd:
                raise ValueError(
                    f"{self.api}(vmap_axes): axis {a} does not exist in {p}, which has {nd} axes with its batch axis; expected "
                    "the batch axis of every input leaf"
                )
            out.append(None if a is None else a % nd)
        return out

    def __len__(self) -> int:
        return self.n

    @property
    def single(self) -> bool:
        """One leaf batched along axis 0 (a plain tensor, array or Dataset of them): the fingerprint of earlier versions."""
        return self.spec.num_leaves == 1 and self.spec.is_leaf() and self.axes == [0]

    def get(self, start: int, stop: int) -> PyTree:
        """Samples ``[start, stop)``, the input's pytree with every batched leaf sliced along its batch axis."""
        return tree_unflatten(self._leaves(start, stop), self.spec)

    def leaves(self, start: int, stop: int, device: torch.device | None = None, *, pin: bool = False) -> list[torch.Tensor]:
        """Samples ``[start, stop)`` as the flat leaves (tensors) on ``device``; ``pin``: through pinned memory, asynchronously."""
        out = []
        for x in self._leaves(start, stop):
            if device is not None and device.type == "cuda" and x.device.type == "cpu" and pin:
                x = x.pin_memory().to(device, non_blocking=True)
            elif device is not None:
                x = x.to(device)
            out.append(x)
        return out

    def take(self, indices: Sequence[int]) -> PyTree:
        """The samples ``indices`` together (each batched leaf concatenated along its batch axis)."""
        parts = [self._leaves(i, i + 1) for i in indices]
        joined = [parts[0][k] if a is None else torch.cat([p[k] for p in parts], dim=a) for k, a in enumerate(self.axes)]
        return tree_unflatten(joined, self.spec)

    def _leaves(self, start: int, stop: int) -> list[torch.Tensor]:
        if self.kind == "dataset":
            items = [tree_flatten(_input_of(self.data[i], self.name, i, self.api))[0] for i in range(start, stop)]
            for i, leaves in zip(range(start, stop), items):
                if len(leaves) != len(self.axes):
                    raise ValueError(f"{self.api}: {self.name}[{i}] has {len(leaves)} input leaves; expected {len(self.axes)} as "
                                     f"{self.name}[0] has ({self.spec})")
            return [torch.stack([_tensor(it[k]) for it in items], dim=a or 0) for k, a in enumerate(self.axes)]  # all batched
        out = []
        for x, a in zip(self.leaf_data, self.axes):
            if a is not None:
                x = x[(slice(None),) * a + (slice(start, stop),)]
            out.append(torch.from_numpy(np.array(x, copy=True)) if isinstance(x, np.ndarray) else x)
        return out

    def fingerprint(self) -> str:
        """sha256 of the samples, as a resume compares them.

        Tensors and arrays: every byte of every leaf, with the pytree's structure and each leaf's batch
        axis (a plain tensor or array along axis 0 hashes as in earlier versions). A Dataset with a
        ``__ntkfunc_fingerprint__()`` method: its length and what that returns (``ntkfunc compute``'s file
        and folder datasets hash their files byte by byte). Any other Dataset: every item when they total
        at most 256 MiB (judged by the first item), else that budget's worth of evenly spread items (at
        least 64).
        """
        h = hashlib.sha256()
        if not self.single:
            h.update(f"tree:{self.spec}:axes:{self.axes}:".encode())
        if self.kind != "dataset":
            for p, x, a in zip(self.paths, self.leaf_data, self.axes):
                if not self.single:  # the leaf's path within the input, not the side's name: x1's data hashes as x2's
                    h.update(f"{p[len(self.name):]}:".encode())
                h.update(f"{'array' if isinstance(x, np.ndarray) else 'tensor'}:{_shape(x)}:{_dtype(x)}".encode())
                if a is None:  # not batched: one piece
                    h.update(tensor_bytes(_tensor(x)))
                    continue
                moved = x if a == 0 else (np.moveaxis(x, a, 0) if isinstance(x, np.ndarray) else x.movedim(a, 0))
                rows = max(1, _HASH_CHUNK // max(1, math.prod(_shape(moved)[1:]) * _dtype(x).itemsize))
                for i in range(0, len(moved), rows):
                    part = moved[i : i + rows]
                    h.update(tensor_bytes(_tensor(part)))
            return h.hexdigest()
        h.update(f"dataset:{type(self.data).__name__}:{self.n}".encode())
        own = getattr(self.data, FINGERPRINT_ATTR, None)
        if callable(own):
            h.update(str(own()).encode())
            return h.hexdigest()
        for i in self.hashed_items():
            for leaf in tree_flatten(_input_of(self.data[i], self.name, i, self.api))[0]:
                h.update(tensor_bytes(_tensor(leaf).unsqueeze(0)))
        return h.hexdigest()

    def hashed_items(self) -> list[int]:
        """The Dataset items :meth:`fingerprint` hashes: all of them, or evenly spread ones within the budget."""
        first = [_tensor(t) for t in tree_flatten(_input_of(self.data[0], self.name, 0, self.api))[0]]
        count = max(_DATASET_PROBES, _DATASET_HASH_BYTES // max(1, sum(t.numel() * t.element_size() for t in first)))
        if count >= self.n:
            return list(range(self.n))
        return sorted({round(k * (self.n - 1) / (count - 1)) for k in range(count)})


def narrow(leaves: Sequence[torch.Tensor], axes: Sequence[int | None], start: int, stop: int) -> list[torch.Tensor]:
    """Samples ``[start, stop)`` of a block's leaves (views), each batched leaf along its axis.

    >>> [tuple(t.shape) for t in narrow([torch.zeros(4, 2), torch.zeros(3, 4), torch.zeros(5)], [0, 1, None], 1, 3)]
    [(2, 2), (3, 2), (5,)]
    """
    return [t if a is None else t.narrow(a, start, stop - start) for t, a in zip(leaves, axes)]


def _a(noun: str) -> str:
    """``"an int"``, ``"a float"``."""
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


def _dtype(x: Any) -> torch.dtype:
    """The torch dtype of a tensor or array (as the array's rows read as tensors have)."""
    return x.dtype if isinstance(x, torch.Tensor) else torch.from_numpy(np.empty(0, dtype=x.dtype)).dtype


def _tensor(x: Any) -> torch.Tensor:
    return torch.from_numpy(np.array(x, copy=True)) if isinstance(x, np.ndarray) else x


def _input_of(item: Any, name: str, i: int, api: str = API) -> PyTree:
    """An item's input (``item[0]`` of a tuple or list), its numpy leaves as tensors; refused unless every leaf is one."""
    x = item[0] if isinstance(item, (tuple, list)) else item
    leaves, spec = tree_flatten(x)
    converted = []
    for path, leaf in zip(_paths(spec, f"{name}[{i}]"), leaves):
        if isinstance(leaf, np.ndarray):
            leaf = torch.from_numpy(leaf)
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(
                f"{api}: {path} gives {_a(type(leaf).__name__)} as input; expected a tensor or numpy array, a pytree of them "
                "(dict, tuple, list), or a tuple/list whose first element is one"
            )
        converted.append(leaf)
    if not converted:
        raise ValueError(f"{api}: {name}[{i}] gives an empty {type(x).__name__} as input; expected at least one tensor")
    return tree_unflatten(converted, spec)
