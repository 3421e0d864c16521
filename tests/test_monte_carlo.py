"""``monte_carlo_kernel_fn``: the mean of explicit empirical kernels over the same draws."""

from __future__ import annotations

import pytest
import torch

import ntkfunc
from ntkfunc.monte_carlo import sample_seeds
from tests.reference import max_rel_err, reference_kernel, reference_nngp
from tests.zoo import implementations


def _init(gen):
    return {
        "w": torch.randn(3, 16, generator=gen, dtype=torch.float64),
        "b": 0.1 * torch.randn(16, generator=gen, dtype=torch.float64),
        "v": torch.randn(16, 2, generator=gen, dtype=torch.float64),
    }


def _f(p, x):
    return torch.tanh(x @ p["w"] + p["b"]) @ p["v"] / 4.0


def _x(n, seed):
    return torch.randn(n, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("impl", implementations())
@pytest.mark.parametrize("batch_size", [1, 3, None])
def test_mean_of_reference_kernels_over_the_same_draws(impl, batch_size):
    n = 5
    x1, x2 = _x(4, 0), _x(3, 1)
    mc = ntkfunc.monte_carlo_kernel_fn(_f, _init, n, trace_axes=(), implementation=impl, seed=7, batch_size=batch_size)
    k = mc(x1, x2)
    assert k._fields == ("nngp", "ntk")
    draws = [_init(torch.Generator().manual_seed(s)) for s in sample_seeds(7, n)]
    ntk = sum(reference_kernel(_f, p, x1, x2, (), ()) for p in draws) / n
    nngp = sum(reference_nngp(_f, p, x1, x2, (), ()) for p in draws) / n
    assert max_rel_err(k.ntk, ntk) <= 1e-10
    assert max_rel_err(k.nngp, nngp) <= 1e-10
    assert max_rel_err(mc(x1, None, "ntk"), sum(reference_kernel(_f, p, x1, None, (), ()) for p in draws) / n) <= 1e-10


def test_deterministic_for_a_seed_and_independent_of_batching_and_global_rng():
    x1 = _x(4, 2)
    a = ntkfunc.monte_carlo_kernel_fn(_f, _init, 6, seed=3, get="ntk", batch_size=4)(x1)
    torch.manual_seed(123)
    b = ntkfunc.monte_carlo_kernel_fn(_f, _init, 6, seed=3, get="ntk", batch_size=1)(x1)
    c = ntkfunc.monte_carlo_kernel_fn(_f, _init, 6, seed=4, get="ntk")(x1)
    assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)
    assert not torch.allclose(a, c)


def test_converges_to_the_infinite_width_nngp_of_a_linear_readout():
    """f = x W / sqrt(d) with W ~ N(0, 1): E[NNGP] = x1 x2ᵀ / d (trace over outputs averaged)."""
    d = 3

    def init(gen):
        return torch.randn(d, 4, generator=gen, dtype=torch.float64)

    f = lambda w, x: x @ w / d**0.5  # noqa: E731
    x = _x(3, 5)
    k = ntkfunc.monte_carlo_kernel_fn(f, init, 400, get=("nngp", "ntk"), seed=0)(x)
    exact = x @ x.T / d
    assert torch.allclose(k.ntk, exact, atol=1e-12)  # the NTK of a linear model does not depend on W
    assert (k.nngp - exact).abs().max() < 0.15 * exact.abs().max()  # 400 draws x 4 outputs: ~5% noise


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"n_samples=0\): expected a positive int"):
        ntkfunc.monte_carlo_kernel_fn(_f, _init, 0)
    with pytest.raises(ValueError, match=r"batch_size=0\): expected a positive int or None"):
        ntkfunc.monte_carlo_kernel_fn(_f, _init, 2, batch_size=0)
    with pytest.raises(ValueError, match=r"get='cov' contains 'cov'; expected 'ntk', 'nngp'"):
        ntkfunc.monte_carlo_kernel_fn(_f, _init, 2, get="cov")
    mc = ntkfunc.monte_carlo_kernel_fn(_f, _init, 2)
    with pytest.raises(ValueError, match=r"get=\('nngp', 'x'\) contains 'x'"):
        mc(_x(2, 0), None, ("nngp", "x"))
