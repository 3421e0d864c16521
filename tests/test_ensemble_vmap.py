"""Kernels under ``torch.func.vmap`` over a leading ensemble axis of ``params``."""

from __future__ import annotations

import dataclasses
import types

import pytest
import torch
from torch.utils import _pytree as pytree

import ntkfunc
from ntkfunc._engines import get_engine, registry
from tests.reference import max_rel_err, reference_kernel
from tests.zoo import CASES, implementations

_E = 3


def _ensemble(params):
    """Three perturbed copies of params, stacked along a new leading axis."""
    gen = torch.Generator().manual_seed(0)

    def stack(t):
        if not t.is_floating_point():
            return torch.stack([t] * _E)
        return torch.stack([t + 0.1 * k * torch.randn(t.shape, generator=gen, dtype=t.dtype) for k in range(_E)])

    return pytree.tree_map(stack, params)


def _member(stacked, i):
    return pytree.tree_map(lambda t: t[i], stacked)


def _setting(case):
    if case.name == "batch_axis_1":
        return (0,), ()
    return ((), ()) if case.out_ndim == 2 else ((1,), (2,))


@pytest.mark.parametrize("impl", implementations())
@pytest.mark.parametrize("case", CASES, ids=str)
def test_ntk_of_an_ensemble_in_one_vmapped_call(case, impl):
    f, params, x1, x2, vmap_axes = case.build(torch.float64)
    tr, dg = _setting(case)
    kernel = ntkfunc.ntk_fn(f, trace_axes=tr, diagonal_axes=dg, vmap_axes=vmap_axes, implementation=impl)
    stacked = _ensemble(params)
    if not get_engine(impl, api="test").param_vmap:
        with pytest.raises(NotImplementedError, match=r"does not support torch.func.vmap over params"):
            torch.func.vmap(kernel, in_dims=(None, None, 0))(x1, x2, stacked)
        return
    k = torch.func.vmap(kernel, in_dims=(None, None, 0))(x1, x2, stacked)
    for i in range(_E):  # member 0 against the float64 reference, the others against the unvmapped kernel
        p = _member(stacked, i)
        ref = reference_kernel(f, p, x1, x2, tr, dg) if i == 0 else kernel(x1, x2, p)
        assert max_rel_err(pytree.tree_map(lambda t, i=i: t[i], k), ref) <= 1e-10


@pytest.mark.parametrize("impl", implementations(param_vmap=True))
def test_ensemble_kernel_fn_nngp_and_symmetric(impl):
    case = next(c for c in CASES if c.name == "layernorm_mlp")
    f, params, x1, _, _ = case.build(torch.float64)
    stacked = _ensemble(params)
    k = torch.func.vmap(ntkfunc.kernel_fn(f, trace_axes=(), implementation=impl), in_dims=(None, None, None, 0))(
        x1, None, ("ntk", "nngp"), stacked)
    for i in range(_E):
        p = _member(stacked, i)
        assert max_rel_err(k.ntk[i], reference_kernel(f, p, x1, None, (), ())) <= 1e-10
        assert max_rel_err(k.nngp[i], ntkfunc.nngp_fn(f, trace_axes=())(x1, None, p)) <= 1e-12


def test_gradient_of_an_ensemble_kernel_matches_finite_differences():
    """grad(vmap(kernel)) w.r.t. x1: exact through the decomposed LayerNorm."""
    case = next(c for c in CASES if c.name == "layernorm_mlp")
    f, params, x1, x2, _ = case.build(torch.float64)
    stacked = _ensemble(params)
    kernel = ntkfunc.ntk_fn(f)
    loss = lambda x: (torch.func.vmap(kernel, in_dims=(None, None, 0))(x, x2, stacked) ** 2).sum()  # noqa: E731
    d = torch.randn(x1.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    fd = (loss(x1 + 1e-5 * d) - loss(x1 - 1e-5 * d)) / 2e-5
    g = torch.func.grad(loss)(x1)
    assert abs((g * d).sum() - fd) <= 1e-6 * abs(fd)


def test_implementation_without_param_vmap_says_so(monkeypatch):
    table = dict(registry.ENGINES)
    table[2] = dataclasses.replace(table[2], param_vmap=False)
    monkeypatch.setattr(registry, "ENGINES", types.MappingProxyType(table))
    case = CASES[0]
    f, params, x1, x2, _ = case.build(torch.float64)
    kernel = ntkfunc.ntk_fn(f, implementation=2)
    with pytest.raises(NotImplementedError, match=r"implementation=2\) does not support torch.func.vmap over params.*expected one of implementations \[0, 1"):
        torch.func.vmap(kernel, in_dims=(None, None, 0))(x1, x2, _ensemble(params))
    kernel(x1, x2, params)  # unbatched params still work
