"""``nonfinite="raise" | "warn" | "ignore"``: every kernel function checks its result the same way."""

from __future__ import annotations

import warnings

import pytest
import torch

import ntkfunc
from tests.reference import max_rel_err, reference_kernel
from tests.zoo import implementations


def _mlp():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).double()
    f, params = ntkfunc.from_module(model)
    x1, x2 = torch.randn(6, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    x1[2, 1] = float("nan")
    return f, params, x1, x2


@pytest.mark.parametrize("impl", implementations())
def test_ntk_fn_raises_by_default_naming_the_samples(impl):
    """Regression: ntk_fn passed NaN through silently where kernel_matrix raised."""
    f, params, x1, x2 = _mlp()
    with pytest.raises(FloatingPointError, match=r"^ntk_fn: 4 non-finite kernel entries, from x1 samples \[2\] and x2 samples "
                                                  r"\[0, 1, 2, 3\]; expected finite values .*pass nonfinite='warn'"):
        ntkfunc.ntk_fn(f, implementation=impl)(x1, x2, params)


def test_warn_returns_the_kernel_and_ignore_is_silent():
    f, params, x1, x2 = _mlp()
    with pytest.warns(RuntimeWarning, match=r"from x1 samples \[2\] and x2 samples \[0, 1, 2, 3\]"):
        k = ntkfunc.ntk_fn(f, nonfinite="warn")(x1, x2, params)
    assert torch.isnan(k[2]).all() and torch.isfinite(k[[0, 1, 3, 4, 5]]).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        k2 = ntkfunc.ntk_fn(f, nonfinite="ignore")(x1, x2, params)
    assert torch.equal(k2.nan_to_num(), k.nan_to_num())
    clean = x1[[0, 1, 3]]
    assert max_rel_err(ntkfunc.ntk_fn(f)(clean, x2, params), reference_kernel(f, params, clean, x2)) <= 1e-12  # finite: unchanged


def test_every_kernel_function_offers_the_same_check():
    f, params, x1, x2 = _mlp()
    calls = {
        "pntk_fn": lambda nf: ntkfunc.pntk_fn(f, nonfinite=nf)(x1, x2, params),
        "nngp_fn": lambda nf: ntkfunc.nngp_fn(f, nonfinite=nf)(x1, x2, params),
        "kernel_fn ntk": lambda nf: ntkfunc.kernel_fn(f, nonfinite=nf)(x1, x2, "ntk", params),
        "kernel_fn nngp": lambda nf: ntkfunc.kernel_fn(f, nonfinite=nf)(x1, x2, "nngp", params),
        "kernel_matrix": lambda nf: ntkfunc.kernel_matrix(f, params, x1, x2, nonfinite=nf, progress=False),
        "per_param": lambda nf: ntkfunc.ntk_fn(f, per_param=True, nonfinite=nf)(x1, x2, params),
    }
    for call in calls.values():
        with pytest.raises(FloatingPointError, match=r"non-finite (kernel|NTK|NNGP) entries.*from x1 samples \[2\]"):
            call("raise")
        with pytest.warns(RuntimeWarning, match=r"from x1 samples \[2\]"):
            call("warn")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            call("ignore")
    with pytest.raises(FloatingPointError, match=r"\(parameter params\['0.weight'\]\), from x1 samples \[2\]"):
        calls["per_param"]("raise")
    with pytest.raises(FloatingPointError, match=r"^kernel_fn: 4 non-finite NNGP entries"):
        calls["kernel_fn nngp"]("raise")


@pytest.mark.parametrize("api", ["ntk_fn", "pntk_fn", "nngp_fn", "kernel_fn", "kernel_matrix"])
def test_bad_mode_names_the_call(api):
    f, params, x1, _ = _mlp()
    make = {
        "ntk_fn": lambda: ntkfunc.ntk_fn(f, nonfinite="nope"),
        "pntk_fn": lambda: ntkfunc.pntk_fn(f, nonfinite="nope"),
        "nngp_fn": lambda: ntkfunc.nngp_fn(f, nonfinite="nope"),
        "kernel_fn": lambda: ntkfunc.kernel_fn(f, nonfinite="nope"),
        "kernel_matrix": lambda: ntkfunc.kernel_matrix(f, params, x1, nonfinite="nope", progress=False),
    }
    with pytest.raises(ValueError, match=rf"^{api}\(nonfinite='nope'\): expected 'raise', 'warn' or 'ignore'"):
        make[api]()


def test_under_vmap_and_grad():
    """The check looks through torch.func wrappers: an ensemble with a NaN member raises; finite kernels differentiate."""
    f, params, x1, x2 = _mlp()
    ensemble = {k: torch.stack([v, v * 1.1]) for k, v in params.items()}
    kernel = ntkfunc.ntk_fn(f)
    with pytest.raises(FloatingPointError, match=r"under a torch.func transform"):
        torch.func.vmap(kernel, in_dims=(None, None, 0))(x1, x2, ensemble)
    clean = x1[[0, 1, 3]]
    ks = torch.func.vmap(kernel, in_dims=(None, None, 0))(clean, x2, ensemble)
    assert ks.shape == (2, 3, 4) and torch.isfinite(ks).all()
    grad = torch.func.grad(lambda x: kernel(x, x2, params).sum())(clean)
    assert grad.shape == clean.shape and torch.isfinite(grad).all()
