"""``nngp_fn`` against the outer product of outputs; ``kernel_fn`` against ``ntk_fn`` / ``nngp_fn``."""

from __future__ import annotations

import pytest
import torch
from torch.utils import _pytree as pytree

import ntkfunc
from tests.reference import max_rel_err, reference_nngp
from tests.test_ntk import PARAMS, _pick_x2
from tests.zoo import CASES, implementations


@pytest.mark.parametrize("symmetric", [False, True], ids=["x2", "x2None"])
@pytest.mark.parametrize("case,tr,dg", PARAMS)
def test_nngp_matches_outer_product(case, tr, dg, symmetric):
    f, params, x1, x2, vmap_axes = case.build(torch.float64)
    x2 = _pick_x2(case, tr, dg, x1, x2, vmap_axes, symmetric)
    k = ntkfunc.nngp_fn(f, trace_axes=tr, diagonal_axes=dg, vmap_axes=vmap_axes)(x1, x2, params)
    ref = reference_nngp(f, params, x1, x2, tr, dg)
    assert pytree.tree_structure(k) == pytree.tree_structure(ref)
    assert max_rel_err(k, ref) <= 1e-12


def test_nngp_by_hand():
    w = torch.randn(3, 2, dtype=torch.float64)
    x1, x2 = torch.randn(4, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    f = lambda p, x: x @ p  # noqa: E731
    o1, o2 = x1 @ w, x2 @ w
    assert torch.allclose(ntkfunc.nngp_fn(f)(x1, x2, w), o1 @ o2.T / 2)
    assert torch.allclose(ntkfunc.nngp_fn(f, trace_axes=())(x1, x2, w), torch.einsum("ia,jb->ijab", o1, o2))
    assert torch.allclose(ntkfunc.nngp_fn(f, trace_axes=(), diagonal_axes=(-1,))(x1, x2, w), torch.einsum("ia,ja->ija", o1, o2))
    assert torch.allclose(ntkfunc.nngp_fn(f, trace_axes=(0,))(x1, None, w), o1.T @ o1 / 4)


def test_nngp_bad_axes():
    f = lambda p, x: x @ p  # noqa: E731
    w, x = torch.randn(3, 2), torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"trace_axes=\(5,\).*out of range"):
        ntkfunc.nngp_fn(f, trace_axes=(5,))(x, None, w)
    with pytest.raises(ValueError, match=r"traced and diagonal axes must match, axis 0 differs \(4 vs 2\)"):
        ntkfunc.nngp_fn(f, trace_axes=(0,))(x, x[:2], w)


@pytest.mark.parametrize("impl", implementations())
@pytest.mark.parametrize("name", ["mlp", "attention_matmul", "pytree", "batchnorm_train_vmap_none"])
def test_kernel_fn_matches_ntk_fn_and_nngp_fn(name, impl):
    case = next(c for c in CASES if c.name == name)
    f, params, x1, x2, vmap_axes = case.build(torch.float64)
    tr = () if case.out_ndim == 2 else (1,)
    kfn = ntkfunc.kernel_fn(f, trace_axes=tr, vmap_axes=vmap_axes, implementation=impl)
    ntk = ntkfunc.ntk_fn(f, trace_axes=tr, vmap_axes=vmap_axes, implementation=impl)
    nngp = ntkfunc.nngp_fn(f, trace_axes=tr, vmap_axes=vmap_axes)
    for x2_ in (x2, None):
        both = kfn(x1, x2_, ("ntk", "nngp"), params)
        assert type(both).__name__ == "Kernel" and both._fields == ("ntk", "nngp")
        assert max_rel_err(both.ntk, ntk(x1, x2_, params)) == 0
        assert max_rel_err(both.nngp, nngp(x1, x2_, params)) == 0
        flipped = kfn(x1, x2_, ("nngp", "ntk"), params)
        assert flipped._fields == ("nngp", "ntk")
        assert max_rel_err(kfn(x1, x2_, "nngp", params), flipped.nngp) == 0
        assert max_rel_err(kfn(x1, x2_, "ntk", params), flipped.ntk) == 0


def test_kernel_fn_bad_get():
    f, params, x1, x2, _ = CASES[0].build(torch.float64)
    k = ntkfunc.kernel_fn(f)
    with pytest.raises(ValueError, match=r"get='ntkk' contains 'ntkk'; expected 'ntk', 'nngp'"):
        k(x1, x2, "ntkk", params)
    with pytest.raises(ValueError, match=r"get=\('ntk', 'cov'\) contains 'cov'; expected"):
        k(x1, x2, ("ntk", "cov"), params)
    with pytest.raises(ValueError, match=r"get=\(\); expected 'ntk', 'nngp' or a non-empty tuple"):
        k(x1, x2, (), params)
    with pytest.raises(ValueError, match=r"repeats a kernel"):
        k(x1, x2, ("ntk", "ntk"), params)
    with pytest.raises(ValueError, match=r"implementation=7; expected .auto. or one of"):
        ntkfunc.kernel_fn(f, implementation=7)


def test_nngp_refuses_batch_coupled_functions_unless_vmap_axes_none():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)).double().train()
    f, params = ntkfunc.from_module(model, vmap_axes=None)
    x = torch.randn(5, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"vmap_axes=0.*BatchNorm.*pass vmap_axes=None"):
        ntkfunc.nngp_fn(f)
    assert ntkfunc.nngp_fn(f, vmap_axes=None)(x, None, params).shape == (5, 5)
