"""jacobian_fn: per-sample Jacobians against the float64 reference (the whole batch's Jacobian by autograd, cut per sample)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils import _pytree as pytree

import ntkfunc
from tests.reference import full_jacobians, max_rel_err
from tests.zoo import CASES

IMPLEMENTATIONS = [None, 1, 3]


def _reference(f, params, x, vmap_axes):
    """Per output leaf ``(N, *out, P)`` (``(*out, P)`` for ``vmap_axes=None``) from the whole batch's Jacobian.

    Samples do not interact when ``vmap_axes`` is set, so the Jacobian of sample ``n``'s outputs is the
    rows of the batch Jacobian that belong to them: no per-sample machinery involved.
    """
    leaves, _ = full_jacobians(f, params, x)
    out = []
    for shape, jac in leaves:
        j = jac.reshape(*shape, jac.shape[-1])
        if vmap_axes is not None:
            axis = vmap_axes if isinstance(vmap_axes, int) else 0
            j = j.movedim(axis, 0)
        out.append(j)
    return out


def _flat_leaves(result):
    return pytree.tree_leaves(result)


def _as_flat(result, params, n_lead):
    """A pytree-like-params result (per output leaf) back to ``(..., P)`` in the documented order."""
    diff = [t for t in pytree.tree_leaves(params) if t.is_floating_point()]
    leaves = [t for t in pytree.tree_leaves(result) if t is not None]
    per_output = len(leaves) // len(diff)
    out = []
    for k in range(per_output):
        group = leaves[k * len(diff):(k + 1) * len(diff)]
        lead = group[0].shape[: group[0].ndim - diff[0].ndim]
        out.append(torch.cat([j.reshape(*lead, -1) for j in group], -1))
    return out


@pytest.mark.parametrize("impl", IMPLEMENTATIONS, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_zoo_matches_the_reference_flat_and_like_params(case, impl):
    f, params, x1, _, vmap_axes = case.build(torch.float64)
    ref = _reference(f, params, x1, vmap_axes)
    flat = ntkfunc.jacobian_fn(f, vmap_axes, implementation=impl, flat=True)(x1, params)
    got = _flat_leaves(flat)
    assert [tuple(g.shape) for g in got] == [tuple(r.shape) for r in ref]
    assert all(g.dtype == torch.float64 for g in got)
    assert max_rel_err(got, ref) <= 1e-12
    tree = ntkfunc.jacobian_fn(f, vmap_axes, implementation=impl)(x1, params)
    assert max_rel_err(_as_flat(tree, params, 1), ref) <= 1e-12
    if isinstance(params, dict) and all(isinstance(v, torch.Tensor) for v in params.values()):
        assert list(tree) == list(params)  # the structure of params (one output tensor)
        for name, theta in params.items():
            assert tree[name].shape[-theta.ndim:] == theta.shape if theta.ndim else True


def test_pytree_params_and_outputs_keep_their_structure():
    f, params, x1, _, _ = next(c for c in CASES if c.name == "pytree").build(torch.float64)
    jac = ntkfunc.jacobian_fn(f)(x1, params)
    assert set(jac) == {"logits", "aux"} and isinstance(jac["aux"], tuple)
    logits = jac["logits"]
    assert logits["step"] is None  # an integer leaf: a constant, no derivative
    assert logits["enc"]["w"].shape == (5, 2, 3, 5) and logits["heads"][1][0].shape == (5, 2, 5, 4)
    assert jac["aux"][0]["enc"]["b"].shape == (5, 4, 5)
    flat = ntkfunc.jacobian_fn(f, flat=True)(x1, params)
    assert flat["logits"].shape == (5, 2, 3 * 5 + 5 + 7 * 2 + 5 * 4) and flat["aux"][0].shape == (5, 4, 54)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS, ids=str)
def test_output_shapes_and_per_sample_loss_gradients(impl):
    """Scalar outputs (a per-sample loss with integer labels in the inputs), (N, C, H, W) and (N, T, D) outputs."""
    torch.manual_seed(0)
    conv = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv2d(3, 2, 3, stride=2)).double()
    f, params = ntkfunc.from_module(conv)
    x = torch.randn(4, 2, 7, 7, dtype=torch.float64)
    got = ntkfunc.jacobian_fn(f, implementation=impl, flat=True)(x, params)
    assert got.shape == (4, 2, 3, 3, sum(p.numel() for p in params.values()))
    assert max_rel_err(got, _reference(f, params, x, 0)[0]) <= 1e-12

    mlp = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU(), torch.nn.Linear(8, 4)).double()
    g, gp = ntkfunc.from_module(mlp)
    tokens = torch.randn(3, 5, 6, dtype=torch.float64)  # (N, T, D) outputs
    seq = ntkfunc.jacobian_fn(g, implementation=impl)(tokens, gp)
    assert seq["0.weight"].shape == (3, 5, 4, 8, 6)
    assert max_rel_err(_as_flat(seq, gp, 3), _reference(g, gp, tokens, 0)) <= 1e-12

    labels = torch.tensor([1, 0, 3])
    xs = torch.randn(3, 6, dtype=torch.float64)

    def loss(p, batch):
        inputs, y = batch
        return torch.nn.functional.cross_entropy(g(p, inputs), y, reduction="none")  # (N,)

    grads = ntkfunc.jacobian_fn(loss, implementation=impl)((xs, labels), gp)
    assert grads["2.weight"].shape == (3, 4, 8)
    for n in range(3):  # each sample's gradient of its own loss, by plain autograd
        p = {k: v.clone().requires_grad_(True) for k, v in gp.items()}
        torch.nn.functional.cross_entropy(g(p, xs[n:n + 1]), labels[n:n + 1]).backward()
        for k in gp:
            assert torch.allclose(grads[k][n], p[k].grad, rtol=1e-12, atol=1e-14), (n, k)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS, ids=str)
def test_float32_and_bfloat16(impl):
    case = next(c for c in CASES if c.name == "cnn")
    f, params, x1, _, _ = case.build(torch.float32)
    got = ntkfunc.jacobian_fn(f, implementation=impl, flat=True)(x1, params)
    f64, p64, x64, _, _ = case.build(torch.float64)
    assert got.dtype == torch.float32 and max_rel_err(got, _reference(f64, p64, x64, 0)[0]) <= 1e-5
    fb, pb, xb, _, _ = next(c for c in CASES if c.name == "mlp").build(torch.bfloat16)
    low = ntkfunc.jacobian_fn(fb, implementation=impl, flat=True)(xb, pb)
    assert low.dtype == torch.bfloat16
    ref = _reference(fb, {k: v.double() for k, v in pb.items()}, xb.double(), 0)[0]
    assert max_rel_err(low.double(), ref) <= 3e-2


@pytest.mark.parametrize("impl", IMPLEMENTATIONS, ids=str)
def test_memory_budget_chunks_and_stays_exact(impl, row_chunks):
    chunks = row_chunks
    f, params, x1, _, _ = next(c for c in CASES if c.name == "resblock_groupnorm").build(torch.float64)
    got = ntkfunc.jacobian_fn(f, implementation=impl, flat=True, memory_budget=20_000)(x1, params)
    assert chunks and max(chunks) < x1.shape[0]  # several passes
    assert max_rel_err(got, _reference(f, params, x1, 0)[0]) <= 1e-12


def test_auto_uses_the_rules_where_they_pay_and_vmap_jacrev_on_small_problems(monkeypatch):
    from ntkfunc._engines.rows import per_sample

    made = []
    original = per_sample.source

    def spy(rp, captures, auto):
        src = original(rp, captures, auto)
        made.append(type(src).__name__)
        return src

    monkeypatch.setattr(per_sample, "source", spy)
    f, params, x1, _, _ = next(c for c in CASES if c.name == "mlp").build(torch.float64)
    ntkfunc.jacobian_fn(f)(x1, params)
    torch.manual_seed(0)
    wide = torch.nn.Sequential(torch.nn.Linear(32, 512), torch.nn.ReLU(), torch.nn.Linear(512, 10)).double()
    g, gp = ntkfunc.from_module(wide)
    x = torch.randn(16, 32, dtype=torch.float64)
    got = ntkfunc.jacobian_fn(g, flat=True)(x, gp)
    assert made == ["JacobianRows", "StructuredRows"]
    assert max_rel_err(got, _reference(g, gp, x, 0)[0]) <= 1e-12


def _central_difference(fun, t: torch.Tensor, direction: torch.Tensor, eps: float = 1e-6) -> float:
    return float((fun(t + eps * direction) - fun(t - eps * direction)) / (2 * eps))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS, ids=str)
@pytest.mark.parametrize("name", ["cnn", "layernorm_mlp", "attention_matmul"])
def test_differentiable_in_inputs_and_params_against_finite_differences(name, impl):
    """d/dx and d/dθ of a scalar of the Jacobians (torch.autograd and torch.func.grad) against central differences."""
    f, params, x1, _, _ = next(c for c in CASES if c.name == name).build(torch.float64)
    jac = ntkfunc.jacobian_fn(f, implementation=impl, flat=True)
    torch.manual_seed(1)
    weights = torch.randn_like(jac(x1, params))

    def scalar_of_x(x):
        return (jac(x, params) * weights).sum()

    x = x1.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(scalar_of_x(x), x)
    direction = torch.randn_like(x1)
    with torch.no_grad():
        fd = _central_difference(scalar_of_x, x1, direction)
    assert math.isclose(float((gx * direction).sum()), fd, rel_tol=1e-6, abs_tol=1e-8)

    def scalar_of_params(p):
        return (jac(x1, p) * weights).sum()

    gp = torch.func.grad(scalar_of_params)(params)
    name0 = next(iter(params))
    d = torch.randn_like(params[name0])

    def along(t):
        return scalar_of_params({**params, name0: t})

    fd = _central_difference(along, params[name0], d)
    assert math.isclose(float((gp[name0] * d).sum()), fd, rel_tol=1e-6, abs_tol=1e-8)


def test_vmap_over_an_ensemble_of_params():
    f, params, x1, _, _ = next(c for c in CASES if c.name == "mlp").build(torch.float64)
    ensemble = {k: torch.stack([v, 0.5 * v]) for k, v in params.items()}
    jac = ntkfunc.jacobian_fn(f, flat=True)
    both = torch.func.vmap(jac, in_dims=(None, 0))(x1, ensemble)
    assert torch.allclose(both[1], jac(x1, {k: v[1] for k, v in ensemble.items()}), rtol=1e-12, atol=1e-14)


def test_bad_arguments_say_what_was_given_and_expected():
    f, params, x1, _, _ = next(c for c in CASES if c.name == "mlp").build(torch.float64)
    with pytest.raises(ValueError, match=r"jacobian_fn\(f, implementation=2\).*no per-sample gradients.*expected one of"):
        ntkfunc.jacobian_fn(f, implementation=2)
    with pytest.raises(ValueError, match=r"jacobian_fn: implementation=7"):
        ntkfunc.jacobian_fn(f, implementation=7)
    with pytest.raises(TypeError, match="flat"):
        ntkfunc.jacobian_fn(f, flat="yes")
    with pytest.raises(ValueError, match="jacobian_fn"):
        ntkfunc.jacobian_fn(f, vmap_axes=3)(x1, params)


def test_a_kernel_function_measures_its_ways_once_per_shape(monkeypatch):
    """The rules time their ways of forming a convolution's gradient on the first samples of a shape; a jacobian
    function called again with the same shapes reuses those measurements (one way per layer, nothing probed)."""
    from ntkfunc.rules import conv

    calls = []
    for name in ("gradient_by_im2col", "gradient_by_grouped_convolution"):
        original = getattr(conv, name)
        monkeypatch.setattr(conv, name, lambda *a, _f=original, _n=name, **k: (calls.append(_n), _f(*a, **k))[1])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv2d(4, 6, 3), torch.nn.Flatten(),
                                torch.nn.Linear(6 * 4 * 4, 3)).double()
    f, params = ntkfunc.from_module(model)
    x = torch.randn(9, 2, 6, 6, dtype=torch.float64)
    monkeypatch.setattr("ntkfunc._engines.rows.structured.EXPLORE_FLOPS", 0.0)  # the rules only, not vmap(jacrev)
    jac = ntkfunc.jacobian_fn(f, implementation=3)
    first = jac(x, params)
    probed = len(calls)
    assert probed > 2  # both ways timed on each of the two convolutions
    calls.clear()
    again = jac(x, params)
    assert len(calls) == 2, calls  # one way per convolution: the measurements were kept
    ref = torch.func.vmap(torch.func.jacrev(lambda p, xi: f(p, xi[None])[0]), in_dims=(None, 0))(params, x)
    for k in params:
        assert max_rel_err(first[k], ref[k]) < 1e-12 and max_rel_err(again[k], ref[k]) < 1e-12


@pytest.mark.parametrize("flat", [False, True], ids=["like_params", "flat"])
@pytest.mark.parametrize("faster", ["rules", "vmap(jacrev)"])
def test_the_second_call_takes_the_way_its_first_call_measured_faster(monkeypatch, faster, flat):
    """The first call forms its one chunk by the rules (warm-up), then times the rules and vmap(jacrev) on it; the
    second call takes the faster (here made so by the measured table) and is exact either way, outputs cut into
    f's leaves (two outputs: the rows of their concatenation) and parameters, flat or like params."""
    from ntkfunc._engines.rows import jacobian as jac_mod
    from ntkfunc._engines.rows import structured as rows_mod
    from ntkfunc._engines.structured import kernel

    original = rows_mod.StructuredRows._form

    def form(self, way, xc, out, parts):
        original(self, way, xc, out, parts)
        table = self.buffers.seconds[("rows", out.shape[0])]
        if way in (rows_mod.RULES, rows_mod.VMAP):  # the measurement made to say `faster`
            table[way] = 1.0 if way == faster else 2.0

    monkeypatch.setattr(rows_mod.StructuredRows, "_form", form)
    passes = []
    for mod, name in ((kernel, "side"), (jac_mod.JacobianRows, "pieces")):
        fn = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _fn=fn, _n=name, **k: (passes.append(_n), _fn(*a, **k))[1])
    torch.manual_seed(0)
    # vmap(jacrev) is tried where it holds no more per sample than the rules' work buffers (im2col patches)
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.Tanh(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(8, 2)).double()
    g, params = ntkfunc.from_module(model)

    def f(p, x):
        y = g(p, x)
        return {"logits": y, "loss": (y ** 2).sum(1)}

    x = torch.randn(6, 4, 8, 8, dtype=torch.float64)
    jac = ntkfunc.jacobian_fn(f, implementation=3, flat=flat)
    first = jac(x, params)
    assert passes == ["side"] + ["side", "pieces"] * rows_mod.EXPLORE_ROUNDS  # warm-up, then both timed, alternating
    passes.clear()
    again = jac(x, params)
    assert passes == (["side"] if faster == "rules" else ["pieces"])
    ref = _reference(f, params, x, 0)
    for got in (first, again):
        leaves = [got["logits"], got["loss"]] if flat else _as_flat(got, params, 1)
        assert [tuple(t.shape) for t in leaves] == [tuple(r.shape) for r in ref]
        assert max_rel_err(leaves, ref) <= 1e-12
    if not flat:
        assert again["logits"]["4.weight"].shape == (6, 2, 2, 8) and again["loss"]["0.bias"].shape == (6, 8)


