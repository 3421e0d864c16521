"""Convolution family: ``conv1d/2d/3d`` and ``conv_transpose1d/2d/3d`` (stride, padding incl. 'same', dilation, groups).

A convolution is linear in its kernel: ``y[g, o, s] = Σ_{i, k} patches(x)[g, i, k, s] W[g, o, i, k]``
where ``patches`` (im2col) gathers, for every output position ``s``, the input window
it sees. The NTK contribution of ``W`` is then an einsum of the cotangents, the
patches of both samples and nothing of size ``numel(W)``. A transposed convolution
is the convolution (stride 1) of the zero-upsampled, re-padded input with the
flipped kernel, so the same patches serve after flipping the window axes.

A 2-D convolution also forms its kernel's per-sample gradient directly (:meth:`Conv2d.write_gradient`:
:func:`im2col` into reused buffers and ``bmm``, or the weight-gradient half of a convolution backward
with the samples folded into the groups, whichever :func:`choose_way` measured faster for the layer's
shape) and gives its factors (cotangents and patches) to the sketches.

Example:
  >>> import torch
  >>> from ntkfunc.rules import lookup
  >>> x, w = torch.randn(1, 2, 8, 8), torch.randn(4, 2, 3, 3)
  >>> rule = lookup(torch.nn.functional.conv2d)
  >>> ops, meta = rule.capture(rule.bind((x, w), {"stride": 2, "padding": 1}), lambda t: t is w)
  >>> s = rule.structure("weight", [x.unsqueeze(0)], meta, (1, 4, 4, 4))
  >>> s.operands[0][1].shape  # (samples, batch, groups, in/group, out H, out W, kH, kW)
  torch.Size([1, 1, 1, 2, 4, 4, 3, 3])
  >>> s.window.x.shape, s.window.offsets  # the unpadded input and the window letters (the input-Gram path)
  (torch.Size([1, 1, 1, 2, 8, 8]), 'kl')
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Hashable, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ntkfunc._core.buffers import Buffers, clock
from ntkfunc.rules.base import Bound, Factorable, IsParam, PaddedFactors, Rule, Structure, Tensor, Window, register, window_out_size

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


PADDED, PATCHES, GRADIENT = "conv-padded", "conv-patches", "conv-gradient"
"""The work buffers of :func:`im2col` and :meth:`Conv2d.write_gradient` (names in a :class:`Buffers`)."""

IM2COL, GROUPED = "im2col", "grouped convolution"
"""The two ways of :meth:`Conv2d.write_gradient` (:func:`gradient_by_im2col`, :func:`gradient_by_grouped_convolution`)."""

CACHE_BYTES = 4 << 20
"""The im2col way's product target per sub-batch: small enough to stay in cache until it is copied into the rows."""

PROBE = 4
"""Samples on which :func:`choose_way` times each way (once per key; the rows they write are kept)."""

CPU = torch.device("cpu")


