"""Sketched eNTKs: exactness when dim holds every parameter, unbiasedness at the 1/sqrt(dim) rate, determinism,
agreement of sketched_ntk_fn / kernel_matrix(sketch=) / features_fn, routes, files, errors.

Statistical tests use a fixed set of seeds and tolerances derived from the sample variance of those
seeds' estimates (z-scores), so they are deterministic and their thresholds have a meaning.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import ntkfunc
from ntkfunc._dataset.fileformat import FORMAT
from ntkfunc._engines.sketch import countsketch, gaussian, tensorsketch
from tests import zoo
from tests.reference import reference_kernel

ROOT = Path(__file__).resolve().parents[1]
KINDS = ["countsketch", "tensorsketch", "gaussian", "auto"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: a second intra-op thread only contends


def _mlp(width: int = 24, outputs: int = 1, dtype=torch.float64, seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, outputs)).to(dtype)
    f, params = ntkfunc.from_module(model)
    return f, params, torch.randn(6, 5, dtype=dtype), torch.randn(4, 5, dtype=dtype)


def _cnn(dtype=torch.float64):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2), nn.Tanh(),
        nn.Flatten(), nn.Linear(6 * 4 * 4, 3),
    ).to(dtype)
    f, params = ntkfunc.from_module(model)
    return f, params, torch.randn(7, 2, 8, 8, dtype=dtype), torch.randn(3, 2, 8, 8, dtype=dtype)


def _n_params(params) -> int:
    return sum(t.numel() for t in torch.utils._pytree.tree_leaves(params) if t.is_floating_point())


# --- arguments -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,match", [
    (dict(dim=0), r"Sketch\(dim=0\): expected a positive int"),
    (dict(dim=2.5), r"Sketch\(dim=2.5\): expected a positive int"),
    (dict(dim=True), r"Sketch\(dim=True\): expected a positive int"),
    (dict(dim=8, seed=-1), r"Sketch\(seed=-1\): expected an int in \[0, 2\*\*63\)"),
    (dict(dim=8, seed="a"), r"Sketch\(seed='a'\): expected an int"),
    (dict(dim=8, kind="srht"), r"Sketch\(kind='srht'\): expected 'auto' or one of \['countsketch', 'tensorsketch', 'gaussian'\]"),
])
def test_bad_sketch_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ntkfunc.Sketch(**kwargs)


def test_sketch_functions_refuse_what_cannot_be_sketched():
    f, params, x1, _ = _mlp()
    with pytest.raises(TypeError, match=r"^features_fn: sketch is a int; expected ntkfunc.Sketch"):
        ntkfunc.features_fn(f, 8)
    with pytest.raises(ValueError, match=r"^sketched_ntk_fn\(implementation=2\): implementation 2 \(NTK-vector products\) has no per-sample"):
        ntkfunc.sketched_ntk_fn(f, ntkfunc.Sketch(8), implementation=2)
    with pytest.raises(ValueError, match=r"^kernel_matrix\(sketch=..., implementation=2\): implementation 2 .* has no per-sample"):
        ntkfunc.kernel_matrix(f, params, x1, sketch=ntkfunc.Sketch(8), implementation=2, progress=False)
    with pytest.raises(TypeError, match=r"^kernel_matrix\(sketch=8\): expected None or ntkfunc.Sketch"):
        ntkfunc.kernel_matrix(f, params, x1, sketch=8, progress=False)
    with pytest.raises(ValueError, match=r"error_estimate: features1 has shape \(6, 1, 4\); expected \(N, \*out, 8\)"):
        ntkfunc.Sketch(8).error_estimate(torch.zeros(6, 1, 4))
    with pytest.raises(ValueError, match=r"^sketched_ntk_fn\(trace_axes=\(5,\)\): axis 5 out of range"):
        ntkfunc.sketched_ntk_fn(f, ntkfunc.Sketch(8), trace_axes=(5,))(x1, None, params)


# --- exact: dim holds every parameter ---------------------------------------------------------------


@pytest.mark.parametrize("case", zoo.CASES, ids=str)
def test_count_sketch_with_dim_over_p_is_exact_on_the_zoo(case):
    """An orthogonal Π (a signed partial permutation: no two coordinates share a bucket) gives the exact kernel."""
    f, params, x1, x2, vmap_axes = case.build(torch.float64)
    dim = 1 << (2 * _n_params(params) - 1).bit_length()
    for kind in ("countsketch", "auto"):
        sketch = ntkfunc.Sketch(dim, seed=5, kind=kind)
        plan = sketch.explain(f, params, x1, vmap_axes=vmap_axes)
        assert plan.exact and plan.kind == "countsketch", str(plan)
        batch = 1 if vmap_axes == 1 else 0
        for trace, diag in zoo.settings(case):
            touches = any(a % case.out_ndim == batch for a in (*trace, *diag))
            for b in (x1 if touches else x2, None):  # a traced / diagonal batch axis pairs x1[n] with x2[n]
                expected = reference_kernel(f, params, x1, b, trace, diag)
                got = ntkfunc.sketched_ntk_fn(f, sketch, trace, diag, vmap_axes)(x1, b, params)
                for e, g in zip(torch.utils._pytree.tree_leaves(expected), torch.utils._pytree.tree_leaves(got)):
                    assert e.shape == g.shape
                    torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-10)


def test_exact_count_sketch_through_implementation_1_and_kernel_matrix():
    f, params, x1, x2 = _cnn()
    dim = 1 << (2 * _n_params(params) - 1).bit_length()
    expected = reference_kernel(f, params, x1, x2, (), ())
    for impl in (1, 3, "auto"):
        k = ntkfunc.sketched_ntk_fn(f, ntkfunc.Sketch(dim, kind="countsketch"), trace_axes=(), implementation=impl)(x1, x2, params)
        torch.testing.assert_close(k, expected, rtol=1e-9, atol=1e-10)
    km = ntkfunc.kernel_matrix(f, params, x1, x2, trace_axes=(), sketch=ntkfunc.Sketch(dim), batch_size=3, progress=False)
    torch.testing.assert_close(km, expected, rtol=1e-9, atol=1e-10)


def test_params_and_inputs_that_require_grad_are_taken_as_values():
    """Regression: every sketch API failed with torch's "bmm(): functions with out=... arguments don't support automatic
    differentiation" on dict(model.named_parameters()) (or inputs that require grad), which ntk_fn accepts."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 3)).double()
    params = dict(model.named_parameters())

    def f(p, x):
        return torch.func.functional_call(model, p, (x,))

    x1 = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    x2 = torch.randn(4, 5, dtype=torch.float64)
    plain = {k: v.detach() for k, v in params.items()}
    dim = 1 << (2 * _n_params(plain) - 1).bit_length()  # the exact count sketch
    sketch = ntkfunc.Sketch(dim, kind="countsketch")
    expected = reference_kernel(f, plain, x1.detach(), x2, (), ())
    feats = ntkfunc.features_fn(f, sketch)(x1, params)
    assert not feats.requires_grad
    torch.testing.assert_close(feats, ntkfunc.features_fn(f, sketch)(x1.detach(), plain))
    k = ntkfunc.sketched_ntk_fn(f, sketch, trace_axes=())(x1, x2, params)
    km = ntkfunc.kernel_matrix(f, params, x1, x2, trace_axes=(), sketch=sketch, progress=False)
    for got in (k, km):
        assert not got.requires_grad
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)
    assert sketch.explain(f, params, x1).exact


