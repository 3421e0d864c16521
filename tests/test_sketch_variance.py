"""Sketch accuracy at equal dim: no error shared by the outputs of a layer, auto no worse than a Gaussian projection,
and the Gaussian projection drawn once (in float32) instead of once per chunk."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ntkfunc
from ntkfunc._engines.sketch import plan as sketch_plan
from ntkfunc._engines.sketch import seeds
from tests.reference import reference_kernel


def _head_errors(kind: str, cols: int, dim: int, outputs: int = 6) -> torch.Tensor:
    """Per output ``o``: the sketched kernel of a linear layer's row ``o`` minus the exact ``<x1, x2>`` (no bias)."""
    torch.manual_seed(0)
    w = torch.randn(outputs, cols, dtype=torch.float64)
    f = lambda p, x: x @ p["w"].T  # noqa: E731  # the gradient of output o is row o: e_o ⊗ x
    x = torch.randn(3, cols, dtype=torch.float64)
    feats = ntkfunc.features_fn(f, ntkfunc.Sketch(dim, seed=5, kind=kind))(x, {"w": w})
    k_hat = torch.einsum("aod,bod->abo", feats, feats)
    return k_hat - (x @ x.T)[..., None]


@pytest.mark.parametrize("kind,cols", [("tensorsketch", 48), ("countsketch", 48), ("countsketch", 100)])
def test_a_last_layers_outputs_do_not_share_one_error(kind, cols):
    """Rows that fit in dim (48 <= 64) are sketched without collisions: each output's term is exact. Rows wider than dim
    (100 > 64) collide with themselves, but each row with its own signs: the outputs' errors differ (they were equal)."""
    err = _head_errors(kind, cols, 64)
    if cols <= 64:
        assert float(err.abs().max()) < 1e-10
    else:
        off = err[0, 1]  # a pair of different samples, per output
        assert float(off.abs().mean()) > 1e-3 and float(off.std()) > 0.3 * float(off.abs().mean()), off


def test_tensorsketch_of_rows_wider_than_dim_is_priced_out_of_auto():
    """TensorSketch cannot give wide rows their own collisions: the same error for every output (documented), so
    auto takes the count sketch there even where TensorSketch is predicted faster."""
    err = _head_errors("tensorsketch", 100, 64)[0, 1]
    assert float((err - err[0]).abs().max()) < 1e-9 * float(err.abs().max()) + 1e-12
    assert sketch_plan.variance_factor("tensorsketch", (10, 4096), 2048, 10) > sketch_plan.VARIANCE_TOLERANCE
    assert sketch_plan.variance_factor("countsketch", (10, 4096), 2048, 10) <= sketch_plan.VARIANCE_TOLERANCE
    from ntkfunc.rules import Factorable

    wide, narrow = Factorable(10, 4096, 1), Factorable(256, 1024, 1)
    assert sketch_plan.fft_seconds(wide, 10, 2048) < sketch_plan.factors_seconds(wide, 10, 2048)  # TS would be faster
    p = sketch_plan.resolve("auto", 2048, 0, ["a", "b"], [(256, 1024), (10, 4096)], 10, {0: narrow, 1: wide}, True)
    assert [q.kind for q in p.params] == ["tensorsketch", "countsketch"]
    assert p.record()["tables"] == {k: sketch_plan.TABLES[k] for k in ("countsketch", "tensorsketch")}


def _cnn(last: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, last // 16, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(last, 10)).double()


@pytest.mark.parametrize("last", [128, 512])
def test_auto_error_at_most_a_gaussian_projections(last):
    """A CNN with 10 logits, traced (the default kernel), dim = 256, the mean relative error over 6 fixed seeds: auto's
    is at most 1.1 times a Gaussian projection's (it was 1.7 and 2.7 times: TensorSketch of the last layer)."""
    f, params = ntkfunc.from_module(_cnn(last))
    x = torch.randn(12, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    exact = reference_kernel(f, params, x, None)

    def mean_error(kind: str) -> float:
        errs = []
        for seed in range(6):
            phi = ntkfunc.features_fn(f, ntkfunc.Sketch(256, seed, kind))(x, params)
            errs.append(float((torch.einsum("aod,bod->ab", phi, phi) / 10 - exact).norm() / exact.norm()))
        return sum(errs) / len(errs)

    plan = ntkfunc.Sketch(256).explain(f, params, x[:2])
    assert {p.kind for p in plan.params} <= {"countsketch", "tensorsketch"}
    assert mean_error("auto") <= sketch_plan.VARIANCE_TOLERANCE * mean_error("gaussian")


def test_gaussian_projection_is_drawn_once_in_float32_whatever_the_chunks(monkeypatch):
    """Features of 30 samples in chunks of 4 draw each block of Π once (it fits in half the budget); a budget too small
    for it draws the blocks it cannot keep once per chunk; the same Π (drawn in float32) serves float32 and float64."""
    from ntkfunc._core.problem import make_problem
    from ntkfunc._engines.rows.projected import ProjectedRows

    drawn: list = []
    original = seeds.generator

    def spy(seed, *labels):
        if labels and labels[0] == "gaussian":
            drawn.append(labels)
        return original(seed, *labels)

    monkeypatch.setattr(seeds, "generator", spy)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 36, 3))
    f, params = ntkfunc.from_module(model)
    x = torch.randn(30, 2, 6, 6)
    problem = make_problem(f, x[:1], None, params, 0, (), ())
    n_blocks = sum(-(-p.numel() // 512) for p in params.values())  # 4096 numbers a row of Π: 512 rows per block
    whole = 4096 * 4 * sum(p.numel() for p in params.values())
    out = torch.empty(30, 3, 4096)
    for budget, draws in ((4 * whole, n_blocks), (whole / 2, None)):
        drawn.clear()
        src = ProjectedRows(problem, "gaussian", 4096, 2)
        src.chunk_for(budget)
        src.compute([x], out, 4)  # 8 chunks
        if draws is not None:
            assert len(drawn) == draws, (len(drawn), draws)
            first = out.clone()
        else:  # half of Π kept: the 432-row block of the last layer's weight is drawn for each chunk
            assert n_blocks < len(drawn) <= n_blocks + 7 * 2, len(drawn)
            torch.testing.assert_close(out, first, rtol=0, atol=0)
    f64, p64 = ntkfunc.from_module(model.double())
    feats64 = ntkfunc.features_fn(f64, ntkfunc.Sketch(4096, seed=2, kind="gaussian"))(x.double(), p64)
    torch.testing.assert_close(feats64.float(), first, rtol=1e-4, atol=1e-5)
