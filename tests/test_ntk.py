"""Every implementation against the float64 reference, on the whole architecture zoo."""

from __future__ import annotations

import pytest
import torch
from torch.utils import _pytree as pytree

import ntkfunc
from tests.reference import max_rel_err, reference_kernel
from tests.zoo import CASES, implementations, settings

IMPLEMENTATIONS = implementations()

PARAMS = [
    pytest.param(case, tr, dg, id=f"{case}-trace{tr}-diag{dg}")
    for case in CASES
    for tr, dg in settings(case)
]


def _batch_axis(case_vmap, out_ndim):
    return 1 if case_vmap == 1 else 0


def _touches_batch(tr, dg, batch_axis, ndim):
    return any(a % ndim == batch_axis for a in tuple(tr) + tuple(dg))


def _flip(x, axis):
    return pytree.tree_map(lambda t: t.flip(axis), x)


_REFERENCE_CACHE: dict = {}


def _reference(case, tr, dg, symmetric):
    key = (case.name, tr, dg, symmetric)
    if key not in _REFERENCE_CACHE:
        f, params, x1, x2, vmap_axes = case.build(torch.float64)
        x2 = _pick_x2(case, tr, dg, x1, x2, vmap_axes, symmetric)
        _REFERENCE_CACHE[key] = reference_kernel(f, params, x1, x2, tr, dg)
    return _REFERENCE_CACHE[key]


def _pick_x2(case, tr, dg, x1, x2, vmap_axes, symmetric):
    if symmetric:
        return None
    b = _batch_axis(vmap_axes, case.out_ndim)
    if _touches_batch(tr, dg, b, case.out_ndim):
        return _flip(x1, b)  # the batch axis pairs x1[n] with x2[n]: equal sizes
    return x2


@pytest.mark.parametrize("symmetric", [False, True], ids=["x2", "x2None"])
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("case,tr,dg", PARAMS)
def test_float64_matches_reference(case, tr, dg, impl, symmetric):
    f, params, x1, x2, vmap_axes = case.build(torch.float64)
    x2 = _pick_x2(case, tr, dg, x1, x2, vmap_axes, symmetric)
    kernel = ntkfunc.ntk_fn(f, trace_axes=tr, diagonal_axes=dg, vmap_axes=vmap_axes, implementation=impl)
    k = kernel(x1, x2, params)
    ref = _reference(case, tr, dg, symmetric)
    assert pytree.tree_structure(k) == pytree.tree_structure(ref)
    for leaf in pytree.tree_leaves(k):
        assert leaf.dtype == torch.float64
    assert max_rel_err(k, ref) <= 1e-10


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_float32_close_to_reference(case, impl):
    f, params, x1, x2, vmap_axes = case.build(torch.float32)
    k = ntkfunc.ntk_fn(f, trace_axes=(), vmap_axes=vmap_axes, implementation=impl)(x1, x2, params)
    for leaf in pytree.tree_leaves(k):
        assert leaf.dtype == torch.float32  # never silently upcast
    assert max_rel_err(k, _reference(case, (), (), False)) <= 1e-4


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_bfloat16_stays_bfloat16(impl):
    case = next(c for c in CASES if c.name == "mlp")
    f, params, x1, x2, vmap_axes = case.build(torch.bfloat16)
    k = ntkfunc.ntk_fn(f, implementation=impl)(x1, x2, params)
    assert k.dtype == torch.bfloat16
    assert max_rel_err(k, _reference(case, (-1,), (), False)) <= 5e-2


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("case_name", ["mlp", "cnn", "attention_matmul", "pytree"])
def test_small_memory_budget_tiles_and_stays_exact(case_name, impl, monkeypatch):
    """A budget below the Jacobians' size forces several tiles; the kernel is unchanged."""
    import ntkfunc._core.tiles as blocks

    counted = []

    def counting_tiles(*args):
        for t in blocks.tiles(*args):
            counted.append(t)
            yield t

    modules = {1: ["ntkfunc._engines.jacobian"], 2: ["ntkfunc._engines.vp"],
               3: ["ntkfunc._engines.jacobian", "ntkfunc._engines.structured.kernel"],
               "auto": ["ntkfunc._engines.jacobian", "ntkfunc._engines.structured.kernel"]}[impl]
    for module in modules:
        monkeypatch.setattr(f"{module}.tiles", counting_tiles)
    case = next(c for c in CASES if c.name == case_name)
    f, params, x1, x2, vmap_axes = case.build(torch.float64)
    tr = () if case.out_ndim == 2 else (1,)
    for x2_ in (x2, None):
        ref = reference_kernel(f, params, x1, x2_, tr, ())
        tiled = False
        for budget in (300_000, 100_000, 30_000, 10_000, 3_000):  # the first that tiles and fits
            counted.clear()
            try:
                k = ntkfunc.ntk_fn(f, trace_axes=tr, vmap_axes=vmap_axes, implementation=impl, memory_budget=budget)(x1, x2_, params)
            except MemoryError:
                break
            assert max_rel_err(k, ref) <= 1e-10
            if len(counted) > 1:
                tiled = True
                break
        assert tiled


def test_implementation_enum_values():
    assert [int(i) for i in ntkfunc.Implementation] == [0, 1, 2, 3]
    f, params, x1, x2, _ = CASES[0].build(torch.float64)
    a = ntkfunc.ntk_fn(f, implementation=ntkfunc.Implementation.NTK_VECTOR_PRODUCTS)(x1, x2, params)
    b = ntkfunc.ntk_fn(f, implementation=2)(x1, x2, params)
    assert torch.equal(a, b)


def test_symmetric_result_is_symmetric():
    f, params, x1, _, _ = CASES[0].build(torch.float64)
    k = ntkfunc.ntk_fn(f, trace_axes=(), memory_budget=20_000)(x1, None, params)
    assert torch.allclose(k, k.permute(1, 0, 3, 2), rtol=0, atol=1e-14)


def test_model_that_needs_batch_axis_receives_it():
    seen = []

    def f(p, x):
        seen.append(x.shape)
        return x.reshape(x.shape[0], -1) @ p

    p = torch.randn(6, 2, dtype=torch.float64)
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    ntkfunc.ntk_fn(f)(x, None, p)
    assert all(len(s) == 3 for s in seen)
