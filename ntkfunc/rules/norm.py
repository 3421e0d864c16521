"""Norm family: the affine weight and bias of ``layer_norm``, ``group_norm``, ``batch_norm``, ``instance_norm``, ``rms_norm``.

``y = x̂ ⊙ w + b`` where ``x̂`` is the normalised input, which does not depend on ``w``
or ``b``; the capture step recomputes ``x̂`` (the same op with no affine) and the
rules are elementwise products. ``batch_norm`` in eval mode uses its running
statistics as constants; in training mode (``vmap_axes=None``) the batch statistics.
``instance_norm`` normalises each sample and channel over its spatial axes (or by its running
statistics when ``use_input_stats`` is off: ``track_running_stats`` in eval mode).

Example:
  >>> import torch
  >>> from ntkfunc.rules import lookup
  >>> x, w, b = torch.randn(1, 3, 6), torch.ones(6), torch.zeros(6)
  >>> rule = lookup(torch.nn.functional.layer_norm)
  >>> bound = rule.bind((x, (6,), w, b), {})
  >>> sorted(rule.match(bound, lambda t: t is w or t is b))
  ['bias', 'weight']
  >>> (xhat,), meta = rule.capture(bound, lambda t: t is w or t is b)
  >>> torch.allclose(xhat, torch.nn.functional.layer_norm(x, (6,)))
  True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ntkfunc.rules.base import LETTERS, Bound, IsParam, Rule, Structure, Tensor, einsum_structure, register


@dataclasses.dataclass(frozen=True)
class AffineMeta:
    """A norm's affine: the shapes of its ``weight`` and ``bias`` (None where absent)."""

    weight_shape: tuple[int, ...] | None = None
    bias_shape: tuple[int, ...] | None = None

    def shape(self, role: str) -> tuple[int, ...]:
        shape = self.weight_shape if role == "weight" else self.bias_shape
        assert shape is not None, f"no {role}"
        return shape


class _Affine(Rule):
    """A norm whose output is ``normalise(x) * weight + bias``."""

    static_meta = True
    fresh_output = True
    channel_axis: int | None = None  # None: weight aligned to the trailing axes

    def normalise(self, a: Bound) -> Tensor:
        raise NotImplementedError(f"Subclass {type(self).__name__} must define normalise()")

    def match(self, a: Bound, is_param: IsParam) -> dict[str, Tensor] | None:
        if not isinstance(a.get("input"), torch.Tensor) or is_param(a["input"]):
            return None
        if any(is_param(a.get(k)) for k in self.names if k not in ("input", "weight", "bias")):
            return None
        roles: dict[str, Tensor] = {r: a[r] for r in ("weight", "bias") if r in a and is_param(a[r])}
        return roles or None

    def capture(self, a: Bound, is_param: IsParam) -> tuple[list[Tensor | None], AffineMeta]:
        w, b = (a.get(r) for r in ("weight", "bias"))
        meta = AffineMeta(tuple(w.shape) if isinstance(w, torch.Tensor) else None, tuple(b.shape) if isinstance(b, torch.Tensor) else None)
        return [self.normalise(a)], meta

    def structure(self, role: str, operands: Sequence[Tensor | None], meta: AffineMeta, y_shape: tuple[int, ...]) -> Structure:
        ny = len(y_shape)
        shape = meta.shape(role)
        out = LETTERS[:ny]
        if self.channel_axis is None:
            sub = LETTERS[ny - len(shape) : ny]
        else:
            sub = out[self.channel_axis]
        if role == "bias":
            return einsum_structure([sub], out, 0, [None], shape, y_shape)
        return einsum_structure([sub, out], out, 0, [None, operands[0]], shape, y_shape)


@register(F.layer_norm)
class LayerNorm(_Affine):
    name = "layer_norm"
    names = ("input", "normalized_shape", "weight", "bias", "eps")
    defaults = {"weight": None, "bias": None, "eps": 1e-5}

    def normalise(self, a: Bound) -> Tensor:
        return F.layer_norm(a["input"], a["normalized_shape"], None, None, a["eps"])


@register(F.rms_norm)
class RMSNorm(_Affine):
    name = "rms_norm"
    names = ("input", "normalized_shape", "weight", "eps")
    defaults = {"weight": None, "eps": None}

    def normalise(self, a: Bound) -> Tensor:
        return F.rms_norm(a["input"], a["normalized_shape"], None, a["eps"])


