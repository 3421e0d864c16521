"""Type aliases and protocols shared by ntkfunc's modules."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, Union

import torch

PyTree = Any
"""A tensor, or nested dicts / lists / tuples of tensors."""

Axes = Union[int, tuple[int, ...], list[int]]
"""Output axes, counted on the whole output of ``f`` (batch axis included)."""

VMapAxes = Union[None, int, tuple[Any, Any, Any], Any]
"""``None``, an int, a pytree of ints matching ``x``, or ``(x_axis, fx_axis, {})``."""

ApplyFn = Callable[[PyTree, PyTree], PyTree]
"""``f(params, x) -> outputs``: a pure function of parameters and inputs."""

MemoryBudget = Union[None, int, float, str]
"""Bytes as a number, or a string such as ``"2GB"`` / ``"512MiB"``; None = automatic."""


class KernelFn(Protocol):
    """``kernel(x1, x2, params) -> Tensor`` (or a pytree of tensors for pytree outputs)."""

    def __call__(self, x1: PyTree, x2: PyTree | None, params: PyTree) -> PyTree: ...


Tensor = torch.Tensor
