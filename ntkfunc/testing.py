"""Testing kernels and rules the way ntkfunc tests itself: against an independent float64 reference.

- :func:`reference_kernel` / :func:`reference_nngp`: empirical kernels by the definition. No
  vmap, no per-sample tricks, no einsum subscripts: the whole batch goes through ``f`` at
  once, the Jacobian of every output entry with respect to the flattened parameter vector
  comes from ``torch.autograd.functional.jacobian``, the full kernel is ``J1 @ J2.T``, and
  traces / diagonals are taken one axis pair at a time with ``torch.diagonal``. Slow, obviously
  correct, and sharing no code with the engines.
- :func:`check_rule`: for a model whose primitives have structured rules (yours included),
  that implementation 3 uses the rules you expect and gives the reference's kernel and the
  kernel with every rule switched off (:func:`ntkfunc.rules.disabled`), for several output
  settings, with ``x2`` and with ``x2=None``.
- :func:`max_rel_err`: ``max |a - b| / max |b|`` over the leaves of two pytrees.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch.utils import _pytree as pytree

from ntkfunc import rules
from ntkfunc._core.types import ApplyFn, Axes, PyTree, VMapAxes
from ntkfunc.explain import Explanation, explain
from ntkfunc.ntk import ntk_fn

Settings = Sequence[tuple[Axes, Axes]]
"""``(trace_axes, diagonal_axes)`` pairs."""


def _flat_params(params: PyTree) -> tuple[torch.Tensor, Callable[[torch.Tensor], PyTree]]:
    leaves, spec = pytree.tree_flatten(params)
    diff = [i for i, t in enumerate(leaves) if t.is_floating_point()]
    theta = torch.cat([leaves[i].detach().double().reshape(-1) for i in diff])

    def unflatten(vec: torch.Tensor) -> PyTree:
        out, offset = list(leaves), 0
        for i in diff:
            n = leaves[i].numel()
            out[i] = vec[offset : offset + n].reshape(leaves[i].shape)
            offset += n
        return pytree.tree_unflatten(out, spec)

    return theta, unflatten


def full_jacobians(f: ApplyFn, params: PyTree, x: PyTree) -> tuple[list[tuple[tuple[int, ...], torch.Tensor]], Any]:
    """Per output leaf: ``(output shape, Jacobian of shape (output numel, P))`` in float64; and the output structure."""
    theta, unflatten = _flat_params(params)
    outs = pytree.tree_leaves(f(unflatten(theta), x))
    result = []
    for k, o in enumerate(outs):

        def leaf_fn(vec: torch.Tensor, k: int = k) -> torch.Tensor:
            return pytree.tree_leaves(f(unflatten(vec), x))[k].reshape(-1)

        jac = torch.autograd.functional.jacobian(leaf_fn, theta)
        result.append((tuple(o.shape), jac))
    return result, pytree.tree_structure(f(unflatten(theta), x))


def trace_and_diagonal(full: torch.Tensor, ndim: int, trace_axes: Axes, diagonal_axes: Axes) -> torch.Tensor:
    """``full`` has shape ``(*s1, *s2)``; apply neural-tangents' trace (averaged) / diagonal rule.

    >>> trace_and_diagonal(torch.eye(2).reshape(1, 2, 1, 2), 2, (-1,), ()).shape
    torch.Size([1, 1])
    """
    trace_axes = (trace_axes,) if isinstance(trace_axes, int) else trace_axes
    diagonal_axes = (diagonal_axes,) if isinstance(diagonal_axes, int) else diagonal_axes
    trace = sorted({a % ndim for a in trace_axes})
    diag = sorted({a % ndim for a in diagonal_axes})
    interleave = [p for i in range(ndim) for p in (i, ndim + i)]
    k = full.permute(interleave)  # (s1[0], s2[0], s1[1], s2[1], ...)
    size = 1
    for i in reversed(range(ndim)):
        if i in trace:
            size *= k.shape[2 * i]
            k = torch.diagonal(k, dim1=2 * i, dim2=2 * i + 1).sum(-1)
        elif i in diag:
            k = torch.diagonal(k, dim1=2 * i, dim2=2 * i + 1).movedim(-1, 2 * i)
    # Positions after processing: an untouched pair stays adjacent, in order.
    return k / size


def reference_kernel(f: ApplyFn, params: PyTree, x1: PyTree, x2: PyTree | None, trace_axes: Axes = (-1,), diagonal_axes: Axes = ()) -> PyTree:
    """The empirical NTK in float64 by the definition (the same pytree as ``f``'s output).

    Axes count on the whole output of ``f`` (batch axis included), as in ``ntk_fn``.

    >>> import torch
    >>> f = lambda p, x: torch.tanh(x @ p["w"])
    >>> p, x = {"w": torch.randn(3, 2, dtype=torch.float64)}, torch.randn(4, 3, dtype=torch.float64)
    >>> reference_kernel(f, p, x, None).shape
    torch.Size([4, 4])
    """
    j1, spec = full_jacobians(f, params, x1)
    j2 = j1 if x2 is None else full_jacobians(f, params, x2)[0]
    kernels = []
    for (s1, a), (s2, b) in zip(j1, j2):
        full = (a @ b.T).reshape(*s1, *s2)
        kernels.append(trace_and_diagonal(full, len(s1), trace_axes, diagonal_axes))
    return pytree.tree_unflatten(kernels, spec)


def reference_nngp(f: ApplyFn, params: PyTree, x1: PyTree, x2: PyTree | None, trace_axes: Axes = (-1,), diagonal_axes: Axes = ()) -> PyTree:
    """``f(x1) f(x2)ᵀ`` in float64 with the same output-axis rule."""
    o1 = pytree.tree_leaves(f(params, x1))
    o2 = o1 if x2 is None else pytree.tree_leaves(f(params, x2))
    spec = pytree.tree_structure(f(params, x1))
    kernels = []
    for a, b in zip(o1, o2):
        full = torch.einsum("i,j->ij", a.double().reshape(-1), b.double().reshape(-1)).reshape(*a.shape, *b.shape)
        kernels.append(trace_and_diagonal(full, a.ndim, trace_axes, diagonal_axes))
    return pytree.tree_unflatten(kernels, spec)


def max_rel_err(a: PyTree, b: PyTree) -> float:
    """``max |a - b| / max |b|`` over all leaves (``b`` the reference; shapes must match).

    The finite entries of ``b`` set the scale; a non-finite entry counts as equal only to the same
    value at the same place (NaN to NaN, ``inf`` to ``inf``), any other mismatch makes the error ``inf``
    (a NaN in ``a`` where ``b`` is finite is never within a tolerance).

    >>> max_rel_err(torch.ones(2), 2 * torch.ones(2))
    0.5
    >>> max_rel_err(torch.tensor([1.0, float("nan")]), torch.ones(2))
    inf
    >>> max_rel_err(torch.tensor([1.0, float("nan")]), torch.tensor([1.0, float("nan")]))
    0.0
    """
    la, lb = pytree.tree_leaves(a), pytree.tree_leaves(b)
    if len(la) != len(lb):
        raise AssertionError(f"max_rel_err: {len(la)} leaves against {len(lb)}")
    err = 0.0
    for x, y in zip(la, lb):
        if tuple(x.shape) != tuple(y.shape):
            raise AssertionError(f"max_rel_err: shapes {tuple(x.shape)} and {tuple(y.shape)} differ")
        x, y = x.double(), y.double()
        finite = torch.isfinite(y)
        same = (x == y) | (x.isnan() & y.isnan())  # non-finite entries must match exactly
        if not bool((finite | same).all()) or not bool(torch.isfinite(x[finite]).all()):
            return math.inf
        if not bool(finite.any()):
            continue
        scale = y[finite].abs().max().item() or 1.0
        err = max(err, (x[finite] - y[finite]).abs().max().item() / scale)
    return err


def _double(tree: PyTree) -> PyTree:
    return pytree.tree_map(lambda t: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t, tree)


def check_rule(
    f: ApplyFn,
    params: PyTree,
    x1: PyTree,
    x2: PyTree | None = None,
    *,
    expected: Mapping[str, str] | None = None,
    settings: Settings = (((), ()), ((-1,), ())),
    vmap_axes: VMapAxes = 0,
    tol: float = 1e-10,
) -> Explanation:
    """Check implementation 3 on ``f`` the way ntkfunc's rule tests do; returns ``explain``'s report.

    ``params``, ``x1`` and ``x2`` are cast to float64 (their floating leaves). Then:

    1. with ``expected`` (parameter name -> ``"rule:role"``, as ``explain`` names them), the
       parameters named there are handled by that rule (they did not fall back);
    2. for ``x2`` (if given) and ``x2=None``, and every ``(trace_axes, diagonal_axes)`` of
       ``settings``, the kernel of implementation 3 with every rule in use
       (:func:`ntkfunc.rules.forced`) agrees to ``tol`` (relative to its largest
       entry) with :func:`reference_kernel` and with implementation 3 under
       :func:`ntkfunc.rules.disabled` (every parameter from its reverse-mode Jacobian).

    An AssertionError says which parameter or setting failed, with the errors found.

    Example:
      >>> import torch, torch.nn.functional as F
      >>> p = {"w": torch.randn(5, 4), "b": torch.randn(5)}
      >>> f = lambda p, x: F.linear(torch.tanh(x), p["w"], p["b"])
      >>> report = check_rule(f, p, torch.randn(3, 4), torch.randn(2, 4),
      ...                     expected={"w": "linear:weight", "b": "linear:bias"})
      >>> [r.rule for r in report.params]
      ['linear:weight', 'linear:bias']
    """
    params, x1 = _double(params), _double(x1)
    x2 = None if x2 is None else _double(x2)
    report = explain(f, params, x1, trace_axes=settings[0][0], diagonal_axes=settings[0][1], vmap_axes=vmap_axes)
    got = {p.name: p.rule for p in report.params}
    for name, rule in (expected or {}).items():
        if name not in got:
            raise AssertionError(f"check_rule: no parameter {name!r}; the parameters are {sorted(got)}")
        if got[name] != rule:
            detail = next(p.detail for p in report.params if p.name == name)
            raise AssertionError(f"check_rule: {name} is handled by {got[name] or 'the fallback'} ({detail}); expected {rule}\n{report}")
    for x2_ in ([x2] if x2 is not None else []) + [None]:
        for tr, dg in settings:
            kernel = ntk_fn(f, trace_axes=tr, diagonal_axes=dg, vmap_axes=vmap_axes, implementation=3)
            with rules.forced():  # every matching rule, even where reverse mode would be cheaper
                k = kernel(x1, x2_, params)
            with rules.disabled():
                fallback = kernel(x1, x2_, params)
            ref = reference_kernel(f, params, x1, x2_, tr, dg)
            errors = {"reference": max_rel_err(k, ref), "rules disabled": max_rel_err(k, fallback)}
            if max(errors.values()) > tol:
                which = "x2=None" if x2_ is None else "x2"
                raise AssertionError(f"check_rule: trace_axes={tr}, diagonal_axes={dg}, {which}: relative errors {errors} > {tol}")
    return report
