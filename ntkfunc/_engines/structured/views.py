"""Parameters used through views, and parameters used by several primitives (tied weights).

**Views.** ``cls_token.expand(n, -1, -1)``, ``gamma.reshape(1, -1, 1, 1)``, ``W.T``: the
primitive consumes ``v = view(θ)``, and its rule describes ``∂y/∂v``. Every view in
:data:`VIEW_FUNCS` addresses θ's storage by strides, ``v[i] = θ.flat[offset + Σ_d i_d s_d]``
(:class:`ViewMap`), so ``∂y/∂θ`` is ``∂y/∂v`` summed over the entries of ``v`` that
address the same entry of θ:

- axes of stride 0 (``expand``) are summed on each side: their letters leave ``θ``'s;
- the other axes address distinct entries of θ (checked: the view is *injective*), so a
  sum over θ's entries is a sum over them: the rule's structure serves as it is, with its
  θ letters reordered by stride (most significant first) so that they enumerate θ's entries
  in row-major order, as a rule on θ itself does.

**Tying.** A parameter consumed by uses ``u = 1..m`` (primitives and roles, possibly
through views) contributes ``Σ_{u,w} (c₁ᵤ ∂yᵤ/∂θ)(c₂_w ∂y_w/∂θ)ᵀ``: every pair of uses,
cross terms included. Each use's structure, in :func:`canonical` form (θ letters of size
> 1 in row-major order), is one factorisation of θ's entries; two uses pair up when these
factorisations have the same sizes (:func:`theta_sizes`), the second relabelled onto the
first (:func:`relabel`). The capture checks all of this once, on the first sample
(:func:`check_uses`); a parameter whose uses cannot be paired falls back to Jacobian
contraction, with the reason.

Example:
  >>> import torch
  >>> w = torch.zeros(3, 4)
  >>> vm = ViewMap.of(w.T, w, ("Tensor.T",))
  >>> vm.broadcast, vm.injective, vm.bijective
  ((), True, True)
  >>> ViewMap.of(torch.zeros(1, 1, 8).expand(5, 1, 8), None, ("expand",))
  'expected a view of the parameter'
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch

from ntkfunc import rules
from ntkfunc.rules import LETTERS, Structure

_T = torch.Tensor

VIEW_FUNCS: frozenset[Any] = frozenset({
    _T.view, _T.view_as, _T.reshape, _T.reshape_as, _T.expand, _T.expand_as, _T.broadcast_to,
    _T.unsqueeze, _T.squeeze, _T.flatten, _T.unflatten, _T.transpose, _T.swapaxes, _T.swapdims,
    _T.permute, _T.t, _T.movedim, _T.moveaxis, _T.narrow, _T.select, _T.__getitem__, _T.diagonal,
    _T.to, _T.type_as, _T.contiguous,
    vars(torch._C.TensorBase)["T"].__get__, vars(torch._C.TensorBase)["mT"].__get__,  # the attribute views W.T, W.mT
    torch.reshape, torch.broadcast_to, torch.unsqueeze, torch.squeeze, torch.flatten, torch.unflatten,
    torch.transpose, torch.swapaxes, torch.swapdims, torch.permute, torch.t, torch.movedim, torch.moveaxis,
    torch.narrow, torch.select, torch.diagonal,
})
"""Torch functions whose result, when it shares the parameter's storage and dtype, is a view the capture follows.

