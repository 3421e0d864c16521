"""``ntk_fn(per_param=True)`` and ``group_kernels`` against the float64 reference."""

from __future__ import annotations

import dataclasses
import types

import pytest
import torch
from torch.utils import _pytree as pytree

import ntkfunc
from ntkfunc import rules
from ntkfunc._engines import registry
from tests.reference import max_rel_err, reference_kernel
from tests.zoo import CASES, implementations

IMPLEMENTATIONS = implementations()
CASE_BY_NAME = {c.name: c for c in CASES}


def _setting(case):
    """One non-trivial (trace, diagonal) pair per case: full O x O blocks for 2-D outputs."""
    return ((), ()) if case.out_ndim == 2 else ((1,), (2,))


def _frozen(f, params, index):
    """``f`` as a function of parameter leaf ``index`` alone (the others closed over)."""
    leaves, spec = pytree.tree_flatten(params)

    def g(p, x):
        full = list(leaves)
        full[index] = p
        return f(pytree.tree_unflatten(full, spec), x)

    return g, leaves[index]


_REF: dict = {}


def _component_refs(case, x2_given):
    key = (case.name, x2_given)
    if key not in _REF:
        f, params, x1, x2, _ = case.build(torch.float64)
        tr, dg = _setting(case)
        x2 = x2 if x2_given else None
        leaves = pytree.tree_leaves(params)
        refs = []
        for i, leaf in enumerate(leaves):
            if not leaf.is_floating_point():
                refs.append(None)
                continue
            g, p = _frozen(f, params, i)
            refs.append(reference_kernel(g, p, x1, x2, tr, dg))
        _REF[key] = (refs, reference_kernel(f, params, x1, x2, tr, dg))
    return _REF[key]


@pytest.mark.parametrize("x2_given", [True, False], ids=["x2", "x2None"])
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_each_component_and_their_sum_match_reference(case, impl, x2_given):
    f, params, x1, x2, vmap_axes = case.build(torch.float64)
    tr, dg = _setting(case)
    per = ntkfunc.ntk_fn(f, tr, dg, vmap_axes, impl, per_param=True)(x1, x2 if x2_given else None, params)
    comps = pytree.tree_structure(params).flatten_up_to(per)
    refs, full_ref = _component_refs(case, x2_given)
    total = None
    for comp, ref, leaf in zip(comps, refs, pytree.tree_leaves(params)):
        if ref is None:  # integer leaf: a constant, no kernel
            assert comp is None and not leaf.is_floating_point()
            continue
        assert max_rel_err(comp, ref) <= 1e-10 * max(1.0, _scale(full_ref) / max(_scale(ref), 1e-300))
        total = comp if total is None else pytree.tree_map(torch.add, total, comp)
    assert max_rel_err(total, full_ref) <= 1e-10


def _scale(tree):
    return max(t.abs().max().item() for t in pytree.tree_leaves(tree))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_sum_equals_full_kernel_of_same_implementation(impl):
    case = CASE_BY_NAME["attention_matmul"]
    f, params, x1, x2, vmap_axes = case.build(torch.float64)
    for tr, dg in [((-1,), ()), ((), (0,)), ((1, 2), ())]:
        kernel = ntkfunc.ntk_fn(f, tr, dg, vmap_axes, impl)
        per = ntkfunc.ntk_fn(f, tr, dg, vmap_axes, impl, per_param=True)
        x2_ = x1.flip(0) if 0 in dg else x2
        full = kernel(x1, x2_, params)
        assert max_rel_err(sum(per(x1, x2_, params).values()), full) <= 1e-12


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_tiled_under_small_memory_budget_is_unchanged(impl, monkeypatch):
    import ntkfunc._core.tiles as blocks

    counted = []

    def counting_tiles(*args):
        for t in blocks.tiles(*args):
            counted.append(t)
            yield t

    monkeypatch.setattr("ntkfunc._engines.jacobian.tiles", counting_tiles)
    monkeypatch.setattr("ntkfunc._engines.structured.kernel.tiles", counting_tiles)
    monkeypatch.setattr("ntkfunc._engines.vp.tiles", counting_tiles)
    f, params, x1, x2, vmap_axes = CASE_BY_NAME["mlp"].build(torch.float64)
    big = ntkfunc.ntk_fn(f, trace_axes=(), implementation=impl, per_param=True)(x1, None, params)
    for budget in (100_000, 30_000, 10_000, 5_000):  # the first that tiles
        counted.clear()
        small = ntkfunc.ntk_fn(f, trace_axes=(), implementation=impl, per_param=True, memory_budget=budget)(x1, None, params)
        if len(counted) > 1:
            break
    assert len(counted) > 1
    for name in params:
        assert max_rel_err(small[name], big[name]) <= 1e-12


