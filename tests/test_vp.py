"""Implementation 2's own paths: column triangles and chunked pushes, per-parameter JVPs, threads."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch
from torch.utils import _pytree as pytree

import ntkfunc
import ntkfunc._engines.vp as vp
from ntkfunc._core.problem import make_problem
from ntkfunc._engines import ENGINES
from tests.concurrency import in_threads
from tests.reference import max_rel_err, reference_kernel
from tests.zoo import CASES

CASE_BY_NAME = {c.name: c for c in CASES}
VMAPPED = [c for c in CASES if not c.name.endswith("vmap_none")]


def _setting(case):
    return ((), ()) if case.out_ndim == 2 else ((1,), (2,))


@pytest.mark.parametrize("x2_given", [True, False], ids=["x2", "x2None"])
@pytest.mark.parametrize("case", VMAPPED, ids=str)
def test_many_columns_rows_and_chunks_are_exact(case, x2_given, monkeypatch):
    """Column blocks of one sample, one x1 row and two tangents per JVP: every piece of the tiling is used."""
    monkeypatch.setattr(vp, "PUSH_CALL_FLOPS", 0.0)  # calls are free: columns of one sample
    monkeypatch.setattr(vp, "MIN_TANGENTS", 1)
    monkeypatch.setattr(vp, "MAX_COLUMNS", 100)
    monkeypatch.setattr(vp, "WORKING_SET", 1)
    pushes = []
    original = vp._push

    def spy(problem, group, r0, r1, tangents, chunk, forward):
        pushes.append((r0, r1, chunk))
        return original(problem, group, r0, r1, tangents, chunk, forward)

    monkeypatch.setattr(vp, "_push", spy)
    f, params, x1, x2, vmap_axes = case.build(torch.float64)
    tr, dg = _setting(case)
    x2 = x2 if x2_given else None
    k = ntkfunc.ntk_fn(f, tr, dg, vmap_axes, implementation=2)(x1, x2, params)
    assert max_rel_err(k, reference_kernel(f, params, x1, x2, tr, dg)) <= 1e-10
    assert all(r1 - r0 == 1 and c == 1 for r0, r1, c in pushes)
    if not x2_given:  # the triangle: column j is pushed through rows 0..j only
        n = pytree.tree_leaves(x1)[0].shape[1 if vmap_axes == 1 else 0]
        assert len(pushes) == n * (n + 1) // 2


@pytest.mark.parametrize("x2_given", [True, False], ids=["x2", "x2None"])
@pytest.mark.parametrize("case", VMAPPED, ids=str)
def test_cotangents_sample_by_sample_are_exact(case, x2_given, monkeypatch):
    """Column blocks of several samples whose cotangents are formed one sample per call (as for large models)."""
    monkeypatch.setattr(vp, "SAMPLE_BY_SAMPLE", 1)
    calls = []
    original = vp.jacobian.jacobians

    def spy(problem, group, which, start, stop):
        calls.append(stop - start)
        return original(problem, group, which, start, stop)

    monkeypatch.setattr(vp.jacobian, "jacobians", spy)
    f, params, x1, x2, vmap_axes = case.build(torch.float64)
    tr, dg = _setting(case)
    x2 = x2 if x2_given else None
    k = ntkfunc.ntk_fn(f, tr, dg, vmap_axes, implementation=2)(x1, x2, params)
    assert max_rel_err(k, reference_kernel(f, params, x1, x2, tr, dg)) <= 1e-10
    n2 = pytree.tree_leaves(x1 if x2 is None else x2)[0].shape[1 if vmap_axes == 1 else 0]
    assert calls and set(calls) == {1} and len(calls) == n2  # every x2 sample once, one per call


def test_cotangents_batched_below_the_threshold(monkeypatch):
    """Small models keep one batched call per column block."""
    calls = []
    original = vp.jacobian.jacobians
    monkeypatch.setattr(vp.jacobian, "jacobians", lambda p, g, w, a, b: calls.append(b - a) or original(p, g, w, a, b))
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).double()
    f, params = ntkfunc.from_module(model)
    x1, x2 = torch.randn(4, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    k = ntkfunc.ntk_fn(f, (), implementation=2)(x1, x2, params)
    assert max_rel_err(k, reference_kernel(f, params, x1, x2, ())) <= 1e-10
    assert calls == [5]


def test_symmetric_kernel_uses_the_triangle(monkeypatch):
    """With x2=None, fewer (x1 sample, tangent) pairs are pushed than N1 x N2 x O (once pairs cost more than
    calls: this model's 600 FLOPs per pair alone would take one column)."""
    monkeypatch.setattr(vp, "PUSH_CALL_FLOPS", 1e3)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 10)).double()
    f, params = ntkfunc.from_module(model)
    x = torch.randn(40, 3, dtype=torch.float64)
    p = vp.plan(make_problem(f, x, None, params, 0, (), ()), 10**9)
    assert p.b2 < 40 and p.b1 == p.b2  # several columns on one grid
    k = ntkfunc.ntk_fn(f, trace_axes=(), implementation=2)(x, None, params)
    assert max_rel_err(k, reference_kernel(f, params, x, None, (), ())) <= 1e-10