def test_the_rules_work_buffers_are_lent_to_the_next_call_with_the_same_shapes(monkeypatch):
    """The second call with the same shapes writes through the first call's work buffers (taken out of the function's
    cache while it runs, so that two calls at once never share them); other shapes get their own; results exact."""
    from ntkfunc._engines.rows import per_sample

    made = []
    original = per_sample.source
    monkeypatch.setattr(per_sample, "source", lambda *a: (made.append(original(*a)), made[-1])[1])
    monkeypatch.setattr("ntkfunc._engines.rows.structured.EXPLORE_FLOPS", 0.0)  # the rules on every call
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.Tanh(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 6 * 6, 3)).double()
    f, params = ntkfunc.from_module(model)
    jac = ntkfunc.jacobian_fn(f, implementation=3, flat=True)
    x, other = torch.randn(5, 2, 6, 6, dtype=torch.float64), torch.randn(3, 2, 6, 6, dtype=torch.float64)
    results = [jac(x, params), jac(other, params), jac(x, params)]
    assert made[2].buffers is made[0].buffers and made[1].buffers is not made[0].buffers
    assert made[0].buffers.seconds  # the measured ways travel with them
    key = per_sample._buffers_key(made[0].problem)
    cache = made[0].problem.cache
    lent = per_sample.borrow_buffers(made[0].problem)  # a call in progress holds them: the next one gets fresh ones
    assert lent is made[0].buffers and key not in cache.derived
    assert per_sample.borrow_buffers(made[0].problem) is not lent
    for got, xs in zip(results, (x, other, x)):
        assert max_rel_err(got, _reference(f, params, xs, 0)[0]) <= 1e-12


