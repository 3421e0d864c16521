"""The Gram route of a convolution's kernel from its input's own Gram (``input_gram.INPUT_GRAM``), against the float64 reference.

The patch Gram ``x₁x₂ᵀ`` over ``C_in·k`` patch columns equals the input's Gram over its ``C_in`` channels summed over
the window's offsets as shifted views; these tests force that path on every Gram equation that has it (through the
structured engine's tiles and through the per-sample rows' Gram terms) and compare the kernel with the reference.
"""

from __future__ import annotations

import pytest
import torch

import ntkfunc
from ntkfunc import rules
from ntkfunc._core.layout import Layout
from ntkfunc._core.problem import make_problem
from ntkfunc._engines import rows as persample
from ntkfunc._engines.structured import contraction, input_gram, plan, routes
from tests.reference import max_rel_err, reference_kernel

F = torch.nn.functional


def _net(d: int, ci: int, co: int, k: int, stride: int, padding: int | str, dilation: int, size: tuple[int, ...],
         bias: bool, groups: int, dtype: torch.dtype) -> torch.nn.Module:
    """A convolution of the settings given (``d`` spatial axes), then tanh, a second 3x3 convolution and a linear head."""
    conv = {1: torch.nn.Conv1d, 2: torch.nn.Conv2d, 3: torch.nn.Conv3d}[d]
    torch.manual_seed(ci * 7 + co + k)
    first = conv(ci, co, k, stride=stride, padding=padding, dilation=dilation, bias=bias, groups=groups)
    out = first(torch.zeros(1, ci, *size)).shape[2:]
    second = conv(co, 3, 3, padding=1)
    n = 3 * torch.Size(out).numel()
    return torch.nn.Sequential(first, torch.nn.Tanh(), second, torch.nn.Flatten(), torch.nn.Linear(n, 2)).to(dtype)


CONVS = {  # name: (spatial axes, c_in, c_out, kernel, stride, padding, dilation, input size, bias, groups)
    "3x3 s1 p1, c_in < c_out": (2, 3, 5, 3, 1, 1, 1, (5, 6), True, 1),
    "3x3 s2 p1, odd maps, c_in > c_out": (2, 5, 2, 3, 2, 1, 1, (7, 7), False, 1),
    "5x5 same": (2, 2, 3, 5, 1, "same", 1, (6, 5), True, 1),
    "1x1 s1 p0": (2, 4, 3, 1, 1, 0, 1, (4, 4), True, 1),
    "1x1 s2 p0": (2, 4, 3, 1, 2, 0, 1, (5, 5), False, 1),
    "3x3 dilation 2 p2": (2, 3, 4, 3, 1, 2, 2, (6, 7), True, 1),
    "3x3 valid": (2, 3, 4, 3, 1, 0, 1, (6, 5), False, 1),
    "3x3 groups 2": (2, 4, 6, 3, 1, 1, 1, (5, 5), True, 2),
    "conv1d k3 p1": (1, 3, 4, 3, 1, 1, 1, (9,), True, 1),
    "conv3d k3 s2 p1": (3, 2, 3, 3, 2, 1, 1, (4, 5, 3), True, 1),
}


@pytest.fixture
def along_input_gram(monkeypatch):
    """Gram routes everywhere, and every Gram equation that has the input-Gram path contracted along it; the calls that did."""
    used: list[str] = []
    contract = routes.contract

    def forced_path(eq, memory_limit, table=None, sharing=None):  # type: ignore[no-untyped-def]
        q = next((p for p in eq.paths if p.name == input_gram.INPUT_GRAM), None)
        if q is None:
            return contract(eq, memory_limit, table, sharing)
        used.append(eq.eq)
        return eq.run(memory_limit, sharing, q)

    monkeypatch.setattr(routes, "contract", forced_path)
    monkeypatch.setattr(routes, "on_tile", lambda prices, formed1, formed2: routes.Route(routes.GRAM, prices.at_tile(formed1, formed2)))
    return used


