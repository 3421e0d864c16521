"""``linearize`` / ``taylor_expand`` against finite differences of ``f`` (float64)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils import _pytree as pytree

import ntkfunc
from tests.test_gradients import EXTRA
from tests.zoo import CASES, Case, GroupNormResBlock, _module_case

ALL = {c.name: c for c in CASES + EXTRA}
TAYLOR_CASES = ["mlp", "layernorm_mlp", "resblock_groupnorm", "attention_matmul", "multihead_attention",
                "batchnorm_eval_instancenorm_rmsnorm", "batchnorm_train_vmap_none", "pytree", "embedding_int_inputs"]



class SmoothResBlock(GroupNormResBlock):
    """The zoo's GroupNorm residual block with softplus for ReLU (finite differences of
    order 2 and 3 are meaningless across ReLU kinks; the ReLU block is covered at first order)."""

    def forward(self, x):
        h = self.conv2(torch.nn.functional.softplus(self.norm(self.conv1(x)))) + x
        return self.head(h.mean(dim=(2, 3)))


ALL["resblock_groupnorm"] = Case("resblock_groupnorm", _module_case(SmoothResBlock, lambda n, dt: torch.randn(n, 4, 5, 5).to(dt)), 2)


def _direction(params, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return pytree.tree_map(lambda t: scale * torch.randn(t.shape, dtype=t.dtype, generator=g) if t.is_floating_point() else torch.zeros_like(t), params)


def _along(params, direction, s):
    return pytree.tree_map(lambda p, d: p + s * d if p.is_floating_point() else p, params, direction)


def _flat(out):
    return torch.cat([t.reshape(-1) for t in pytree.tree_leaves(out)])


_STENCILS = {  # (offsets, weights, power of h): derivative estimates with O(h^4) error
    1: ([-2, -1, 1, 2], [1 / 12, -8 / 12, 8 / 12, -1 / 12], 1),
    2: ([-2, -1, 0, 1, 2], [-1 / 12, 16 / 12, -30 / 12, 16 / 12, -1 / 12], 2),
    3: ([-3, -2, -1, 1, 2, 3], [1 / 8, -1, 13 / 8, -13 / 8, 1, -1 / 8], 3),
}


def _fd_derivative(g, order, h):
    offsets, weights, power = _STENCILS[order]
    return sum(w * g(o * h) for o, w in zip(offsets, weights)) / h**power


def _poly_coefficients(g, degree):
    """Coefficients of a polynomial g(s) of the given degree, from degree + 1 exact values."""
    s = torch.arange(degree + 1, dtype=torch.float64) - degree // 2
    values = torch.stack([g(v.item()) for v in s])
    vander = torch.stack([s**k for k in range(degree + 1)], 1)
    return torch.linalg.solve(vander, values)


@pytest.mark.parametrize("name", TAYLOR_CASES)
def test_taylor_terms_match_finite_differences(name):
    f, params, x1, _, _ = ALL[name].build(torch.float64)
    degree = 3
    d = _direction(params, 0, scale=0.5)
    f_taylor = ntkfunc.taylor_expand(f, params, degree)
    coeffs = _poly_coefficients(lambda s: _flat(f_taylor(_along(params, d, s), x1)), degree)
    g = lambda s: _flat(f(_along(params, d, s), x1))  # noqa: E731
    assert torch.allclose(coeffs[0], g(0.0), rtol=0, atol=1e-12)
    scale = g(0.0).abs().max()
    for k in range(1, degree + 1):
        h = {1: 2e-3, 2: 5e-3, 3: 1e-2}[k]
        fd = _fd_derivative(g, k, h) / math.factorial(k)
        fd_half = _fd_derivative(g, k, h / 2) / math.factorial(k)
        richardson = (16 * fd_half - fd) / 15  # O(h^6)
        err = (richardson - coeffs[k]).abs().max() / max(richardson.abs().max(), 1e-3 * scale)
        tol = {1: 1e-7, 2: 1e-6, 3: 1e-4}[k]  # finite-difference round-off grows like eps / h^k
        assert err < tol, f"term {k}: relative error {err.item():.2e}"


def test_taylor_terms_of_a_polynomial_are_exact():
    """f cubic in w: degree 3 is exact everywhere, degree 2 misses exactly the cubic term."""
    f = lambda p, x: (x @ p["w"]) ** 3 + x @ p["v"] * (x @ p["w"])  # noqa: E731
    g = torch.Generator().manual_seed(1)
    p0 = {"w": torch.randn(3, 2, generator=g, dtype=torch.float64), "v": torch.randn(3, 2, generator=g, dtype=torch.float64)}
    p = {k: v + torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in p0.items()}
    x = torch.randn(4, 3, generator=g, dtype=torch.float64)
    assert torch.allclose(ntkfunc.taylor_expand(f, p0, 3)(p, x), f(p, x), atol=1e-12)
    assert torch.allclose(ntkfunc.taylor_expand(f, p0, 5)(p, x), f(p, x), atol=1e-12)
    cubic = (x @ (p["w"] - p0["w"])) ** 3
    assert torch.allclose(ntkfunc.taylor_expand(f, p0, 2)(p, x), f(p, x) - cubic, atol=1e-12)


@pytest.mark.parametrize("name", TAYLOR_CASES)
def test_linearize_equals_f_at_params0_and_degree_one(name):
    f, params, x1, _, _ = ALL[name].build(torch.float64)
    f_lin = ntkfunc.linearize(f, params)
    # equal up to rounding (normalisations are evaluated in elementary ops inside f_lin)
    assert torch.allclose(_flat(f_lin(params, x1)), _flat(f(params, x1)), rtol=1e-14, atol=1e-14)
    p = _along(params, _direction(params, 3, 0.1), 1.0)
    a, b = _flat(f_lin(p, x1)), _flat(ntkfunc.taylor_expand(f, params, 1)(p, x1))
    assert torch.equal(a, b)
    assert torch.allclose(_flat(ntkfunc.taylor_expand(f, params, 0)(p, x1)), _flat(f(params, x1)), rtol=1e-14, atol=1e-14)


def test_linearize_is_exact_for_a_model_linear_in_its_parameters():
    model = torch.nn.Linear(4, 3).double()
    f, params0 = ntkfunc.from_module(model)
    g = torch.Generator().manual_seed(2)
    params = {k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in params0.items()}
    x = torch.randn(6, 4, generator=g, dtype=torch.float64)
    assert torch.allclose(ntkfunc.linearize(f, params0)(params, x), f(params, x), atol=1e-13)


@pytest.mark.parametrize("name", ["layernorm_mlp", "batchnorm_eval_instancenorm_rmsnorm", "attention_matmul"])
def test_linearized_model_gradients_match_finite_differences(name):
    f, params0, x1, _, _ = ALL[name].build(torch.float64)
    f_lin = ntkfunc.linearize(f, params0)
    params = _along(params0, _direction(params0, 4, 0.1), 1.0)
    d = _direction(params0, 5)
    loss = lambda p: (_flat(f_lin(p, x1)) ** 2).sum() + _flat(f_lin(p, x1)).sin().sum()  # noqa: E731
    fd = (loss(_along(params, d, 1e-5)) - loss(_along(params, d, -1e-5))) / 2e-5
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    grads = torch.autograd.grad(loss(leaves), list(leaves.values()))
    ad = sum((gr * d[k]).sum() for gr, k in zip(grads, leaves))
    assert abs(ad - fd) <= 1e-7 * max(abs(fd), 1.0)
    fgrads = torch.func.grad(loss)(params)
    fad = sum((fgrads[k] * d[k]).sum() for k in params)
    assert abs(fad - fd) <= 1e-7 * max(abs(fd), 1.0)


def test_linearized_model_trains_with_torch_optim():
    f, params0, x1, _, _ = ALL["layernorm_mlp"].build(torch.float64)
    f_lin = ntkfunc.linearize(f, params0)
    params = {k: v.clone().requires_grad_(True) for k, v in params0.items()}
    y = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    opt = torch.optim.SGD(params.values(), lr=0.1)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = ((f_lin(params, x1) - y) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_taylor_bad_inputs():
    f, params0, x1, _, _ = ALL["mlp"].build(torch.float64)
    with pytest.raises(ValueError, match=r"degree=-1\): expected a non-negative int"):
        ntkfunc.taylor_expand(f, params0, -1)
    with pytest.raises(TypeError, match=r"degree=1.5\): expected a non-negative int"):
        ntkfunc.taylor_expand(f, params0, 1.5)
    f_lin = ntkfunc.linearize(f, params0)
    missing = {k: v for k, v in params0.items() if k != "0.bias"}
    with pytest.raises(ValueError, match=r"different structure than params0 \(missing: \['0.bias'\]; unexpected: none\); expected the structure"):
        f_lin(missing, x1)
    wrong = dict(params0, **{"0.bias": torch.zeros(7, dtype=torch.float64)})
    with pytest.raises(ValueError, match=r"params\['0.bias'\] has shape \(7,\); expected \(6,\) as in params0"):
        f_lin(wrong, x1)