def test_dense_sketches_are_not_exact_but_countsketch_layout_says_when_it_is():
    assert countsketch.is_exact([(0, (3, 5)), (1, (3,))], 18)
    assert not countsketch.is_exact([(0, (3, 5)), (1, (3,))], 17)
    f, params, x1, _ = _mlp()
    p = _n_params(params)
    assert not ntkfunc.Sketch(4 * p, kind="gaussian").explain(f, params, x1).exact
    assert not ntkfunc.Sketch(4 * p, kind="tensorsketch").explain(f, params, x1).exact


# --- unbiased, at the expected rate ----------------------------------------------------------------


def _estimates(f, params, x1, x2, kind: str, dim: int, seeds: range, trace=(-1,)) -> torch.Tensor:
    return torch.stack([ntkfunc.sketched_ntk_fn(f, ntkfunc.Sketch(dim, s, kind), trace)(x1, x2, params) for s in seeds])


@pytest.mark.parametrize("kind", KINDS)
def test_mean_over_seeds_converges_to_the_exact_kernel(kind):
    """Over 300 fixed seeds the mean is within 4.5 standard errors of the exact kernel in every entry, and the
    z-scores' mean square is that of a standard normal (|mean z² - 1| < 5 sqrt(2 / entries))."""
    f, params, x1, x2 = _mlp()
    exact = reference_kernel(f, params, x1, x2)
    est = _estimates(f, params, x1, x2, kind, 16, range(300))
    se = est.std(0) / math.sqrt(est.shape[0])
    z = (est.mean(0) - exact) / se
    assert float(z.abs().max()) < 4.5, z
    assert abs(float(z.pow(2).mean()) - 1) < 5 * math.sqrt(2 / z.numel()), float(z.pow(2).mean())


