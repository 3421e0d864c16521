"""``pntk_fn`` against its definition ``(1/O) Σ_{o,o'} Θ_{oo'}`` from float64 reference Jacobians."""

from __future__ import annotations

import math

import pytest
import torch

import ntkfunc
from tests.reference import full_jacobians, max_rel_err
from tests.zoo import CASES

CASE_BY_NAME = {c.name: c for c in CASES}


def _per_sample_jacobian(f, params, x, batch_axis):
    """``(N, O, P)``: all output leaves of all samples, from the reference's whole-batch Jacobians."""
    jacs, _ = full_jacobians(f, params, x)
    parts = []
    for shape, jac in jacs:
        j = jac.reshape(*shape, -1).movedim(batch_axis, 0)
        parts.append(j.reshape(j.shape[0], -1, j.shape[-1]))
    return torch.cat(parts, dim=1)


def pntk_by_definition(f, params, x1, x2, batch_axis=0):
    j1 = _per_sample_jacobian(f, params, x1, batch_axis)
    j2 = j1 if x2 is None else _per_sample_jacobian(f, params, x2, batch_axis)
    theta = torch.einsum("iop,jqp->ijoq", j1, j2)  # every output pair, across leaves too
    return theta.sum((2, 3)) / j1.shape[1]


@pytest.mark.parametrize("x2_given", [True, False], ids=["x2", "x2None"])
@pytest.mark.parametrize("impl", [1, 2])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_definition(case, impl, x2_given):
    f, params, x1, x2, vmap_axes = case.build(torch.float64)
    x2 = x2 if x2_given else None
    k = ntkfunc.pntk_fn(f, vmap_axes=vmap_axes, implementation=impl)(x1, x2, params)
    batch_axis = 1 if vmap_axes == 1 else 0
    ref = pntk_by_definition(f, params, x1, x2, batch_axis)
    assert k.shape == ref.shape and k.dtype == torch.float64
    assert max_rel_err(k, ref) <= 1e-10


def test_single_output_equals_ntk():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()
    f, params = ntkfunc.from_module(model)
    x1, x2 = torch.randn(4, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    assert max_rel_err(ntkfunc.pntk_fn(f)(x1, x2, params), ntkfunc.ntk_fn(f)(x1, x2, params)) <= 1e-12


def test_costs_one_output_per_sample(monkeypatch):
    """The Jacobians it forms have no output axis: one VJP per sample, not O."""
    import ntkfunc._engines.jacobian as jac_mod

    shapes = []
    original = jac_mod.jacobians

    def spy(problem, group, which, start, stop):
        out = original(problem, group, which, start, stop)
        shapes.extend(tuple(j.shape) for leaf in out for j in leaf)
        return out

    monkeypatch.setattr(jac_mod, "jacobians", spy)
    f, params, x1, x2, _ = CASE_BY_NAME["mlp"].build(torch.float64)  # O = 3
    ntkfunc.pntk_fn(f)(x1, x2, params)
    names = list(params)
    assert shapes and all(s[1:] == tuple(params[names[i % len(names)]].shape) for i, s in enumerate(shapes))


def test_output_scale_is_mean_over_outputs():
    """(1/O) Σ Θ_oo': for a model whose O outputs are copies of one, the pNTK is O times the NTK."""
    torch.manual_seed(0)
    w = torch.randn(3, 1, dtype=torch.float64)

    def f(p, x):
        return (x @ p).expand(-1, 4)  # O = 4 identical outputs

    x = torch.randn(5, 3, dtype=torch.float64)
    single = ntkfunc.ntk_fn(lambda p, x: x @ p)(x, None, w)
    assert max_rel_err(ntkfunc.pntk_fn(f)(x, None, w), 4 * single) <= 1e-12


def test_approximation_improves_with_width():
    """pNTK ⊗ I approaches the full eNTK at initialisation as width grows (relative Frobenius error)."""
    errs = []
    x = torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for width in (16, 1024):
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Linear(5, width), torch.nn.ReLU(), torch.nn.Linear(width, 4)).double()
        f, params = ntkfunc.from_module(model)
        full = ntkfunc.ntk_fn(f, trace_axes=())(x, None, params)  # (6, 6, 4, 4)
        approx = torch.einsum("ij,ab->ijab", ntkfunc.pntk_fn(f)(x, None, params), torch.eye(4, dtype=torch.float64))
        errs.append(((full - approx).norm() / full.norm()).item())
    assert errs[1] < errs[0] / 3, errs  # ~ 1/sqrt(width): sqrt(64) = 8 in expectation


def test_output_without_batch_axis_is_refused():
    def f(p, x):
        return (x @ p).sum()

    with pytest.raises(ValueError, match=r"output leaf 0 of f is torch.Size\(\[\]\); expected a tensor with a batch axis"):
        ntkfunc.pntk_fn(f, vmap_axes=None)(torch.randn(3, 2), None, torch.randn(2, 2))


def test_batch_coupled_module_needs_vmap_axes_none():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2)).train()
    f, params = ntkfunc.from_module(model, vmap_axes=None)
    with pytest.raises(ValueError, match=r"BatchNorm module\(s\) \['1'\] are in training mode"):
        ntkfunc.pntk_fn(f, vmap_axes=0)
    assert ntkfunc.pntk_fn(f, vmap_axes=None)(torch.randn(5, 3), None, params).shape == (5, 5)
    assert math.isfinite(float(ntkfunc.pntk_fn(f, vmap_axes=None)(torch.randn(5, 3), None, params).sum()))


def test_pytree_vmap_axes_triple():
    f, params, x1, x2, _ = CASE_BY_NAME["pytree"].build(torch.float64)
    axes = ({"a": 0, "b": 0}, {"logits": 0, "aux": (0,)}, {})
    k = ntkfunc.pntk_fn(f, vmap_axes=axes, implementation=2)(x1, x2, params)
    assert max_rel_err(k, pntk_by_definition(f, params, x1, x2)) <= 1e-10