def _case(name: str, seed: int, n1: int) -> tuple:
    """``(f, params, x1, x2)`` for the case ``name`` of :data:`CONVS` in float64: ``n1`` x1 samples, 3 x2 samples."""
    d, ci, co, k, stride, padding, dilation, size, bias, groups = CONVS[name]
    f, params = ntkfunc.from_module(_net(d, ci, co, k, stride, padding, dilation, size, bias, groups, torch.float64))
    torch.manual_seed(seed)
    return f, params, torch.randn(n1, ci, *size, dtype=torch.float64), torch.randn(3, ci, *size, dtype=torch.float64)


@pytest.mark.parametrize("name", sorted(CONVS))
def test_structured_kernel_along_the_input_gram_path_equals_the_reference(name, along_input_gram):
    """Implementation 3 on x1 x x2 and x1 x x1 (x2 = None), trace_axes () and (-1,), float64."""
    f, params, x1, x2 = _case(name, seed=1, n1=4)
    for trace in ((), (-1,)):
        for b in (x2, None):
            with rules.forced():
                got = ntkfunc.ntk_fn(f, trace_axes=trace, implementation=3)(x1, b, params)
            assert max_rel_err(got, reference_kernel(f, params, x1, b, trace, ())) <= 1e-10, (name, trace, b is None)
    assert along_input_gram  # the path ran (both convolutions have it)


@pytest.mark.parametrize("name", ["3x3 s1 p1, c_in < c_out", "3x3 s2 p1, odd maps, c_in > c_out", "conv1d k3 p1"])
def test_diagonal_axes_and_whole_batch_along_the_input_gram_path(name, along_input_gram):
    """Diagonal output axes, and ``vmap_axes=None`` (the whole batch one unit: a sample axis of size 1)."""
    f, params, x1, x2 = _case(name, seed=2, n1=3)
    with rules.forced():
        diag = ntkfunc.ntk_fn(f, trace_axes=(), diagonal_axes=(-1,), implementation=3)(x1, x2, params)
        whole = ntkfunc.ntk_fn(f, trace_axes=(), vmap_axes=None, implementation=3)(x1, x2, params)
    assert max_rel_err(diag, reference_kernel(f, params, x1, x2, (), (-1,))) <= 1e-10
    assert max_rel_err(whole, reference_kernel(f, params, x1, x2, (), ())) <= 1e-10
    assert along_input_gram


def test_float32_along_the_input_gram_path(along_input_gram):
    """float32 factors: within float32 rounding of the float64 reference."""
    d, ci, co, k, stride, padding, dilation, size, bias, groups = CONVS["3x3 s1 p1, c_in < c_out"]
    model = _net(d, ci, co, k, stride, padding, dilation, size, bias, groups, torch.float32)
    f, params = ntkfunc.from_module(model)
    torch.manual_seed(3)
    x1, x2 = torch.randn(5, ci, *size), torch.randn(4, ci, *size)
    with rules.forced():
        got = ntkfunc.ntk_fn(f, trace_axes=(), implementation=3)(x1, x2, params)
    p64 = {k: v.double() for k, v in params.items()}
    assert max_rel_err(got.double(), reference_kernel(f, p64, x1.double(), x2.double(), (), ())) <= 1e-5
    assert along_input_gram


@pytest.mark.parametrize("name", ["3x3 s1 p1, c_in < c_out", "5x5 same", "3x3 dilation 2 p2"])
def test_rows_gram_terms_along_the_input_gram_path_equal_the_reference(name):
    """The per-sample rows' Gram terms (packed factors of chunks of 2 samples, concatenated) along the path."""
    f, params, x1, x2 = _case(name, seed=4, n1=5)
    problem = make_problem(f, x1[:1], None, params, 0, (-1,), (), api="kernel_matrix")
    source = persample.StructuredRows(problem, 5, 3, routes="gram")
    lay = problem.layouts[0]
    r1 = torch.empty((5, *source.out_shape, source.slots.width), dtype=torch.float64)
    r2 = torch.empty((3, *source.out_shape, source.slots.width), dtype=torch.float64)
    f1, f2 = source.compute([x1], r1, 2), source.compute([x2], r2, 2)
    k_ = lay.contract(r1, r2, 1)
    taken = 0
    for (s1, c1), (s2, c2) in zip(f1.terms, f2.terms):
        eq = plan.gram_equation(lay, True, s1, s2, c1, c2)
        q = next((p for p in eq.paths if p.name == input_gram.INPUT_GRAM), eq.paths[0])
        taken += q.name == input_gram.INPUT_GRAM
        k_ = k_ + eq.run(source.limit, path=q) * (s1.scale * s2.scale)
    assert taken == 2  # both convolutions' kernels
    got = k_ / lay.trace_size(problem.out_shapes1[0])
    assert max_rel_err(got, reference_kernel(f, params, x1, x2, (-1,), ())) <= 1e-10