@pytest.mark.parametrize("faster", ["rules", "vmap(jacrev)"])
def test_auto_skips_the_rules_set_up_where_its_first_call_measured_vmap_faster(monkeypatch, faster):
    """``"auto"``: where the first call measured ``vmap(jacrev)`` faster on the whole batch, later calls with these
    shapes take implementation 1's rows directly (no :class:`StructuredRows` built: its set-up is most of a small
    batch's cost over ``vmap(grad)``); where the rules were faster they are built and taken. Exact either way."""
    from ntkfunc._engines.rows import structured as rows_mod
    from ntkfunc._engines.structured import routes

    monkeypatch.setattr(routes, "unprobed", lambda *a: None)  # auto goes through the rules' rows, as on larger models
    original = rows_mod.StructuredRows._form

    def form(self, way, xc, out, parts):
        original(self, way, xc, out, parts)
        if way in (rows_mod.RULES, rows_mod.VMAP):  # the measurement made to say `faster`
            self.buffers.seconds[("rows", out.shape[0])][way] = 1.0 if way == faster else 2.0

    monkeypatch.setattr(rows_mod.StructuredRows, "_form", form)
    built = []
    init = rows_mod.StructuredRows.__init__
    monkeypatch.setattr(rows_mod.StructuredRows, "__init__", lambda self, *a, **k: (built.append(1), init(self, *a, **k))[1])
    torch.manual_seed(0)
    # vmap(jacrev) is tried where it holds no more per sample than the rules' work buffers (im2col patches)
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.Tanh(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(8, 2)).double()
    f, params = ntkfunc.from_module(model)
    x = torch.randn(6, 4, 8, 8, dtype=torch.float64)
    jac = ntkfunc.jacobian_fn(f)
    ref = _reference(f, params, x, 0)
    for call in range(3):
        built.clear()
        got = _as_flat(jac(x, params), params, 1)
        assert max_rel_err(got, ref) <= 1e-12, call
        assert len(built) == (1 if call == 0 or faster == "rules" else 0), (call, built)
    other = torch.randn(5, 4, 8, 8, dtype=torch.float64)  # another batch size: measured anew, through the rules first
    built.clear()
    assert max_rel_err(_as_flat(jac(other, params), params, 1), _reference(f, params, other, 0)) <= 1e-12 and built == [1]


