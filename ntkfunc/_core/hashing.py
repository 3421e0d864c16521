"""Digests of tensors (shapes, dtypes and every byte) and of plain values, shared by fingerprints and module identities."""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
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


_PLAIN = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device, enum.Enum)
_MAX_ITEMS = 10_000  # container items described one by one; a larger container by its type and length


def value_text(value: Any, depth: int = 0) -> str:
    """A text that changes when ``value`` does, as far as it can change what a function computes.

    Scalars, strings, dtypes and devices by ``repr``; tensors and arrays by a digest of every byte
    (a tensor computed from parameters at each call, such as weight_norm's ``weight``, by shape and dtype);
    lists, tuples, sets and dicts item by item (up to 10,000 items, 4 levels deep); functions and
    classes by qualified name; other objects by their type only.

    >>> value_text([1.0, "a"]), value_text(torch.ones(2)) == value_text(torch.ones(2)) != value_text(torch.zeros(2))
    ("list[1.0, 'a']", True)
    """
    if isinstance(value, _PLAIN):
        return repr(value)
    if isinstance(value, torch.Tensor):
        if torch._C._functorch.is_functorch_wrapped_tensor(value) or value.grad_fn is not None:
            return f"derived tensor:{tuple(value.shape)}:{value.dtype}"  # computed from parameters at each call (weight_norm)
        if value.layout != torch.strided or value.device.type == "meta":
            return f"tensor:{tuple(value.shape)}:{value.dtype}:{value.layout}:{value.device.type}"  # no bytes to read as they are
        return f"tensor:{tensor_digest([value], [''])}"
    if isinstance(value, np.ndarray):
        data = np.ascontiguousarray(value)
        digest = hashlib.sha256(f"{data.shape}:{data.dtype};".encode() + (data.tobytes() if data.dtype != object else repr(data).encode()))
        return f"array:{digest.hexdigest()}"
    if isinstance(value, (list, tuple, set, frozenset, dict)) and depth < 4 and len(value) <= _MAX_ITEMS:
        if isinstance(value, dict):
            items = sorted(f"{value_text(k, depth + 1)}: {value_text(v, depth + 1)}" for k, v in value.items())
        elif isinstance(value, (set, frozenset)):
            items = sorted(value_text(v, depth + 1) for v in value)
        else:
            items = [value_text(v, depth + 1) for v in value]
        return f"{type(value).__name__}[{', '.join(items)}]"
    if isinstance(value, (list, tuple, set, frozenset, dict)):
        return f"{type(value).__name__} of {len(value)}"
    if isinstance(value, type) or callable(value) and hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', '')}.{value.__qualname__}"
    return type(value).__qualname__


def module_attributes(module: torch.nn.Module) -> str:
    """sha256 of the plain attributes of ``module`` and its submodules (:func:`value_text`).

    Hyper-parameters kept as attributes (``self.clip = 3.0``: in no ``repr`` or ``state_dict``)
    and tensors kept outside parameters and buffers change what ``f`` computes; names that
    start with ``_`` (torch's internals) and ``training`` (recorded elsewhere) are left out.

    >>> class Clip(torch.nn.Module):
    ...     def __init__(self, c):
    ...         super().__init__(); self.c = c
    >>> module_attributes(Clip(3.0)) == module_attributes(Clip(3.0)) != module_attributes(Clip(1.0))
    True
    """
    parts = []
    for name, m in module.named_modules(remove_duplicate=False):
        attributes = {k: value_text(v) for k, v in vars(m).items() if not k.startswith("_") and k != "training"}
        parts.append([name, type(m).__qualname__, sorted(attributes.items())])
    return hashlib.sha256(repr(parts).encode()).hexdigest()