def _last_stage_equation(b: int = 4, c: int = 256) -> plan.Equation:
    """The Gram equation of a 3x3 convolution ``c -> c`` channels on 4x4 maps (padding 1; the ResNet-18's last stage has
    ``c = 512``), ``b`` x ``b`` samples, one logit."""
    rule = rules.lookup(F.conv2d)
    torch.manual_seed(5)
    w = torch.randn(c, c, 3, 3)

    def side(x: torch.Tensor) -> tuple[rules.Structure, torch.Tensor]:
        ops, meta = rule.capture(rule.bind((x[:1], w), {"padding": 1}), lambda t: t is w)
        st = rule.structure("weight", [x.unsqueeze(1)], meta, (1, c, 4, 4))
        return st, torch.randn(b, 1, 1, c, 4, 4)  # cotangents (b, logit, *y)

    lay = Layout.make(2, 0, (-1,), ())
    (s1, c1), (s2, c2) = side(torch.randn(b, c, 4, 4)), side(torch.randn(b, c, 4, 4))
    return plan.gram_equation(lay, True, s1, s2, c1, c2)


def test_input_gram_path_is_a_candidate_priced_cheaper_and_measured(monkeypatch):
    """A 3x3 stride-1 convolution with many channels on small maps: the path exists, costs fewer FLOPs than the others
    (about 9x fewer for the patch Gram) and is priced cheaper with its shifted sums' writes, so it is the equation's price
    (which routes compare with the row's) and taken without a table; given one, it is timed with the others."""
    eq = _last_stage_equation()
    by_name = {q.name: q for q in eq.paths}
    assert set(by_name) == {contraction.OPTIMAL, contraction.PAIRED, input_gram.INPUT_GRAM}
    assert by_name[input_gram.INPUT_GRAM].price.flops < 0.6 * by_name[contraction.PAIRED].price.flops
    assert by_name[input_gram.INPUT_GRAM].price.cost < min(by_name[contraction.PAIRED].price.cost, by_name[contraction.OPTIMAL].price.cost)
    assert eq.price == by_name[input_gram.INPUT_GRAM].price
    ran: list = []
    real = plan.run_input_gram
    monkeypatch.setattr(plan, "run_input_gram", lambda *a: ran.append(1) or real(*a))
    expected = eq.run(None, path=by_name[contraction.PAIRED]).double()
    assert max_rel_err(routes.contract(eq, None).double(), expected) <= 1e-5
    assert ran  # the cheapest priced, without a table
    table: dict = {}
    routes.contract(eq, None, table)
    assert set(table[("contract", eq.eq, eq.shapes)]) == {contraction.OPTIMAL, contraction.PAIRED, input_gram.INPUT_GRAM}
    probe = plan.probe_equation(eq, 3)
    assert probe.windows is not None and probe.windows.x1.shape[0] == 3
    assert {q.name for q in probe.paths} == set(by_name)


def test_no_input_gram_path_where_the_window_does_not_apply():
    """Transposed convolutions and structures without their window (a renamed tied use) have no such path."""
    eq = _last_stage_equation()
    bare = plan.Equation(eq.eq, eq.tensors, eq.side)
    assert input_gram.INPUT_GRAM not in {q.name for q in bare.paths}
    x, w = torch.randn(2, 3, 4, 4), torch.randn(3, 5, 3, 3)
    rule = rules.lookup(F.conv_transpose2d)
    ops, meta = rule.capture(rule.bind((x, w), {"padding": 1}), lambda t: t is w)
    assert rule.structure("weight", [x.unsqueeze(0)], meta, (2, 5, 4, 4)).window is None