def test_vmap_is_tried_where_a_chunk_of_it_fits_the_callers_budget(monkeypatch):
    """An MLP whose ``vmap(jacrev)`` holds more per sample than the rules' pass: without a budget (``kernel_matrix``'s
    chunks, sized for the rules) it is not tried; ``jacobian_fn`` gives its planned budget, where a chunk of it fits,
    so its first call times both ways and later calls take the faster. Exact either way."""
    from ntkfunc._core.problem import make_problem
    from ntkfunc._engines.rows import structured as rows_mod
    from ntkfunc._engines.structured import routes

    monkeypatch.setattr(routes, "unprobed", lambda *a: None)  # auto goes through the rules' rows, as on larger models
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(30, 40), torch.nn.ReLU(), torch.nn.Linear(40, 40), torch.nn.ReLU(),
                                torch.nn.Linear(40, 3)).double()
    f, params = ntkfunc.from_module(model)
    x = torch.randn(2, 30, dtype=torch.float64)
    src = rows_mod.StructuredRows(make_problem(f, x, None, params, 0, (), ()), routes="rows")
    assert src._jacobian_rows().sample_bytes().transient > src.sample_bytes().transient  # the case at hand
    assert not src._vmap_allowed(2)
    src.chunk_budget = 1e9
    assert src._vmap_allowed(2)
    src.chunk_budget = 1.0  # a chunk of vmap(jacrev) would not fit
    assert not src._vmap_allowed(2)
    built = []
    init = rows_mod.StructuredRows.__init__
    monkeypatch.setattr(rows_mod.StructuredRows, "__init__", lambda self, *a, **k: (built.append(self), init(self, *a, **k))[1])
    jac = ntkfunc.jacobian_fn(f, flat=True)
    ref = _reference(f, params, x, 0)
    assert max_rel_err(jac(x, params), ref) <= 1e-12
    table = built[0].buffers.seconds[("rows", 2)]
    assert math.isfinite(table[rows_mod.VMAP]) and math.isfinite(table[rows_mod.RULES])  # both timed on the first call
    assert max_rel_err(jac(x, params), ref) <= 1e-12


