"""``ntk_vp_fn``: NTK-vector products ``v ↦ Θ(x1, x2) v`` without forming ``Θ``.

``Θ(x1, x2) v = J(x1) (J(x2)ᵀ v)``: one VJP of ``f`` at the whole batch ``x2`` (the
parameter cotangent ``J(x2)ᵀ v``, shaped like ``params``), then one JVP at the whole
batch ``x1``. No per-sample ``vmap`` is involved, so it is exact for models whose
samples interact too (BatchNorm with batch statistics); it matches
``ntk_fn(f, trace_axes=(), vmap_axes=None)``. Semantics follow
``neural_tangents.empirical_ntk_vp_fn``: ``Θ`` is the full kernel, nothing traced or
averaged.

Cost per product: one backward pass at ``x2`` (the forward pass at ``x2`` is done once,
when the function is built, and its activations are kept for all later products) and
one forward-mode pass at ``x1``. Memory: the activations of ``f`` at ``x2`` plus those
of one JVP at ``x1``; nothing of size ``N1 x N2`` or ``N x P``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.func import jvp, vjp
from torch.utils import _pytree as pytree

from ntkfunc._core.batchable import BatchableOps
from ntkfunc._core.forward_ad import forward_ad_section
from ntkfunc._core.ops import load_forward_ad_decompositions, transform_friendly_attention
from ntkfunc._core.problem import Params
from ntkfunc._core.types import ApplyFn, PyTree
from ntkfunc._engines.vp import jvp_by_double_vjp


def _check_outputs(out: PyTree, name: str) -> tuple[list[torch.Tensor], Any]:
    leaves, spec = pytree.tree_flatten(out)
    for k, o in enumerate(leaves):
        if not isinstance(o, torch.Tensor) or not (o.is_floating_point() or o.is_complex()):
            what = o.dtype if isinstance(o, torch.Tensor) else type(o).__name__
            raise TypeError(f"ntk_vp_fn: f(params, {name}) returned {what} as output leaf {k}; expected floating-point tensors")
    return leaves, spec


class NtkVp:
    """``Θ(x1, x2) v`` as a callable; built by :func:`ntk_vp_fn`.

    Attributes:
      in_shapes: shapes of the leaves of ``f(params, x2)`` (what ``v`` must look like).
      out_shapes: shapes of the leaves of ``f(params, x1)`` (what the product looks like).
      dtype / device: those of ``f``'s outputs.
    """

    def __init__(self, f: ApplyFn, x1: PyTree, x2: PyTree | None, params: PyTree) -> None:
        p = Params.make(params, "ntk_vp_fn")
        self._params = p
        diff = [t.detach() for t in p.diff_leaves]

        def at(x: PyTree) -> Callable[[list[torch.Tensor]], PyTree]:
            return lambda d: f(p.rebuild(d), x)

        self._f1 = at(x1)
        self._diff = diff
        with transform_friendly_attention(), BatchableOps():
            try:
                out2, self._vjp2 = vjp(at(x1 if x2 is None else x2), diff)[:2]
            except RuntimeError:  # say so if f returns integers (no derivative), else re-raise
                with torch.no_grad():
                    _check_outputs(f(params, x1 if x2 is None else x2), "x1" if x2 is None else "x2")
                raise
            out1 = out2 if x2 is None else f(p.rebuild(diff), x1)
        leaves2, self._spec2 = _check_outputs(out2, "x1" if x2 is None else "x2")
        leaves1, self._spec1 = _check_outputs(out1, "x1")
        self.in_shapes = [tuple(o.shape) for o in leaves2]
        self.out_shapes = [tuple(o.shape) for o in leaves1]
        self._dtypes = [o.dtype for o in leaves2]
        self.dtype = leaves1[0].dtype
        self.device = leaves1[0].device
        self._push: Callable = jvp

    def _check(self, v: PyTree, name: str = "v") -> list[torch.Tensor]:
        leaves, spec = pytree.tree_flatten(v)
        if spec != self._spec2:
            raise ValueError(
                f"ntk_vp_fn: {name} has structure {pytree.treespec_pprint(spec)}; expected the structure of "
                f"f(params, x2): {pytree.treespec_pprint(self._spec2)}"
            )
        for k, (t, shape, dtype) in enumerate(zip(leaves, self.in_shapes, self._dtypes)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"ntk_vp_fn: {name} leaf {k} is a {type(t).__name__}; expected a tensor of shape {shape}")
            if tuple(t.shape) != shape:
                raise ValueError(f"ntk_vp_fn: {name} has shape {tuple(t.shape)} (leaf {k}); expected {shape}, the shape of f(params, x2)")
            if t.dtype != dtype:
                raise TypeError(f"ntk_vp_fn: {name} has dtype {t.dtype} (leaf {k}); expected {dtype}, the dtype of f(params, x2)")
        return leaves

    def __call__(self, v: PyTree) -> PyTree:
        """``Θ(x1, x2) v``: ``v`` shaped like ``f(params, x2)``, result like ``f(params, x1)``."""
        self._check(v)
        load_forward_ad_decompositions()
        with forward_ad_section(), transform_friendly_attention(), BatchableOps(scalar_overloads=True):
            (tangents,) = self._vjp2(v)  # J(x2)ᵀ v: a list, one tensor per differentiated parameter
            try:
                _, out = self._push(self._f1, (self._diff,), (tangents,))
            except NotImplementedError as err:  # an op without a forward-mode derivative
                if "forward AD" not in str(err) or self._push is jvp_by_double_vjp:
                    raise
                self._push = jvp_by_double_vjp
                _, out = self._push(self._f1, (self._diff,), (tangents,))
        return out

    def matvec(self, vec: torch.Tensor) -> torch.Tensor:
        """The product on flat vectors: ``vec`` of length ``Σ numel(f(x2))`` -> length ``Σ numel(f(x1))``."""
        sizes = [int(torch.Size(s).numel()) for s in self.in_shapes]
        if vec.ndim != 1 or vec.numel() != sum(sizes):
            raise ValueError(f"ntk_vp_fn: matvec got shape {tuple(vec.shape)}; expected a vector of length {sum(sizes)}")
        parts = [c.reshape(s) for c, s in zip(vec.split(sizes), self.in_shapes)]
        out = self(pytree.tree_unflatten(parts, self._spec2))
        return torch.cat([o.reshape(-1) for o in pytree.tree_leaves(out)])


def ntk_vp_fn(f: ApplyFn, x1: PyTree, x2: PyTree | None, params: PyTree) -> NtkVp:
    """Returns ``ntk_vp(v) = Θ(x1, x2) v``, never materialising ``Θ``.

    ``Θ(x1, x2)`` is the full eNTK, ``J(x1) J(x2)ᵀ`` with ``J`` the Jacobian of the whole
    batched output with respect to all floating-point parameters (as
    ``neural_tangents.empirical_ntk_vp_fn``; no trace, no averaging). ``x2=None`` means
    ``x2 = x1``. ``v`` must have the structure, shapes and dtype of ``f(params, x2)``; the
    product has those of ``f(params, x1)``. ``ntk_vp.matvec`` works on flat vectors (for
    ``ntkfunc.linalg``).

    Shapes: ``f(params, x): (N, O)``; ``v: (N2, O)`` -> ``(N1, O)``; equals
    ``einsum("ijab,jb->ia", ntk_fn(f, trace_axes=())(x1, x2, params), v)``.

    Example:
      >>> import torch, ntkfunc
      >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
      >>> f, params = ntkfunc.from_module(model)
      >>> x1, x2 = torch.randn(5, 4), torch.randn(2, 4)
      >>> ntk_vp = ntkfunc.ntk_vp_fn(f, x1, x2, params)
      >>> v = torch.randn(2, 3)
      >>> ntk_vp(v).shape
      torch.Size([5, 3])
      >>> theta = ntkfunc.ntk_fn(f, trace_axes=())(x1, x2, params)  # (5, 2, 3, 3)
      >>> bool(torch.allclose(ntk_vp(v), torch.einsum("ijab,jb->ia", theta, v), atol=1e-5))
      True
    """
    return NtkVp(f, x1, x2, params)

