"""Linear family: ``F.linear``, ``matmul`` / ``@`` / ``mm`` / ``bmm`` and ``einsum`` with one parameter operand.

Every op here is an einsum ``y = einsum(a, θ)``, so ``∂y/∂θ`` is the einsum with θ
removed; for ``y = x Wᵀ + b`` the NTK contribution of ``W`` is
``Σ_{p,q} (c₁[p]·c₂[q]) (x₁[p]·x₂[q])`` over positions ``p, q``, and opt_einsum picks
that Gram path or the Jacobian path, whichever is cheaper.

Example:
  >>> import torch
  >>> from ntkfunc.rules import lookup
  >>> rule = lookup(torch.nn.functional.linear)
  >>> x, w = torch.randn(1, 3, 4), torch.randn(5, 4)
  >>> rule.match(rule.bind((x, w), {}), lambda t: t is w)
  {'weight': ...}
  >>> s = rule.structure("weight", [x.unsqueeze(0)], {}, (1, 3, 5))
  >>> (s.y, s.theta, [letters for letters, _ in s.operands])
  ('abz', 'zy', ['aby'])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ntkfunc.rules.base import LETTERS, Bound, IsParam, Rule, Structure, Tensor, bind, einsum_structure, register


def _is_tensor(t: Any) -> bool:
    return isinstance(t, torch.Tensor)


@register(F.linear)
class Linear(Rule):
    """``F.linear(x, W, b) = x Wᵀ + b``: x ``(..., i)``, W ``(o, i)``, b ``(o,)``."""

    static_meta = True
    name = "linear"
    names = ("input", "weight", "bias")
    defaults = {"bias": None}

    def match(self, a: Bound, is_param: IsParam) -> dict[str, Tensor] | None:
        if is_param(a["input"]) or not _is_tensor(a["weight"]) or a["weight"].ndim != 2:
            return None
        return {r: a[r] for r in ("weight", "bias") if is_param(a[r])} or None

    def capture(self, a: Bound, is_param: IsParam) -> tuple[list[Tensor | None], dict[str, Any]]:
        return [a["input"]], {}

    def structure(self, role: str, operands: Sequence[Tensor | None], meta: dict[str, Any], y_shape: tuple[int, ...]) -> Structure:
        k = len(y_shape) - 1
        lead = LETTERS[:k]
        if role == "bias":
            return Structure(y_shape, lead + "z", "z", [])
        (x,) = operands
        assert x is not None
        return einsum_structure([lead + "y", "zy"], lead + "z", 1, [x, None], (y_shape[-1], x.shape[-1]), y_shape)


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

    def capture(self, a: Bound, is_param: IsParam) -> tuple[list[Tensor | None], dict[str, Any]]:
        x, y = a["input"], a["other"]
        meta = {"subscripts": self.subscripts(x, y), "shapes": (tuple(x.shape), tuple(y.shape))}
        return [None if is_param(t) else t for t in (x, y)], meta

    def structure(self, role: str, operands: Sequence[Tensor | None], meta: dict[str, Any], y_shape: tuple[int, ...]) -> Structure:
        sa, sb, out = meta["subscripts"]
        idx = 0 if role == "lhs" else 1
        tensors = [None, operands[1]] if idx == 0 else [operands[0], None]
        return einsum_structure([sa, sb], out, idx, tensors, meta["shapes"][idx], y_shape)


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


@register(torch.einsum)
class Einsum(Rule):
    """``torch.einsum(eq, *operands)`` where exactly one operand is a parameter, used once."""

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
        if subs is None or any(len(set(s)) != len(s) for s in subs[0]):
            return None
        return {"equation": args[0], "operands": ops, "subscripts": subs}

    def match(self, a: Bound, is_param: IsParam) -> dict[str, Tensor] | None:
        which = [k for k, t in enumerate(a["operands"]) if is_param(t)]
        if len(which) != 1:
            return None
        return {f"operand{which[0]}": a["operands"][which[0]]}

    def capture(self, a: Bound, is_param: IsParam) -> tuple[list[Tensor | None], dict[str, Any]]:
        ops = a["operands"]
        return [None if is_param(t) else t for t in ops], {"subscripts": a["subscripts"], "shapes": [tuple(t.shape) for t in ops]}

    def structure(self, role: str, operands: Sequence[Tensor | None], meta: dict[str, Any], y_shape: tuple[int, ...]) -> Structure:
        inputs, out = meta["subscripts"]
        idx = int(role[len("operand") :])
        tensors = [None if k == idx else t for k, t in enumerate(operands)]
        return einsum_structure(inputs, out, idx, tensors, meta["shapes"][idx], y_shape)
