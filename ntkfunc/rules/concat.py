"""Concatenation: a parameter (or a view of one) concatenated with tensors, ``torch.cat``.

Class tokens are the typical case: ``torch.cat([cls_token.expand(n, -1, -1), x], dim=1)``
in timm's and torchvision's Vision Transformers. ``y`` restricted to the parameter's slice
along ``dim`` is the parameter itself, so ``∂y/∂θ`` is a selection: a one-hot matrix
``S[l, m] = [l = offset + m]`` along ``dim`` (shared by all samples) and the identity on
every other axis.

Example:
  >>> import torch
  >>> from ntkfunc.rules import lookup
  >>> cls, x = torch.randn(1, 1, 4), torch.randn(1, 6, 4)
  >>> rule = lookup(torch.cat)
  >>> bound = rule.bind(([cls, x],), {"dim": 1})
  >>> rule.match(bound, lambda t: t is cls)
  {'tensor0': ...}
  >>> ops, meta = rule.capture(bound, lambda t: t is cls)
  >>> s = rule.structure("tensor0", ops, meta, (1, 7, 4))
  >>> (s.y, s.theta, [(letters, tuple(t.shape)) for letters, t in s.operands])
  ('abc', 'adc', [('bd', (1, 7, 1))])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from ntkfunc.rules.base import LETTERS, Bound, IsParam, Rule, Structure, Tensor, einsum_structure, register


@dataclasses.dataclass(frozen=True)
class CatMeta:
    """A concatenation along ``dim`` (non-negative): each tensor's ``offsets`` along it and ``shapes``, and the ``device``."""

    dim: int
    offsets: tuple[int, ...]
    shapes: tuple[tuple[int, ...], ...]
    device: torch.device


@register(torch.cat, torch.concat, torch.concatenate)
class Cat(Rule):
    """``cat(tensors, dim)``: every parameter among ``tensors`` gets the role ``tensor{i}``."""

    static_meta = True
    name = "cat"

    def bind(self, args: tuple, kwargs: dict) -> Bound | None:
        kwargs = dict(kwargs)
        if kwargs.pop("out", None) is not None or len(args) > 2:
            return None
        tensors = args[0] if args else kwargs.pop("tensors", None)
        dim = args[1] if len(args) > 1 else kwargs.pop("dim", kwargs.pop("axis", 0))
        if kwargs or not isinstance(tensors, (list, tuple)) or not isinstance(dim, int):
            return None
        if not tensors or not all(isinstance(t, torch.Tensor) for t in tensors) or len({t.ndim for t in tensors}) != 1:
            return None  # includes the legacy 1-D empty tensors that cat skips
        return {"tensors": list(tensors), "dim": dim}

    def match(self, a: Bound, is_param: IsParam) -> dict[str, Tensor] | None:
        return {f"tensor{i}": t for i, t in enumerate(a["tensors"]) if is_param(t)} or None

    def capture(self, a: Bound, is_param: IsParam) -> tuple[list[Tensor | None], CatMeta]:
        tensors = a["tensors"]
        dim = a["dim"] % tensors[0].ndim
        lengths = [int(t.shape[dim]) for t in tensors]
        offsets = tuple(sum(lengths[:i]) for i in range(len(tensors)))
        return [], CatMeta(dim, offsets, tuple(tuple(t.shape) for t in tensors), tensors[0].device)

    def structure(self, role: str, operands: Sequence[Tensor | None], meta: CatMeta, y_shape: tuple[int, ...]) -> Structure:
        i = int(role[len("tensor") :])
        shape, dim, offset = meta.shapes[i], meta.dim, meta.offsets[i]
        ny = len(y_shape)
        out = LETTERS[:ny]
        new = LETTERS[ny]
        theta = out[:dim] + new + out[dim + 1 :]
        select = torch.zeros(1, y_shape[dim], shape[dim], device=meta.device)
        select[0, offset + torch.arange(shape[dim]), torch.arange(shape[dim])] = 1
        return einsum_structure([theta, out[dim] + new], out, 0, [None, select], shape, y_shape)
