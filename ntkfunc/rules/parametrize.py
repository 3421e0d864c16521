"""Parametrizations: ``weight_norm``'s ``torch._weight_norm``, and ``tril`` / ``triu`` (``orthogonal``'s first step).

**weight_norm** (``torch.nn.utils.parametrizations.weight_norm`` and the hook-based
``torch.nn.utils.weight_norm``) computes ``w = g ⊙ v / ‖v‖`` (norms over every axis but ``dim``;
``dim=-1``: the whole tensor) with ``torch._weight_norm(v, g, dim)``. ``w`` is linear in ``g``:
``∂w/∂g = u = v / ‖v‖``. It is not linear in ``v``: ``∂w/∂v = s (I - u uᵀ)`` per slice along
``dim``, with ``s = g / ‖v‖``, a sum of two factorised terms. A structure is one product, so
the rule gives ``v`` two roles on the same call, ``v`` (``s I``) and ``v_radial`` (``-s u uᵀ``):
a parameter with several uses gets the sum of their derivatives (every pair of uses contracted,
as for tied weights), which here is exactly ``∂w/∂v``. The primitive's output is the weight
itself, so its cotangents are per-sample gradients of the weight: the rule makes ``g`` and
``v`` exact by rules (``explain`` names ``weight_norm:v+weight_norm:v_radial``), but it cannot
be cheaper than reverse mode, and the route planner keeps them on reverse mode unless
:func:`~ntkfunc.rules.forced`.

**spectral_norm** is ``W / σ`` with ``σ = uᵀ W v`` (``u``, ``v`` buffers in eval mode): ``W`` is
consumed by ``torch.mv`` (the matmul family) and by ``θ / a`` (the elementwise family), two
linear uses of one parameter, contracted as tied uses. A convolution's kernel is flattened to a
matrix for ``mv``: its two uses then factor it differently and it falls back (``explain`` says so).

**orthogonal** starts from ``X.tril()`` (``matrix_exp`` / ``cayley``) or ``X.tril(-1)`` and the
signs of ``X``'s diagonal (``householder``): the mask is the whole derivative, ``∂y/∂X = mask``,
and what follows (``matrix_exp``, ``householder_product``) acts on the masked tensor, not on
the parameter.

Example:
  >>> import torch
  >>> from ntkfunc.rules import lookup
  >>> v, g = torch.randn(3, 4), torch.rand(3, 1) + 0.5
  >>> rule = lookup(torch._weight_norm)
  >>> bound = rule.bind((v, g, 0), {})
  >>> sorted(rule.match(bound, lambda t: t is v or t is g))
  ['g', 'v', 'v_radial']
  >>> ops, meta = rule.capture(bound, lambda t: t is v or t is g)
  >>> s = rule.structure("v_radial", [o.unsqueeze(0) for o in ops], meta, (3, 4))
  >>> (s.y, s.theta, [letters for letters, _ in s.operands], s.scale)
  ('ab', 'aY', ['ab', 'aY', 'a'], -1.0)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import ClassVar

import torch

from ntkfunc.rules.base import LETTERS, Bound, IsParam, Rule, Structure, Tensor, einsum_structure, register

Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class WeightNormMeta:
    """``torch._weight_norm(v, g, dim)``: the axis kept by the norm (``-1``: none, the whole tensor) and ``g``'s shape."""

    dim: int
    v_shape: Shape
    g_shape: Shape


