"""``ntk_vp_fn`` against ``Θ v`` with ``Θ = J(x1) J(x2)ᵀ`` from float64 reference Jacobians."""

from __future__ import annotations

import pytest
import torch
from torch.utils import _pytree as pytree

import ntkfunc
from tests.reference import full_jacobians, max_rel_err
from tests.zoo import CASES

CASE_BY_NAME = {c.name: c for c in CASES}


def theta_v_reference(f, params, x1, x2, v):
    """``J(x1) J(x2)ᵀ v`` over all output leaves (cross-leaf blocks included)."""
    j1, spec = full_jacobians(f, params, x1)
    j2 = j1 if x2 is None else full_jacobians(f, params, x2)[0]
    jv = sum(jac.T @ t.double().reshape(-1) for (_, jac), t in zip(j2, pytree.tree_leaves(v)))  # (P,)
    return pytree.tree_unflatten([(jac @ jv).reshape(shape) for shape, jac in j1], spec)


def _random_like(tree, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return pytree.tree_map(lambda t: torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.dtype), tree)


@pytest.mark.parametrize("x2_given", [True, False], ids=["x2", "x2None"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_reference(case, x2_given):
    f, params, x1, x2, _ = case.build(torch.float64)
    x2 = x2 if x2_given else None
    ntk_vp = ntkfunc.ntk_vp_fn(f, x1, x2, params)
    v = _random_like(f(params, x1 if x2 is None else x2))
    out = ntk_vp(v)
    ref = theta_v_reference(f, params, x1, x2, v)
    assert pytree.tree_structure(out) == pytree.tree_structure(ref)
    assert max_rel_err(out, ref) <= 1e-10
    v2 = _random_like(v, seed=1)  # a second product reuses the x2 forward pass
    assert max_rel_err(ntk_vp(v2), theta_v_reference(f, params, x1, x2, v2)) <= 1e-10


def test_matches_dense_kernel_of_ntk_fn():
    f, params, x1, x2, _ = CASE_BY_NAME["cnn"].build(torch.float64)
    v = torch.randn(3, 3, dtype=torch.float64)
    theta = ntkfunc.ntk_fn(f, trace_axes=())(x1, x2, params)  # (5, 3, 3, 3)
    assert max_rel_err(ntkfunc.ntk_vp_fn(f, x1, x2, params)(v), torch.einsum("ijab,jb->ia", theta, v)) <= 1e-10


def test_matvec_on_flat_vectors():
    f, params, x1, x2, _ = CASE_BY_NAME["pytree"].build(torch.float64)
    op = ntkfunc.ntk_vp_fn(f, x1, x2, params)
    v = _random_like(f(params, x2))
    flat = torch.cat([t.reshape(-1) for t in pytree.tree_leaves(v)])
    expected = torch.cat([t.reshape(-1) for t in pytree.tree_leaves(op(v))])
    assert torch.allclose(op.matvec(flat), expected, rtol=0, atol=1e-14)
    assert op.in_shapes == [(3, 2), (3, 4)] and op.out_shapes == [(5, 2), (5, 4)]
    with pytest.raises(ValueError, match=r"matvec got shape \(5,\); expected a vector of length 18"):
        op.matvec(torch.zeros(5, dtype=torch.float64))


def test_float32_stays_float32():
    f, params, x1, x2, _ = CASE_BY_NAME["mlp"].build(torch.float32)
    out = ntkfunc.ntk_vp_fn(f, x1, x2, params)(torch.randn(3, 3))
    assert out.dtype == torch.float32 and out.shape == (5, 3)


def test_forward_ad_fallback(monkeypatch):
    """Ops without a forward-mode derivative: the JVP is taken as the transpose of a VJP."""
    import ntkfunc.ntk_vp as mod

    def no_forward_ad(*args, **kwargs):
        raise NotImplementedError("Trying to use forward AD with some_op that does not support it")

    monkeypatch.setattr(mod, "jvp", no_forward_ad)
    f, params, x1, x2, _ = CASE_BY_NAME["layernorm_mlp"].build(torch.float64)
    op = ntkfunc.ntk_vp_fn(f, x1, x2, params)
    v = torch.randn(3, 3, dtype=torch.float64)
    assert max_rel_err(op(v), theta_v_reference(f, params, x1, x2, v)) <= 1e-10


def test_implementation_2_forward_ad_fallback(monkeypatch):
    """The same fallback in ntk_fn(implementation=2) (it used to unpack the tangents wrongly)."""
    import ntkfunc._engines.vp as vp

    def no_forward_ad(*args, **kwargs):
        raise NotImplementedError("Trying to use forward AD with some_op that does not support it")

    monkeypatch.setattr(vp, "jvp", no_forward_ad)
    f, params, x1, x2, _ = CASE_BY_NAME["layernorm_mlp"].build(torch.float64)
    ref = ntkfunc.ntk_fn(f, trace_axes=(), implementation=1)(x1, x2, params)
    assert max_rel_err(ntkfunc.ntk_fn(f, trace_axes=(), implementation=2)(x1, x2, params), ref) <= 1e-10


def test_other_errors_propagate(monkeypatch):
    import ntkfunc.ntk_vp as mod

    def broken(*args, **kwargs):
        raise NotImplementedError("something else")

    monkeypatch.setattr(mod, "jvp", broken)
    f, params, x1, x2, _ = CASE_BY_NAME["mlp"].build(torch.float64)
    with pytest.raises(NotImplementedError, match="something else"):
        ntkfunc.ntk_vp_fn(f, x1, x2, params)(torch.zeros(3, 3, dtype=torch.float64))


def test_large_n_never_forms_the_kernel():
    """N = 10,000 with O = 10: Θ would take 80 GB in float64; the product takes a few passes."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10)).double()
    f, params = ntkfunc.from_module(model)
    x = torch.randn(10_000, 8, dtype=torch.float64)
    out = ntkfunc.ntk_vp_fn(f, x, None, params)(torch.randn(10_000, 10, dtype=torch.float64))
    assert out.shape == (10_000, 10) and torch.isfinite(out).all()
    # Spot check rows against J(x_i) (J(x)ᵀ v) from torch.func directly.
    small = x[:50]
    v = torch.randn(50, 10, dtype=torch.float64)
    assert max_rel_err(ntkfunc.ntk_vp_fn(f, small[:7], small, params)(v), theta_v_reference(f, params, small[:7], small, v)) <= 1e-10


def test_bad_v_is_refused():
    f, params, x1, x2, _ = CASE_BY_NAME["mlp"].build(torch.float64)
    op = ntkfunc.ntk_vp_fn(f, x1, x2, params)
    with pytest.raises(ValueError, match=r"v has shape \(5, 3\) \(leaf 0\); expected \(3, 3\), the shape of f\(params, x2\)"):
        op(torch.zeros(5, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"v has dtype torch.float32 \(leaf 0\); expected torch.float64"):
        op(torch.zeros(3, 3))
    with pytest.raises(ValueError, match=r"v has structure .*; expected the structure of f\(params, x2\)"):
        op([torch.zeros(3, 3, dtype=torch.float64)] * 2)
    with pytest.raises(TypeError, match=r"v leaf 0 is a float; expected a tensor of shape \(3, 3\)"):
        op(1.0)


def test_integer_output_is_refused():
    with pytest.raises(TypeError, match=r"f\(params, x1\) returned torch.int64 as output leaf 0; expected floating-point"):
        ntkfunc.ntk_vp_fn(lambda p, x: (x @ p).argmax(-1), torch.randn(3, 2), None, torch.randn(2, 2))