OUT_CASES = ["mlp", "cnn", "layernorm_mlp", "attention_matmul", "resblock_groupnorm", "embedding_int_inputs", "tied_weights"]


@pytest.mark.parametrize("flat", [False, True], ids=["like_params", "flat"])
@pytest.mark.parametrize("impl", IMPLEMENTATIONS, ids=str)
@pytest.mark.parametrize("name", OUT_CASES)
def test_out_holds_the_jacobians_and_is_written_again_by_the_next_call(name, impl, flat):
    """``out=``: the result is views of the caller's buffer, exact against the reference; a second call with other
    inputs writes its Jacobians over the first ones in the same buffer (no new rows)."""
    f, params, x1, _, _ = next(c for c in CASES if c.name == name).build(torch.float64)
    jac = ntkfunc.jacobian_fn(f, implementation=impl, flat=flat)
    want = jac(x1, params)  # a new result, for its shape
    shape = (want if flat else _as_flat(want, params, 1)[0]).shape
    buf = torch.full(shape, float("nan"), dtype=torch.float64)
    for x in (x1, x1.flip(0)):
        got = jac(x, params, out=buf)
        leaves = [got] if flat else [t for t in pytree.tree_leaves(got) if t is not None]
        assert all(t.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr() for t in leaves)
        assert (got is buf) == flat
        ref = _reference(f, params, x, 0)[0]
        assert max_rel_err(buf, ref) <= 1e-12
        assert max_rel_err(got if flat else _as_flat(got, params, 1)[0], ref) <= 1e-12


