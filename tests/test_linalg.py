"""``ntkfunc.linalg``: Lanczos eigenvalues vs ``torch.linalg.eigvalsh``, CG vs a direct solve."""

from __future__ import annotations

import pytest
import torch

import ntkfunc
from ntkfunc.linalg import cg, lanczos, ntk_solve, top_eigenvalues
from tests.reference import full_jacobians
from tests.zoo import CASES

CASE_BY_NAME = {c.name: c for c in CASES}


def _psd(n, spectrum, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q @ torch.diag(torch.as_tensor(spectrum, dtype=torch.float64)) @ q.T


SPECTRA = {
    "decaying": lambda n: 10.0 ** -torch.linspace(0, 6, n),
    "low_rank": lambda n: torch.cat([torch.linspace(5, 1, 7), torch.zeros(n - 7)]),  # invariant subspace: restarts
    "clustered": lambda n: torch.cat([torch.tensor([3.0, 3.0, 3.0 - 1e-9, 2.0]), torch.rand(n - 4, generator=torch.Generator().manual_seed(1))]),
    "indefinite": lambda n: torch.linspace(-4, 2, n),
}


@pytest.mark.parametrize("k", [1, 5])
@pytest.mark.parametrize("name", list(SPECTRA))
def test_lanczos_matches_eigvalsh(name, k):
    n = 80
    a = _psd(n, SPECTRA[name](n))
    res = lanczos(lambda v: a @ v, n, k, return_eigenvectors=True)
    expected = torch.linalg.eigvalsh(a).flip(0)[:k]
    assert res.converged
    assert torch.allclose(res.eigenvalues, expected, rtol=1e-10, atol=1e-12 * expected.abs().max())
    vecs = res.eigenvectors
    assert vecs.shape == (n, k)
    assert torch.allclose(vecs.T @ vecs, torch.eye(k, dtype=torch.float64), atol=1e-8)
    resid = a @ vecs - vecs * res.eigenvalues
    assert resid.norm(dim=0).max() <= 1e-6 * expected.abs().max()


def test_lanczos_k_equals_n_is_exact():
    a = _psd(12, torch.cat([torch.ones(3), torch.zeros(9)]))  # rank 3: two restarts at least
    res = lanczos(lambda v: a @ v, 12, 12)
    assert res.iterations == 12
    assert torch.allclose(res.eigenvalues, torch.linalg.eigvalsh(a).flip(0), atol=1e-12)


def test_lanczos_warns_when_not_converged():
    a = _psd(200, torch.linspace(1, 1.01, 200))  # no gap: slow convergence
    with pytest.warns(RuntimeWarning, match=r"did not converge to tol=1e-12 in max_iter=8 products"):
        res = lanczos(lambda v: a @ v, 200, 3, max_iter=8, tol=1e-12)
    assert not res.converged and res.iterations == 8


def test_lanczos_errors():
    with pytest.raises(ValueError, match=r"lanczos\(k=0\): expected 1 <= k <= n = 5"):
        lanczos(lambda v: v, 5, 0)
    with pytest.raises(ValueError, match=r"lanczos\(max_iter=2\): expected k = 3 <= max_iter <= n = 5"):
        lanczos(lambda v: v, 5, 3, max_iter=2)
    with pytest.raises(ValueError, match=r"matvec returned shape \(4,\); expected \(5,\)"):
        lanczos(lambda v: v[:4], 5, 1)
    with pytest.raises(ValueError, match=r"lanczos\(n=0\): expected a positive operator size"):
        lanczos(lambda v: v, 0, 1)


def _dense_ntk(f, params, x):
    """``J Jᵀ`` over the flattened outputs of all leaves, from the float64 reference."""
    jacs, _ = full_jacobians(f, params, x)
    j = torch.cat([jac for _, jac in jacs])
    return j @ j.T


@pytest.mark.parametrize("name", ["mlp", "cnn", "pytree", "batchnorm_train_vmap_none", "batch_axis_1", "tied_weights"])
def test_top_eigenvalues_of_ntk(name):
    f, params, x1, _, _ = CASE_BY_NAME[name].build(torch.float64)
    dense = _dense_ntk(f, params, x1)
    k = 4
    vals, vecs = top_eigenvalues(f, x1, params, k=k, return_eigenvectors=True)
    expected = torch.linalg.eigvalsh(dense).flip(0)[:k]
    assert torch.allclose(vals, expected, rtol=1e-9, atol=1e-12 * expected[0])
    flat = torch.cat([t.reshape(k, -1) for t in torch.utils._pytree.tree_leaves(vecs)], dim=1).T  # (n, k)
    assert torch.allclose(dense @ flat, flat * vals, atol=1e-6 * expected[0])


def test_top_eigenvalues_match_ntk_fn_reshaped():
    f, params, x1, _, _ = CASE_BY_NAME["mlp"].build(torch.float64)
    theta = ntkfunc.ntk_fn(f, trace_axes=())(x1, None, params).permute(0, 2, 1, 3).reshape(15, 15)
    assert torch.allclose(top_eigenvalues(f, x1, params, k=15), torch.linalg.eigvalsh(theta).flip(0), atol=1e-10)


def test_top_eigenvalues_float32():
    f, params, x1, _, _ = CASE_BY_NAME["mlp"].build(torch.float32)
    vals = top_eigenvalues(f, x1, params, k=2)
    assert vals.dtype == torch.float32
    f64, p64, x64, _, _ = CASE_BY_NAME["mlp"].build(torch.float64)
    expected = torch.linalg.eigvalsh(_dense_ntk(f64, p64, x64)).flip(0)[:2]
    assert torch.allclose(vals.double(), expected, rtol=1e-4)


@pytest.mark.parametrize("cond", [1e1, 1e6])
def test_cg_matches_direct_solve(cond):
    n = 60
    a = _psd(n, torch.logspace(0, torch.log10(torch.tensor(cond)).item(), n))
    b = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    res = cg(lambda v: a @ v, b, tol=1e-10)
    assert res.converged and res.residual <= 1e-10
    direct = torch.linalg.solve(a, b)
    assert (res.x - direct).norm() / direct.norm() <= 1e-10 * cond


def test_cg_x0_zero_rhs_and_warning():
    a = _psd(30, torch.linspace(1, 100, 30))
    b = torch.randn(30, dtype=torch.float64)
    exact = torch.linalg.solve(a, b)
    res = cg(lambda v: a @ v, b, x0=exact, tol=1e-8)
    assert res.iterations == 0 and res.converged
    zero = cg(lambda v: a @ v, torch.zeros(30, dtype=torch.float64))
    assert zero.converged and not zero.x.any()
    with pytest.warns(RuntimeWarning, match=r"cg: relative residual .* > tol=1e-12 after 2 iterations"):
        assert not cg(lambda v: a @ v, b, tol=1e-12, max_iter=2).converged


def test_cg_errors():
    with pytest.raises(ValueError, match=r"cg: b has shape \(2, 2\); expected a vector"):
        cg(lambda v: v, torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"cg: x0 has shape \(3,\); expected \(2,\) like b"):
        cg(lambda v: v, torch.ones(2), x0=torch.zeros(3))
    with pytest.raises(ValueError, match=r"cg\(max_iter=0\): expected a positive number"):
        cg(lambda v: v, torch.ones(2), max_iter=0)


@pytest.mark.parametrize("name", ["mlp", "pytree", "batch_axis_1"])
def test_ntk_solve_matches_direct(name):
    f, params, x1, _, _ = CASE_BY_NAME[name].build(torch.float64)
    out = f(params, x1)
    gen = torch.Generator().manual_seed(0)
    y = torch.utils._pytree.tree_map(lambda t: torch.randn(t.shape, generator=gen, dtype=torch.float64), out)
    ridge = 1e-2
    res = ntk_solve(f, x1, params, y, ridge, tol=1e-12)
    assert res.converged
    leaves = torch.utils._pytree.tree_leaves(y)
    b = torch.cat([t.reshape(-1) for t in leaves])
    dense = _dense_ntk(f, params, x1)
    direct = torch.linalg.solve(dense + ridge * torch.eye(len(b), dtype=torch.float64), b)
    got = torch.cat([t.reshape(-1) for t in torch.utils._pytree.tree_leaves(res.x)])
    assert torch.utils._pytree.tree_structure(res.x) == torch.utils._pytree.tree_structure(y)
    assert (got - direct).norm() / direct.norm() <= 1e-8


def test_ntk_solve_predictions_on_new_points():
    """Kernel regression: predictions Θ(x_test, x) α from ntk_vp_fn equal the dense formula."""
    f, params, x1, x2, _ = CASE_BY_NAME["mlp"].build(torch.float64)
    y = torch.randn(5, 3, dtype=torch.float64)
    alpha = ntk_solve(f, x1, params, y, ridge=0.1, tol=1e-12).x
    pred = ntkfunc.ntk_vp_fn(f, x2, x1, params)(alpha)
    theta = ntkfunc.ntk_fn(f, trace_axes=())
    k_train = theta(x1, None, params).permute(0, 2, 1, 3).reshape(15, 15)
    k_test = theta(x2, x1, params).permute(0, 2, 1, 3).reshape(9, 15)
    direct = k_test @ torch.linalg.solve(k_train + 0.1 * torch.eye(15, dtype=torch.float64), y.reshape(-1))
    assert torch.allclose(pred.reshape(-1), direct, atol=1e-9)


def test_ntk_solve_errors():
    f, params, x1, _, _ = CASE_BY_NAME["mlp"].build(torch.float64)
    with pytest.raises(ValueError, match=r"ntk_solve\(ridge=-1\): expected a non-negative number"):
        ntk_solve(f, x1, params, torch.zeros(5, 3, dtype=torch.float64), -1)
    with pytest.raises(ValueError, match=r"y has shape \(5, 2\) \(leaf 0\); expected \(5, 3\)"):
        ntk_solve(f, x1, params, torch.zeros(5, 2, dtype=torch.float64), 0.1)