def test_gaussian_error_matches_its_variance_formula_at_every_dim():
    """E‖K̂ - K‖² = Σ_nm (K_nn K_mm + K_nm²) / dim exactly for i.i.d. N(0, 1/dim) projections (one output)."""
    f, params, x1, _ = _mlp()
    exact = reference_kernel(f, params, x1, None)
    diag = exact.diagonal()
    theory = float((diag[:, None] * diag[None, :] + exact ** 2).sum())
    for dim in (8, 32, 128):
        err = (_estimates(f, params, x1, None, "gaussian", dim, range(120)) - exact).pow(2).sum((1, 2))
        mean, se = float(err.mean()), float(err.std()) / math.sqrt(err.numel())
        assert abs(mean - theory / dim) < 4 * se, (dim, mean, theory / dim, se)


@pytest.mark.parametrize("kind", ["countsketch", "tensorsketch", "auto"])
def test_hashed_sketch_error_falls_like_one_over_sqrt_dim(kind):
    """Mean squared error at dim and 4 dim: their ratio is 4 within four standard errors of its log
    (delta method from the seeds' sample variances) plus 15% for the hashes' finite-P corrections."""
    f, params, x1, _ = _mlp(width=40)
    exact = reference_kernel(f, params, x1, None)
    stats = []
    for dim in (16, 64):
        err = (_estimates(f, params, x1, None, kind, dim, range(150)) - exact).pow(2).sum((1, 2))
        stats.append((float(err.mean()), float(err.std()) / math.sqrt(err.numel())))
    (m1, s1), (m2, s2) = stats
    log_se = math.sqrt((s1 / m1) ** 2 + (s2 / m2) ** 2)
    assert abs(math.log(m1 / m2) - math.log(4)) < 4 * log_se + math.log(1.15), (m1, m2, log_se)


def test_error_estimate_tracks_the_actual_error():
    """Gaussian: the re-sketch estimate is unbiased for the squared error (mean ratio over seeds within e^±0.5);
    the count sketch's is conservative (not below the actual error on average) but not by more than 4x."""
    f, params, x1, _ = _mlp(width=40)
    exact = reference_kernel(f, params, x1, None)
    for kind in ("gaussian", "countsketch"):
        ratios = []
        for seed in range(60):
            sketch = ntkfunc.Sketch(32, seed, kind)
            feats = ntkfunc.features_fn(f, sketch)(x1, params)
            k = ntkfunc.sketched_ntk_fn(f, sketch)(x1, None, params)
            est = sketch.error_estimate(feats)
            ratios.append((est.relative * float(k.norm())) ** 2 / float((k - exact).pow(2).sum()))
        r = torch.tensor(ratios).log()
        if kind == "gaussian":
            assert abs(float(torch.tensor(ratios).mean().log())) < 0.5, ratios
        else:
            assert -0.3 < float(r.mean()) < math.log(4), ratios


