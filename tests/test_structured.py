"""Implementation 3 as a whole: mixed coverage, weight tying, explain, transforms, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils import _pytree as pytree

import ntkfunc
from ntkfunc._engines import engines
from ntkfunc._engines.structured import capture as _capture
from ntkfunc._engines.structured import contraction
from tests.reference import max_rel_err, reference_kernel

D = torch.float64


PLANNED_AND_FORCED = pytest.mark.parametrize(
    "forced", [pytest.param(False, id="planned"), pytest.param(True, id="rules", marks=pytest.mark.rules_forced)])
"""Implementation 3 as planned and with every rule in use: on models this small the planner sends most parameters to
reverse-mode Jacobians, so the planned run alone would not exercise the rules a test names."""


def _mixed():
    torch.manual_seed(0)
    p = {
        "w1": 0.5 * torch.randn(6, 4, dtype=D),  # linear: rule
        "b1": 0.1 * torch.randn(6, dtype=D),  # linear bias: rule
        "div": 1.5 + torch.rand(6, dtype=D),  # x / p: no rule
        "tied": 0.4 * torch.randn(6, 6, dtype=D),  # used by two linear calls: tying (every pair of uses)
        "wt": 0.4 * torch.randn(3, 6, dtype=D),  # consumed through .T: a view, composed with the rule
        "logscale": 0.1 * torch.randn(3, dtype=D),  # exp(p): no rule
        "both": 0.3 * torch.randn(3, dtype=D),  # a rule use and a no-rule use
        "head": 0.5 * torch.randn(3, 3, dtype=D),  # matmul: rule
    }

    def f(p, x):
        h = torch.tanh(F.linear(x, p["w1"], p["b1"]) / p["div"])
        h = torch.tanh(F.linear(h, p["tied"]))
        h = torch.sin(F.linear(h, p["tied"]))
        h = (h @ p["wt"].T) * torch.exp(p["logscale"])
        h = torch.tanh(h + p["both"]) * torch.cos(p["both"])
        return h @ p["head"]

    return f, p


@PLANNED_AND_FORCED
def test_mixed_coverage_is_exact_and_explained(forced):
    f, p = _mixed()
    x1, x2 = torch.randn(4, 4, dtype=D), torch.randn(3, 4, dtype=D)
    report = ntkfunc.explain(f, p, x1, trace_axes=())
    by_name = {r.name: r for r in report.params}
    assert {n for n, r in by_name.items() if r.method == "rule"} == {"w1", "b1", "head", "tied", "wt"}
    assert by_name["tied"].rule == "linear:weight+linear:weight" and by_name["tied"].uses == 2
    assert by_name["wt"].rule == "matmul:rhs" and "Tensor.T" in by_name["wt"].via
    assert "div" in by_name["div"].detail
    assert "exp" in by_name["logscale"].detail
    assert by_name["both"].method == "fallback"
    for tr, dg in [((), ()), ((-1,), ()), ((), (-1,)), ((0,), ())]:
        for x2_ in (x2 if tr != (0,) and dg != (0,) else x1.flip(0), None):
            k = ntkfunc.ntk_fn(f, trace_axes=tr, diagonal_axes=dg, implementation=3)(x1, x2_, p)
            assert max_rel_err(k, reference_kernel(f, p, x1, x2_, tr, dg)) <= 1e-10


def test_explain_table_and_totals():
    f, p = _mixed()
    report = ntkfunc.explain(f, p, torch.randn(4, 4, dtype=D))
    text = str(report)
    for word in ("parameter", "method", "linear:weight", "fallback", "linear:weight+linear:weight", "(via Tensor.T)", "total"):
        assert word in text
    assert report.flops == sum(r.flops for r in report.params) > 0
    assert len(report.fallbacks) == 3
    assert all(r.flops == r.jacobian_flops for r in report.fallbacks)


def test_traced_kernel_is_contracted_early():
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10)).double()
    f, p = ntkfunc.from_module(model)
    x = torch.randn(6, 8, dtype=D)
    full = ntkfunc.explain(f, p, x, trace_axes=()).flops
    traced = ntkfunc.explain(f, p, x, trace_axes=(-1,)).flops
    assert traced * 4 < full  # about 1/O of the full kernel's cost (O = 10)


def test_faster_contraction_than_jacobians_for_wide_linear_layers():
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(16, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 4))
    f, p = ntkfunc.from_module(model)
    report = ntkfunc.explain(f, p, torch.randn(8, 16), trace_axes=())
    assert not report.fallbacks
    assert report.flops * 10 < report.jacobian_flops


@PLANNED_AND_FORCED
def test_weight_tying_in_a_module_and_a_covered_bias(forced):
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = torch.nn.Linear(5, 3)
            self.dec = torch.nn.Linear(3, 5)
            self.dec.weight = torch.nn.Parameter(self.enc.weight.detach().T.clone())
            self.scale = torch.nn.Parameter(torch.ones(3))

        def forward(self, x):
            h = torch.tanh(self.enc(x)) * self.scale
            return F.linear(h, self.enc.weight.T, self.dec.bias)

    torch.manual_seed(3)
    model = Tied().double()
    del model.dec.weight  # only the encoder's weight remains, used twice
    f, p = ntkfunc.from_module(model)
    x1, x2 = torch.randn(4, 5, dtype=D), torch.randn(2, 5, dtype=D)
    report = {r.name: r for r in ntkfunc.explain(f, p, x1).params}
    assert report["enc.weight"].rule == "linear:weight+linear:weight"  # directly, and through .T
    assert report["dec.bias"].rule == "linear:bias" and report["scale"].rule == "mul:other"
    k = ntkfunc.ntk_fn(f, trace_axes=(), implementation=3)(x1, x2, p)
    assert max_rel_err(k, reference_kernel(f, p, x1, x2, (), ())) <= 1e-10


def test_every_parameter_without_rules_still_exact():
    torch.manual_seed(4)
    p = {"a": torch.randn(3, 4, dtype=D), "b": torch.rand(4, dtype=D) + 1}

    def f(p, x):
        return torch.tanh(x @ torch.sin(p["a"]).T) ** 2 / p["b"][:3]

    x1 = torch.randn(4, 4, dtype=D)
    assert all(r.method == "fallback" for r in ntkfunc.explain(f, p, x1).params)
    k = ntkfunc.ntk_fn(f, trace_axes=(), implementation=3)(x1, None, p)
    assert max_rel_err(k, reference_kernel(f, p, x1, None, (), ())) <= 1e-10


@PLANNED_AND_FORCED
def test_pytree_outputs_and_inputs_match_implementation_1(forced):
    torch.manual_seed(5)
    p = {"w": torch.randn(3, 4, dtype=D), "v": torch.randn(4, 2, dtype=D)}

    def f(p, x):
        h = torch.tanh(x["a"] @ p["w"] + x["b"])
        return {"y": h @ p["v"], "z": (h * 2,)}

    x = {"a": torch.randn(5, 3, dtype=D), "b": torch.randn(5, 4, dtype=D)}
    k3 = ntkfunc.ntk_fn(f, trace_axes=(), implementation=3)(x, None, p)
    k1 = ntkfunc.ntk_fn(f, trace_axes=(), implementation=1)(x, None, p)
    assert pytree.tree_structure(k3) == pytree.tree_structure(k1)
    assert max_rel_err(k3, k1) <= 1e-10


@PLANNED_AND_FORCED
def test_composes_with_vmap_over_params_and_grad(forced):
    torch.manual_seed(6)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).double()
    f, p = ntkfunc.from_module(model)
    x = torch.randn(4, 3, dtype=D)
    ensemble = {k: torch.stack([v, 0.5 * v]) for k, v in p.items()}
    kernel = ntkfunc.ntk_fn(f, trace_axes=(), implementation=3)
    batched = torch.func.vmap(lambda q: kernel(x, None, q))(ensemble)
    for i in range(2):
        member = {k: v[i] for k, v in ensemble.items()}
        assert max_rel_err(batched[i], reference_kernel(f, member, x, None, (), ())) <= 1e-10
    grads = [
        torch.func.grad(lambda q, impl=impl: ntkfunc.ntk_fn(f, implementation=impl)(x, None, q).sum())(p) for impl in (1, 3)
    ]
    assert max_rel_err(grads[1], grads[0]) <= 1e-10


def test_path_cache_is_reused():
    torch.manual_seed(7)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    f, p = ntkfunc.from_module(model)
    x = torch.randn(4, 3)
    kernel = ntkfunc.ntk_fn(f, implementation=3)
    with ntkfunc.rules.forced():
        kernel(x, None, p)
        before = contraction.expression.cache_info()
        kernel(x, None, p)
        after = contraction.expression.cache_info()
    assert after.misses == before.misses and after.hits > before.hits


def test_control_flow_that_changes_between_passes_is_refused(monkeypatch):
    state = {"extra": False}
    p = {"w": torch.randn(3, 3, dtype=D)}

    def f(p, x):
        h = F.linear(x, p["w"])
        return F.linear(torch.tanh(h), p["w"] * 1.0) if state["extra"] else h

    real = _capture.discover

    def discover_then_change(*args):
        cap = real(*args)
        state["extra"] = True
        return cap

    monkeypatch.setattr(_capture, "discover", discover_then_change)
    with pytest.raises(RuntimeError, match="capture pass saw no more calls; expected f to call the same ops on every sample"):
        ntkfunc.ntk_fn(f, implementation=3)(torch.randn(2, 3, dtype=D), None, p)


def test_implementation_3_is_registered():
    assert [int(e.implementation) for e in engines()] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="expected 'auto' or one of \\[0, 1, 2, 3\\]"):
        ntkfunc.ntk_fn(lambda p, x: x, implementation=4)


def test_reverse_mode_routes_where_cheaper_and_forced_keeps_the_rules():
    """64 tokens of width 8, full kernel: probing the linear (its cotangents on every token, then its
    roles' routes) costs more than reverse-mode Jacobians, so implementation 3 takes both parameters
    from reverse mode (and, with nothing left to probe, skips the capture); inside ``rules.forced()``
    the rule is used. Both kernels are the reference's."""
    from ntkfunc._core.problem import make_problem
    from ntkfunc._engines.structured import kernel as structured

    torch.manual_seed(0)
    p = {"w": 0.3 * torch.randn(8, 8, dtype=D), "b": 0.1 * torch.randn(8, dtype=D)}

    def f(p, x):  # x: (N, T, 8), output (N, 8)
        return torch.tanh(F.linear(x, p["w"], p["b"])).mean(1)

    x = torch.randn(3, 64, 8, dtype=D)
    problem = make_problem(f, x, None, p, 0, (), (), api="test")
    moved = structured.route_plan(problem).moved
    assert set(moved) == {0, 1} and all("Jacobian contraction" in why for why in moved.values())
    with ntkfunc.rules.forced():
        assert structured.route_plan(problem).moved == {}
    ref = reference_kernel(f, p, x, None, (), ())
    kernel = ntkfunc.ntk_fn(f, trace_axes=(), implementation=3)
    assert max_rel_err(kernel(x, None, p), ref) <= 1e-10
    with ntkfunc.rules.forced():
        assert max_rel_err(kernel(x, None, p), ref) <= 1e-10


@pytest.mark.parametrize("eq,sa,sb", [
    ("abte,atf->abef", (2, 3, 5, 4), (2, 5, 6)),  # cotangent (b, O, T, d) with inputs (b, T, i): a linear weight
    ("abcte,atf->abcef", (2, 3, 2, 5, 4), (2, 5, 6)),  # two outer axes broadcast over
    ("ate,atf->aef", (2, 5, 4), (2, 5, 6)),  # nothing to broadcast over: left to einsum
])
def test_broadcast_matmul_agrees_with_einsum(eq, sa, sb):
    a, b = torch.randn(*sa, dtype=D), torch.randn(*sb, dtype=D)
    out = contraction.broadcast_matmul(eq, a, b)
    if out is None:
        return
    assert out.is_contiguous()
    torch.testing.assert_close(out, torch.einsum(eq, a, b))


def _fresh_outputs_model():
    """A convolution, an eval-mode batch norm with non-trivial statistics, a linear map, and a linear map of a constant
    (its output depends on no input and no probe)."""
    torch.manual_seed(3)
    p = {"cw": 0.5 * torch.randn(3, 2, 3, 3, dtype=D), "cb": 0.1 * torch.randn(3, dtype=D), "bw": 1 + 0.2 * torch.randn(3, dtype=D),
         "bb": 0.1 * torch.randn(3, dtype=D), "lw": 0.3 * torch.randn(2, 12, dtype=D), "kw": 0.3 * torch.randn(2, 5, dtype=D)}
    mean, var, const = 0.2 * torch.randn(3, dtype=D), 0.5 + torch.rand(3, dtype=D), torch.randn(1, 5, dtype=D)

    def f(p, x):
        h = F.batch_norm(F.conv2d(x, p["cw"], p["cb"]), mean, var, p["bw"], p["bb"])
        return F.linear(torch.tanh(h).flatten(1), p["lw"]) + F.linear(const, p["kw"])

    return f, p


@pytest.mark.parametrize("outer", ["none", "vmap over parameters", "grad"])
def test_probes_are_added_in_place_to_fresh_outputs_also_under_transforms(outer):
    """The capture adds its probe in place to a fresh output (``Rule.fresh_output``: convolutions, linear maps, norms),
    with the rules forced, alone, under ``vmap`` over an ensemble of parameters and under ``grad`` (the linear map of a
    constant included: inside the transforms its result is wrapped as the probe is)."""
    f, p = _fresh_outputs_model()
    x1, x2 = torch.randn(3, 2, 4, 4, dtype=D), torch.randn(2, 2, 4, 4, dtype=D)
    with ntkfunc.rules.forced():
        kernel = ntkfunc.ntk_fn(f, trace_axes=(), implementation=3)
        if outer == "none":
            assert max_rel_err(kernel(x1, x2, p), reference_kernel(f, p, x1, x2, (), ())) <= 1e-10
        elif outer == "vmap over parameters":
            ensemble = {k: torch.stack([v, 0.5 * v]) for k, v in p.items()}
            batched = torch.func.vmap(lambda q: kernel(x1, x2, q))(ensemble)
            for i in range(2):
                member = {k: v[i] for k, v in ensemble.items()}
                assert max_rel_err(batched[i], reference_kernel(f, member, x1, x2, (), ())) <= 1e-10
        else:
            got = torch.func.grad(lambda q: kernel(x1, x2, q).sum())(p)
            expected = torch.func.grad(lambda q: ntkfunc.ntk_fn(f, trace_axes=(), implementation=1)(x1, x2, q).sum())(p)
            assert max_rel_err(got, expected) <= 1e-10


def test_add_probe_in_place_only_for_fresh_outputs():
    y, delta = torch.ones(2, 3), torch.full((3,), 0.5)
    assert _capture._add_probe(y, delta, fresh=True) is y and bool((y == 1.5).all())
    out = _capture._add_probe(y, delta, fresh=False)
    assert out is not y and bool((y == 1.5).all()) and bool((out == 2.0).all())
