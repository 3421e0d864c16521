"""``explain`` reports the route the kernel takes for every parameter (issue 20: one route decision).

What runs is observed by spying on the kernel's block functions (Gram contraction, Jacobians
formed from the rule, reverse-mode Jacobians) and on implementation 1's kernel (taken when
nothing is probed), never by asking the planner again.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import ntkfunc
from ntkfunc import rules
from ntkfunc._engines import jacobian
from ntkfunc._engines.structured import kernel as structured
from ntkfunc._engines.structured import routes
from tests.reference import max_rel_err, reference_kernel
from tests.zoo import CASES, settings


def _observe(monkeypatch) -> dict[int, set[str]]:
    """Parameter index -> the routes its kernel blocks were computed by, filled as kernels run."""
    seen: dict[int, set[str]] = {}

    def spy(name: str, route: str, k_at: int):
        original = getattr(structured, name)

        def wrapped(*args, **kwargs):
            seen.setdefault(args[k_at], set()).add(route)
            return original(*args, **kwargs)

        monkeypatch.setattr(structured, name, wrapped)

    spy("gram_block", routes.GRAM, 0)  # (k, equations, ...)
    spy("formed_block", routes.FORMED, 1)  # (problem, k, ...)
    spy("reverse_mode_block", routes.REVERSE_MODE, 1)  # (problem, k, ...)
    original_jacobian = jacobian.kernel

    def outright(problem, *args, **kwargs):  # nothing probed: every parameter from reverse mode
        for k in range(len(problem.params.diff_leaves)):
            seen.setdefault(k, set()).add(routes.REVERSE_MODE)
        return original_jacobian(problem, *args, **kwargs)

    monkeypatch.setattr(jacobian, "kernel", outright)
    return seen


def _issue_mlp():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 64), torch.nn.Tanh(), torch.nn.Linear(64, 3)).double()
    f, params = ntkfunc.from_module(model)
    return f, params, torch.randn(8, 4, dtype=torch.float64)


def test_issue_mlp_runs_reverse_mode_and_explain_says_so(monkeypatch):
    """The issue's case: implementation 3 takes all four parameters from reverse mode on N=8
    (its rules save less than probing costs); explain said "rule" for all four and nothing else."""
    f, params, x = _issue_mlp()
    seen = _observe(monkeypatch)
    k = ntkfunc.ntk_fn(f, trace_axes=(), implementation=3)(x, None, params)
    assert max_rel_err(k, reference_kernel(f, params, x, None, (), ())) <= 1e-10
    assert seen == {k: {routes.REVERSE_MODE} for k in range(4)}
    report = ntkfunc.explain(f, params, x, trace_axes=())
    assert [(p.method, p.route) for p in report.params] == [("rule", "reverse-mode")] * 4
    assert [p.rule for p in report.params] == ["linear:weight", "linear:bias"] * 2
    assert all("less than probing costs" in p.reason for p in report.params)
    assert report.reverse_mode == report.params and report.fallbacks == []
    assert report.flops == report.jacobian_flops  # the contraction is implementation 1's
    text = str(report)
    assert "reverse-mode (0.weight, 0.bias, 2.weight, 2.bias): Jacobian contraction: the rules would save" in text
    assert "N=8, implementation 3" in text


def test_explain_of_auto_and_forced_rules():
    f, params, x = _issue_mlp()
    auto = ntkfunc.explain(f, params, x, trace_axes=(), implementation="auto")
    assert auto.implementation == "auto" and {p.route for p in auto.params} == {"reverse-mode"}
    assert all(p.reason.startswith("auto: ") for p in auto.params)
    with rules.forced():
        forced = ntkfunc.explain(f, params, x, trace_axes=())
    assert {p.route for p in forced.params} <= {"gram", "formed"} and not forced.reverse_mode
    assert forced.flops < forced.jacobian_flops and "reverse-mode (" not in str(forced)


@pytest.mark.parametrize("implementation", [1, 2, "nope", 7])
def test_explain_refuses_implementations_without_routes(implementation):
    f, params, x = _issue_mlp()
    match = r"^explain: implementation=" + (r".*no per-parameter routes" if implementation in (1, 2) else r".*expected 'auto' or one of")
    with pytest.raises(ValueError, match=match):
        ntkfunc.explain(f, params, x, implementation=implementation)


ZOO = [
    pytest.param(case, tr, dg, impl, forced, id=f"{case}-trace{tr}-diag{dg}-{impl}{'-rules' if forced else ''}")
    for case in CASES
    for tr, dg in settings(case)[:2]
    for impl, forced in ((3, False), ("auto", False), (3, True))
]


@pytest.mark.parametrize("case,tr,dg,impl,forced", ZOO)
def test_explain_route_is_the_route_that_runs(case, tr, dg, impl, forced, monkeypatch):
    """Over the zoo: for ``K(x, x)``, every parameter's route in ``explain`` is the one its kernel blocks took."""
    f, params, x, _, vmap_axes = case.build(torch.float64)
    seen = _observe(monkeypatch)
    with rules.forced() if forced else contextlib.nullcontext():
        k = ntkfunc.ntk_fn(f, trace_axes=tr, diagonal_axes=dg, vmap_axes=vmap_axes, implementation=impl)(x, None, params)
        report = ntkfunc.explain(f, params, x, trace_axes=tr, diagonal_axes=dg, vmap_axes=vmap_axes, implementation=impl)
    assert max_rel_err(k, reference_kernel(f, params, x, None, tr, dg)) <= 1e-10
    explained = {i: set(p.route.split("+")) for i, p in enumerate(report.params)}
    assert explained == seen, [(p.name, p.method, p.route, seen.get(i)) for i, p in enumerate(report.params)]
    for p in report.params:
        assert p.flops == p.jacobian_flops or p.route != "reverse-mode"  # implementation 1's contraction
        assert (p.rule is None) == (p.method == "fallback")


