"""implementation="auto": exact, and its per-parameter choice is made once per input signature."""

from __future__ import annotations

import torch

import ntkfunc
from tests.reference import max_rel_err, reference_kernel
from tests.zoo import CASES


def test_auto_decides_once_per_signature_and_stays_exact(monkeypatch):
    from ntkfunc._engines.structured import capture

    calls = []
    original = capture.discover

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(capture, "discover", spy)
    f, params, x1, x2, _ = next(c for c in CASES if c.name == "cnn").build(torch.float64)
    kernel = ntkfunc.ntk_fn(f, trace_axes=(), implementation="auto")
    first = kernel(x1, x2, params)
    n_first = len(calls)
    second = kernel(x1, x2, params)
    assert n_first >= 1 and len(calls) - n_first <= n_first  # no second calibration
    ref = reference_kernel(f, params, x1, x2, (), ())
    assert max_rel_err(first, ref) <= 1e-10 and max_rel_err(second, ref) <= 1e-10
    third = kernel(x1[:2], x2, params)  # other sizes: decided again, still exact
    assert max_rel_err(third, reference_kernel(f, params, x1[:2], x2, (), ())) <= 1e-10


def test_auto_takes_jacobian_contraction_when_rules_do_not_pay():
    """A long sequence through small linear layers: the Gram route costs more than J1 J2^T."""
    from ntkfunc._core.problem import make_problem
    from ntkfunc._engines import auto as _auto
    from ntkfunc._engines.structured import capture as _capture

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)).double()
    f, params = ntkfunc.from_module(model)
    x = torch.randn(6, 64, 4, dtype=torch.float64)  # 64 positions per sample
    problem = make_problem(f, x, None, params, 0, (), ())
    cap = _capture.discover(problem)
    assert set(_auto.choose(problem).moved) == set(cap.covered) and _auto.choose(problem).outright
    k = ntkfunc.ntk_fn(f, trace_axes=(-1,), implementation="auto")(x[:3], None, params)
    assert max_rel_err(k, reference_kernel(f, params, x[:3], None, (-1,), ())) <= 1e-10