@pytest.mark.parametrize("kind", ["gaussian", "countsketch"])
def test_error_estimate_is_not_swamped_by_a_last_layer_bias(kind):
    """A CNN with 10 biased outputs (every sample's bias gradient is 1), dim = 512 (P = 2,970; rows at most 288
    wide): averaged over seeds the estimate is within [0.6, 6] of the actual relative error (the two halves
    of the features overestimated it 20-50x there: a coordinate in one half adds Σ u_i² v_i² whatever dim)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    f, params = ntkfunc.from_module(model.double())
    x = torch.randn(24, 1, 6, 6, dtype=torch.float64)
    exact = reference_kernel(f, params, x, None)
    actual, estimated = [], []
    for seed in range(8):
        sketch = ntkfunc.Sketch(512, seed, kind)
        feats = ntkfunc.features_fn(f, sketch)(x, params)
        k = torch.einsum("aod,bod->ab", feats, feats) / feats.shape[1]
        actual.append(float((k - exact).norm() / exact.norm()))
        estimated.append(sketch.error_estimate(feats).relative)
    ratio = sum(estimated) / sum(actual)
    assert 0.6 < ratio < 6, (actual, estimated)


# --- determinism ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_features_whatever_the_tiling(kind):
    f, params, x1, _ = _cnn(torch.float32)
    sketch = ntkfunc.Sketch(256, seed=11, kind=kind)
    whole = ntkfunc.features_fn(f, sketch)(x1, params)
    parts = torch.cat([ntkfunc.features_fn(f, sketch)(x1[a:b], params) for a, b in ((0, 1), (1, 4), (4, 7))])
    torch.testing.assert_close(parts, whole, rtol=1e-5, atol=1e-5)
    again = ntkfunc.features_fn(f, ntkfunc.Sketch(256, seed=11, kind=kind))(x1, params)
    assert torch.equal(again, whole)
    other = ntkfunc.features_fn(f, ntkfunc.Sketch(256, seed=12, kind=kind))(x1, params)
    assert not torch.allclose(other, whole)


def test_kernel_matrix_same_for_any_tiling_and_device_count():
    f, params, x1, _ = _cnn(torch.float32)
    x = torch.cat([x1, x1 * 0.5, x1.flip(0)])
    sketch = ntkfunc.Sketch(128, seed=3)
    ref = ntkfunc.kernel_matrix(f, params, x, sketch=sketch, batch_size=21, progress=False)
    for bs, devices in ((2, None), (5, None), (4, ["cpu", "cpu"])):
        k = ntkfunc.kernel_matrix(f, params, x, sketch=sketch, batch_size=bs, devices=devices, progress=False)
        torch.testing.assert_close(k, ref, rtol=1e-5, atol=1e-4)


def test_projection_pieces_do_not_depend_on_what_else_is_drawn():
    blk = gaussian.GaussianBlock(leaf=2, numel=1000, dim=4096, seed=9)  # 512 rows per generated block
    cpu = torch.device("cpu")
    rows = blk.rows(0, 1000, cpu, torch.float64)
    fresh = gaussian.GaussianBlock(leaf=2, numel=1000, dim=4096, seed=9)
    assert torch.equal(fresh.rows(700, 900, cpu, torch.float64), rows[700:900])
    a = countsketch.layout([(0, (5, 7)), (1, (9,))], 16, 4)[1].tables(cpu, torch.float64)
    b = countsketch.layout([(1, (9,))], 16, 4)[0].tables(cpu, torch.float64)  # leaf 1's tables alone
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- agreement of the three entry points and of the routes ----------------------------------------------------


@pytest.mark.parametrize("trace,diag", [((-1,), ()), ((), ()), ((), (-1,))])
def test_sketched_ntk_fn_kernel_matrix_and_features_fn_agree(trace, diag):
    f, params, x1, x2 = _cnn(torch.float64)
    sketch = ntkfunc.Sketch(64, seed=1)
    f1 = ntkfunc.features_fn(f, sketch)(x1, params)
    f2 = ntkfunc.features_fn(f, sketch)(x2, params)
    o = f1.shape[1]
    full = torch.einsum("aok,bpk->abop", f1, f2)  # features contracted over dim: (N1, N2, O, O)
    by_features = {((-1,), ()): full.diagonal(dim1=2, dim2=3).sum(-1) / o, ((), ()): full,
                   ((), (-1,)): full.diagonal(dim1=2, dim2=3)}[(trace, diag)]
    for b, expected in ((x2, by_features), (None, None)):
        k = ntkfunc.sketched_ntk_fn(f, sketch, trace, diag)(x1, b, params)
        km = ntkfunc.kernel_matrix(f, params, x1, b, trace_axes=trace, diagonal_axes=diag, sketch=sketch, batch_size=4, progress=False)
        torch.testing.assert_close(km, k, rtol=1e-10, atol=1e-10)
        if expected is not None:
            torch.testing.assert_close(k, expected, rtol=1e-10, atol=1e-10)


def test_kernel_matrix_pntk_sketch_is_the_sketch_of_the_sum_of_logits():
    f, params, x1, _ = _cnn(torch.float64)
    sketch = ntkfunc.Sketch(64, seed=2)
    g = lambda p, x: f(p, x).sum(-1, keepdim=True) / math.sqrt(3)  # noqa: E731
    expected = ntkfunc.sketched_ntk_fn(g, sketch)(x1, None, params)
    got = ntkfunc.kernel_matrix(f, params, x1, pntk=True, sketch=sketch, progress=False)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


class _Tokens(nn.Module):
    """Linear layers on (N, T, D) inputs (positions), then a mean over tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 10), nn.Linear(10, 2)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x))).mean(1)