def test_out_may_be_the_leading_rows_of_a_larger_buffer():
    """A last, smaller batch writes into ``buf[:n]`` of the buffer the full batches use (a contiguous slice)."""
    f, params, x1, _, _ = next(c for c in CASES if c.name == "cnn").build(torch.float64)
    p = sum(t.numel() for t in params.values())
    buf = torch.full((x1.shape[0], 3, p), float("nan"), dtype=torch.float64)
    jac = ntkfunc.jacobian_fn(f, flat=True)
    jac(x1, params, out=buf)
    last = x1[:2]
    assert jac(last, params, out=buf[:2]).data_ptr() == buf.data_ptr()
    assert max_rel_err(buf[:2], _reference(f, params, last, 0)[0]) <= 1e-12
    assert max_rel_err(buf[2:], _reference(f, params, x1, 0)[0][2:]) <= 1e-12  # the rest left as the full batch wrote it


@pytest.mark.parametrize("way", ["rules", "vmap(jacrev)"])
def test_out_is_filled_by_either_way_and_chunk_by_chunk(monkeypatch, way, row_chunks):
    """Both ways of forming the rows write into ``out`` (the measured table says which is faster), also when the
    budget splits the batch into several passes."""
    from ntkfunc._engines.rows import structured as rows_mod

    def forced_way(self, g):
        self.buffers.seconds.setdefault(("rows", g), {rows_mod.WARM: 0.0, rows_mod.RULES: 0.0, rows_mod.VMAP: 0.0})
        return rows_mod.RULES if way == "rules" else rows_mod.VMAP

    monkeypatch.setattr(rows_mod.StructuredRows, "_way", forced_way)
    monkeypatch.setattr(rows_mod.StructuredRows, "_form", _recording_form(rows_mod.StructuredRows._form, seen := []))
    f, params, x1, _, _ = next(c for c in CASES if c.name == "resblock_groupnorm").build(torch.float64)
    p = sum(t.numel() for t in params.values())
    buf = torch.empty(x1.shape[0], 3, p, dtype=torch.float64)
    got = ntkfunc.jacobian_fn(f, implementation=3, memory_budget=20_000)(x1, params, out=buf)
    assert row_chunks and max(row_chunks) < x1.shape[0] and set(seen) == {way}
    assert max_rel_err(buf, _reference(f, params, x1, 0)[0]) <= 1e-12
    assert got["conv1.weight"].untyped_storage().data_ptr() == buf.data_ptr()