@pytest.mark.parametrize("x2_given", [True, False], ids=["x2", "x2None"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_per_parameter_jvps_match_reference(case, x2_given, monkeypatch):
    """The JVP route of per_param=True (one pass per parameter), forced, on the whole zoo."""
    monkeypatch.setattr(vp, "per_param_cost", lambda problem: vp.PerParamCost(0.0, 1.0))
    f, params, x1, x2, vmap_axes = case.build(torch.float64)
    tr, dg = _setting(case)
    x2 = x2 if x2_given else None
    per = ntkfunc.ntk_fn(f, tr, dg, vmap_axes, implementation=2, per_param=True)(x1, x2, params)
    comps = pytree.tree_structure(params).flatten_up_to(per)
    leaves, spec = pytree.tree_flatten(params)
    for i, (comp, leaf) in enumerate(zip(comps, leaves)):
        if not leaf.is_floating_point():
            assert comp is None
            continue

        def g(p, x, i=i):
            full = list(leaves)
            full[i] = p
            return f(pytree.tree_unflatten(full, spec), x)

        ref = reference_kernel(g, leaf, x1, x2, tr, dg)
        scale = max(t.abs().max().item() for t in pytree.tree_leaves(ref))
        err = torch.stack([(a - b).abs().max() for a, b in zip(pytree.tree_leaves(comp), pytree.tree_leaves(ref))]).max().item()  # NaN stays NaN
        assert err <= 1e-10 * max(scale, 1.0)


def test_per_parameter_route_follows_the_cost(monkeypatch):
    """Wide layers with 10 outputs: JVP passes; a small CNN: implementation 1's path."""
    routes = []
    original = ntkfunc._engines.jacobian.kernel
    monkeypatch.setattr(vp.jacobian, "kernel", lambda *a, **k: routes.append("jacobian") or original(*a, **k))
    torch.manual_seed(0)
    wide = torch.nn.Sequential(torch.nn.Linear(4, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256), torch.nn.ReLU(),
                               torch.nn.Linear(256, 10))
    f, params = ntkfunc.from_module(wide)
    x = torch.randn(8, 4)
    per = ntkfunc.ntk_fn(f, trace_axes=(), implementation=2, per_param=True)(x, None, params)
    assert routes == []
    full = ntkfunc.ntk_fn(f, trace_axes=(), implementation=1)(x, None, params)
    assert max_rel_err(sum(per.values()), full) <= 1e-5
    f, params, x1, x2, _ = CASE_BY_NAME["cnn"].build(torch.float64)
    ntkfunc.ntk_fn(f, implementation=2, per_param=True)(x1, x2, params)
    assert routes == ["jacobian"]


def test_threads_compute_different_kernels_at_once():
    """Regression: forward-mode AD levels are process-wide in torch; 4 threads x 20 calls gave
    'Trying to access a forward AD level with an invalid index' and some wrong kernels."""
    assert ENGINES[2].thread_safe
    cases = [CASE_BY_NAME[n] for n in ("mlp", "cnn", "layernorm_mlp", "pytree")]
    jobs = []
    for case in cases:
        f, params, x1, x2, vmap_axes = case.build(torch.float64)
        jobs.append((ntkfunc.ntk_fn(f, trace_axes=(), vmap_axes=vmap_axes, implementation=2), x1, x2, params,
                     reference_kernel(f, params, x1, x2, (), ())))
    worst: list = []
    barrier = threading.Barrier(len(jobs))

    def work(job):
        kernel, x1, x2, params, ref = job
        barrier.wait()
        for _ in range(20):
            worst.append(max_rel_err(kernel(x1, x2, params), ref))

    in_threads(*[lambda job=job: work(job) for job in jobs])  # raises the first error of any thread
    assert len(worst) == 20 * len(jobs) and max(worst) <= 1e-10


def test_zero_size_parameter():
    """Regression: a parameter with no elements (a Linear to 0 features) crashed the tangents' reshape."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 0), torch.nn.Linear(0, 2)).double()
    f, params = ntkfunc.from_module(model)
    x = torch.randn(3, 3, dtype=torch.float64)
    k = ntkfunc.ntk_fn(f, trace_axes=(), implementation=2)(x, None, params)
    assert max_rel_err(k, reference_kernel(f, params, x, None, (), ())) <= 1e-12


def test_balanced_parts_never_exceed_the_planned_push() -> None:
    """Rows and tangent chunks are split into equal parts no larger than the plan's (the memory cap holds)."""
    for total in range(1, 200):
        for most in range(1, 80):
            size = vp.balanced(total, most)
            parts = -(-total // size)
            assert 1 <= size <= most
            assert parts == -(-total // most)  # no more pushes than fixed-size chunks
            assert (parts - 1) * size < total <= parts * size


def test_push_shape_fills_calls_within_the_working_set() -> None:
    """Per column block: every call within ``pairs`` (or one pair), no more calls than the block needs at that cap."""
    for pairs in (1, 7, 64, 768, 5000):
        for n_rows in range(1, 40, 3):
            for n_tangents in range(1, 150, 7):
                rows, chunk = vp.push_shape(pairs, n_rows, n_tangents)
                assert 1 <= rows <= n_rows and 1 <= chunk <= n_tangents
                assert rows * chunk <= max(pairs, 1)
                if n_rows * n_tangents <= pairs:  # the whole block fits: one call
                    assert (rows, chunk) == (n_rows, n_tangents)


@pytest.mark.parametrize("x2_given", [True, False], ids=["x2", "x2None"])
@pytest.mark.parametrize("name", ["mlp", "cnn", "pytree"])
def test_cotangents_of_several_columns_in_one_call_are_exact(name, x2_given, monkeypatch):
    """Column blocks of one sample take their cotangents from calls that form those of three samples at once."""
    monkeypatch.setattr(vp, "MIN_TANGENTS", 1)
    monkeypatch.setattr(vp, "MAX_COLUMNS", 100)
    original_plan = vp.plan
    monkeypatch.setattr(vp, "plan", lambda *a, **k: dataclasses.replace(original_plan(*a, **k), b2=1, cotangents=3))
    calls = []
    original = vp.jacobian.jacobians
    monkeypatch.setattr(vp.jacobian, "jacobians", lambda p, g, w, a, b: calls.append((a, b)) or original(p, g, w, a, b))
    f, params, x1, x2, vmap_axes = CASE_BY_NAME[name].build(torch.float64)
    x2 = x2 if x2_given else None
    k = ntkfunc.ntk_fn(f, (), (), vmap_axes, implementation=2)(x1, x2, params)
    assert max_rel_err(k, reference_kernel(f, params, x1, x2, (), ())) <= 1e-10
    n2 = pytree.tree_leaves(x1 if x2 is None else x2)[0].shape[0]
    assert calls == [(a, min(a + 3, n2)) for a in range(0, n2, 3)]  # every x2 sample once, three per call


def test_plan_forms_the_cotangents_of_several_columns_at_once(monkeypatch):
    """With x2=None the triangle's narrow columns share cotangent calls, as many samples as the budget holds."""
    monkeypatch.setattr(vp, "PUSH_CALL_FLOPS", 1e3)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 10)).double()
    f, params = ntkfunc.from_module(model)
    p = vp.plan(make_problem(f, torch.randn(40, 3, dtype=torch.float64), None, params, 0, (), ()), 10**9)
    assert p.b2 < 40 and p.cotangents == 40 // p.b2 * p.b2


def _scalar_ops(h: torch.Tensor) -> torch.Tensor:
    return torch.div(torch.mul((h / 3.0 - 1) * 2 + 0.5, 7), 3) + torch.add(h, 1.5, alpha=2) - torch.sub(h, 2) + 1 / h


def test_scalar_overloads_change_no_value_or_tangent():
    """``ScalarOverloads`` (entered around implementation 2's pushes): bitwise the same values and tangents,
    under ``vmap`` of ``jvp`` as in a push, for float and int numbers; keyword calls and ``1 / h`` pass through."""
    from torch.func import jvp, vmap

    from ntkfunc._core.forward_ad import ScalarOverloads
    from ntkfunc._core.ops import load_forward_ad_decompositions

    load_forward_ad_decompositions()  # as every forward-mode path of ntkfunc does first
    torch.manual_seed(0)
    x, t = torch.randn(4, 6, dtype=torch.float64) + 3, torch.randn(5, 4, 6, dtype=torch.float64)

    def push(tt):
        return jvp(_scalar_ops, (x,), (tt,))

    plain = vmap(push)(t)
    with ScalarOverloads():
        fast = vmap(push)(t)
    assert all(torch.equal(a, b) for a, b in zip(plain, fast))
    seen = []

    class Spy(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    with Spy(), ScalarOverloads():  # the spy, outside, sees what ScalarOverloads calls
        _scalar_ops(x)
    assert {torch.ops.aten.div.Scalar, torch.ops.aten.mul.Scalar, torch.ops.aten.add.Scalar, torch.ops.aten.sub.Scalar} <= set(seen)
    assert torch.add in seen and torch.Tensor.__rdiv__ in seen  # alpha= and 1 / h: unchanged
    assert torch._C.TensorBase.div not in seen and torch.mul not in seen


def test_column_width_prices_calls_against_pairs(monkeypatch):
    """Within [1, most]; heavier pairs never push more pairs; free calls: one-sample columns (the fewest pairs,
    n (n + 1) / 2 x outputs); the CPU plan takes that width."""

    def pushed(n, width, outputs=10):
        return sum(min(j0 + width, n) * (min(j0 + width, n) - j0) * outputs for j0 in range(0, n, width))

    for n in (1, 5, 16, 40, 300):
        for most in (1, 3, n):
            widths = [vp.column_width(n, 10, 777, flops, most) for flops in (0.0, 1e4, 1e5, 1e6, 1e7, 1e8)]
            assert all(1 <= w <= most for w in widths)
            assert [pushed(n, w) for w in widths] == sorted((pushed(n, w) for w in widths), reverse=True)
    monkeypatch.setattr(vp, "PUSH_CALL_FLOPS", 0.0)
    assert [vp.column_width(n, 10, 777, 1e6, n) for n in (1, 16, 64)] == [1, 1, 1] and pushed(16, 1) == 16 * 17 * 5
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 10)).double()
    f, params = ntkfunc.from_module(model)
    assert vp.plan(make_problem(f, torch.randn(40, 3, dtype=torch.float64), None, params, 0, (), ()), 10**9).b2 == 1
