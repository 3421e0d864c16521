"""Per-sample rows (ntkfunc._engines.rows), their Gram route, the products' precision and the panel plan."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import jacrev, vmap

import ntkfunc
from ntkfunc._core.problem import make_problem
from ntkfunc._dataset import plan
from ntkfunc._dataset.precision import batched_product, check_precision, matmul_precision
from ntkfunc._engines import rows as persample
from tests.reference import max_rel_err, reference_kernel, trace_and_diagonal
from tests.zoo import CASES, SETTINGS_2D, SETTINGS_3D

# one output tensor with the batch axis first: the rows' domain
ROW_CASES = [c for c in CASES if c.name not in ("pytree", "batch_axis_1", "batchnorm_train_vmap_none", "set_pooling_vmap_none")]


def _problem(case, dtype=torch.float64, trace=(), diag=()):
    f, params, x1, x2, _ = case.build(dtype)
    return f, params, x1, x2, make_problem(f, x1[:1], None, params, 0, trace, diag, api="kernel_matrix")


def _jacobian_rows(f, params, x):
    """Per-sample Jacobians by torch.func alone, flattened in the documented order."""
    jac = vmap(jacrev(lambda p, xi: f(p, xi.unsqueeze(0)).squeeze(0)), in_dims=(None, 0))(params, x)
    leaves = [k for k, v in params.items() if v.is_floating_point()]
    return torch.cat([jac[k].reshape(x.shape[0], *jac[k].shape[1 : jac[k].ndim - params[k].ndim], -1) for k in leaves], -1)


@pytest.mark.parametrize("case", ROW_CASES, ids=str)
def test_rows_equal_jacobians_in_the_documented_order(case):
    """Rule-formed rows (conv im2col + bmm, linear bmm, norms/attention/embedding einsums, fallbacks) equal vmap(jacrev)."""
    f, params, x1, _, problem = _problem(case)
    rows = persample.per_sample_gradients(problem, [x1], chunk=2)  # chunks of 2: 5 samples in 3 passes
    expected = _jacobian_rows(f, params, x1)
    assert rows.shape == expected.shape
    assert max_rel_err(rows, expected) <= 1e-12
    source = persample.StructuredRows(problem, routes="rows")
    assert source.slots.names(problem) == [problem.params.names[i] for i in problem.params.diff_index]


def _tied_lm(p, x):  # GPT-2 style: the token embedding is the LM head (two uses of one table)
    h = torch.tanh(torch.nn.functional.embedding(x, p["e"]) + p["pos"][: x.shape[1]])
    return torch.nn.functional.linear(h, p["e"]).sum(1)


def _views(p, x):  # a weight through .T (tied with a direct use), a layer scale through reshape, a slice, an expand
    h = torch.tanh(torch.tanh(x) @ p["w"].T + p["b"]) @ p["w"]
    h = torch.cat([p["cls"].expand(x.shape[0], -1, -1), h * p["g"].reshape(1, 1, -1)], dim=1)
    return torch.sin(h + p["pos"][: h.shape[1]]).flatten(1) @ p["v"].T


def _linear_t(p, x):  # a covered weight through a view only: F.linear(x, W.T) and x @ W.T (rows in W's order)
    return torch.nn.functional.linear(torch.tanh(x @ p["a"].T), p["m"].T)


VIEW_CASES = {
    "tied_lm": (_tied_lm, {"e": (7, 4), "pos": (6, 4)}, lambda: torch.randint(0, 7, (5, 5))),
    "views": (_views, {"w": (5, 4), "b": (5,), "cls": (1, 1, 4), "g": (4,), "pos": (8, 4), "v": (3, 16)}, lambda: torch.randn(5, 3, 4, dtype=torch.float64)),
    "linear_t": (_linear_t, {"a": (6, 4), "m": (6, 3)}, lambda: torch.randn(5, 2, 4, dtype=torch.float64)),
}


@pytest.mark.parametrize("name", VIEW_CASES)
def test_rows_follow_views_and_tied_parameters(name):
    """Rows of parameters used through views (in the parameter's order) and of tied ones (sum of the uses) equal vmap(jacrev);
    the kernel by auto equals the reference."""
    torch.manual_seed(0)
    f, shapes, make_x = VIEW_CASES[name]
    params = {k: 0.5 * torch.randn(*s, dtype=torch.float64) for k, s in shapes.items()}
    x = make_x()
    problem = make_problem(f, x[:1], None, params, 0, (), (), api="kernel_matrix")
    source = persample.StructuredRows(problem, routes="rows")
    if name == "tied_lm":
        assert list(source.cap.tied) == [0]  # the rules, not the fallback, form the tied table's rows
        assert source.cap.fallback[1].startswith("rows: the view")  # pos[:T]: a slice, its rows by reverse mode
    rows = persample.per_sample_gradients(problem, [x], chunk=2)
    assert max_rel_err(rows, _jacobian_rows(f, params, x)) <= 1e-12
    for trace in ((), (-1,)):
        k = ntkfunc.kernel_matrix(f, params, x, x[:3], trace_axes=trace, batch_size=2, progress=False)
        assert max_rel_err(k, reference_kernel(f, params, x, x[:3], trace)) <= 1e-10, trace


@pytest.mark.parametrize("case", [c for c in ROW_CASES if c.name in ("mlp", "cnn", "attention_matmul", "resblock_groupnorm")], ids=str)
def test_jacobian_rows_equal_structured_rows(case):
    f, params, x1, _, problem = _problem(case)
    out = torch.empty_like(persample.per_sample_gradients(problem, [x1]))
    persample.JacobianRows(problem).compute([x1], out, 3)
    assert max_rel_err(out, _jacobian_rows(f, params, x1)) <= 1e-12


def _convs(p, x):  # uneven 'same' padding (an even kernel), then stride, dilation and groups
    h = torch.tanh(torch.nn.functional.conv2d(x, p["a"], p["ab"], padding="same"))
    h = torch.tanh(torch.nn.functional.conv2d(h, p["b"], None, stride=2, padding=1, dilation=2, groups=2))
    return h.flatten(1) @ p["v"]


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
def test_convolution_rows_come_from_the_rule_also_with_uneven_same_padding(monkeypatch):
    """Regression: an even kernel with padding='same' (one more zero on the right) crashed the im2col path.
    Every convolution weight's rows are written by ``Conv2d.write_gradient`` and equal vmap(jacrev)."""
    from ntkfunc.rules.conv import Conv2d

    written = []
    original = Conv2d.write_gradient
    monkeypatch.setattr(Conv2d, "write_gradient", lambda self, role, *a: written.append((role, original(self, role, *a))) or written[-1][1])
    torch.manual_seed(0)
    shapes = {"a": (4, 2, 2, 2), "ab": (4,), "b": (6, 2, 3, 3), "v": (54, 3)}
    params = {k: 0.5 * torch.randn(*s, dtype=torch.float64) for k, s in shapes.items()}
    x = torch.randn(5, 2, 7, 7, dtype=torch.float64)
    problem = make_problem(_convs, x[:1], None, params, 0, (), (), api="kernel_matrix")
    rows = persample.per_sample_gradients(problem, [x], chunk=2)
    assert max_rel_err(rows, _jacobian_rows(_convs, params, x)) <= 1e-12
    assert sorted(set(written)) == [("bias", True), ("weight", True)] and len(written) == 3 * 3  # 3 parameters, 3 chunks


CONV_WAYS = [  # (C_in, C_out, H, kernel, stride, padding, dilation, groups, outputs per sample)
    (3, 4, 8, 3, 1, 1, 1, 1, 1), (4, 6, 9, 3, 2, 1, 1, 2, 2), (2, 3, 7, 2, 1, "same", 1, 1, 3),
    (4, 4, 10, 3, 2, 2, 2, 4, 1), (3, 5, 6, 1, 1, 0, 1, 1, 2), (2, 4, 9, 3, 1, "same", 2, 2, 1),
]


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@pytest.mark.parametrize("shape", CONV_WAYS, ids=str)
def test_both_ways_of_a_convolutions_gradient_equal_the_float64_reference(shape):
    """``gradient_by_im2col`` and ``gradient_by_grouped_convolution`` (and ``write_gradient``'s measured choice between
    them, also when the table is filled in advance) write each sample's ``∂(c·y)/∂W`` into strided rows."""
    from ntkfunc._core.buffers import Buffers
    from ntkfunc.rules import conv

    ci, co, h, k, stride, pad, dil, groups, o = shape
    torch.manual_seed(0)
    g = 6
    x = torch.randn(g, ci, h, h, dtype=torch.float64)
    w = torch.randn(co, ci // groups, k, k, dtype=torch.float64)
    kw = {"stride": stride, "padding": pad, "dilation": dil, "groups": groups}
    rule = ntkfunc.rules.lookup(torch.nn.functional.conv2d)
    _, meta = rule.capture(rule.bind((x[:1], w), kw), lambda t: t is w)
    y = torch.nn.functional.conv2d(x, w, **kw)
    cot = torch.randn(g, o, *y.shape[1:], dtype=torch.float64)
    per_sample = vmap(lambda xi, ci_: torch.func.jacrev(lambda ww: torch.nn.functional.conv2d(xi[None], ww, **kw)[0])(w)
                      .reshape(-1, w.numel()).T @ ci_.reshape(o, -1).T)  # (numel, O)
    expected = per_sample(x, cot).transpose(1, 2)  # (g, O, numel)
    for way in (conv.gradient_by_im2col, conv.gradient_by_grouped_convolution):
        rows = torch.full((g, o, w.numel() + 3), float("nan"), dtype=torch.float64)
        way(x, cot, meta, rows[..., 1:-2], Buffers())
        assert max_rel_err(rows[..., 1:-2], expected) <= 1e-12, way.__name__
        assert rows[..., 0].isnan().all() and rows[..., -2:].isnan().all()  # nothing written outside the slot
    buffers = Buffers()
    rows = torch.full((g, o, w.numel()), float("nan"), dtype=torch.float64)
    assert rule.write_gradient("weight", [x], cot, meta, (1, *y.shape[1:]), rows, buffers)
    assert max_rel_err(rows, expected) <= 1e-12
    assert len(buffers.seconds) == 1 and set(next(iter(buffers.seconds.values()))) == {conv.IM2COL, conv.GROUPED}
    for way in (conv.IM2COL, conv.GROUPED):  # the table filled in advance: that way alone
        buffers.seconds[next(iter(buffers.seconds))] = {way: 1.0}
        rows.fill_(float("nan"))
        assert rule.write_gradient("weight", [x], cot, meta, (1, *y.shape[1:]), rows, buffers)
        assert max_rel_err(rows, expected) <= 1e-12


def test_choose_way_times_each_way_once_per_key_then_runs_the_fastest():
    """The probe's samples are done three times by every way (the last one's result kept: all ways give one result), the
    rest by the fastest; a second call of the key does not time again."""
    from ntkfunc._core.buffers import Buffers
    from ntkfunc.rules.conv import PROBE, choose_way

    calls: list = []
    ways = {"slow": lambda a, b: calls.append(("slow", a, b)) or sum(range(200_000)), "fast": lambda a, b: calls.append(("fast", a, b))}
    buffers = Buffers()
    assert choose_way(buffers, "k", ways, 10) == "fast"
    assert calls == [("slow", 0, PROBE), ("fast", 0, PROBE)] * 3 + [("fast", PROBE, 10)]
    assert set(buffers.seconds["k"]) == {"slow", "fast"} and buffers.seconds["k"]["slow"] > buffers.seconds["k"]["fast"]
    calls.clear()
    assert choose_way(buffers, "k", ways, 3) == "fast" and calls == [("fast", 0, 3)]


def test_rows_take_vmap_jacrev_where_it_was_measured_faster():
    """Chunk 1 by the rules (warm-up), then again by the rules and by vmap(jacrev) (both timed, a small model),
    then every chunk by the faster; every chunk's rows exact. With Gram-route parameters (factors kept) vmap(jacrev) is never tried."""
    from ntkfunc._engines.rows import structured as rows_mod

    case = next(c for c in ROW_CASES if c.name == "cnn")
    f, params, x1, _, problem = _problem(case)
    expected = _jacobian_rows(f, params, x1)
    source = persample.StructuredRows(problem, routes="rows")
    out = torch.full((x1.shape[0], *source.out_shape, source.slots.width), float("nan"), dtype=torch.float64)
    seen = []
    for _ in range(4):
        out.fill_(float("nan"))
        source.compute([x1], out, 1)  # chunks of one sample
        assert max_rel_err(out, expected) <= 1e-12
        seen.append(dict(source.buffers.seconds[("rows", 1)]))
    assert list(seen[0]) == [rows_mod.WARM, rows_mod.RULES, rows_mod.VMAP]  # 5 chunks: all three met in the first call
    table = seen[-1]
    assert set(table) == {rows_mod.WARM, rows_mod.RULES, rows_mod.VMAP} and all(math.isfinite(v) for v in table.values())
    for faster in (rows_mod.VMAP, rows_mod.RULES):  # the table filled: the faster way forms every chunk, exactly
        source.buffers.seconds[("rows", 1)] = {rows_mod.WARM: 0.0, rows_mod.RULES: 1.0, rows_mod.VMAP: 1.0}
        source.buffers.seconds[("rows", 1)][faster] = 0.5
        source._vmap = None
        out.fill_(float("nan"))
        source.compute([x1], out, 1)
        assert max_rel_err(out, expected) <= 1e-12 and (source._vmap is not None) == (faster == rows_mod.VMAP)
    gram = persample.StructuredRows(problem, x1.shape[0], x1.shape[0], routes="gram")
    assert gram.gram_params
    out = torch.empty((x1.shape[0], *gram.out_shape, gram.slots.width), dtype=torch.float64)
    for _ in range(2):
        gram.compute([x1], out, 1)
    assert gram.buffers.seconds[("rows", 1)][rows_mod.VMAP] == math.inf and gram._vmap is None


def test_projected_rows_are_a_row_source():
    """The sketch's rows: one slot of width dim, SampleBytes and Flops, no Gram route; ``compute`` gives ``features_fn``'s features."""
    case = next(c for c in ROW_CASES if c.name == "cnn")
    f, params, x1, _, problem = _problem(case)
    source = persample.ProjectedRows(problem, "countsketch", 64, 0, True)
    assert source.slots.width == 64 and source.out_shape == (3,)
    sample = source.sample_bytes()
    assert isinstance(sample, persample.SampleBytes) and sample.rows == 3 * 64 * 8 and sample.kept == 0
    assert sample.transient > sample.rows and 1 <= source.chunk_for(1e9) <= 32
    flops = source.flops()
    assert isinstance(flops, persample.Flops) and flops.row > 0 and flops.product > 0 and flops.gram == 0
    out = torch.empty((x1.shape[0], *source.out_shape, source.slots.width), dtype=torch.float64)
    assert source.compute([x1], out, 2) is None and source.gram(persample.Factors([]), persample.Factors([])) is None
    expected = ntkfunc.features_fn(f, ntkfunc.Sketch(64, seed=0, kind="countsketch"))(x1, params)
    assert max_rel_err(out, expected) <= 1e-12


def _source_kernel(source, problem, x1, x2):
    """The kernel block of two sample blocks from a row source: row product plus Gram terms, trace-averaged."""
    lay = problem.layouts[0]
    r1 = torch.empty((x1.shape[0], *source.out_shape, source.slots.width), dtype=torch.float64)
    r2 = torch.empty((x2.shape[0], *source.out_shape, source.slots.width), dtype=torch.float64)
    f1, f2 = source.compute([x1], r1, 2), source.compute([x2], r2, 3)
    k = lay.contract(r1, r2, 1)
    if f1 is not None:
        k = k + source.gram(f1, f2)
    return k / lay.trace_size(problem.out_shapes1[0])


@pytest.mark.parametrize("case", ROW_CASES, ids=str)
def test_gram_route_kernel_equals_reference(case):
    """Parameters on the Gram route keep factors (chunks concatenated) and contract them: the kernel is unchanged."""
    f, params, x1, x2, _ = case.build(torch.float64)
    nd = case.out_ndim
    full = reference_kernel(f, params, x1, x2, (), ())  # (N1, N2, d, d', ...): every setting derives from it
    full = full.permute(list(range(0, 2 * nd, 2)) + list(range(1, 2 * nd, 2)))
    settings = SETTINGS_2D if nd == 2 else SETTINGS_3D
    for routes in ("gram", "price"):
        for trace, diag in settings[:3] if routes == "gram" else settings[:1]:
            if any(a % nd == 0 for a in trace + diag):
                continue
            problem = make_problem(f, x1[:1], None, params, 0, trace, diag, api="kernel_matrix")
            source = persample.StructuredRows(problem, x1.shape[0], x2.shape[0], routes=routes)
            if routes == "gram":
                assert set(source.gram_params) == set(source.cap.covered)
                assert not set(source.slots.leaves) & set(source.gram_params)
            k = _source_kernel(source, problem, x1, x2)
            assert max_rel_err(k, trace_and_diagonal(full, nd, trace, diag)) <= 1e-10, (routes, trace, diag)


def test_route_prices_give_wide_layers_the_gram_route():
    """A 1024-wide hidden layer on few samples: its weight's Gram contraction is cheaper than its rows."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.Tanh(), torch.nn.Linear(1024, 1)).double()
    f, params = ntkfunc.from_module(model)
    x = torch.randn(6, 1024, dtype=torch.float64)
    problem = make_problem(f, x[:1], None, params, 0, (-1,), (), api="kernel_matrix")
    source = persample.StructuredRows(problem, 6, 6)
    names = problem.params.diff_names
    assert [names[k] for k in source.gram_params] == ["['0.weight']"]  # 1M parameters: no row for them
    assert source.slots.width == 1024 + 1024 + 1
    assert source.sample_bytes().kept < source.sample_bytes().rows
    k = ntkfunc.kernel_matrix(f, params, x, None, implementation=3, progress=False)
    assert max_rel_err(k, reference_kernel(f, params, x, None)) <= 1e-10


def test_errors_name_what_was_given():
    f, params, x1, _, problem = _problem(CASES[0])
    with pytest.raises(ValueError, match=r"routes='fast'\): expected 'price', 'rows' or 'gram'"):
        persample.StructuredRows(problem, routes="fast")
    with pytest.raises(ValueError, match=r"precision='fp8'\): expected one of 'highest', 'tf32', 'bf16'"):
        check_precision("fp8")
    with pytest.raises(ValueError, match=r"kernel_matrix\(precision='half'\)"):
        ntkfunc.kernel_matrix(f, params, x1, precision="half")


@pytest.mark.parametrize("trace,diag", SETTINGS_3D)
def test_batched_product_equals_layout_contract(trace, diag):
    from ntkfunc._core.layout import Layout

    lay = Layout.make(3, 0, trace, diag)
    torch.manual_seed(0)
    n2 = 4 if 0 not in [a % 3 for a in diag] else 5
    a, b = torch.randn(5, 3, 2, 7, dtype=torch.float64), torch.randn(n2, 3, 2, 7, dtype=torch.float64)
    assert max_rel_err(batched_product(lay, a, b, torch.bmm), lay.contract(a, b, 1)) <= 1e-12


def _digits_cnn():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 10),
    )
    f, params = ntkfunc.from_module(model.eval())
    x = ntkfunc.datasets.load_digits()[0][:40].float()
    return f, params, x


@pytest.mark.parametrize("impl", [1, "auto"])
def test_precision_errors_against_float64(impl):
    """float32 kernels: 'highest' to float32 rounding, 'tf32' (no TF32 on a CPU: the same), 'bf16' to bfloat16 rounding."""
    f, params, x = _digits_cnn()
    f64, p64 = f, {k: v.double() for k, v in params.items()}
    ref = reference_kernel(f64, p64, x.double(), None)
    errors = {}
    for precision in ("highest", "tf32", "bf16"):
        k = ntkfunc.kernel_matrix(f, params, x, None, implementation=impl, batch_size=16, precision=precision, progress=False)
        assert k.dtype == torch.float32
        errors[precision] = max_rel_err(k.double(), ref)
    assert errors["highest"] <= 1e-5 and errors["tf32"] <= 1e-5
    assert errors["bf16"] <= 3e-2  # 8-bit mantissas of the inputs, float32 sums
    k64 = ntkfunc.kernel_matrix(f64, p64, x.double(), None, implementation=impl, batch_size=16, precision="bf16", progress=False)
    assert max_rel_err(k64, ref) <= 1e-10  # float64 kernels keep their dtype


def test_precision_scope_restores_the_flags():
    mkldnn = torch.backends.mkldnn.matmul
    before = mkldnn.fp32_precision
    with matmul_precision("bf16", [torch.device("cpu")]):
        assert mkldnn.fp32_precision == "bf16"
    assert mkldnn.fp32_precision == before


# --- the plan --------------------------------------------------------------------------------------


def test_plan_holds_panels_within_the_budget():
    sample = persample.SampleBytes(rows=100_000, kept=20_000, transient=500_000)
    sizes = plan.Sizes(100, 100, True, False)
    everything = plan.plan_tiles(sample, 1.0, 1e9, sizes, 8, None)
    assert everything.panel * everything.block >= 100  # 100 rows of 120 kB fit in 1 GB: one panel, nothing streamed
    small = plan.plan_tiles(sample, 1.0, 10e6, sizes, 8, None)
    room = 10e6 - small.chunk * 600_000
    assert small.panel >= 1 and (small.panel + 1) * small.block * 120_000 + 3 * small.panel * small.block**2 * 8 <= room
    half = plan.plan_tiles(sample, 0.5, 10e6, sizes, 8, None)  # bfloat16 panels: more rows per panel
    assert half.panel * half.block > small.panel * small.block
    assert plan.plan_tiles(sample, 1.0, 7e5, sizes, 8, None).panel == 0  # not two rows: the engine per tile


def test_choose_block_trades_product_rate_against_rows_recomputed():
    """Flat rates: the block that leaves the longest panels (fewest rows); a much faster wide product: the
    wide block; widths capped at N."""
    sample = persample.SampleBytes(rows=100_000, kept=0, transient=500_000)
    sizes = plan.Sizes(2048, 2048, True, False)
    flat = {64: 1e10, 128: 1e10, 256: 1e10, 512: 1e10}
    costly_rows = persample.Flops(row=1e9, product=1e5, gram=0.0)
    b = plan.choose_block(sample, 1.0, 100e6, sizes, 8, flat, costly_rows)
    plans = [plan.plan_tiles(sample, 1.0, 100e6, sizes, 8, c) for c in flat]
    best = min(plan.rows_needed(sizes, p.block, p.panel) for p in plans if p.panel)
    chosen = plan.plan_tiles(sample, 1.0, 100e6, sizes, 8, b)
    assert b is not None and plan.rows_needed(sizes, chosen.block, chosen.panel) <= best
    steep = {64: 1e8, 128: 1e9, 256: 1e10, 512: 1e11}
    assert plan.choose_block(sample, 1.0, 1e9, sizes, 8, steep, persample.Flops(1e3, 1e6, 0.0)) >= 512
    assert plan.choose_block(sample, 1.0, 1e9, plan.Sizes(16, 16, True, False), 8, flat, costly_rows) == 16  # one block


@pytest.mark.parametrize("workers", [2, 3, 4])
@pytest.mark.parametrize("symmetric", [True, False])
def test_panels_are_balanced_by_cost(workers, symmetric):
    """The upper triangle cut into panels of equal cost (not of equal rows) and dealt to workers evenly."""
    sizes = plan.Sizes(4096, 4096 if symmetric else 3000, symmetric, False)
    costs = plan.Costs(row=50.0, pair=1.0)
    starts = plan.partition(64, 64, workers, 64, sizes, costs)
    spans = [(a, starts[i + 1] if i + 1 < len(starts) else 64) for i, a in enumerate(starts)]
    panel = [plan.panel_cost(a, c, 64, sizes, costs) for a, c in spans]
    load = [sum(panel[p] for p in ps) for ps in plan.assign(panel, workers)]
    assert len(starts) == workers
    assert max(load) / min(load) <= 1.15  # one block row of granularity
    if symmetric:  # equal rows would give the first worker far more of the triangle
        equal = [plan.panel_cost(w * 64 // workers, (w + 1) * 64 // workers, 64, sizes, costs) for w in range(workers)]
        assert max(equal) / min(equal) > 2 * max(load) / min(load)
    assert math.isclose(sum(panel), sum(load))


def test_memory_caps_the_panels_then_workers_share_them():
    sizes = plan.Sizes(1000, 1000, True, False)
    starts = plan.partition(10, 3, 2, 100, sizes, plan.Costs(1.0, 0.01))
    spans = [(a, starts[i + 1] if i + 1 < len(starts) else 10) for i, a in enumerate(starts)]
    assert all(c - a <= 3 for a, c in spans) and len(starts) % 2 == 0 and starts[0] == 0


@pytest.mark.parametrize("trace", [(-1,), ()])
def test_bfloat16_panels_stage_chunks_and_multiply_in_float32(monkeypatch, trace):
    """The CUDA bf16 path on a CPU: rows stored in bfloat16 (computed chunk by chunk in float32, then stored)
    and multiplied by ``batched_product`` into float32 (here with an upcast bmm standing in for out_dtype=)."""
    from ntkfunc._dataset import panels, pipeline

    f, params, x = _digits_cnn()
    seen = []
    monkeypatch.setattr(pipeline, "storage_dtype", lambda precision, dtype, device: torch.bfloat16)
    monkeypatch.setattr(panels, "product", lambda lay, a, b, dt: seen.append(a.dtype) or batched_product(
        lay, a, b, lambda u, v: torch.bmm(u.to(dt), v.to(dt))))
    k = ntkfunc.kernel_matrix(f, params, x[:24], None, trace_axes=trace, batch_size=8, progress=False)
    assert k.dtype == torch.float32 and set(seen) == {torch.bfloat16}
    ref = reference_kernel(f, {n: v.double() for n, v in params.items()}, x[:24].double(), None, trace)
    assert max_rel_err(k.double(), ref) <= 3e-2