@pytest.mark.parametrize("kind", ["countsketch", "tensorsketch", "auto"])
def test_factor_routes_equal_the_formed_gradient_routes(kind):
    """Routes from captured c and x (implementation 3) give the features of formed gradients (implementation 1)."""
    for build in (_cnn, None):
        if build is None:
            torch.manual_seed(0)
            model = _Tokens().double()
            f, params = ntkfunc.from_module(model)
            x = torch.randn(5, 4, 6, dtype=torch.float64)
        else:
            f, params, x, _ = build()
        sketch = ntkfunc.Sketch(48, seed=4, kind=kind)
        routes = {p.route for p in sketch.explain(f, params, x).params}
        assert routes & {"factors", "fft"}, routes
        fast = ntkfunc.features_fn(f, sketch)(x, params)
        formed = ntkfunc.features_fn(f, sketch, implementation=1)(x, params)
        torch.testing.assert_close(fast, formed, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("conv", [
    dict(kernel_size=3, padding=1), dict(kernel_size=3, stride=2, padding=1), dict(kernel_size=(2, 3), padding=(0, 2)),
    dict(kernel_size=3, dilation=2, padding=2), dict(kernel_size=3, padding="same", dilation=(1, 2)), dict(kernel_size=1),
], ids=str)
@pytest.mark.parametrize("dim", [32, 4096])
def test_count_sketch_of_convolutions_from_gathered_patches_equals_the_formed_route(conv, dim):
    """The count sketch of a convolution's gradient from its padded input (signed patches gathered in bucket order;
    rows wrapping the buckets at dim=32, an exact layout at 4096) equals hashing the formed gradient."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 5, **conv), nn.Tanh(), nn.Flatten(1), nn.LazyLinear(2)).double()
    x = torch.randn(4, 3, 7, 6, dtype=torch.float64)
    model(x)
    f, params = ntkfunc.from_module(model)
    sketch = ntkfunc.Sketch(dim, seed=2, kind="countsketch")
    assert sketch.explain(f, params, x).params[0].route == "factors"
    fast = ntkfunc.features_fn(f, sketch)(x, params)
    formed = ntkfunc.features_fn(f, sketch, implementation=1)(x, params)
    torch.testing.assert_close(fast, formed, rtol=1e-10, atol=1e-10)


class _ViewsAndTies(nn.Module):
    """A weight used through its transpose, another tied into two layers."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 9) / 3)  # F.linear(x, w.T): 6 -> 9
        self.t = nn.Linear(9, 9)

    def forward(self, x):
        h = torch.tanh(nn.functional.linear(x, self.w.T))       # (N, 9)
        return self.t(torch.tanh(self.t(h))).sum(-1, keepdim=True)


@pytest.mark.parametrize("kind", ["countsketch", "tensorsketch", "auto"])
def test_weights_through_views_and_tied_weights_get_the_formed_features(kind):
    torch.manual_seed(0)
    f, params = ntkfunc.from_module(_ViewsAndTies().double())
    x = torch.randn(5, 6, dtype=torch.float64)
    sketch = ntkfunc.Sketch(40, seed=1, kind=kind)
    fast = ntkfunc.features_fn(f, sketch)(x, params)
    formed = ntkfunc.features_fn(f, sketch, implementation=1)(x, params)
    torch.testing.assert_close(fast, formed, rtol=1e-10, atol=1e-10)


def test_tensorsketch_fft_route_equals_hashing_the_outer_products():
    blk = tensorsketch.TensorSketchBlock(leaf=0, rows=5, cols=9, dim=32, seed=1)
    c, x = torch.randn(3, 2, 5, 4, dtype=torch.float64), torch.randn(3, 4, 9, dtype=torch.float64)
    a = torch.zeros(3, 2, 32, dtype=torch.float64)
    blk.fft(c, x, a)
    b = torch.zeros(6, 32, dtype=torch.float64)
    blk.formed(torch.einsum("mors,msd->mord", c, x).reshape(6, 45), b)
    torch.testing.assert_close(a.reshape(6, 32), b)


def test_pytree_outputs_batch_axes_and_vmap_axes_none_keep_ntk_fn_layout():
    f, params, x1, x2, vmap_axes = zoo._pytree_case(torch.float64)
    sketch = ntkfunc.Sketch(16)
    feats = ntkfunc.features_fn(f, sketch, vmap_axes)(x1, params)
    out = f(params, x1)
    for fe, o in zip(torch.utils._pytree.tree_leaves(feats), torch.utils._pytree.tree_leaves(out)):
        assert fe.shape[-1] == 16 and fe.shape[0] == 5 and fe.numel() == o.numel() * 16
    ex = ntkfunc.ntk_fn(f, trace_axes=(), vmap_axes=vmap_axes)(x1, x2, params)
    sk = ntkfunc.sketched_ntk_fn(f, sketch, trace_axes=(), vmap_axes=vmap_axes)(x1, x2, params)
    assert torch.utils._pytree.tree_structure(ex) == torch.utils._pytree.tree_structure(sk)
    assert [t.shape for t in torch.utils._pytree.tree_leaves(ex)] == [t.shape for t in torch.utils._pytree.tree_leaves(sk)]
    f, params, x1, x2, _ = zoo._set_case(torch.float64)
    assert ntkfunc.features_fn(f, sketch, vmap_axes=None)(x1, params).shape == (*f(params, x1).shape, 16)


# --- plans -----------------------------------------------------------------------------------------------------


def test_auto_takes_tensorsketch_for_wide_layers_and_countsketch_for_many_positions():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 1))
    f, params = ntkfunc.from_module(mlp)
    plan = ntkfunc.Sketch(1024).explain(f, params, torch.randn(2, 256))
    assert [p.kind for p in plan.params][0] == "tensorsketch" and plan.params[0].route == "fft"
    conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 32 * 32, 1))
    f, params = ntkfunc.from_module(conv)
    plan = ntkfunc.Sketch(1024).explain(f, params, torch.randn(2, 3, 32, 32))
    assert plan.params[0].kind == "countsketch" and plan.params[0].route == "factors"
    rec = plan.record()
    assert rec["kind"] == "auto" and rec["dim"] == 1024 and set(rec["per_parameter"]) == {p.name for p in plan.params}
    assert "total" in str(plan) and "0.weight" in str(plan)
    with_impl1 = ntkfunc.Sketch(1024).explain(f, params, torch.randn(2, 3, 32, 32), implementation=1)
    assert [p.kind for p in with_impl1.params] == [p.kind for p in plan.params]  # the choice never depends on the implementation
    assert {p.route for p in with_impl1.params} == {"formed"}


