"""implementation="auto": exact, and its per-parameter choice is made once per input signature."""

from __future__ import annotations

import torch

import ntkfunc
from tests.reference import max_rel_err, reference_kernel
from tests.zoo import CASES


def _spy(monkeypatch, module, name: str) -> list:
    calls: list = []
    original = getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls


def test_auto_decides_once_per_signature_and_stays_exact(monkeypatch):
    from ntkfunc._engines.structured import capture
    from ntkfunc._engines.structured import kernel as structured

    estimates = _spy(monkeypatch, structured, "implementation1_price")
    discoveries = _spy(monkeypatch, capture, "discover")
    monkeypatch.setattr(structured.routes, "PROBE_FLOPS", 0.0)  # the capture path, even on the zoo's small CNN
    f, params, x1, x2, _ = next(c for c in CASES if c.name == "cnn").build(torch.float64)
    kernel = ntkfunc.ntk_fn(f, trace_axes=(), implementation="auto")
    first = kernel(x1, x2, params)
    n_first = (len(estimates), len(discoveries))
    second = kernel(x1, x2, params)
    assert n_first[0] == 1 and n_first[1] >= 1 and (len(estimates), len(discoveries)) == n_first  # no second calibration
    ref = reference_kernel(f, params, x1, x2, (), ())
    assert max_rel_err(first, ref) <= 1e-10 and max_rel_err(second, ref) <= 1e-10
    third = kernel(x1[:2], x2, params)  # other sizes: decided again, still exact
    assert len(estimates) == 2
    assert max_rel_err(third, reference_kernel(f, params, x1[:2], x2, (), ())) <= 1e-10


def test_auto_on_small_problems_is_implementation_1_without_the_capture(monkeypatch):
    """Where implementation 1's whole kernel costs less than probing (the test zoo), auto neither
    captures nor calibrates: its first call costs implementation 1's plus one forward pass."""
    from ntkfunc._engines import jacobian
    from ntkfunc._engines.structured import capture
    from ntkfunc._engines.structured import kernel as structured

    discoveries = _spy(monkeypatch, capture, "discover")
    sides = _spy(monkeypatch, structured, "side")
    jacobians = _spy(monkeypatch, jacobian, "kernel")
    for case in CASES:
        f, params, x1, x2, vmap_axes = case.build(torch.float64)
        trace = (0,) if vmap_axes == 1 else (-1,)
        k = ntkfunc.ntk_fn(f, trace_axes=trace, vmap_axes=vmap_axes, implementation="auto")(x1, x2, params)
        ref = reference_kernel(f, params, x1, x2, trace, ())
        assert max_rel_err(k, ref) <= 1e-10, case.name
    assert discoveries == [] and sides == [] and len(jacobians) == len(CASES)


def test_auto_estimate_bounds_what_the_rules_save():
    """Whenever the capture's calibration would probe a primitive, the estimate of implementation 1's
    work is larger than what the rules save, and at least the probing threshold (so the shortcut
    never skips a capture that pays)."""
    from ntkfunc._core.problem import make_problem
    from ntkfunc._engines.structured import kernel as structured
    from ntkfunc._engines.structured import routes

    torch.manual_seed(0)
    wide = torch.nn.Sequential(torch.nn.Linear(16, 512), torch.nn.ReLU(), torch.nn.Linear(512, 10))
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(16 * 64, 10))
    probed = 0
    for model, x in ((wide, torch.randn(8, 16)), (conv, torch.randn(8, 3, 8, 8)), (wide, torch.randn(2, 16))):
        f, params = ntkfunc.from_module(model)
        for trace in ((-1,), ()):
            problem = make_problem(f, x, None, params, 0, trace, ())
            cap = structured.captured(problem)
            plan = routes.decide(structured.calibrate(problem, cap), cap, routes.AUTO)
            estimate = structured.implementation1_price(problem)
            assert estimate is not None
            if not plan.outright:
                probed += 1
                assert estimate.cost >= plan.saving and routes.unprobed(None, estimate) is None, (model, trace)
    assert probed >= 2


def test_auto_takes_jacobian_contraction_when_rules_do_not_pay():
    """A long sequence through small linear layers: the Gram route costs more than J1 J2^T."""
    from ntkfunc._core.problem import make_problem
    from ntkfunc._engines import auto as _auto
    from ntkfunc._engines.structured import capture as _capture
    from ntkfunc._engines.structured import kernel as _structured
    from ntkfunc._engines.structured import routes as _routes

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)).double()
    f, params = ntkfunc.from_module(model)
    x = torch.randn(6, 64, 4, dtype=torch.float64)  # 64 positions per sample
    problem = make_problem(f, x, None, params, 0, (), ())
    cap = _capture.discover(problem)
    assert _auto.choose(problem).outright  # decided without the capture: implementation 1 costs less than probing
    calibrated = _routes.decide(_structured.calibrate(problem, cap), cap, _routes.AUTO)  # the capture's own decision
    assert set(calibrated.moved) == set(cap.covered) and calibrated.outright
    k = ntkfunc.ntk_fn(f, trace_axes=(-1,), implementation="auto")(x[:3], None, params)
    assert max_rel_err(k, reference_kernel(f, params, x[:3], None, (-1,), ())) <= 1e-10