def test_float32_and_dtype_kept():
    f, params, x1, x2, _ = CASE_BY_NAME["cnn"].build(torch.float32)
    per = ntkfunc.ntk_fn(f, per_param=True)(x1, x2, params)
    assert all(k.dtype == torch.float32 and k.shape == (5, 3) for k in per.values())


def test_unsupported_implementation_is_refused(monkeypatch):
    table = dict(registry.ENGINES)
    table[3] = dataclasses.replace(table[3], per_param=False)
    monkeypatch.setattr(registry, "ENGINES", types.MappingProxyType(table))
    f, params, x1, x2, _ = CASE_BY_NAME["mlp"].build(torch.float64)
    with pytest.raises(NotImplementedError, match=r"implementation=3, per_param=True\): implementation 3 cannot split .* expected one of \[0, 1, 2\]"):
        ntkfunc.ntk_fn(f, implementation=3, per_param=True)
    assert ntkfunc.ntk_fn(f, implementation=3)(x1, x2, params).shape == (5, 3)  # without per_param it still runs


def test_every_registered_implementation_splits_by_parameter():
    assert all(e.per_param for e in registry.engines())


def test_per_param_must_be_bool():
    f, params, *_ = CASE_BY_NAME["mlp"].build(torch.float64)
    with pytest.raises(TypeError, match=r"per_param='yes'\): expected True or False"):
        ntkfunc.ntk_fn(f, per_param="yes")


# --- group_kernels -----------------------------------------------------------------


def _nested_model():
    torch.manual_seed(0)
    enc = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 5))
    model = torch.nn.Sequential()
    model.add_module("encoder", enc)
    model.add_module("act", torch.nn.Tanh())
    model.add_module("head", torch.nn.Linear(5, 2))
    return model.double()


def test_group_by_module_depth_prefixes_and_callable():
    f, params = ntkfunc.from_module(_nested_model())
    x = torch.randn(4, 3, dtype=torch.float64)
    per = ntkfunc.ntk_fn(f, per_param=True)(x, None, params)
    full = ntkfunc.ntk_fn(f)(x, None, params)

    by_module = ntkfunc.group_kernels(per)
    assert list(by_module) == ["encoder.0", "encoder.2", "head"]
    assert torch.equal(by_module["head"], per["head.weight"] + per["head.bias"])

    by_block = ntkfunc.group_kernels(per, by=1)
    assert list(by_block) == ["encoder", "head"]
    assert max_rel_err(by_block["encoder"] + by_block["head"], full) <= 1e-12
    ref_head = reference_kernel(*_frozen_dict(f, params, ["head.weight", "head.bias"]), x, None)
    assert max_rel_err(by_block["head"], ref_head) <= 1e-10

    by_prefix = ntkfunc.group_kernels(per, by=["encoder.0", "encoder", "head"])
    assert list(by_prefix) == ["encoder.0", "encoder", "head"]
    assert torch.equal(by_prefix["encoder"], per["encoder.2.weight"] + per["encoder.2.bias"])

    by_kind = ntkfunc.group_kernels(per, by=lambda name: name.rsplit(".", 1)[1])
    assert sorted(by_kind) == ["bias", "weight"]
    assert max_rel_err(by_kind["bias"] + by_kind["weight"], full) <= 1e-12


def _frozen_dict(f, params, names):
    """``(g, sub)``: ``f`` as a function of the parameters ``names`` only."""

    def g(sub, x):
        return f({**params, **sub}, x)

    return g, {k: params[k] for k in names}


