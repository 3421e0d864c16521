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
  >>> rule.match((x, w), {}, lambda t: t is w)
  {'weight': ...}
  >>> s = rule.structure("weight", [x.unsqueeze(0)], {}, (1, 3, 5))
  >>> (s.y, s.theta, [letters for letters, _ in s.operands])
  ('abz', 'zy', ['aby'])
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

from ntkfunc.rules import LETTERS, Rule, Structure, Tensor, bind, einsum_structure, register


def _is_tensor(t: Any) -> bool:
    return isinstance(t, torch.Tensor)


@register(F.linear)
class Linear(Rule):
    """``F.linear(x, W, b) = x Wᵀ + b``: x ``(..., i)``, W ``(o, i)``, b ``(o,)``."""

    name = "linear"
    _names = ("input", "weight", "bias")

    def match(self, args: tuple, kwargs: dict, is_param) -> Optional[dict[str, Tensor]]:  # type: ignore[no-untyped-def]
        a = bind(args, kwargs, self._names, {"bias": None})
        if a is None or is_param(a["input"]) or not _is_tensor(a["weight"]) or a["weight"].ndim != 2:
            return None
        return {r: a[r] for r in ("weight", "bias") if is_param(a[r])}

    def capture(self, args: tuple, kwargs: dict, is_param) -> tuple[list, dict[str, Any]]:  # type: ignore[no-untyped-def]
        a = bind(args, kwargs, self._names, {"bias": None})
        assert a is not None
        return [a["input"]], {}

    def structure(self, role: str, operands: Sequence[Tensor], meta: dict[str, Any], y_shape: tuple[int, ...]) -> Structure:
        k = len(y_shape) - 1
        lead = LETTERS[:k]
        if role == "bias":
            return Structure(y_shape, lead + "z", "z", [])
        (x,) = operands
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


class _EinsumLike(Rule):
    """A two-operand product where exactly one operand is a parameter."""

    def operands_of(self, args: tuple, kwargs: dict) -> Optional[tuple[Any, Any]]:
        raise NotImplementedError(f"Subclass {type(self).__name__} must define operands_of()")

    def subscripts(self, a: Tensor, b: Tensor) -> tuple[str, str, str]:
        raise NotImplementedError(f"Subclass {type(self).__name__} must define subscripts()")

    def match(self, args: tuple, kwargs: dict, is_param) -> Optional[dict[str, Tensor]]:  # type: ignore[no-untyped-def]
        ops = self.operands_of(args, kwargs)
        if ops is None or not all(_is_tensor(t) for t in ops):
            return None
        a, b = ops
        if is_param(a) == is_param(b):
            return None
        return {"lhs": a} if is_param(a) else {"rhs": b}

    def capture(self, args: tuple, kwargs: dict, is_param) -> tuple[list, dict[str, Any]]:  # type: ignore[no-untyped-def]
        ops = self.operands_of(args, kwargs)
        assert ops is not None
        a, b = ops
        return [None if is_param(t) else t for t in ops], {"subscripts": self.subscripts(a, b), "shapes": (tuple(a.shape), tuple(b.shape))}

    def structure(self, role: str, operands: Sequence[Tensor], meta: dict[str, Any], y_shape: tuple[int, ...]) -> Structure:
        sa, sb, out = meta["subscripts"]
        idx = 0 if role == "lhs" else 1
        tensors = [None, operands[1]] if idx == 0 else [operands[0], None]
        return einsum_structure([sa, sb], out, idx, tensors, meta["shapes"][idx], y_shape)


@register(torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm)
class MatMul(_EinsumLike):
    """``a @ b`` (``matmul``, ``mm``) with broadcasting batch axes and 1-D operands."""

    name = "matmul"

    def operands_of(self, args: tuple, kwargs: dict) -> Optional[tuple[Any, Any]]:
        if kwargs.get("out") is not None or len(args) + len(kwargs) != 2:
            return None
        a = bind(args, {k: v for k, v in kwargs.items() if k != "out"}, ("input", "other"), {})
        if a is None or "input" not in a or "other" not in a:
            return None
        return a["input"], a["other"]

    def subscripts(self, a: Tensor, b: Tensor) -> tuple[str, str, str]:
        return matmul_subscripts(a.ndim, b.ndim)


@register(torch.Tensor.__rmatmul__)
class RMatMul(MatMul):
    """``a @ θ`` dispatched to ``θ.__rmatmul__(a)``."""

    name = "matmul"

    def operands_of(self, args: tuple, kwargs: dict) -> Optional[tuple[Any, Any]]:
        ops = super().operands_of(args, kwargs)
        return None if ops is None else (ops[1], ops[0])


@register(torch.bmm, torch.Tensor.bmm)
class BMM(MatMul):
    """``bmm(a, b)``: ``(B, n, k) @ (B, k, m)``."""

    name = "bmm"

    def subscripts(self, a: Tensor, b: Tensor) -> tuple[str, str, str]:
        return "axy", "ayz", "axz"


def parse_einsum(equation: str, ndims: Sequence[int]) -> Optional[tuple[list[str], str]]:
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

    name = "einsum"

    def _parse(self, args: tuple, kwargs: dict) -> Optional[tuple[str, list[Any]]]:
        if kwargs or not args or not isinstance(args[0], str):
            return None
        ops = list(args[1]) if len(args) == 2 and isinstance(args[1], (list, tuple)) else list(args[1:])
        if not all(_is_tensor(t) for t in ops):
            return None
        return args[0], ops

    def match(self, args: tuple, kwargs: dict, is_param) -> Optional[dict[str, Tensor]]:  # type: ignore[no-untyped-def]
        parsed = self._parse(args, kwargs)
        if parsed is None:
            return None
        eq, ops = parsed
        which = [k for k, t in enumerate(ops) if is_param(t)]
        subs = parse_einsum(eq, [t.ndim for t in ops])
        if len(which) != 1 or subs is None or any(len(set(s)) != len(s) for s in subs[0]):
            return None
        return {f"operand{which[0]}": ops[which[0]]}

    def capture(self, args: tuple, kwargs: dict, is_param) -> tuple[list, dict[str, Any]]:  # type: ignore[no-untyped-def]
        parsed = self._parse(args, kwargs)
        assert parsed is not None
        eq, ops = parsed
        return [None if is_param(t) else t for t in ops], {"subscripts": parse_einsum(eq, [t.ndim for t in ops]), "shapes": [tuple(t.shape) for t in ops]}

    def structure(self, role: str, operands: Sequence[Tensor], meta: dict[str, Any], y_shape: tuple[int, ...]) -> Structure:
        inputs, out = meta["subscripts"]
        idx = int(role[len("operand") :])
        tensors = [None if k == idx else t for k, t in enumerate(operands)]
        return einsum_structure(inputs, out, idx, tensors, meta["shapes"][idx], y_shape)
