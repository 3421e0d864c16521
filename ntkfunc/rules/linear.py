"""Linear family: ``F.linear``, ``matmul`` / ``@`` / ``mm`` / ``bmm``, ``einsum``, and ``addmm`` / ``baddbmm`` /
``addbmm`` / ``addmv`` with one parameter operand (and the added input as a parameter).

Every op here is an einsum ``y = einsum(a, θ)``, so ``∂y/∂θ`` is the einsum with θ
removed; for ``y = x Wᵀ + b`` the NTK contribution of ``W`` is
``Σ_{p,q} (c₁[p]·c₂[q]) (x₁[p]·x₂[q])`` over positions ``p, q``, and opt_einsum picks
that Gram path or the Jacobian path, whichever is cheaper. ``F.linear`` also forms its weight's
per-sample gradient directly (:meth:`Linear.write_gradient`: one ``bmm`` per output entry) and
gives its factors ``c`` and ``x`` to the sketches.

Example:
  >>> import torch
  >>> from ntkfunc.rules import lookup
  >>> rule = lookup(torch.nn.functional.linear)
  >>> x, w = torch.randn(1, 3, 4), torch.randn(5, 4)
  >>> rule.match(rule.bind((x, w), {}), lambda t: t is w)
  {'weight': ...}
  >>> ops, meta = rule.capture(rule.bind((x, w), {}), lambda t: t is w)
  >>> meta
  LinearMeta(weight_shape=(5, 4))
  >>> s = rule.structure("weight", [x.unsqueeze(0)], meta, (1, 3, 5))
  >>> (s.y, s.theta, [letters for letters, _ in s.operands])
  ('abz', 'zy', ['aby'])
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ntkfunc._core.buffers import Buffers
from ntkfunc.rules.base import LETTERS, Bound, Factorable, IsParam, Rule, Structure, Tensor, bind, einsum_structure, register

Shape = tuple[int, ...]

GRADIENT = "linear-gradient"
"""The work buffer of :meth:`Linear.write_gradient` (its name in a :class:`Buffers`)."""


def _is_tensor(t: Any) -> bool:
    return isinstance(t, torch.Tensor)


@dataclasses.dataclass(frozen=True)
class LinearMeta:
    """An ``F.linear`` call's settings: the weight's shape ``(out, in)``."""

    weight_shape: Shape


@register(F.linear)
class Linear(Rule):
    """``F.linear(x, W, b) = x Wᵀ + b``: x ``(..., i)``, W ``(o, i)``, b ``(o,)``."""

    static_meta = True
    fresh_output = True
    name = "linear"
    names = ("input", "weight", "bias")
    defaults = {"bias": None}

    def match(self, a: Bound, is_param: IsParam) -> dict[str, Tensor] | None:
        if is_param(a["input"]) or not _is_tensor(a["weight"]) or a["weight"].ndim != 2:
            return None
        return {r: a[r] for r in ("weight", "bias") if is_param(a[r])} or None

    def capture(self, a: Bound, is_param: IsParam) -> tuple[list[Tensor | None], LinearMeta]:
        return [a["input"]], LinearMeta(tuple(a["weight"].shape))

    def structure(self, role: str, operands: Sequence[Tensor | None], meta: LinearMeta, y_shape: tuple[int, ...]) -> Structure:
        k = len(y_shape) - 1
        lead = LETTERS[:k]
        if role == "bias":
            return Structure(y_shape, lead + "z", "z", [])
        (x,) = operands
        assert x is not None
        return einsum_structure([lead + "y", "zy"], lead + "z", 1, [x, None], (y_shape[-1], x.shape[-1]), y_shape)

    def write_gradient(self, role: str, operands: Sequence[Tensor | None], cot: Tensor, meta: LinearMeta,
                       y_shape: tuple[int, ...], out: Tensor, buffers: Buffers) -> bool:
        """The bias: the cotangents summed over positions. The weight: with one position (an MLP's layer) the outer
        product of cotangent and input written straight into ``out``; else one ``bmm`` of cotangents and inputs over
        positions per output entry, into a contiguous buffer, then one copy (``bmm`` into the strided slot takes a
        slower path)."""
        g, o = out.shape[:2]
        z = y_shape[-1]
        c = cot.reshape(g, o, -1, z)  # (g, O, positions, out features)
        if role == "bias":
            out.copy_(c.sum(2))
            return True
        (xin,) = operands
        if xin is None or xin.shape[0] != g:
            return False  # an input shared by all samples: the einsum
        xi = xin.reshape(g, -1, xin.shape[-1])  # (g, positions, in features)
        if xi.shape[1] != c.shape[2]:
            return False  # a broadcast input: the einsum
        if xi.shape[1] == 1:  # (g, z) x (g, in): one multiplication per entry, no sum, nothing to stage
            for j in range(o):
                torch.mul(c[:, j, 0, :, None], xi[:, 0, None, :], out=out[:, j].view(g, z, xi.shape[-1]))
            return True
        tmp = buffers.get(GRADIENT, (g, z, xi.shape[-1]), xi)
        for j in range(o):
            torch.bmm(c[:, j].transpose(1, 2), xi, out=tmp)
            out[:, j].view(g, z, xi.shape[-1]).copy_(tmp)
        return True

    def gradient_workspace(self, role: str, meta: LinearMeta, y_shape: tuple[int, ...]) -> dict[str, int]:
        return {GRADIENT: math.prod(meta.weight_shape)} if role == "weight" else {}

    def factorable(self, role: str, meta: LinearMeta, y_shape: tuple[int, ...]) -> Factorable | None:
        """The weight ``(out, in)`` over the input's positions."""
        if role != "weight":
            return None
        return Factorable(meta.weight_shape[0], meta.weight_shape[1], math.prod(y_shape[:-1]))

    def factors(self, role: str, operands: Sequence[Tensor | None], cot: Tensor, meta: LinearMeta, y_shape: tuple[int, ...],
                buffers: Buffers) -> tuple[Tensor, Tensor] | None:
        """``c`` ``(g, O, out, S)`` (a transposed view of the cotangents) and the inputs ``(g, S, in)``."""
        fac = self.factorable(role, meta, y_shape)
        (xin,) = operands
        g = cot.shape[0]
        if fac is None or xin is None or xin.shape[0] != g:
            return None
        x = xin.reshape(g, -1, xin.shape[-1])
        if x.shape[1] != fac.positions:
            return None  # a broadcast input
        return cot.reshape(g, -1, fac.positions, fac.rows).transpose(2, 3), x


def matmul_subscripts(nda: int, ndb: int) -> tuple[str, str, str]:
    """Einsum subscripts of ``matmul`` for operands of ndims ``nda`` and ``ndb`` (with broadcasting)."""
    if nda == 1 and ndb == 1:
        return "y", "y", ""
    if nda == 1:
        batch = LETTERS[: ndb - 2]
        return "y", batch + "yz", batch + "z"
    if ndb == 1:
        batch = LETTERS[: nda - 2]
        return batch + "xy", "y", batch + "x"
    nb = max(nda, ndb) - 2
    batch = LETTERS[:nb]
    return batch[nb - (nda - 2) :] + "xy", batch[nb - (ndb - 2) :] + "yz", batch + "xz"


@dataclasses.dataclass(frozen=True)
class MatMulMeta:
    """A matrix product's einsum ``subscripts`` (``a``, ``b``, output) and its two operands' ``shapes``."""

    subscripts: tuple[str, str, str]
    shapes: tuple[Shape, Shape]


@register(torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm)
class MatMul(Rule):
    """``input @ other`` (``matmul``, ``mm``) with broadcasting batch axes and 1-D operands; one is a parameter."""

    static_meta = True
    name = "matmul"
    names = ("input", "other")

    def bind(self, args: tuple, kwargs: dict) -> Bound | None:
        if kwargs.get("out") is not None or len(args) + len(kwargs) != 2:
            return None
        a = bind(args, kwargs, self.names, {})
        if a is None or "input" not in a or "other" not in a:
            return None
        return a

    def subscripts(self, a: Tensor, b: Tensor) -> tuple[str, str, str]:
        return matmul_subscripts(a.ndim, b.ndim)

    def match(self, a: Bound, is_param: IsParam) -> dict[str, Tensor] | None:
        x, y = a["input"], a["other"]
        if not (_is_tensor(x) and _is_tensor(y)) or is_param(x) == is_param(y):
            return None
        return {"lhs": x} if is_param(x) else {"rhs": y}

    def capture(self, a: Bound, is_param: IsParam) -> tuple[list[Tensor | None], MatMulMeta]:
        x, y = a["input"], a["other"]
        meta = MatMulMeta(self.subscripts(x, y), (tuple(x.shape), tuple(y.shape)))
        return [None if is_param(t) else t for t in (x, y)], meta

    def structure(self, role: str, operands: Sequence[Tensor | None], meta: MatMulMeta, y_shape: tuple[int, ...]) -> Structure:
        sa, sb, out = meta.subscripts
        idx = 0 if role == "lhs" else 1
        tensors = [None, operands[1]] if idx == 0 else [operands[0], None]
        return einsum_structure([sa, sb], out, idx, tensors, meta.shapes[idx], y_shape)


@register(torch.Tensor.__rmatmul__)
class RMatMul(MatMul):
    """``a @ θ`` dispatched to ``θ.__rmatmul__(a)``: the bound operands are swapped back."""

    name = "matmul"

    def bind(self, args: tuple, kwargs: dict) -> Bound | None:
        a = super().bind(args, kwargs)
        return None if a is None else {"input": a["other"], "other": a["input"]}


@register(torch.bmm, torch.Tensor.bmm)
class BMM(MatMul):
    """``bmm(a, b)``: ``(B, n, k) @ (B, k, m)``."""

    name = "bmm"

    def subscripts(self, a: Tensor, b: Tensor) -> tuple[str, str, str]:
        return "axy", "ayz", "axz"


@register(torch.mv, torch.Tensor.mv)
class MV(MatMul):
    """``mv(mat, vec)``: ``(n, k) @ (k,)`` (spectral norm's ``σ = uᵀ W v``)."""

    name = "mv"

    def subscripts(self, a: Tensor, b: Tensor) -> tuple[str, str, str]:
        return "xy", "y", "x"


def parse_einsum(equation: str, ndims: Sequence[int]) -> tuple[list[str], str] | None:
    """``(inputs, output)`` letters of an einsum equation with ``...`` expanded; None if unsupported."""
    eq = equation.replace(" ", "")
    lhs, arrow, rhs = eq.partition("->")
    inputs = lhs.split(",")
    if len(inputs) != len(ndims):
        return None
    used = set(eq) - {".", ",", "-", ">"}
    if not all(c in LETTERS for c in used):
        return None
    free = [c for c in LETTERS if c not in used]
    n_ell = max([n - (len(s) - 3) for s, n in zip(inputs, ndims) if "..." in s] or [0])
    ell = "".join(free[:n_ell])
    expanded = []
    for s, n in zip(inputs, ndims):
        if "..." in s:
            k = n - (len(s) - 3)
            s = s.replace("...", ell[n_ell - k :])
        if len(s) != n:
            return None
        expanded.append(s)
    if arrow:
        out = rhs.replace("...", ell)
    else:
        counts = {c: sum(s.count(c) for s in expanded) for c in used}
        out = ell + "".join(sorted(c for c, k in counts.items() if k == 1 and c not in ell))
    return expanded, out


@dataclasses.dataclass(frozen=True)
class EinsumMeta:
    """An einsum's operand ``inputs`` letters (``...`` expanded), its ``output`` letters, its operands' ``shapes`` and ``device``."""

    inputs: tuple[str, ...]
    output: str
    shapes: tuple[Shape, ...]
    device: torch.device = torch.device("cpu")


def _diagonals(letters: str, t: Tensor) -> tuple[str, Tensor]:
    """A batch-first operand whose subscripts repeat a letter (``"bii"``) as its diagonal (``"bi"``): what einsum reads of it."""
    while len(set(letters)) < len(letters):
        ch = next(c for c in letters if letters.count(c) > 1)
        i = letters.index(ch)
        j = letters.index(ch, i + 1)
        t = torch.diagonal(t, dim1=1 + i, dim2=1 + j)
        letters = letters[:i] + letters[i + 1 : j] + letters[j + 1 :] + ch
    return letters, t


def _distinct(letters: str, shape: Shape) -> tuple[str, Shape]:
    """Subscripts with each letter once (first occurrences) and their sizes."""
    seen: dict[str, int] = {}
    for ch, d in zip(letters, shape):
        seen.setdefault(ch, d)
    return "".join(seen), tuple(seen.values())


@register(torch.einsum)
class Einsum(Rule):
    """``torch.einsum(eq, *operands)`` with one or several parameter operands, subscripts possibly repeated.

    Each parameter operand is a role; its ``∂y/∂θ`` is the einsum with θ removed, the other
    operands (parameters included) as they are, so a product of parameters gets the sum over
    its factors (the product rule: the same parameter twice is tied to itself). A subscript
    repeated within a non-parameter operand reads its diagonal; repeated within the parameter
    (``einsum("bk,kk->bk", x, D)`` reads ``D``'s diagonal), each repetition gets a new letter
    and an identity operand: ``∂y/∂D[k, l] = δ_kl ∂y/∂D[k, k]``.

    >>> from ntkfunc.rules import lookup
    >>> rule = lookup(torch.einsum)
    >>> x, d = torch.randn(3, 4), torch.randn(4, 4)
    >>> bound = rule.bind(("bk,kk->bk", x, d), {})
    >>> ops, meta = rule.capture(bound, lambda t: t is d)
    >>> s = rule.structure("operand1", [o if o is None else o.unsqueeze(0) for o in ops], meta, (3, 4))
    >>> (s.y, s.theta, [letters for letters, _ in s.operands])
    ('bk', 'kZ', ['bk', 'kZ'])
    """

    static_meta = True
    name = "einsum"

    def bind(self, args: tuple, kwargs: dict) -> Bound | None:
        """``{"equation", "operands", "subscripts"}``: ``einsum(eq, *ops)`` or ``einsum(eq, [ops])``, parsed once."""
        if kwargs or not args or not isinstance(args[0], str):
            return None
        ops = list(args[1]) if len(args) == 2 and isinstance(args[1], (list, tuple)) else list(args[1:])
        if not all(_is_tensor(t) for t in ops):
            return None
        subs = parse_einsum(args[0], [t.ndim for t in ops])
        if subs is None:
            return None
        return {"equation": args[0], "operands": ops, "subscripts": subs}

    def match(self, a: Bound, is_param: IsParam) -> dict[str, Tensor] | None:
        return {f"operand{k}": t for k, t in enumerate(a["operands"]) if is_param(t)} or None

    def capture(self, a: Bound, is_param: IsParam) -> tuple[list[Tensor | None], EinsumMeta]:
        """The operands, parameters left out when there is one (with several, each is an operand of the others' roles)."""
        ops = a["operands"]
        inputs, output = a["subscripts"]
        several = sum(map(is_param, ops)) > 1
        kept = [t if several or not is_param(t) else None for t in ops]
        return kept, EinsumMeta(tuple(inputs), output, tuple(tuple(t.shape) for t in ops), ops[0].device)

    def structure(self, role: str, operands: Sequence[Tensor | None], meta: EinsumMeta, y_shape: tuple[int, ...]) -> Structure:
        idx = int(role[len("operand") :])
        inputs: list[str] = []
        tensors: list[Tensor | None] = []
        for k, (letters, t) in enumerate(zip(meta.inputs, operands)):
            if k == idx:
                inputs.append(_distinct(letters, meta.shapes[k])[0])
                tensors.append(None)
            else:
                assert t is not None
                letters, t = _diagonals(letters, t)
                inputs.append(letters)
                tensors.append(t)
        theta, shape = _distinct(meta.inputs[idx], meta.shapes[idx])
        s = einsum_structure(inputs, meta.output, idx, tensors, shape, y_shape)
        return _repeated_theta(s, meta.inputs[idx], meta.shapes[idx], meta.device)


def _repeated_theta(s: Structure, letters: str, shape: Shape, device: torch.device) -> Structure:
    """``s`` (θ's distinct subscripts) for θ subscripted ``letters``: each repeated axis a new letter tied by an identity."""
    if len(set(letters)) == len(letters):
        return s
    used = set(s.y).union(s.theta, *[set(sub) for sub, _ in s.operands])
    fresh = iter(c for c in LETTERS[::-1] if c not in used and c not in letters)
    theta, operands, seen = "", list(s.operands), set()
    for ch, d in zip(letters, shape):
        if ch not in s.theta:  # a size-1 axis broadcast against a larger one: not part of θ's letters
            continue
        if ch in seen:
            new = next(fresh)
            operands.append((ch + new, torch.eye(d, device=device).unsqueeze(0)))
            ch = new
        seen.add(ch)
        theta += ch
    return dataclasses.replace(s, theta=theta, operands=operands)


@dataclasses.dataclass(frozen=True)
class AddMatMulMeta:
    """``beta * input + alpha * (mat1 @ mat2)``: the shapes of ``input`` and the two matrix operands, ``beta`` and ``alpha``."""

    input_shape: Shape
    mat_shapes: tuple[Shape, Shape]
    beta: complex | float
    alpha: complex | float


class _AddMatMul(Rule):
    """``beta * input + alpha * (mat1 @ mat2)`` (``addmm`` and its batched / vector variants).

    Roles: ``input`` (broadcast to the output, like a bias: ``∂y/∂input = beta``) and one
    of the two matrix operands (``∂y/∂θ`` is ``alpha`` times the other one, as in
    :class:`MatMul`). ``mats`` names the two matrix operands, ``subscripts`` their einsum.
    """

    static_meta = True
    mats: ClassVar[tuple[str, str]] = ("mat1", "mat2")
    subscripts: ClassVar[tuple[str, str, str]] = ("xy", "yz", "xz")

    def bind(self, args: tuple, kwargs: dict) -> Bound | None:
        names = ("input", *self.mats, "beta", "alpha", "out")
        a = bind(args, kwargs, names, {"beta": 1, "alpha": 1, "out": None})
        if a is None or a["out"] is not None or any(r not in a for r in ("input", *self.mats)):
            return None
        return a

    def match(self, a: Bound, is_param: IsParam) -> dict[str, Tensor] | None:
        m1, m2 = (a[r] for r in self.mats)
        if not all(_is_tensor(t) for t in (a["input"], m1, m2)) or is_param(m1) and is_param(m2):
            return None
        if not all(isinstance(a[s], numbers.Number) and not isinstance(a[s], bool) for s in ("beta", "alpha")):
            return None
        return {r: a[r] for r in ("input", *self.mats) if is_param(a[r])} or None

    def capture(self, a: Bound, is_param: IsParam) -> tuple[list[Tensor | None], AddMatMulMeta]:
        m1, m2 = (tuple(a[r].shape) for r in self.mats)
        meta = AddMatMulMeta(
            tuple(a["input"].shape), (m1, m2),
            complex(a["beta"]) if isinstance(a["beta"], complex) else float(a["beta"]),
            complex(a["alpha"]) if isinstance(a["alpha"], complex) else float(a["alpha"]),
        )
        return [None if is_param(a[r]) else a[r] for r in self.mats], meta

    def structure(self, role: str, operands: Sequence[Tensor | None], meta: AddMatMulMeta, y_shape: tuple[int, ...]) -> Structure:
        out = LETTERS[: len(y_shape)]
        if role == "input":  # broadcast against the output's trailing axes, as in add
            shape = meta.input_shape
            sub = LETTERS[len(y_shape) - len(shape) : len(y_shape)]
            return einsum_structure([sub], out, 0, [None], shape, y_shape, meta.beta)
        idx = self.mats.index(role)
        tensors = [None, operands[1]] if idx == 0 else [operands[0], None]
        sa, sb, so = self.subscripts
        return einsum_structure([sa, sb], so, idx, tensors, meta.mat_shapes[idx], y_shape, meta.alpha)


@register(torch.addmm, torch.Tensor.addmm)
class AddMM(_AddMatMul):
    """``addmm(input, mat1, mat2)``: ``(n, k) @ (k, m)`` plus ``input`` broadcast to ``(n, m)``.

    HuggingFace's GPT-2 ``Conv1D`` is ``addmm(bias, x.view(-1, in), W)`` with ``W`` of shape ``(in, out)``.

    >>> from ntkfunc.rules import lookup
    >>> rule = lookup(torch.addmm)
    >>> b, x, w = torch.randn(5), torch.randn(3, 4), torch.randn(4, 5)
    >>> bound = rule.bind((b, x, w), {})
    >>> sorted(rule.match(bound, lambda t: t is w or t is b))
    ['input', 'mat2']
    >>> ops, meta = rule.capture(bound, lambda t: t is w or t is b)
    >>> s = rule.structure("mat2", [o if o is None else o.unsqueeze(0) for o in ops], meta, (3, 5))
    >>> (s.y, s.theta, [letters for letters, _ in s.operands])
    ('xz', 'yz', ['xy'])
    """

    name = "addmm"


@register(torch.baddbmm, torch.Tensor.baddbmm)
class BAddBMM(_AddMatMul):
    """``baddbmm(input, batch1, batch2)``: ``(B, n, k) @ (B, k, m)`` plus ``input`` broadcast to ``(B, n, m)``."""

    name = "baddbmm"
    mats = ("batch1", "batch2")
    subscripts = ("axy", "ayz", "axz")


@register(torch.addbmm, torch.Tensor.addbmm)
class AddBMM(_AddMatMul):
    """``addbmm(input, batch1, batch2)``: ``Σ_B (B, n, k) @ (B, k, m)`` plus ``input`` broadcast to ``(n, m)``."""

    name = "addbmm"
    mats = ("batch1", "batch2")
    subscripts = ("axy", "ayz", "xz")


@register(torch.addmv, torch.Tensor.addmv)
class AddMV(_AddMatMul):
    """``addmv(input, mat, vec)``: ``(n, k) @ (k,)`` plus ``input`` broadcast to ``(n,)``."""

    name = "addmv"
    mats = ("mat", "vec")
    subscripts = ("xy", "y", "x")


@dataclasses.dataclass(frozen=True)
class BilinearMeta:
    """An ``F.bilinear`` call's settings: the weight's shape ``(out, in1, in2)``."""

    weight_shape: Shape


@register(torch.bilinear)
class Bilinear(Rule):
    """``F.bilinear(x1, x2, W, b)`` (``nn.Bilinear``): ``y[..., k] = Σ_ij x1[..., i] W[k, i, j] x2[..., j] + b[k]``.

    ``∂y/∂W`` is the outer product of the two inputs, so the NTK contribution of ``W`` is
    ``Σ_{p,q} (c₁[p]·c₂[q]) (x1₁[p]·x1₂[q]) (x2₁[p]·x2₂[q])`` over positions ``p, q``.

    >>> from ntkfunc.rules import lookup
    >>> rule = lookup(torch.nn.functional.bilinear)
    >>> x1, x2, w = torch.randn(3, 4), torch.randn(3, 2), torch.randn(5, 4, 2)
    >>> ops, meta = rule.capture(rule.bind((x1, x2, w), {}), lambda t: t is w)
    >>> s = rule.structure("weight", [o.unsqueeze(0) for o in ops], meta, (3, 5))
    >>> (s.y, s.theta, [letters for letters, _ in s.operands])
    ('az', 'zxy', ['ax', 'ay'])
    """

    static_meta = True
    name = "bilinear"
    names = ("input1", "input2", "weight", "bias")
    defaults = {"bias": None}

    def match(self, a: Bound, is_param: IsParam) -> dict[str, Tensor] | None:
        x1, x2, w = a["input1"], a["input2"], a["weight"]
        if not (_is_tensor(x1) and _is_tensor(x2) and _is_tensor(w)) or is_param(x1) or is_param(x2) or w.ndim != 3:
            return None
        return {r: a[r] for r in ("weight", "bias") if is_param(a[r])} or None

    def capture(self, a: Bound, is_param: IsParam) -> tuple[list[Tensor | None], BilinearMeta]:
        return [a["input1"], a["input2"]], BilinearMeta(tuple(a["weight"].shape))

    def structure(self, role: str, operands: Sequence[Tensor | None], meta: BilinearMeta, y_shape: tuple[int, ...]) -> Structure:
        lead = LETTERS[: len(y_shape) - 1]
        if role == "bias":
            return Structure(y_shape, lead + "z", "z", [])
        x1, x2 = operands
        return einsum_structure([lead + "x", "zxy", lead + "y"], lead + "z", 1, [x1, None, x2], meta.weight_shape, y_shape)
