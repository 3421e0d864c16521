"""Convolution family: ``conv1d/2d/3d`` and ``conv_transpose1d/2d/3d`` (stride, padding incl. 'same', dilation, groups).

A convolution is linear in its kernel: ``y[g, o, s] = Σ_{i, k} patches(x)[g, i, k, s] W[g, o, i, k]``
where ``patches`` (im2col) gathers, for every output position ``s``, the input window
it sees. The NTK contribution of ``W`` is then an einsum of the cotangents, the
patches of both samples and nothing of size ``numel(W)``. A transposed convolution
is the convolution (stride 1) of the zero-upsampled, re-padded input with the
flipped kernel, so the same patches serve after flipping the window axes.

Example:
  >>> import torch
  >>> from ntkfunc.rules import lookup
  >>> x, w = torch.randn(1, 2, 8, 8), torch.randn(4, 2, 3, 3)
  >>> rule = lookup(torch.nn.functional.conv2d)
  >>> ops, meta = rule.capture(rule.bind((x, w), {"stride": 2, "padding": 1}), lambda t: t is w)
  >>> s = rule.structure("weight", [x.unsqueeze(0)], meta, (1, 4, 4, 4))
  >>> s.operands[0][1].shape  # (samples, batch, groups, in/group, out H, out W, kH, kW)
  torch.Size([1, 1, 1, 2, 4, 4, 3, 3])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ntkfunc.rules.base import Bound, IsParam, Rule, Structure, Tensor, register

_CONV = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_T = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")
_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1, "output_padding": 0}


def _tuple(v: Any, d: int) -> tuple[int, ...]:
    return tuple(int(e) for e in v) if isinstance(v, (tuple, list)) else (int(v),) * d


def patches(x: Tensor, kernel: Sequence[int], stride: Sequence[int], dilation: Sequence[int], pads: Sequence[tuple[int, int]]) -> Tensor:
    """im2col for any number of spatial axes: ``(M, C, *sp)`` -> ``(M, C, *out_sp, *kernel)``.

    ``pads`` are ``(left, right)`` per spatial axis (negative values crop).
    """
    d = len(kernel)
    flat = [p for lr in reversed(pads) for p in lr]
    if any(flat):
        x = F.pad(x, flat)
    for i in range(d):
        span = dilation[i] * (kernel[i] - 1) + 1
        x = x.unfold(2 + i, span, stride[i])  # window appended last
    if any(v != 1 for v in dilation):
        x = x[(...,) + tuple(slice(None, None, v) for v in dilation)]
    return x


def upsample(x: Tensor, stride: Sequence[int]) -> Tensor:
    """Insert ``stride - 1`` zeros between input positions (out of place, transform-friendly)."""
    for i, s in enumerate(stride):
        if s == 1:
            continue
        ax = 2 + i
        z = torch.zeros_like(x).unsqueeze(ax + 1).expand(*x.shape[: ax + 1], s - 1, *x.shape[ax + 1 :])
        x = torch.cat([x.unsqueeze(ax + 1), z], ax + 1).flatten(ax, ax + 1)
        x = x.narrow(ax, 0, x.shape[ax] - (s - 1))
    return x


class _Conv(Rule):
    """A convolution ``op(input, weight, bias, ...)`` whose weight and / or bias are parameters."""

    static_meta = True
    transposed: bool = False
    names: ClassVar[tuple[str, ...]] = _CONV
    defaults = _DEFAULTS

    def match(self, a: Bound, is_param: IsParam) -> dict[str, Tensor] | None:
        if not isinstance(a["input"], torch.Tensor) or is_param(a["input"]):
            return None
        if not isinstance(a["weight"], torch.Tensor) or (isinstance(a["padding"], str) and self.transposed):
            return None
        roles = {r: a[r] for r in ("weight", "bias") if is_param(a[r])}
        return roles or None

    def capture(self, a: Bound, is_param: IsParam) -> tuple[list[Tensor | None], dict[str, Any]]:
        w, d = a["weight"], a["weight"].ndim - 2
        kernel = tuple(w.shape[2:])
        stride, dilation = _tuple(a["stride"], d), _tuple(a["dilation"], d)
        if isinstance(a["padding"], str):
            if a["padding"] == "valid":
                pads = [(0, 0)] * d
            else:  # 'same': as PyTorch, the extra element goes to the right
                totals = [v * (k - 1) for v, k in zip(dilation, kernel)]
                pads = [(t // 2, t - t // 2) for t in totals]
        else:
            pads = [(p, p) for p in _tuple(a["padding"], d)]
        meta = {
            "kernel": kernel, "stride": stride, "dilation": dilation, "pads": pads, "groups": int(a["groups"]),
            "weight_shape": tuple(w.shape), "unbatched": a["input"].ndim == d + 1,
            "output_padding": _tuple(a.get("output_padding", 0), d),
        }
        return [a["input"]], meta

    def structure(self, role: str, operands: Sequence[Tensor | None], meta: dict[str, Any], y_shape: tuple[int, ...]) -> Structure:
        kernel = meta["kernel"]
        d, g = len(kernel), meta["groups"]
        y_shape = (1,) + tuple(y_shape) if meta["unbatched"] else tuple(y_shape)
        m, co, out_sp = y_shape[0], y_shape[1], y_shape[2:]
        sp = "stuvw"[:d]
        ks = "klmno"[:d]
        if role == "bias":
            return Structure(y_shape, "pc" + sp, "c", [])
        (x,) = operands
        assert x is not None
        n = x.shape[0]
        if meta["unbatched"]:
            x = x.unsqueeze(1)
        x = x.reshape(n * m, *x.shape[2:])
        ci = x.shape[1]
        if self.transposed:
            stride, dil, pads, opad = meta["stride"], meta["dilation"], meta["pads"], meta["output_padding"]
            x = upsample(x, stride)
            full = [(v * (k - 1) - p, v * (k - 1) - p + op) for v, k, (p, _), op in zip(dil, kernel, pads, opad)]
            x = patches(x, kernel, (1,) * d, dil, full).flip(list(range(-d, 0)))
            theta = "gir" + ks  # W: (in, out/groups, *k) = (g, in/g, out/g, *k)
        else:
            x = patches(x, kernel, meta["stride"], meta["dilation"], meta["pads"])
            theta = "gri" + ks  # W: (out, in/groups, *k) = (g, out/g, in/g, *k)
        if tuple(x.shape[2 : 2 + d]) != tuple(out_sp):
            raise RuntimeError(f"conv rule: patches of spatial shape {tuple(x.shape[2:2 + d])}, expected {tuple(out_sp)}")
        x = x.reshape(n, m, g, ci // g, *x.shape[2:])
        return Structure((m, g, co // g, *out_sp), "pgr" + sp, theta, [("pgi" + sp + ks, x)])


class _ConvTranspose(_Conv):
    transposed = True
    names = _CONV_T


@register(F.conv1d)
class Conv1d(_Conv):
    name = "conv1d"


@register(F.conv2d)
class Conv2d(_Conv):
    name = "conv2d"


@register(F.conv3d)
class Conv3d(_Conv):
    name = "conv3d"


@register(F.conv_transpose1d)
class ConvTranspose1d(_ConvTranspose):
    name = "conv_transpose1d"


@register(F.conv_transpose2d)
class ConvTranspose2d(_ConvTranspose):
    name = "conv_transpose2d"


@register(F.conv_transpose3d)
class ConvTranspose3d(_ConvTranspose):
    name = "conv_transpose3d"