@register(F.group_norm)
class GroupNorm(_Affine):
    name = "group_norm"
    names = ("input", "num_groups", "weight", "bias", "eps")
    defaults = {"weight": None, "bias": None, "eps": 1e-5}
    channel_axis = 1

    def normalise(self, a: Bound) -> Tensor:
        return F.group_norm(a["input"], a["num_groups"], None, None, a["eps"])


@register(F.batch_norm)
class BatchNorm(_Affine):
    """Eval mode: running statistics are constants. Training mode: batch statistics (``vmap_axes=None``).

    In eval mode the op is a per-channel affine map of its input, and the capture pass computes it as
    one (:meth:`output`, :meth:`normalise`: one ``addcmul`` each) rather than by ``batch_norm`` itself,
    which under ``vmap`` folds the samples into the channels (running statistics copied per sample)
    and, in the backward pass, decomposes: on a CIFAR ResNet-18 the capture's pass took 24.8 → 22.5 ms
    per sample (``benchmarks/bench_capture.py``; RESULTS.md, "Rows, round 4").

    >>> import torch
    >>> x, mean, var = torch.randn(2, 3, 4, 4), torch.randn(3), torch.rand(3) + 0.5
    >>> w, b = torch.randn(3), torch.randn(3)
    >>> rule = BatchNorm()
    >>> a = rule.bind((x, mean, var, w, b), {})
    >>> (xhat,), _ = rule.capture(a, lambda t: t is w or t is b)
    >>> torch.allclose(rule.output(a, [xhat]), F.batch_norm(x, mean, var, w, b), atol=1e-6)
    True
    """

    name = "batch_norm"
    names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
    defaults = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5}
    channel_axis = 1

    def normalise(self, a: Bound) -> Tensor:
        if a["training"]:  # batch statistics; never touch the running buffers a second time
            return F.batch_norm(a["input"], None, None, None, None, True, 0.0, a["eps"])
        affine = _running_affine(a, with_parameters=False)
        if affine is None:
            return F.batch_norm(a["input"], a["running_mean"], a["running_var"], None, None, False, 0.0, a["eps"])
        return torch.addcmul(affine[1], a["input"], affine[0])

    def output(self, a: Bound, operands: Sequence[Tensor | None]) -> Tensor | None:
        affine = None if a["training"] else _running_affine(a, with_parameters=True)
        return None if affine is None else torch.addcmul(affine[1], a["input"], affine[0])


def _running_affine(a: Bound, with_parameters: bool) -> tuple[Tensor, Tensor] | None:
    """Eval-mode ``batch_norm`` as ``x * scale + shift``: ``(scale, shift)`` shaped ``(C, 1, ...)`` to broadcast over
    ``input`` ``(N, C, *spatial)`` (with the affine ``weight`` and ``bias`` where ``with_parameters``); None where the
    input, statistics and parameters are not tensors of one floating dtype (``batch_norm`` then runs as it is)."""
    x, mean, var = a["input"], a["running_mean"], a["running_var"]
    w, b = (a["weight"], a["bias"]) if with_parameters else (None, None)
    tensors = [t for t in (x, mean, var, w, b) if t is not None]
    if not isinstance(mean, torch.Tensor) or not isinstance(var, torch.Tensor) or x.ndim < 2:
        return None
    if not all(isinstance(t, torch.Tensor) and t.dtype == x.dtype for t in tensors) or not x.is_floating_point():
        return None
    shape = (x.shape[1],) + (1,) * (x.ndim - 2)
    scale = torch.rsqrt(var + a["eps"])
    shift = -mean * scale
    if w is not None:
        scale, shift = scale * w, shift * w
    if b is not None:
        shift = shift + b
    return scale.reshape(shape), shift.reshape(shape)


@register(F.instance_norm)
class InstanceNorm(_Affine):
    """``nn.InstanceNorm1d/2d/3d`` with ``affine=True``: per-channel weight and bias on each sample's normalised input."""

    name = "instance_norm"
    names = ("input", "running_mean", "running_var", "weight", "bias", "use_input_stats", "momentum", "eps")
    defaults = {"running_mean": None, "running_var": None, "weight": None, "bias": None, "use_input_stats": True,
                "momentum": 0.1, "eps": 1e-5}
    channel_axis = 1

    def normalise(self, a: Bound) -> Tensor:
        if a["use_input_stats"]:  # the sample's statistics; never touch the running buffers a second time
            return F.instance_norm(a["input"], None, None, None, None, True, 0.0, a["eps"])
        return F.instance_norm(a["input"], a["running_mean"], a["running_var"], None, None, False, 0.0, a["eps"])
