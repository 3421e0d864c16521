"""Sample sources for whole-dataset kernels: only the samples of a tile are ever loaded.

A :class:`Samples` wraps a tensor, a numpy array (``np.memmap`` / ``np.load(..., mmap_mode="r")``
included: slicing reads just those rows), or a ``torch.utils.data.Dataset`` /
``DataLoader`` (the loader's ``dataset`` is indexed directly; of each item the input
is taken: ``item[0]`` when the item is a tuple or list, else the item).
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ntkfunc._core.checks import FINGERPRINT_ATTR
from ntkfunc._core.hashing import tensor_bytes

_HASH_CHUNK = 1 << 24  # bytes hashed at a time
_DATASET_HASH_BYTES = 1 << 28  # a Dataset up to this size is hashed item by item, whole
_DATASET_PROBES = 64  # at least this many spread items of a larger one


class Samples:
    """Random access to samples ``[start, stop)`` as a tensor with the batch axis first.

    >>> s = Samples(np.arange(12, dtype=np.float32).reshape(6, 2), "x1")
    >>> len(s), s.get(1, 3).tolist()
    (6, [[2.0, 3.0], [4.0, 5.0]])
    """

    def __init__(self, data: Any, name: str) -> None:
        self.name = name
        if isinstance(data, DataLoader):
            data = data.dataset
        if isinstance(data, torch.Tensor):
            kind, data = "tensor", data.detach()  # inputs that require grad: the whole-dataset kernel is not differentiable
        elif isinstance(data, np.ndarray):
            kind = "array"
        elif isinstance(data, Dataset) or (hasattr(data, "__getitem__") and hasattr(data, "__len__") and not isinstance(data, (list, tuple, dict, str))):
            kind = "dataset"
        else:
            raise TypeError(
                f"kernel_matrix: {name} is a {type(data).__name__}; expected a torch.Tensor, a numpy array "
                "(memory-mapped ones too), or a torch.utils.data.Dataset / DataLoader"
            )
        if kind in ("tensor", "array") and data.ndim == 0:
            raise ValueError(f"kernel_matrix: {name} is a 0-d {kind}; expected samples along axis 0")
        self.data, self.kind = data, kind
        self.n = len(data)
        if self.n == 0:
            raise ValueError(f"kernel_matrix: {name} has no samples; expected at least one")

    def __len__(self) -> int:
        return self.n

    def get(self, start: int, stop: int) -> torch.Tensor:
        if self.kind == "tensor":
            return self.data[start:stop]
        if self.kind == "array":
            return torch.from_numpy(np.array(self.data[start:stop], copy=True))
        items = [_input_of(self.data[i], self.name, i) for i in range(start, stop)]
        return torch.stack(items)

    def fingerprint(self) -> str:
        """sha256 of the samples, as a resume compares them.

        Tensors and arrays: every byte. A Dataset with a ``__ntkfunc_fingerprint__()`` method: its
        length and what that returns (``ntkfunc compute``'s file and folder datasets hash their
        files byte by byte). Any other Dataset: every item when they total at most 256 MiB (judged
        by the first item), else that budget's worth of evenly spread items (at least 64).
        """
        h = hashlib.sha256()
        if self.kind in ("tensor", "array"):
            first = self.get(0, 1)
            h.update(f"{self.kind}:{tuple(self.data.shape)}:{first.dtype}".encode())
            rows = max(1, _HASH_CHUNK // max(1, first.numel() * first.element_size()))
            for i in range(0, self.n, rows):
                h.update(tensor_bytes(self.get(i, min(i + rows, self.n))))
            return h.hexdigest()
        h.update(f"dataset:{type(self.data).__name__}:{self.n}".encode())
        own = getattr(self.data, FINGERPRINT_ATTR, None)
        if callable(own):
            h.update(str(own()).encode())
            return h.hexdigest()
        for i in self.hashed_items():
            h.update(tensor_bytes(_input_of(self.data[i], self.name, i).unsqueeze(0)))
        return h.hexdigest()

    def hashed_items(self) -> list[int]:
        """The Dataset items :meth:`fingerprint` hashes: all of them, or evenly spread ones within the budget."""
        first = _input_of(self.data[0], self.name, 0)
        count = max(_DATASET_PROBES, _DATASET_HASH_BYTES // max(1, first.numel() * first.element_size()))
        if count >= self.n:
            return list(range(self.n))
        return sorted({round(k * (self.n - 1) / (count - 1)) for k in range(count)})


def _input_of(item: Any, name: str, i: int) -> torch.Tensor:
    x = item[0] if isinstance(item, (tuple, list)) else item
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"kernel_matrix: {name}[{i}] gives a {type(x).__name__} as input; expected a tensor or numpy "
            "array (or a tuple/list whose first element is one)"
        )
    return x
