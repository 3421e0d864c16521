"""The route planner's measured choices (issue 23): contraction paths of Gram equations, routes of rows by seconds."""

from __future__ import annotations

import math

import pytest
import torch

import ntkfunc
from ntkfunc._core.problem import make_problem
from ntkfunc._engines import rows as persample
from ntkfunc._engines.structured import contraction, input_gram, plan, routes
from tests.reference import max_rel_err, reference_kernel

D = torch.float64


def _small_maps_cnn(shortcut_in: int = 6) -> torch.nn.Module:
    """A 1x1 convolution on 2x2 maps (the ResNet-18 shortcut's shape, scaled down), a 3x3 one, a linear head."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, shortcut_in, 3, stride=2, padding=1), torch.nn.Tanh(),
        torch.nn.Conv2d(shortcut_in, 8, 1, stride=2), torch.nn.Tanh(),
        torch.nn.Conv2d(8, 5, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(20, 2),
    ).to(D)


def _tokens_mlp() -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(7, 9), torch.nn.Tanh(), torch.nn.Linear(9, 3)).to(D)


CASES = {
    "small-maps CNN": (_small_maps_cnn, (3, 8, 8), ()),
    "small-maps CNN, traced": (_small_maps_cnn, (3, 8, 8), (-1,)),
    "linear on tokens": (_tokens_mlp, (4, 7), ()),
}


def _kernel_by_path(source, problem, x1, x2, name):
    """Row product plus every Gram term contracted along the path called ``name`` (opt_einsum's where it has no other)."""
    lay = problem.layouts[0]
    r1 = torch.empty((x1.shape[0], *source.out_shape, source.slots.width), dtype=D)
    r2 = torch.empty((x2.shape[0], *source.out_shape, source.slots.width), dtype=D)
    f1, f2 = source.compute([x1], r1, 2), source.compute([x2], r2, 3)
    k = lay.contract(r1, r2, 1)
    taken = set()
    for (s1, c1), (s2, c2) in zip(f1.terms, f2.terms):
        eq = plan.gram_equation(lay, True, s1, s2, c1, c2)
        q = next((p for p in eq.paths if p.name == name), eq.paths[0])
        taken.add(q.name)
        k = k + eq.run(source.limit, path=q) * (s1.scale * s2.scale)
    return k / lay.trace_size(problem.out_shapes1[0]), taken


PATHS = [(case, name) for case in sorted(CASES) for name in (contraction.OPTIMAL, contraction.PAIRED)] + [
    (case, input_gram.INPUT_GRAM) for case in sorted(CASES) if "CNN" in case]  # convolutions' kernels only


@pytest.mark.parametrize(("case", "name"), PATHS)
def test_each_path_of_the_gram_route_equals_the_reference(case, name):
    """Every Gram equation along each of its paths: the kernel equals the float64 reference (two shapes a case)."""
    build, shape, trace = CASES[case]
    model = build()
    f, params = ntkfunc.from_module(model)
    for n1, n2 in ((5, 3), (2, 4)):
        torch.manual_seed(n1)
        x1, x2 = torch.randn(n1, *shape, dtype=D), torch.randn(n2, *shape, dtype=D)
        problem = make_problem(f, x1[:1], None, params, 0, trace, (), api="kernel_matrix")
        source = persample.StructuredRows(problem, n1, n2, routes="gram")
        k, taken = _kernel_by_path(source, problem, x1, x2, name)
        assert name in taken  # the path exists for these equations (several factors a side)
        expected = reference_kernel(f, params, x1, x2, trace, ())
        assert max_rel_err(k, expected) <= 1e-10, (case, name, n1, n2)


def _shortcut_equation(b: int = 4) -> plan.Equation:
    """The Gram equation of a 1x1 convolution 16 -> 32 channels on 4x4 maps for ``b`` x ``b`` samples (one logit)."""
    torch.manual_seed(2)
    c = lambda: torch.randn(b, 1, 32, 4, 4, dtype=D)  # noqa: E731  cotangents (b, logit, c_out, h, w)
    x = lambda: torch.randn(b, 4, 4, 16, dtype=D)  # noqa: E731  patches (b, h, w, c_in)
    return plan.Equation("abfkl,aklg,cdfno,cnog->acbd", (c(), x(), c(), x()), 2)


def test_paired_path_is_priced_cheaper_where_opt_einsum_forms_the_gradient():
    """opt_einsum's path of a 1x1 convolution on small maps forms per-sample gradients (non-GEMM steps that write
    b x c_in x c_out numbers); the paired path is two GEMMs and is priced cheaper, and taken without a table."""
    eq = _shortcut_equation()
    by_name = {q.name: q for q in eq.paths}
    assert set(by_name) == {contraction.OPTIMAL, contraction.PAIRED}
    assert by_name[contraction.PAIRED].price.cost < by_name[contraction.OPTIMAL].price.cost
    assert by_name[contraction.PAIRED].price.traffic < by_name[contraction.OPTIMAL].price.traffic
    assert eq.price == by_name[contraction.PAIRED].price  # an equation is priced along its cheapest path
    expected = torch.einsum("abfkl,aklg,cdfno,cnog->acbd", *eq.tensors)
    assert max_rel_err(routes.contract(eq, None), expected) <= 1e-12


def test_contract_measures_each_path_once_then_takes_the_fastest(monkeypatch):
    eq = _shortcut_equation()
    ran: list = []
    real = contraction.contract
    monkeypatch.setattr(plan, "contract", lambda *a: ran.append(a[4]) or real(*a))
    table: dict = {}
    expected = torch.einsum("abfkl,aklg,cdfno,cnog->acbd", *eq.tensors)
    first = routes.contract(eq, None, table)
    key = ("contract", eq.eq, eq.shapes)
    assert set(table[key]) == {contraction.OPTIMAL, contraction.PAIRED} and len(ran) == 2  # each path once, timed
    assert all(s >= 0 for s in table[key].values())
    table[key] = {contraction.OPTIMAL: 0.5, contraction.PAIRED: 2.0}  # a caller's table says the optimal path is faster
    ran.clear()
    again = routes.contract(eq, None, table)
    assert ran == [None]  # opt_einsum's optimal path (no explicit steps)
    table[key] = {contraction.OPTIMAL: 2.0, contraction.PAIRED: 0.5}
    ran.clear()
    routes.contract(eq, None, table)
    assert ran == [contraction.paired_steps(2)]
    for out in (first, again):
        assert max_rel_err(out, expected) <= 1e-12


def test_contract_respects_the_memory_limit():
    """A path whose intermediates exceed the limit is not a candidate (opt_einsum's own path always is)."""
    eq = _shortcut_equation()
    paired = next(q for q in eq.paths if q.name == contraction.PAIRED)
    table: dict = {}
    routes.contract(eq, paired.largest - 1, table)
    assert list(table[("contract", eq.eq, eq.shapes)]) == [contraction.OPTIMAL]


def _candidate(gram_flops: float, row_flops: float, row: int = 4000) -> routes.RowCandidate:
    eq = plan.Equation("ai,aj,bi,bj->ab", tuple(torch.ones(1, n, dtype=D) for n in (3, 5, 3, 5)), 2)
    prices = plan.Prices(contraction.Price(gram_flops), contraction.FREE, contraction.FREE, contraction.Price(row_flops))  # per sample pair
    return routes.RowCandidate(prices, eq, kept=100, row=row)


def test_rows_plan_compares_measured_seconds():
    """Close prices: the Gram route's seconds measured on a probe tile decide (here a table says it is slow)."""
    rates = routes.Rates(gemm=1e9, element=1e-9, call=0.0)
    c = _candidate(gram_flops=1e3, row_flops=1.5e3)  # priced: Gram 1e3 x n1 n2 FLOPs against rows' 1.5e3 n1 n2 (close)
    probe = plan.probe_equation(c.gram, routes.PROBE_SAMPLES)
    key = ("gram probe", probe.eq, probe.shapes)
    n = 10
    priced = routes.rows_plan({0: c}, n, n, room=1e9, rates=None, memory_limit=None)
    assert priced[0].route == routes.GRAM
    rates.table[key] = {"seconds": 1e-5}  # measured: 1e-5 s a pair, far above the 1e-6 priced
    measured = routes.rows_plan({0: c}, n, n, room=1e9, rates=rates, memory_limit=None)
    assert measured[0].route == routes.FORMED and "measured" in measured[0].why
    rates.table[key] = {"seconds": 1e-7}
    assert routes.rows_plan({0: c}, n, n, room=1e9, rates=rates, memory_limit=None)[0].route == routes.GRAM


def test_rows_plan_charges_rows_the_passes_their_bytes_add():
    """Where the x1 rows do not fit in one panel, a row's bytes cost gradient passes: the Gram route keeps the factors."""
    rates = routes.Rates(gemm=1e9, element=0.0, call=0.0)
    c = _candidate(gram_flops=4e3, row_flops=1.5e3, row=4000)  # priced: rows cheaper (beyond CLOSE: not probed)
    n = 100
    fits = routes.rows_plan({0: c}, n, n, room=1e9, rates=rates, memory_limit=None, pass_seconds=1.0)
    assert fits[0].route == routes.FORMED
    tight = routes.rows_plan({0: c}, n, n, room=2e5, rates=rates, memory_limit=None, pass_seconds=1.0)
    assert tight[0].route == routes.GRAM and "passes" in tight[0].why  # 100 x 100 x 4000 / 4e5 = 100 passes of 1 s


def test_rates_are_measured_and_positive():
    r = routes.Rates.measure(torch.device("cpu"), torch.float32)
    assert all(math.isfinite(v) and v > 0 for v in (r.gemm, r.element, r.call))
    assert r.seconds(contraction.Price(r.gemm)) == pytest.approx(1.0)


def test_probe_equation_refuses_other_equations():
    eq = plan.Equation("ab,bc->ac", (torch.ones(2, 3), torch.ones(3, 4)))
    with pytest.raises(ValueError, match=r"probe_equation: 'ab,bc->ac' is no Gram equation \(side=0\)"):
        plan.probe_equation(eq, 4)


def test_kernel_matrix_with_measured_routes_equals_the_reference():
    """``kernel_matrix`` (implementation 3: rows, Gram terms by measured paths and routes) on the small-maps CNN."""
    f, params = ntkfunc.from_module(_small_maps_cnn())
    torch.manual_seed(3)
    x = torch.randn(7, 3, 8, 8, dtype=D)
    k = ntkfunc.kernel_matrix(f, params, x, None, implementation=3, batch_size=3, progress=False)
    assert max_rel_err(k, reference_kernel(f, params, x, None, (-1,), ())) <= 1e-10  # kernel_matrix traces the last axis


def test_the_manifest_records_the_passes_per_sample(tmp_path):
    """A kernel file's manifest says how many per-sample rows the run formed: once per sample when one panel holds x1,
    more when the budget cuts x1 into panels (each panel streams the later x2 blocks again)."""
    import json

    f, params = ntkfunc.from_module(_small_maps_cnn())
    torch.manual_seed(4)
    x = torch.randn(12, 3, 8, 8, dtype=D)
    expected = reference_kernel(f, params, x, None, (-1,), ())
    runs = {}
    for name, budget in (("roomy", "1GB"), ("tight", "80KB")):
        out = tmp_path / f"{name}.npy"
        k = ntkfunc.kernel_matrix(f, params, x, None, implementation=3, batch_size=2, memory_budget=budget, out=out, progress=False)
        assert max_rel_err(k, expected) <= 1e-10
        runs[name] = json.loads((tmp_path / f"{name}.npy.manifest.json").read_text())["rows_run"]
    assert runs["roomy"] == {"rows_computed": 12, "passes_per_sample": 1.0}
    assert runs["tight"]["passes_per_sample"] > 1.0 and runs["tight"]["rows_computed"] == 12 * runs["tight"]["passes_per_sample"]