def _recording_form(original, seen):
    def form(self, way, xc, out, parts):
        seen.append(way)
        return original(self, way, xc, out, parts)

    return form


def test_out_refuses_what_it_cannot_hold_and_says_what_was_expected():
    f, params, x1, _, _ = next(c for c in CASES if c.name == "mlp").build(torch.float64)
    n, p = x1.shape[0], sum(t.numel() for t in params.values())
    jac = ntkfunc.jacobian_fn(f)
    good = torch.empty(n, 3, p, dtype=torch.float64)
    with pytest.raises(ValueError, match=rf"out is \({n}, 3, {p + 1}\) torch.float64 on cpu; expected \({n}, 3, {p}\) torch.float64"):
        jac(x1, params, out=torch.empty(n, 3, p + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"torch.float32 on cpu; expected .* torch.float64"):
        jac(x1, params, out=torch.empty(n, 3, p))
    with pytest.raises(ValueError, match=r"torch.float64 on meta; expected .* torch.float64 on cpu"):
        jac(x1, params, out=torch.empty(n, 3, p, dtype=torch.float64, device="meta"))
    with pytest.raises(ValueError, match="out must be contiguous"):
        jac(x1, params, out=torch.empty(p, 3, n, dtype=torch.float64).permute(2, 1, 0))
    with pytest.raises(ValueError, match="out requires grad"):
        jac(x1, params, out=good.clone().requires_grad_(True))
    with pytest.raises(TypeError, match="out must be a torch.Tensor .*got ndarray"):
        jac(x1, params, out=good.numpy())
    with pytest.raises(ValueError, match="differentiable"):
        jac(x1.clone().requires_grad_(True), params, out=good)
    with pytest.raises(ValueError, match=r"vmap_axes=None"):
        ntkfunc.jacobian_fn(f, vmap_axes=None)(x1, params, out=good)
    with pytest.raises(ValueError, match="one tensor with its batch axis first.*2 output leaves"):
        ntkfunc.jacobian_fn(lambda q, x: (f(q, x), f(q, x)))(x1, params, out=good)
    shared = torch.empty(n * 3 * p, dtype=torch.float64)
    weights = {k: v if k != "0.weight" else shared[: v.numel()].view_as(v).copy_(v) for k, v in params.items()}
    with pytest.raises(ValueError, match=r"shares memory with an input or parameter of shape \(6, 4\)"):
        jac(x1, weights, out=shared.view(n, 3, p))
    assert ntkfunc.jacobian_fn(f, flat=True)(x1, params, out=good) is good  # a good buffer goes through
