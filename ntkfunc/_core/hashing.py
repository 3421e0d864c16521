"""Digests of tensors (shapes, dtypes and every byte), shared by fingerprints and module identities."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The bytes of ``t``'s entries in C order (on the CPU).

    >>> len(tensor_bytes(torch.zeros(2, 3)))
    24
    """
    t = t.detach().cpu().contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def tensor_digest(tensors: Sequence[torch.Tensor], names: Sequence[str]) -> str:
    """sha256 of named tensors (names, shapes, dtypes and every byte).

    >>> tensor_digest([torch.ones(2)], ["w"]) == tensor_digest([torch.ones(2)], ["w"]) != tensor_digest([torch.zeros(2)], ["w"])
    True
    """
    h = hashlib.sha256()
    for name, t in zip(names, tensors):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(tensor_bytes(t))
    return h.hexdigest()