def im2col(x: Tensor, kernel: Sequence[int], stride: Sequence[int], dilation: Sequence[int], pads: Sequence[tuple[int, int]],
           buffers: Buffers, positions_first: bool = False) -> Tensor:
    """im2col of 2-D images ``x`` ``(g, C, H, W)`` into a reused buffer: ``(g, C kh kw, S)``, or ``(g, S, C kh kw)``
    with ``positions_first`` (``S = H' W'`` output positions; ``C kh kw`` in the kernel's C order).

    One strided copy from :func:`patches` views of the zero-padded input, several times faster
    than ``aten::im2col`` on CPU. The padded input and the patches live in ``buffers``
    (:data:`PADDED`, :data:`PATCHES`), reused from call to call (a fresh allocation of this size
    page-faults on every use). ``pads`` are ``(left, right)`` per axis, not negative.

    >>> x = torch.randn(2, 3, 5, 5)
    >>> cols = im2col(x, (3, 3), (2, 2), (1, 1), [(1, 1), (1, 1)], Buffers())
    >>> ref = torch.nn.functional.unfold(x, 3, padding=1, stride=2)   # aten::im2col
    >>> tuple(cols.shape), bool(torch.equal(cols, ref))
    ((2, 27, 9), True)
    """
    g, c, h, w = x.shape
    (t, b), (left, right) = pads
    padded = buffers.get(PADDED, (g, c, h + t + b, w + left + right), x)
    if t or b:  # the border is zero; the buffer is shared with other shapes, so it is zeroed on every use
        padded[:, :, :t].zero_()
        padded[:, :, t + h :].zero_()
    if left or right:
        padded[:, :, t : t + h, :left].zero_()
        padded[:, :, t : t + h, left + w :].zero_()
    padded[:, :, t : t + h, left : left + w].copy_(x)
    u = patches(padded, kernel, stride, dilation, [(0, 0), (0, 0)])  # (g, C, H', W', kh, kw)
    (ho, wo), (k0, k1) = u.shape[2:4], u.shape[4:]
    if positions_first:
        out = buffers.get(PATCHES, (g, ho * wo, c * k0 * k1), x)
        out.view(g, ho, wo, c, k0, k1).copy_(u.permute(0, 2, 3, 1, 4, 5))
    else:
        out = buffers.get(PATCHES, (g, c * k0 * k1, ho * wo), x)
        out.view(g, c, k0, k1, ho, wo).copy_(u.permute(0, 1, 4, 5, 2, 3))
    return out


def choose_way(buffers: Buffers, key: Hashable, ways: dict[str, Callable[[int, int], None]], g: int,
               device: torch.device | None = None) -> str:
    """Run the fastest of ``ways`` (each ``way(a, b)`` does the job for samples ``a:b`` on ``device``, all ways with
    one result) on samples ``0:g``; the way's name.

    The first call for ``key`` times every way on the first :data:`PROBE` samples (each written three
    times: once untimed, which pays for allocations, then twice, the ways alternating, the faster
    kept; :func:`~ntkfunc._core.buffers.clock`: CPU time on the CPU) and keeps the seconds per sample
    in ``buffers.seconds[key]``; every call then runs the fastest on the samples left. ``buffers.seconds``
    is the one rate table: a caller may fill it in advance (a way's entry alone forces that way).

    >>> buffers, calls = Buffers(), []
    >>> ways = {"a": lambda a, b: calls.append(("a", a, b)), "b": lambda a, b: calls.append(("b", a, b))}
    >>> buffers.seconds["job"] = {"b": 1.0}
    >>> choose_way(buffers, "job", ways, 10), calls
    ('b', [('b', 0, 10)])
    """
    start = 0
    if key not in buffers.seconds:
        probe = min(g, PROBE)
        seconds = {name: math.inf for name in ways}
        for way in ways.values():
            way(0, probe)
        for _ in range(2):  # the faster of two timed runs per way, the ways alternating
            for name, way in ways.items():
                t0 = clock(device or CPU)
                way(0, probe)
                seconds[name] = min(seconds[name], (clock(device or CPU) - t0) / probe)
        buffers.seconds[key] = seconds
        start = probe
    table = buffers.seconds[key]
    best = min(table, key=table.__getitem__)
    if start < g:
        ways[best](start, g)
    return best