@pytest.mark.parametrize("impl,forced", [(3, False), ("auto", False), (3, True)])
def test_explain_route_with_tying_and_a_fallback(impl, forced, monkeypatch):
    """A tied weight (once through a view) and a parameter without a rule: the same agreement."""
    torch.manual_seed(1)

    def g(p, x):
        h = torch.tanh(x @ p["w"] + p["b"])
        return (h @ p["w"].T) / p["s"]  # x / s has no rule

    p = {"w": torch.randn(4, 6, dtype=torch.float64), "b": torch.randn(6, dtype=torch.float64),
         "s": torch.rand(4, dtype=torch.float64) + 1}
    x = torch.randn(5, 4, dtype=torch.float64)
    seen = _observe(monkeypatch)
    with rules.forced() if forced else contextlib.nullcontext():
        ntkfunc.ntk_fn(g, trace_axes=(), implementation=impl)(x, None, p)
        report = ntkfunc.explain(g, p, x, trace_axes=(), implementation=impl)
    assert {i: set(r.route.split("+")) for i, r in enumerate(report.params)} == seen
    assert [r.method for r in report.params] == ["rule", "rule", "fallback"] and report.params[0].uses == 2
    assert report.params[2].route == "reverse-mode" and report.params[2].reason == ""


def test_the_zoo_exercises_every_route(monkeypatch):
    """The test above is not vacuous: the zoo runs all three routes (the Gram and formed ones with the rules forced)."""
    seen_all: dict[bool, set[str]] = {False: set(), True: set()}
    for forced in (False, True):
        with rules.forced() if forced else contextlib.nullcontext():
            for case in CASES:
                f, params, x, _, vmap_axes = case.build(torch.float64)
                seen = _observe(monkeypatch)
                ntkfunc.ntk_fn(f, trace_axes=(), vmap_axes=vmap_axes, implementation=3)(x, None, params)
                seen_all[forced] |= set().union(*seen.values())
                monkeypatch.undo()
    assert seen_all[True] == {routes.GRAM, routes.FORMED} and routes.REVERSE_MODE in seen_all[False]
