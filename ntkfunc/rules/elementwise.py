"""Elementwise family: a parameter added to, subtracted from, multiplied with or divided by a tensor.

Biases, scales and learned positional embeddings: ``y = a + θ``, ``a - θ``, ``θ - a``,
``a * θ``, ``θ / a`` with broadcasting (θ aligned to the trailing axes of ``y``; ``a / θ`` is not
linear in θ and falls back). ``∂y/∂θ`` sums
the cotangent (times ``a`` for a product) over the axes θ is broadcast along, so a
bias costs ``O(positions)`` per pair of samples, whatever its size.

Example:
  >>> import torch
  >>> from ntkfunc.rules import lookup
  >>> x, scale = torch.randn(1, 7, 4), torch.randn(4)
  >>> rule = lookup(torch.mul)
  >>> bound = rule.bind((x, scale), {})
  >>> rule.match(bound, lambda t: t is scale)
  {'other': ...}
  >>> ops, meta = rule.capture(bound, lambda t: t is scale)
  >>> s = rule.structure("other", [x.unsqueeze(0)], meta, (1, 7, 4))
  >>> (s.y, s.theta, [letters for letters, _ in s.operands])
  ('abc', 'c', ['abc'])
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Sequence
from typing import ClassVar

import torch

from ntkfunc.rules.base import LETTERS, Bound, IsParam, Rule, Structure, Tensor, bind, einsum_structure, register


def trailing(ndim: int, y_ndim: int) -> str:
    """Letters of a tensor of ``ndim`` axes broadcast against an output of ``y_ndim`` axes."""
    return LETTERS[y_ndim - ndim : y_ndim]


@dataclasses.dataclass(frozen=True)
class BinaryMeta:
    """``op(input, other[, alpha])``: each operand's shape if it is a tensor, its value if it is a number, and ``alpha``."""

    alpha: float
    input_shape: tuple[int, ...] | None = None
    other_shape: tuple[int, ...] | None = None
    input_scalar: complex | float | None = None
    other_scalar: complex | float | None = None

    def shape(self, role: str) -> tuple[int, ...]:
        shape = self.input_shape if role == "input" else self.other_shape
        assert shape is not None, f"{role} is a number"
        return shape

    def scalar(self, role: str) -> complex | float | None:
        """The operand's value if it is a number (None for a tensor)."""
        return self.input_scalar if role == "input" else self.other_scalar


class _Binary(Rule):
    """``op(input, other[, alpha])`` where exactly one of input / other is a parameter."""

    static_meta = True
    names: ClassVar[tuple[str, ...]] = ("input", "other")

    def bind(self, args: tuple, kwargs: dict) -> Bound | None:
        a = bind(args, kwargs, self.names, self.defaults)
        if a is None or "input" not in a or "other" not in a or a.get("out") is not None:
            return None
        return a

    def match(self, a: Bound, is_param: IsParam) -> dict[str, Tensor] | None:
        x, o = a["input"], a["other"]
        if is_param(x) and is_param(o):
            return None
        for t in (x, o):
            if not (isinstance(t, torch.Tensor) or isinstance(t, numbers.Number)):
                return None
        if not isinstance(a.get("alpha", 1), numbers.Number):
            return None
        roles = {r: a[r] for r in ("input", "other") if is_param(a[r])}
        return roles or None

    def capture(self, a: Bound, is_param: IsParam) -> tuple[list[Tensor | None], BinaryMeta]:
        ops: list[Tensor | None] = []
        shapes: list[tuple[int, ...] | None] = []
        scalars: list[complex | float | None] = []
        for r in ("input", "other"):
            t = a[r]
            tensor = isinstance(t, torch.Tensor)
            ops.append(None if not tensor or is_param(t) else t)
            shapes.append(tuple(t.shape) if tensor else None)
            scalars.append(None if tensor else complex(t) if isinstance(t, complex) else float(t))
        return ops, BinaryMeta(float(a.get("alpha", 1)), shapes[0], shapes[1], scalars[0], scalars[1])


@register(torch.add, torch.Tensor.add)
class Add(_Binary):
    """``input + alpha * other``: ``∂y/∂θ`` is the identity broadcast (times alpha for other)."""

    name = "add"
    names = ("input", "other", "alpha", "out")
    defaults = {"alpha": 1}
    _sign = 1.0

    def structure(self, role: str, operands: Sequence[Tensor | None], meta: BinaryMeta, y_shape: tuple[int, ...]) -> Structure:
        shape = meta.shape(role)
        scale = 1.0 if role == "input" else self._sign * meta.alpha
        sub = trailing(len(shape), len(y_shape))
        return einsum_structure([sub], LETTERS[: len(y_shape)], 0, [None], shape, y_shape, scale)


@register(torch.sub, torch.Tensor.sub)
class Sub(Add):
    """``input - alpha * other``."""

    name = "sub"
    _sign = -1.0


@register(torch.mul, torch.Tensor.mul)
class Mul(_Binary):
    """``input * other``: ``∂y/∂θ`` is the other factor (a tensor or a number), summed over broadcast axes."""

    name = "mul"
    names: ClassVar[tuple[str, ...]] = ("input", "other", "out")

    def structure(self, role: str, operands: Sequence[Tensor | None], meta: BinaryMeta, y_shape: tuple[int, ...]) -> Structure:
        other = "other" if role == "input" else "input"
        shape = meta.shape(role)
        ny = len(y_shape)
        out = LETTERS[:ny]
        factor = meta.scalar(other)
        if factor is not None:
            return einsum_structure([trailing(len(shape), ny)], out, 0, [None], shape, y_shape, factor)
        t = operands[0 if other == "input" else 1]
        assert t is not None
        subs = [trailing(len(shape), ny), trailing(t.ndim - 1, ny)]
        return einsum_structure(subs, out, 0, [None, t], shape, y_shape)


@register(torch.div, torch.Tensor.div, torch.true_divide, torch.Tensor.true_divide)
class Div(Mul):
    """``θ / a`` (true division): ``θ * (1 / a)``, the reciprocal kept as the other factor (spectral norm's ``W / σ``)."""

    name = "div"
    names = ("input", "other", "rounding_mode", "out")
    defaults = {"rounding_mode": None}

    def match(self, a: Bound, is_param: IsParam) -> dict[str, Tensor] | None:
        if a.get("rounding_mode") is not None or is_param(a["other"]) or not is_param(a["input"]):
            return None
        if isinstance(a["other"], numbers.Number) and a["other"] == 0:
            return None
        return super().match(a, is_param)

    def capture(self, a: Bound, is_param: IsParam) -> tuple[list[Tensor | None], BinaryMeta]:
        ops, meta = super().capture(a, is_param)
        other = ops[1]
        if other is not None:
            return [ops[0], torch.reciprocal(other)], meta
        scalar = meta.other_scalar
        return ops, meta if scalar is None else dataclasses.replace(meta, other_scalar=1 / scalar)