# --- files, resume, corruption ----------------------------------------------------------------------------------


def test_features_are_written_once_reused_and_checked(tmp_path, monkeypatch):
    f, params, x1, _ = _cnn(torch.float32)
    x = torch.cat([x1] * 6)  # 42 samples
    sketch = ntkfunc.Sketch(64, seed=3)
    out = tmp_path / "K.npy"
    monkeypatch.setattr("ntkfunc._dataset.features.CHUNK_SAMPLES", 8)
    from ntkfunc._dataset import features as featuring

    calls = []
    real = featuring.Chunks.writes  # what the runner commits of each chunk

    def counting(self, c, block):
        calls.append(c)
        if len(calls) == 3 and os.environ.get("_FAIL_ONCE") == "1":
            raise KeyboardInterrupt("killed")
        return real(self, c, block)

    monkeypatch.setattr(featuring.Chunks, "writes", counting)
    monkeypatch.setenv("_FAIL_ONCE", "1")
    with pytest.raises(KeyboardInterrupt):
        ntkfunc.kernel_matrix(f, params, x, sketch=sketch, out=out, batch_size=10, progress=False)
    monkeypatch.setenv("_FAIL_ONCE", "0")
    calls.clear()
    k = ntkfunc.kernel_matrix(f, params, x, sketch=sketch, out=out, batch_size=10, progress=False)
    assert sorted(calls) == [2, 3, 4, 5]  # chunks 0 and 1 were committed before the kill
    torch.testing.assert_close(k, ntkfunc.kernel_matrix(f, params, x, sketch=sketch, batch_size=10, progress=False), rtol=1e-5, atol=1e-4)
    (path,) = (out.parent / "K.npy.features").glob("features-*.npy")
    feats = np.load(path)
    torch.testing.assert_close(torch.from_numpy(feats), ntkfunc.features_fn(f, sketch)(x, params), rtol=1e-5, atol=1e-5)
    manifest = json.loads((out.parent / "K.npy.manifest.json").read_text())
    assert manifest["fingerprint"]["sketch"]["dim"] == 64 and manifest["sketch_run"]["features"] == [str(path), None]
    assert 0 < manifest["sketch_run"]["error_estimate"]["relative_frobenius"] < 1

    # a second kernel of the same data reuses the features: nothing recomputed
    calls.clear()
    ntkfunc.kernel_matrix(f, params, x, x[:5], sketch=sketch, out=tmp_path / "K2.npy", features=out.parent / "K.npy.features", progress=False)
    assert calls == [0]  # only x2 = x[:5] (one chunk) is new

    # a corrupted chunk is detected and recomputed, not reused
    mm = np.load(path, mmap_mode="r+")
    mm[9] += 1.0
    mm.flush()
    del mm
    calls.clear()
    with pytest.warns(RuntimeWarning, match=r"1 committed chunk\(s\) \['1'\] of features-.*\.npy do not match their markers"):
        ntkfunc.kernel_matrix(f, params, x, sketch=sketch, features=out.parent / "K.npy.features", progress=False)
    assert calls == [1]

    # an edited manifest is refused; a foreign features file (other fingerprint under the same name) too, with what changed
    from ntkfunc._dataset.fileformat import FEATURES, OutputFiles, write_manifest

    mpath = Path(str(path) + ".manifest.json")
    man = json.loads(mpath.read_text())
    man["fingerprint"]["data"] = "0" * 64
    mpath.write_text(json.dumps(man))
    with pytest.raises(ValueError, match=r"features-.*\.npy\.manifest\.json does not match its checksum"):
        ntkfunc.kernel_matrix(f, params, x, sketch=sketch, features=out.parent / "K.npy.features", progress=False)
    write_manifest(OutputFiles(path, FEATURES), {k: v for k, v in man.items() if k != "checksum"})
    with pytest.raises(ValueError, match=r"features file .* was computed with different data"):
        ntkfunc.kernel_matrix(f, params, x, sketch=sketch, features=out.parent / "K.npy.features", progress=False)


