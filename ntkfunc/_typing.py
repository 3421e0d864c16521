"""Type aliases and protocols shared by ntkfunc's modules."""

from __future__ import annotations

import enum
from typing import Any, Callable, Optional, Protocol, Union

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


class Implementation(enum.IntEnum):
    """How the empirical NTK is computed (values match ``neural_tangents.NtkImplementation``).

    - ``JACOBIAN_CONTRACTION`` (1): per-sample Jacobians by reverse mode, contracted
      parameter by parameter. Cost ``N O [FP] + N1 N2 O^2 P``. Best when O·P is small
      relative to a forward pass (narrow MLPs, O = 1, traced kernels).
    - ``NTK_VECTOR_PRODUCTS`` (2): VJPs at ``x2`` for every output cotangent, pushed
      through JVPs at ``x1``. Cost ``N1 N2 O [FP]``; never contracts over P, so it wins
      when parameters are many and shared across positions (convolutions) and N is small.
    - ``STRUCTURED_DERIVATIVES`` (3): per-primitive rules (``ntkfunc.rules``) that
      contract cotangents with layer inputs without forming Jacobians.
    - ``AUTO`` (0, also ``"auto"``): per parameter, the cheaper of the structured rule and
      Jacobian contraction, by opt_einsum's FLOP estimates (``ntkfunc._auto``).
    """

    AUTO = 0
    JACOBIAN_CONTRACTION = 1
    NTK_VECTOR_PRODUCTS = 2
    STRUCTURED_DERIVATIVES = 3


class KernelFn(Protocol):
    """``kernel(x1, x2, params) -> Tensor`` (or a pytree of tensors for pytree outputs)."""

    def __call__(self, x1: PyTree, x2: Optional[PyTree], params: PyTree) -> PyTree: ...


Tensor = torch.Tensor