@register(torch._weight_norm)
class WeightNorm(Rule):
    """``w = g ⊙ v / ‖v‖``: roles ``g`` (``∂w/∂g = u``), and ``v`` twice: ``v`` (``s I``) and ``v_radial`` (``-s u uᵀ``)."""

    static_meta = True
    name = "weight_norm"
    names = ("v", "g", "dim")
    defaults = {"dim": 0}

    def match(self, a: Bound, is_param: IsParam) -> dict[str, Tensor] | None:
        v, g, dim = a["v"], a["g"], a["dim"]
        if not (isinstance(v, torch.Tensor) and isinstance(g, torch.Tensor) and isinstance(dim, int)) or v.dim() == 0:
            return None
        if dim != -1 and not 0 <= dim < v.dim():
            return None
        slices = 1 if dim == -1 else v.shape[dim]
        if g.numel() != slices or len(LETTERS) < 2 * v.dim():
            return None
        roles = {"v": v, "v_radial": v} if is_param(v) else {}
        if is_param(g):
            roles["g"] = g
        return roles or None

    def capture(self, a: Bound, is_param: IsParam) -> tuple[list[Tensor | None], WeightNormMeta]:
        """``u = v / ‖v‖`` and ``s = g / ‖v‖`` (the norm's shape: size 1 on every axis but ``dim``)."""
        v, g, dim = a["v"], a["g"], a["dim"]
        axes = [d for d in range(v.dim()) if d != dim]
        norm = v.norm(dim=axes, keepdim=True) if axes else v.abs()  # a vector normed per entry: its magnitude
        return [v / norm, g.reshape(norm.shape) / norm], WeightNormMeta(dim, tuple(v.shape), tuple(g.shape))

    def structure(self, role: str, operands: Sequence[Tensor | None], meta: WeightNormMeta, y_shape: tuple[int, ...]) -> Structure:
        u, s = operands
        assert u is not None and s is not None
        out = LETTERS[: len(y_shape)]
        if role == "g":  # w = g ⊙ u, g broadcast like the norm
            sub = out if len(meta.g_shape) == len(y_shape) else out[meta.dim] if len(meta.g_shape) == 1 and meta.dim >= 0 else ""
            return einsum_structure([sub, out], out, 0, [None, u], meta.g_shape if sub else (), y_shape)
        if role == "v":  # s I
            return einsum_structure([out, out], out, 0, [None, s], meta.v_shape, y_shape)
        # v_radial: -s u uᵀ within each slice along dim; the other axes of θ get letters of their own
        fresh = LETTERS[::-1]
        theta = "".join(c if d == meta.dim else fresh[d] for d, c in enumerate(out))
        kept = out[meta.dim] if meta.dim >= 0 else ""
        scale = s.reshape(s.shape[0], -1) if kept else s.reshape(s.shape[0])
        return Structure(y_shape, out, theta, [(out, u), (theta, u), (kept, scale)], -1.0)


@dataclasses.dataclass(frozen=True)
class TriangleMeta:
    """``tril`` / ``triu(input, diagonal)``: the input's shape, ``diagonal`` and ``device`` (for the mask)."""

    shape: Shape
    diagonal: int
    device: torch.device


class _Triangle(Rule):
    """``y = θ ⊙ mask``, the mask the lower (``tril``) or upper (``triu``) triangle of the last two axes."""

    static_meta = True
    names = ("input", "diagonal", "out")
    defaults = {"diagonal": 0, "out": None}
    lower: ClassVar[bool] = True

    def match(self, a: Bound, is_param: IsParam) -> dict[str, Tensor] | None:
        x = a["input"]
        if a["out"] is not None or not isinstance(a["diagonal"], int) or not isinstance(x, torch.Tensor) or x.dim() < 2:
            return None
        return {"input": x} if is_param(x) else None

    def capture(self, a: Bound, is_param: IsParam) -> tuple[list[Tensor | None], TriangleMeta]:
        x = a["input"]
        return [], TriangleMeta(tuple(x.shape), a["diagonal"], x.device)

    def structure(self, role: str, operands: Sequence[Tensor | None], meta: TriangleMeta, y_shape: tuple[int, ...]) -> Structure:
        ones = torch.ones(meta.shape[-2:], device=meta.device)
        mask = (ones.tril(meta.diagonal) if self.lower else ones.triu(meta.diagonal)).unsqueeze(0)  # shared by all samples
        out = LETTERS[: len(y_shape)]
        return einsum_structure([out, out[-2:]], out, 0, [None, mask], meta.shape, y_shape)


@register(torch.tril, torch.Tensor.tril)
class Tril(_Triangle):
    name = "tril"


@register(torch.triu, torch.Tensor.triu)
class Triu(_Triangle):
    name = "triu"
    lower = False