def test_features_files_of_an_earlier_format_are_refused(tmp_path):
    """Features files written before they shared the kernel's format (format 1: no checksum, other markers) are never reused."""
    f, params, x1, _ = _cnn(torch.float32)
    sketch = ntkfunc.Sketch(64, seed=0)
    folder = tmp_path / "feats"
    k = ntkfunc.kernel_matrix(f, params, x1, sketch=sketch, features=folder, progress=False)
    (path,) = folder.glob("features-*.npy")
    mpath = Path(str(path) + ".manifest.json")
    man = json.loads(mpath.read_text())
    old = {"format": 1, "shape": man["shape"], "dtype": man["dtype"], "chunk": 256, "fingerprint": man["fingerprint"], "complete": True}
    mpath.write_text(json.dumps(old))  # as the features stage wrote it before
    with pytest.raises(ValueError, match=r"^kernel_matrix\(features='.*feats'\): features-.*\.npy\.manifest\.json has format 1; "
                                         rf"expected format {FORMAT} \(written by an earlier ntkfunc: start over with resume=False"):
        ntkfunc.kernel_matrix(f, params, x1, sketch=sketch, features=folder, progress=False)
    torch.testing.assert_close(ntkfunc.kernel_matrix(f, params, x1, sketch=sketch, features=folder, resume=False, progress=False), k)
    assert json.loads(mpath.read_text())["format"] == FORMAT


def test_features_on_several_devices_are_the_same_file(tmp_path, monkeypatch):
    """Chunks taken by two workers (the kernel's runner), each with its own source on a problem built as the pipeline's
    (problem_on); two workers on one device never share a source's workspaces."""
    from ntkfunc._dataset import features as featuring

    f, params, x1, _ = _cnn(torch.float32)
    x = torch.cat([x1] * 4)  # 28 samples
    sketch = ntkfunc.Sketch(64, seed=2)
    monkeypatch.setattr(featuring, "CHUNK_SAMPLES", 4)
    built, real = [], featuring.problem_on
    monkeypatch.setattr(featuring, "problem_on", lambda job, dev, p, *api: built.append(dev) or real(job, dev, p, *api))
    one = ntkfunc.kernel_matrix(f, params, x, sketch=sketch, features=tmp_path / "one", progress=False)
    assert built == []  # one device: the probed problem
    two = ntkfunc.kernel_matrix(f, params, x, sketch=sketch, features=tmp_path / "two", devices=["cpu", "cpu"], progress=False)
    assert built == [torch.device("cpu")] * 2
    torch.testing.assert_close(two, one, rtol=1e-5, atol=1e-5)
    (a,), (b,) = (tmp_path / "one").glob("features-*.npy"), (tmp_path / "two").glob("features-*.npy")
    torch.testing.assert_close(torch.from_numpy(np.load(b)), torch.from_numpy(np.load(a)), rtol=1e-6, atol=1e-6)
    assert len(list(Path(str(b) + ".chunks").iterdir())) == 7


def test_kernel_output_of_another_sketch_is_not_resumed(tmp_path):
    f, params, x1, _ = _cnn(torch.float32)
    out = tmp_path / "K.npy"
    ntkfunc.kernel_matrix(f, params, x1, sketch=ntkfunc.Sketch(64, seed=1), out=out, progress=False)
    with pytest.raises(ValueError, match=r"computed with different sketch"):
        ntkfunc.kernel_matrix(f, params, x1, sketch=ntkfunc.Sketch(64, seed=2), out=out, progress=False)
    with pytest.raises(ValueError, match=r"computed with different sketch"):
        ntkfunc.kernel_matrix(f, params, x1, out=out, progress=False)  # the exact kernel is not the sketched one