A call of one of them that copies (``reshape`` of a non-viewable layout, advanced indexing,
``to`` another dtype) gives a tensor that is not a view of θ: its consumer sees an
unknown tensor, and θ falls back, as for any op without a rule.
"""


def is_view_func(func: Any) -> bool:
    """Whether ``func`` is one of :data:`VIEW_FUNCS` (unhashable callables are not)."""
    try:
        return func in VIEW_FUNCS
    except TypeError:
        return False


@dataclasses.dataclass(frozen=True)
class ViewMap:
    """How a view ``v`` addresses the entries of a contiguous parameter θ.

    Attributes:
      chain: the view functions applied to θ, in order (for ``explain``).
      shape / stride: ``v``'s shape and strides (in elements of θ).
      offset: the position in θ of ``v``'s first element.
      numel: θ's number of elements.
    """

    chain: tuple[str, ...]
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    numel: int

    @staticmethod
    def of(view: torch.Tensor, root: torch.Tensor | None, chain: tuple[str, ...]) -> ViewMap | str:
        """The map of ``view`` onto ``root``, or the reason there is none (a copy, a non-contiguous parameter)."""
        if root is None or view.untyped_storage().data_ptr() != root.untyped_storage().data_ptr():
            return "expected a view of the parameter"
        if not root.is_contiguous():
            return f"the parameter (strides {tuple(root.stride())}) is not contiguous"
        if view.dtype != root.dtype:
            return f"the view has dtype {view.dtype}, the parameter {root.dtype}"
        return ViewMap(chain, tuple(view.shape), tuple(view.stride()), int(view.storage_offset() - root.storage_offset()), root.numel())

    @property
    def broadcast(self) -> tuple[int, ...]:
        """Axes of size > 1 and stride 0 (``expand``): every entry along them is the same entry of θ."""
        return tuple(d for d, (n, s) in enumerate(zip(self.shape, self.stride)) if n > 1 and s == 0)

    @property
    def kept(self) -> tuple[int, ...]:
        """Axes of size > 1 that step through θ, most significant (largest stride) first."""
        axes = [d for d, (n, s) in enumerate(zip(self.shape, self.stride)) if n > 1 and s != 0]
        return tuple(sorted(axes, key=lambda d: -abs(self.stride[d])))

    @property
    def kept_numel(self) -> int:
        return math.prod(self.shape[d] for d in self.kept)

    @property
    def injective(self) -> bool:
        """Whether the kept axes address distinct entries of θ (positive, non-overlapping strides)."""
        span = 1
        for d in reversed(self.kept):  # least significant first
            if self.stride[d] < span:
                return False
            span = self.stride[d] * self.shape[d]
        return True

    @property
    def covers(self) -> bool:
        """Whether the kept axes address every entry of θ exactly once (a permutation of θ's entries)."""
        if not self.injective or self.offset != 0 or self.kept_numel != self.numel:
            return False
        span = 1
        for d in reversed(self.kept):
            if self.stride[d] != span:
                return False
            span *= self.shape[d]
        return True

    @property
    def bijective(self) -> bool:
        """Every entry of ``v`` is a distinct entry of θ, and every entry of θ is one of them."""
        return self.covers and not self.broadcast

    @property
    def trivial(self) -> bool:
        """``v`` is θ itself, reshaped at most (its entries in θ's order, nothing summed)."""
        return self.bijective and list(self.kept) == sorted(self.kept)

    def describe(self) -> str:
        return " -> ".join(self.chain)


def letter_sizes(s: Structure) -> dict[str, int]:
    """The size of every letter of a structure (from ``y`` and its operands)."""
    sizes = dict(zip(s.y, s.y_shape))
    for letters, t in s.operands:
        sizes.update(zip(letters, (int(d) for d in t.shape[1:])))
    return sizes


def canonical(s: Structure) -> Structure:
    """``s`` with θ letters of size 1 dropped (summing over one entry is no sum): the form that uses of a tied θ share."""
    sizes = letter_sizes(s)
    theta = "".join(ch for ch in s.theta if sizes[ch] > 1)
    return s if theta == s.theta else dataclasses.replace(s, theta=theta)


def theta_sizes(s: Structure) -> tuple[int, ...]:
    """The sizes of the θ letters of ``s`` (in order)."""
    sizes = letter_sizes(s)
    return tuple(sizes[ch] for ch in s.theta)


def _runs(s: Structure, shape: Sequence[int]) -> list[str] | None:
    """Per axis of ``v`` (of ``shape``), the run of θ letters of ``s`` that enumerate it; None if they do not align."""
    sizes = letter_sizes(s)
    letters = [ch for ch in s.theta if sizes[ch] > 1]
    runs, i = [], 0
    for n in shape:
        run, prod = "", 1
        while prod < n and i < len(letters):
            run += letters[i]
            prod *= sizes[letters[i]]
            i += 1
        if prod != n:
            return None
        runs.append(run)
    return runs if i == len(letters) else None


class ViewError(ValueError):
    """A use of a parameter through a view that the rule's structure cannot be composed with."""


def compose(s: Structure, vm: ViewMap | None, *, tied: bool) -> Structure:
    """The structure of ``∂y/∂θ`` from the rule's ``∂y/∂v`` (``vm``: how ``v`` addresses θ; None: ``v`` is θ).

    ``tied``: θ has other uses, so the θ letters must enumerate θ's entries in row-major
    order (:func:`canonical`). Raises :class:`ViewError` when the view is not injective, or
    when it needs the rule's θ letters aligned with its axes and they are not.

    >>> s = Structure((1, 3, 4), "abc", "abc", [])          # y = x + v, v of shape (1, 3, 4)
    >>> p = torch.zeros(1, 1, 4)
    >>> vm = ViewMap.of(p.expand(1, 3, 4), p, ("expand",))
    >>> compose(s, vm, tied=False).theta                    # the expanded axis b is summed per side
    'c'
    """
    if vm is None or vm.trivial:
        return canonical(s) if tied else s
    if not vm.injective:
        raise ViewError(f"the view ({vm.describe()}) addresses some entries of the parameter twice")
    if not vm.broadcast and not tied:
        return s  # a sum over v's entries is a sum over the entries of θ it addresses
    runs = _runs(s, vm.shape)
    if runs is None:
        raise ViewError(
            f"the rule's parameter axes of sizes {theta_sizes(s)} do not align with the axes {vm.shape} of the view ({vm.describe()})"
        )
    if tied and not vm.covers:
        raise ViewError(f"the view ({vm.describe()}) selects part of the parameter, and the parameter has other uses")
    return dataclasses.replace(s, theta="".join(runs[d] for d in vm.kept))


def theta_numel(vm: ViewMap | None, numel: int) -> int:
    """How many entries of θ the (composed) structure enumerates: all, or the part a view selects."""
    return numel if vm is None or vm.covers else vm.kept_numel


def relabel(s: Structure, theta: str) -> Structure:
    """``s`` with its θ letters renamed, in order, to ``theta`` and its other letters to letters not in ``theta``.

    >>> s = Structure((2, 3), "ab", "b", [])
    >>> r = relabel(s, "a")
    >>> (r.y, r.theta)
    ('Za', 'a')
    """
    if len(theta) != len(s.theta):
        raise RuntimeError(f"relabel: {len(s.theta)} parameter letters {s.theta!r}, asked for {theta!r}")
    mapping = dict(zip(s.theta, theta))
    free = iter(ch for ch in LETTERS[::-1] if ch not in theta)
    for ch in s.y + "".join(sub for sub, _ in s.operands):
        if ch not in mapping:
            mapping[ch] = next(free)
    return Structure(
        s.y_shape, "".join(mapping[ch] for ch in s.y), theta,
        [("".join(mapping[ch] for ch in sub), t) for sub, t in s.operands], s.scale,
    )


def refine(s: Structure, shape: Sequence[int]) -> Structure:
    """``s`` (canonical) with θ letters split to enumerate the axes of ``shape`` (those of size > 1), where they align.

    A use through ``W.flatten(1)`` names a convolution kernel ``(o, i, kh, kw)`` by two letters of
    sizes ``(o, i kh kw)``, a use of ``W`` itself by four: split, both factor θ the same way and
    pair up. A letter of size ``n₁ n₂`` becomes two letters wherever it occurs; ``y`` (a view of the
    output) and the operands are reshaped row-major, as θ's entries are enumerated. ``s`` comes back
    unchanged where its letters are not runs of ``shape``'s axes.

    >>> s = Structure((5,), "x", "xy", [("y", torch.zeros(1, 12))])
    >>> r = refine(s, (5, 3, 4))
    >>> (r.theta, [(sub, tuple(t.shape)) for sub, t in r.operands])
    ('xya', [('ya', (1, 3, 4))])
    """
    target = [int(d) for d in shape if d > 1]
    sizes = letter_sizes(s)
    runs, i = [], 0
    for ch in s.theta:
        run, prod = [], 1
        while prod < sizes[ch] and i < len(target):
            run.append(target[i])
            prod *= target[i]
            i += 1
        if prod != sizes[ch]:
            return s
        runs.append(run)
    if i != len(target) or all(len(r) <= 1 for r in runs):
        return s
    used = set(s.y + s.theta + "".join(sub for sub, _ in s.operands))
    fresh = iter(ch for ch in LETTERS if ch not in used)
    split = {ch: (ch + "".join(next(fresh) for _ in run[1:]), run) for ch, run in zip(s.theta, runs) if len(run) > 1}

    def letters(sub: str) -> str:
        return "".join(split[ch][0] if ch in split else ch for ch in sub)

    def dims(sub: str, shape: Sequence[int]) -> list[int]:
        return [d for ch, n in zip(sub, shape) for d in (split[ch][1] if ch in split else [int(n)])]

    operands = [(letters(sub), t.reshape(t.shape[0], *dims(sub, t.shape[1:]))) for sub, t in s.operands]
    return Structure(tuple(dims(s.y, s.y_shape)), letters(s.y), letters(s.theta), operands, s.scale)


def use_structure(rule: rules.Rule, role: str, operands: Sequence[torch.Tensor | None], meta: rules.Meta,
                  y_shape: tuple[int, ...], vm: ViewMap | None, tied: bool, theta_shape: Sequence[int]) -> Structure:
    """One use's checked structure of ``∂y/∂θ``: the rule's, composed with its view (:func:`compose`).

    The use of a tied parameter is refined (:func:`refine`) to the parameter's own axes, so that its uses pair up.
    """
    st = compose(rule.structure(role, operands, meta, y_shape), vm, tied=tied)
    numel = theta_numel(vm, math.prod(theta_shape))
    shape = tuple(theta_shape) if numel == math.prod(theta_shape) else (numel,)
    if tied:
        st = refine(st, shape)
    return rules.check_structure(st, rule=rule.name, role=role, theta_shape=shape)


def check_uses(structures: Sequence[Structure]) -> str | None:
    """None when the uses of one parameter can be paired (same factorisation of θ), else the reason."""
    sizes = {theta_sizes(s) for s in structures}
    if len(sizes) > 1:
        return f"its {len(structures)} uses factor it differently ({' vs '.join(map(str, sorted(sizes)))})"
    return None
