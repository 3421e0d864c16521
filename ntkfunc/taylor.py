"""``linearize`` and ``taylor_expand``: Taylor series of ``f(params, x)`` in ``params``.

``taylor_expand(f, params0, degree)(params, x) = Σ_{k<=degree} D^k f(params0, x)[Δ, ..., Δ] / k!``
with ``Δ = params - params0``; the terms come from nested ``torch.func.jvp`` (one per
degree, all lower terms produced on the way). Normalisation ops are decomposed into
elementary ops (:func:`ntkfunc._core.ops.exact_higher_order`) because torch's fused
``layer_norm`` / ``batch_norm`` give wrong nested forward-mode derivatives, and the
result is differentiated again whenever it is trained.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch.func import jvp
from torch.utils import _pytree as pytree

from ntkfunc._core.batchable import BatchableOps
from ntkfunc._core.forward_ad import forward_ad_section
from ntkfunc._core.ops import exact_higher_order, load_forward_ad_decompositions, transform_friendly_attention
from ntkfunc._core.types import ApplyFn, PyTree


def _floating(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex())


def _check_like(params: PyTree, params0: PyTree, caller: str) -> None:
    with_path, spec = pytree.tree_flatten_with_path(params)
    with_path0, spec0 = pytree.tree_flatten_with_path(params0)
    if spec != spec0:
        names = [pytree.keystr(p) for p, _ in with_path]
        names0 = [pytree.keystr(p) for p, _ in with_path0]
        missing = [n for n in names0 if n not in names]
        extra = [n for n in names if n not in names0]
        raise ValueError(
            f"{caller}: params has a different structure than params0 (missing: {', '.join(missing) or 'none'}; "
            f"unexpected: {', '.join(extra) or 'none'}); expected the structure of params0, leaves {', '.join(names0)}"
        )
    for (path, a), (_, b) in zip(with_path, with_path0):
        name = pytree.keystr(path) or "params"
        if not isinstance(a, torch.Tensor):
            raise TypeError(f"{caller}: params{name} is a {type(a).__name__}; expected a torch.Tensor")
        if tuple(a.shape) != tuple(b.shape):
            raise ValueError(
                f"{caller}: params{name} has shape {tuple(a.shape)}; expected {tuple(b.shape)} as in params0"
            )


def _taylor_terms(f: ApplyFn, params0: PyTree, params: PyTree, x: PyTree, degree: int) -> tuple[list[list[torch.Tensor]], Any]:
    """``[D^k f(params0, x)[Δ]^k for k in 0..degree]`` (lists of output leaves, no 1/k!) and the output structure."""
    leaves0, spec = pytree.tree_flatten(params0)
    leaves = pytree.tree_leaves(params)
    diff = [i for i, t in enumerate(leaves0) if _floating(t)]
    primals = tuple(leaves0[i] for i in diff)
    tangents = tuple(leaves[i] - leaves0[i] for i in diff)
    specs: list[Any] = []

    def call(*diff_leaves: torch.Tensor) -> list[torch.Tensor]:
        full = list(leaves0)
        for i, t in zip(diff, diff_leaves):
            full[i] = t
        out, out_spec = pytree.tree_flatten(f(pytree.tree_unflatten(full, spec), x))
        specs.append(out_spec)
        return out

    def terms(k: int) -> Callable[..., list[list[torch.Tensor]]]:
        if k == 0:
            return lambda *p: [call(*p)]
        inner = terms(k - 1)

        def g(*p: torch.Tensor) -> list[list[torch.Tensor]]:
            lower, derivs = jvp(inner, p, tangents)[:2]  # derivs[j] = d/dε of term j: term j+1
            return list(lower) + [derivs[-1]]

        return g

    return terms(degree)(*primals), specs[0]


def taylor_expand(f: ApplyFn, params0: PyTree, degree: int) -> ApplyFn:
    """Returns ``f_taylor(params, x)``: the degree-``degree`` Taylor series of ``f`` in ``params`` at ``params0``.

    ``f_taylor(params, x) = Σ_{k=0}^{degree} D^k_params f(params0, x)[Δ, ..., Δ] / k!`` with
    ``Δ = params - params0`` (floating leaves; other leaves are taken from ``params0``).
    ``degree=0`` is ``f(params0, x)``, ``degree=1`` is :func:`linearize`. Costs about ``2^degree``
    forward passes per call. Differentiable in ``params`` (train it with ``torch.optim``)
    and in ``x``. Same output pytree and shapes as ``f``.

    Example:
      >>> import torch, ntkfunc
      >>> f = lambda p, x: torch.sin(x * p["w"]).sum(-1, keepdim=True)
      >>> p0, p = {"w": torch.tensor([0.3, 0.2])}, {"w": torch.tensor([0.31, 0.18])}
      >>> x = torch.ones(4, 2)
      >>> f2 = ntkfunc.taylor_expand(f, p0, 2)
      >>> f2(p, x).shape
      torch.Size([4, 1])
      >>> bool((f2(p, x) - f(p, x)).abs().max() < 1e-5)
      True
    """
    if isinstance(degree, bool) or not isinstance(degree, int):
        raise TypeError(f"taylor_expand(degree={degree!r}): expected a non-negative int")
    if degree < 0:
        raise ValueError(f"taylor_expand(degree={degree}): expected a non-negative int (0 is f(params0, x) itself)")
    leaves0 = pytree.tree_leaves(params0)
    if not any(_floating(t) for t in leaves0):
        raise ValueError("taylor_expand: params0 has no floating-point tensor; expected parameters to expand in")

    def f_taylor(params: PyTree, x: PyTree) -> PyTree:
        _check_like(params, params0, f"taylor_expand(degree={degree})")
        load_forward_ad_decompositions()
        with forward_ad_section(), transform_friendly_attention(), exact_higher_order(), BatchableOps(scalar_overloads=True):
            terms, spec = _taylor_terms(f, params0, params, x, degree)
        total = list(terms[0])
        for k in range(1, degree + 1):
            total = [a + b / math.factorial(k) for a, b in zip(total, terms[k])]
        return pytree.tree_unflatten(total, spec)

    f_taylor.__doc__ = f"Degree-{degree} Taylor series of {getattr(f, '__name__', 'f')} around params0: f_taylor(params, x)."
    return f_taylor


def linearize(f: ApplyFn, params0: PyTree) -> ApplyFn:
    """Returns ``f_lin(params, x) = f(params0, x) + J(params0, x) (params - params0)``.

    One ``torch.func.jvp`` per call. ``f_lin`` is differentiable in ``params`` (train the
    linearised model with ``torch.optim``) and ``x``; its NTK at any ``params`` is the NTK
    of ``f`` at ``params0``. ``params`` must have the structure and shapes of ``params0``.

    Example:
      >>> import torch, ntkfunc
      >>> model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
      >>> f, params0 = ntkfunc.from_module(model)
      >>> f_lin = ntkfunc.linearize(f, params0)
      >>> x = torch.randn(5, 3)
      >>> torch.allclose(f_lin(params0, x), f(params0, x))
      True
      >>> params = {k: v.clone().requires_grad_(True) for k, v in params0.items()}
      >>> loss = (f_lin(params, x) ** 2).mean()
      >>> loss.backward()
      >>> params["0.weight"].grad.shape
      torch.Size([8, 3])
    """
    f_lin = taylor_expand(f, params0, 1)
    f_lin.__doc__ = f"Linearisation of {getattr(f, '__name__', 'f')} around params0: f_lin(params, x)."
    return f_lin