def gradient_by_im2col(x: Tensor, c: Tensor, meta: ConvMeta, out: Tensor, buffers: Buffers) -> None:
    """A 2-D kernel's per-sample gradient by :func:`im2col` and ``bmm``: ``out`` ``(g, O, numel)`` from the inputs
    ``x`` ``(g, C_in, H, W)`` and cotangents ``c`` ``(g, O, C_out, H', W')``.

    One ``bmm`` per output entry, group and sub-batch of samples whose product fits in
    :data:`CACHE_BYTES` (a contiguous target in ``buffers``, then one copy into the strided rows: a
    ``bmm`` writing the rows directly takes a per-sample path, and a large target leaves the cache
    before its copy).
    """
    g, o, co = c.shape[:3]
    c = c.reshape(g, o, co, -1)
    cols = im2col(x, meta.kernel, meta.stride, meta.dilation, meta.pads, buffers)  # (g, C kh kw, S)
    groups = meta.groups
    cg, ig = co // groups, cols.shape[1] // groups
    step = max(1, min(g, CACHE_BYTES // max(1, cg * ig * x.element_size())))
    tmp = buffers.get(GRADIENT, (step, cg, ig), x)
    for a in range(0, g, step):
        b = min(g, a + step)
        for j in range(o):
            target = out[a:b, j].view(b - a, co, ig)
            for q in range(groups):
                t = tmp[: b - a]
                torch.bmm(c[a:b, j, q * cg : (q + 1) * cg], cols[a:b, q * ig : (q + 1) * ig].transpose(1, 2), out=t)
                target[:, q * cg : (q + 1) * cg].copy_(t)


def gradient_by_grouped_convolution(x: Tensor, c: Tensor, meta: ConvMeta, out: Tensor, buffers: Buffers) -> None:
    """The same as :func:`gradient_by_im2col`, by the weight-gradient half of a convolution's backward with the
    samples folded into the groups (``g x groups`` groups: what ``vmap(grad)`` runs); one call per output entry."""
    g, o, co, ho, wo = c.shape
    ci = x.shape[1]
    (t, b), (left, right) = meta.pads
    symmetric = t == b and left == right
    xs = x if symmetric else F.pad(x, [left, right, t, b])  # convolutions pad both sides alike
    xs = xs.reshape(1, g * ci, *xs.shape[-2:])
    weight = x.new_empty(1).expand(g * co, ci // meta.groups, *meta.kernel)  # its shape is all the backward reads
    padding = [t, left] if symmetric else [0, 0]
    groups = g * meta.groups
    for j in range(o):
        gy = c[:, j].reshape(1, g * co, ho, wo)
        gw = torch.ops.aten.convolution_backward(gy, xs, weight, None, list(meta.stride), padding, list(meta.dilation),
                                                 False, [0, 0], groups, [False, True, False])[1]
        out[:, j].copy_(gw.view(g, -1))


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


@dataclasses.dataclass(frozen=True)
class ConvMeta:
    """A convolution call's settings: per spatial axis ``kernel``, ``stride``, ``dilation``, ``pads`` ``(left, right)``
    and ``output_padding`` (transposed); ``groups``; the weight's and the (per-sample) input's shapes; ``unbatched``
    (an input without its batch axis)."""

    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    pads: tuple[tuple[int, int], ...]
    groups: int
    weight_shape: tuple[int, ...]
    input_shape: tuple[int, ...]
    unbatched: bool
    output_padding: tuple[int, ...]


class _Conv(Rule):
    """A convolution ``op(input, weight, bias, ...)`` whose weight and / or bias are parameters."""

    static_meta = True
    fresh_output = True
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

    def capture(self, a: Bound, is_param: IsParam) -> tuple[list[Tensor | None], ConvMeta]:
        w, d = a["weight"], a["weight"].ndim - 2
        kernel = tuple(int(k) for k in w.shape[2:])
        stride, dilation = _tuple(a["stride"], d), _tuple(a["dilation"], d)
        pads: tuple[tuple[int, int], ...]
        if isinstance(a["padding"], str):
            if a["padding"] == "valid":
                pads = ((0, 0),) * d
            else:  # 'same': as PyTorch, the extra element goes to the right
                totals = [v * (k - 1) for v, k in zip(dilation, kernel)]
                pads = tuple((t // 2, t - t // 2) for t in totals)
        else:
            pads = tuple((p, p) for p in _tuple(a["padding"], d))
        meta = ConvMeta(
            kernel=kernel, stride=stride, dilation=dilation, pads=pads, groups=int(a["groups"]),
            weight_shape=tuple(w.shape), input_shape=tuple(a["input"].shape), unbatched=a["input"].ndim == d + 1,
            output_padding=_tuple(a.get("output_padding", 0), d),
        )
        return [a["input"]], meta

    def structure(self, role: str, operands: Sequence[Tensor | None], meta: ConvMeta, y_shape: tuple[int, ...]) -> Structure:
        kernel = meta.kernel
        d, g = len(kernel), meta.groups
        y_shape = (1,) + tuple(y_shape) if meta.unbatched else tuple(y_shape)
        m, co, out_sp = y_shape[0], y_shape[1], y_shape[2:]
        sp = "stuvw"[:d]
        ks = "klmno"[:d]
        if role == "bias":
            return Structure(y_shape, "pc" + sp, "c", [])
        (x,) = operands
        assert x is not None
        n = x.shape[0]
        if meta.unbatched:
            x = x.unsqueeze(1)
        x = x.reshape(n * m, *x.shape[2:])
        ci = x.shape[1]
        if self.transposed:
            stride, dil, pads, opad = meta.stride, meta.dilation, meta.pads, meta.output_padding
            x = upsample(x, stride)
            full = [(v * (k - 1) - p, v * (k - 1) - p + op) for v, k, (p, _), op in zip(dil, kernel, pads, opad)]
            x = patches(x, kernel, (1,) * d, dil, full).flip(list(range(-d, 0)))
            theta = "gir" + ks  # W: (in, out/groups, *k) = (g, in/g, out/g, *k)
            window = None
        else:
            # the Gram route may contract the input's own Gram over channels, then shift-sum it over the window
            window = Window(0, x.reshape(n, m, g, ci // g, *x.shape[2:]), "pgi", sp, ks, kernel, meta.stride, meta.dilation,
                            meta.pads)
            x = patches(x, kernel, meta.stride, meta.dilation, meta.pads)
            theta = "gri" + ks  # W: (out, in/groups, *k) = (g, out/g, in/g, *k)
        if tuple(x.shape[2 : 2 + d]) != tuple(out_sp):
            raise RuntimeError(f"conv rule: patches of spatial shape {tuple(x.shape[2:2 + d])}, expected {tuple(out_sp)}")
        x = x.reshape(n, m, g, ci // g, *x.shape[2:])
        return Structure((m, g, co // g, *out_sp), "pgr" + sp, theta, [("pgi" + sp + ks, x)], window=window)

    def window_size(self, meta: ConvMeta) -> int:
        return math.prod(meta.kernel)


class _ConvTranspose(_Conv):
    transposed = True
    names = _CONV_T


@register(F.conv1d)
class Conv1d(_Conv):
    name = "conv1d"


@register(F.conv2d)
class Conv2d(_Conv):
    """``conv2d``; its kernel's per-sample gradient and factors come from :func:`im2col` patches."""

    name = "conv2d"

    @staticmethod
    def _images(meta: ConvMeta, y_shape: tuple[int, ...]) -> tuple[int, ...] | None:
        """The output's per-sample shape ``(1, C_out, H', W')``, or None when a sample is not one image."""
        y = (1, *y_shape) if meta.unbatched else tuple(y_shape)
        return y if len(meta.kernel) == 2 and y[0] == 1 else None

    def write_gradient(self, role: str, operands: Sequence[Tensor | None], cot: Tensor, meta: ConvMeta,
                       y_shape: tuple[int, ...], out: Tensor, buffers: Buffers) -> bool:
        """The bias: the cotangents summed over positions. The kernel: by :func:`gradient_by_im2col` or
        :func:`gradient_by_grouped_convolution`, whichever :func:`choose_way` measured faster for this layer's
        shape (timed once per shape on the first samples, the table kept in ``buffers.seconds``)."""
        y = self._images(meta, y_shape)
        if y is None:
            return False  # several images per sample: the einsum
        g, o = out.shape[:2]
        c = cot.reshape(g, o, *y[1:])
        if role == "bias":
            out.copy_(c.sum((-2, -1)))
            return True
        (xin,) = operands
        if xin is None or xin.shape[0] != g or min(p for lr in meta.pads for p in lr) < 0:
            return False  # an input shared by all samples: the einsum
        xin = xin.reshape(g, *xin.shape[-3:])
        key = ("conv2d-gradient", tuple(xin.shape[1:]), tuple(y[1:]), meta.kernel, meta.stride, meta.dilation, meta.pads,
               meta.groups, o, xin.dtype, xin.device)

        def way(fn: Callable[[Tensor, Tensor, ConvMeta, Tensor, Buffers], None]) -> Callable[[int, int], None]:
            return lambda a, b: fn(xin[a:b], c[a:b], meta, out[a:b], buffers)

        choose_way(buffers, key, {IM2COL: way(gradient_by_im2col), GROUPED: way(gradient_by_grouped_convolution)}, g, xin.device)
        return True

    def gradient_workspace(self, role: str, meta: ConvMeta, y_shape: tuple[int, ...]) -> dict[str, int]:
        y = self._images(meta, y_shape)
        if role != "weight" or y is None:
            return {}
        c, h, w = meta.input_shape[-3:]
        (t, b), (left, right) = meta.pads
        kernel_numel = math.prod(meta.weight_shape[1:])  # C_in / groups kh kw
        # GRADIENT: the grouped convolution's result, the whole kernel per sample (the im2col way's target is smaller)
        return {PADDED: c * (h + t + b) * (w + left + right), PATCHES: kernel_numel * meta.groups * math.prod(y[2:]),
                GRADIENT: meta.weight_shape[0] * kernel_numel}

    def factorable(self, role: str, meta: ConvMeta, y_shape: tuple[int, ...]) -> Factorable | None:
        """The kernel ``(C_out, C_in kh kw)`` over the output positions, for one group and one image per sample."""
        if role != "weight" or meta.groups != 1 or meta.unbatched or self._images(meta, y_shape) is None:
            return None
        w = meta.weight_shape
        return Factorable(w[0], math.prod(w[1:]), math.prod(y_shape[2:]))

    def factors(self, role: str, operands: Sequence[Tensor | None], cot: Tensor, meta: ConvMeta, y_shape: tuple[int, ...],
                buffers: Buffers) -> tuple[Tensor, Tensor] | None:
        """``c`` ``(g, O, C_out, S)`` and the :func:`im2col` patches ``(g, S, C_in kh kw)``."""
        fac = self.factorable(role, meta, y_shape)
        (xin,) = operands
        g = cot.shape[0]
        if fac is None or xin is None or xin.shape[0] != g or min(p for lr in meta.pads for p in lr) < 0:
            return None
        x = im2col(xin.reshape(g, *xin.shape[-3:]), meta.kernel, meta.stride, meta.dilation, meta.pads, buffers,
                   positions_first=True)
        if x.shape[1] != fac.positions:
            return None
        return cot.reshape(g, -1, fac.rows, fac.positions), x

    def padded_factors(self, role: str, operands: Sequence[Tensor | None], cot: Tensor, meta: ConvMeta,
                       y_shape: tuple[int, ...]) -> PaddedFactors | None:
        """``c`` ``(g, O, C_out, S)`` and the zero-padded input ``(g, C_in, Hp, Wp)``."""
        fac = self.factorable(role, meta, y_shape)
        (xin,) = operands
        g = cot.shape[0]
        if fac is None or xin is None or xin.shape[0] != g:
            return None
        xi = xin.reshape(g, *xin.shape[-3:])
        flat = [p for lr in reversed(meta.pads) for p in lr]
        xpad = F.pad(xi, flat) if any(flat) else xi
        (kh, kw), (sh, sw), (dh, dw) = meta.kernel, meta.stride, meta.dilation
        ho, wo = window_out_size(xpad.shape[-2], kh, sh, dh), window_out_size(xpad.shape[-1], kw, sw, dw)
        if ho * wo != fac.positions:
            return None
        return PaddedFactors(cot.reshape(g, -1, fac.rows, fac.positions), xpad, meta.kernel, meta.stride, meta.dilation)


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