def test_features_that_do_not_fit_in_memory_ask_for_a_folder():
    f, params, x1, _ = _cnn(torch.float32)
    with pytest.raises(MemoryError, match=r"kernel_matrix\(sketch=...\): the features \(7, 3, 4096\) of x1 need .* pass features='DIR'"):
        ntkfunc.kernel_matrix(f, params, x1, sketch=ntkfunc.Sketch(4096), memory_budget=200_000, progress=False)


def test_cli_sketch(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = tmp_path / "k.npy"
    proc = subprocess.run([sys.executable, "-m", "ntkfunc", "compute", "--data", "digits_0_40_0_8", "--sketch-dim", "128",
                           "--sketch-seed", "3", "--out", str(out), "--no-progress"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "sketched (dim=128, seed=3, kind=auto)" in proc.stdout and "estimated relative Frobenius error" in proc.stdout
    assert np.load(out).shape == (48, 40)
    bad = subprocess.run([sys.executable, "-m", "ntkfunc", "compute", "--sketch-dim", "0", "--out", str(out)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2 and "--sketch-dim: expected a positive int" in bad.stderr


def test_features_of_another_function_are_not_reused(tmp_path):
    """Issue 15's guarantee for the features files: same params, another activation (or another f) is never reused."""
    torch.manual_seed(0)
    tanh, relu = (nn.Sequential(nn.Linear(6, 32), act(), nn.Linear(32, 2)) for act in (nn.Tanh, nn.ReLU))
    relu.load_state_dict(tanh.state_dict())
    x = torch.randn(12, 6)
    sketch = ntkfunc.Sketch(64, seed=0)
    folder = tmp_path / "feats"
    for model in (tanh, relu):  # from_module records the module: another file, the right kernel
        f, params = ntkfunc.from_module(model)
        k = ntkfunc.kernel_matrix(f, params, x, sketch=sketch, features=folder, progress=False)
        torch.testing.assert_close(k, ntkfunc.sketched_ntk_fn(f, sketch)(x, None, params), rtol=1e-5, atol=1e-5)
    assert len(list(folder.glob("features-*.npy"))) == 2

    w = {"w": torch.randn(6, 2)}
    scale = [1.0]

    def g(p, x):  # a plain f whose closure changes what it computes: what it captures is part of the file's key
        return torch.tanh(x @ p["w"]) * scale[0]

    ntkfunc.kernel_matrix(g, w, x, sketch=sketch, features=folder, progress=False)
    scale[0] = 2.0
    k = ntkfunc.kernel_matrix(g, w, x, sketch=sketch, features=folder, progress=False)  # another file: the right kernel
    torch.testing.assert_close(k, ntkfunc.sketched_ntk_fn(g, sketch)(x, None, w), rtol=1e-5, atol=1e-5)
    assert len(list(folder.glob("features-*.npy"))) == 4

    class Settings:  # an object f reads through: not among what is captured, but its outputs differ (the probe)
        scale = 1.0

    settings = Settings()

    def h(p, x):
        return torch.tanh(x @ p["w"]) * settings.scale

    ntkfunc.kernel_matrix(h, w, x, sketch=sketch, features=folder, progress=False)
    settings.scale = 2.0
    with pytest.raises(ValueError, match=r"features file features-.*\.npy was computed with different f \(its outputs or gradients"):
        ntkfunc.kernel_matrix(h, w, x, sketch=sketch, features=folder, progress=False)
    k = ntkfunc.kernel_matrix(h, w, x, sketch=sketch, features=folder, resume=False, progress=False)
    torch.testing.assert_close(k, ntkfunc.sketched_ntk_fn(h, sketch)(x, None, w), rtol=1e-5, atol=1e-5)


def test_a_features_file_has_one_writer(tmp_path):
    from ntkfunc._dataset.lock import OutputLock

    f, params, x1, _ = _cnn(torch.float32)
    sketch = ntkfunc.Sketch(64, seed=0)
    folder = tmp_path / "feats"
    ntkfunc.kernel_matrix(f, params, x1, sketch=sketch, features=folder, progress=False)
    (path,) = folder.glob("features-*.npy")
    held = OutputLock.acquire(path, "test")  # another run writing these features
    try:
        with pytest.raises(RuntimeError, match=r"another writer \(pid \d+.*\) holds features-.*\.npy\.lock"):
            ntkfunc.kernel_matrix(f, params, x1, sketch=sketch, features=folder, resume=False, progress=False)
    finally:
        held.release()
    ntkfunc.kernel_matrix(f, params, x1, sketch=sketch, features=folder, progress=False)
