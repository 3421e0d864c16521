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

from collections.abc import Sequence
from typing import Any

import torch

from ntkfunc.rules.base import LETTERS, Bound, IsParam, Rule, Structure, Tensor, einsum_structure, register


@register(torch.cat, torch.concat, torch.concatenate)
class Cat(Rule):
    """``cat(tensors, dim)``: every parameter among ``tensors`` gets the role ``tensor{i}``."""

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

    def capture(self, a: Bound, is_param: IsParam) -> tuple[list[Tensor | None], dict[str, Any]]:
        tensors = a["tensors"]
        dim = a["dim"] % tensors[0].ndim
        lengths = [int(t.shape[dim]) for t in tensors]
        offsets = [sum(lengths[:i]) for i in range(len(tensors))]
        meta = {"dim": dim, "offsets": offsets, "shapes": [tuple(t.shape) for t in tensors], "device": tensors[0].device}
        return [], meta

    def structure(self, role: str, operands: Sequence[Tensor | None], meta: dict[str, Any], y_shape: tuple[int, ...]) -> Structure:
        i = int(role[len("tensor") :])
        shape, dim, offset = meta["shapes"][i], meta["dim"], meta["offsets"][i]
        ny = len(y_shape)
        out = LETTERS[:ny]
        new = LETTERS[ny]
        theta = out[:dim] + new + out[dim + 1 :]
        select = torch.zeros(1, y_shape[dim], shape[dim], device=meta["device"])
        select[0, offset + torch.arange(shape[dim]), torch.arange(shape[dim])] = 1
        return einsum_structure([theta, out[dim] + new], out, 0, [None, select], shape, y_shape)