def test_group_pytree_outputs_needs_params_and_skips_integer_leaves():
    f, params, x1, x2, _ = CASE_BY_NAME["pytree"].build(torch.float64)
    per = ntkfunc.ntk_fn(f, trace_axes=(), per_param=True)(x1, x2, params)
    assert per["step"] is None
    groups = ntkfunc.group_kernels(per, by=1, params=params)
    assert list(groups) == ["enc", "heads"]
    assert set(groups["enc"]) == {"logits", "aux"}  # each group holds the output pytree
    ref = reference_kernel(f, params, x1, x2, (), ())
    total = pytree.tree_map(torch.add, groups["enc"], groups["heads"])
    assert max_rel_err(total, ref) <= 1e-10
    sub = {"enc": params["enc"]}
    ref_enc = reference_kernel(lambda p, x: f({**params, **p}, x), sub, x1, x2, (), ())
    assert max_rel_err(groups["enc"], ref_enc) <= 1e-10
    by_leaf = ntkfunc.group_kernels(per, by=lambda n: n, params=params)
    assert list(by_leaf) == ["enc.w", "enc.b", "heads.0", "heads.1.0"]


def test_group_errors():
    f, params = ntkfunc.from_module(_nested_model())
    per = ntkfunc.ntk_fn(f, per_param=True)(torch.randn(3, 3, dtype=torch.float64), None, params)
    with pytest.raises(ValueError, match=r"parameter 'head.weight' matches none of the prefixes"):
        ntkfunc.group_kernels(per, by=["encoder"])
    with pytest.raises(ValueError, match=r"by=0\): expected a depth >= 1"):
        ntkfunc.group_kernels(per, by=0)
    with pytest.raises(TypeError, match=r"returned 3 for 'encoder.0.weight'; expected a str"):
        ntkfunc.group_kernels(per, by=lambda name: 3)
    with pytest.raises(TypeError, match=r"found a str among the kernels"):
        ntkfunc.group_kernels({"a": "not a kernel"})
    with pytest.raises(ValueError, match=r"no kernel found"):
        ntkfunc.group_kernels({"a": None})
    with pytest.raises(ValueError, match=r"do not have the structure of params"):
        ntkfunc.group_kernels({"x": per["head.bias"]}, params=params)


@pytest.mark.parametrize("impl", [1, 2])
def test_costs_one_kernel_evaluation(impl, monkeypatch):
    """Per-parameter kernels take as many Jacobian passes as implementation 1's full kernel."""
    import ntkfunc._engines.jacobian as jac_mod

    calls = []
    original = jac_mod.jacobians

    def spy(problem, group, which, start, stop):
        calls.append((tuple(group), which, start, stop))
        return original(problem, group, which, start, stop)

    monkeypatch.setattr(jac_mod, "jacobians", spy)
    f, params, x1, x2, _ = CASE_BY_NAME["cnn"].build(torch.float64)
    ntkfunc.ntk_fn(f, implementation=1)(x1, x2, params)
    full_calls = list(calls)
    calls.clear()
    ntkfunc.ntk_fn(f, implementation=impl, per_param=True)(x1, x2, params)
    assert calls == full_calls and len(calls) == 2  # one vmap(jacrev) pass at x1 and one at x2, all parameters


def test_structured_per_param_costs_one_kernel_evaluation(monkeypatch):
    """Implementation 3 splits the same sum: as many cotangent passes as its full kernel."""
    import ntkfunc._engines.structured.kernel as structured

    calls = []
    original = structured.side

    def spy(problem, cap, which, start, stop):
        calls.append((which, start, stop))
        return original(problem, cap, which, start, stop)

    monkeypatch.setattr(structured, "side", spy)
    f, params, x1, x2, _ = CASE_BY_NAME["cnn"].build(torch.float64)
    with rules.forced():  # the rules' path (the zoo's small CNN would otherwise take reverse-mode Jacobians)
        full = ntkfunc.ntk_fn(f, implementation=3)(x1, x2, params)
        full_calls = list(calls)
        calls.clear()
        per = ntkfunc.ntk_fn(f, implementation=3, per_param=True)(x1, x2, params)
    assert calls == full_calls and len(calls) == 2
    assert max_rel_err(sum(per.values()), full) <= 1e-12
