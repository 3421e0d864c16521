"""A convolution's count sketch is computed either way (patches gathered in bucket order, or the gradient formed and
hashed), in spans of samples and blocks of rows of any size: always the features of hashing the formed gradient."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ntkfunc
from ntkfunc._engines.rows import projected
from ntkfunc._engines.sketch import countsketch

pytestmark = pytest.mark.usefixtures("one_thread")


def _cnn(outputs: int):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2), nn.Tanh(),
        nn.Flatten(), nn.Linear(6 * 4 * 4, outputs),
    ).double()
    f, params = ntkfunc.from_module(model)
    return f, params, torch.randn(7, 2, 8, 8, dtype=torch.float64)


@pytest.mark.parametrize("way", ["patches", "gradient"])
@pytest.mark.parametrize("cache", [1 << 20, 600])  # one span and whole blocks; one sample a span and blocks of a few rows
@pytest.mark.parametrize("dim,outputs", [(40, 3), (40, 1), (8192, 2)])  # rows wrapping the buckets; an exact layout
def test_either_way_any_span_gives_the_formed_features(monkeypatch, way, cache, dim, outputs):
    f, params, x = _cnn(outputs)
    sketch = ntkfunc.Sketch(dim, seed=3, kind="countsketch")
    assert [p.route for p in sketch.explain(f, params, x).params][0:3:2] == ["factors", "factors"]
    formed = ntkfunc.features_fn(f, sketch, implementation=1)(x, params)  # a gradient row per sample, then hashed
    used = []

    def forced(buffers, key, ways, g, device=None):  # noqa: ANN001, ANN202
        used.append(key)
        ways[way](0, g)
        return way

    monkeypatch.setattr(projected, "choose_way", forced)
    monkeypatch.setattr(projected, "CACHE_BYTES", cache)
    fast = ntkfunc.features_fn(f, sketch)(x, params)
    assert len(used) >= 2  # both convolutions went through the choice
    torch.testing.assert_close(fast, formed, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("block", [None, 1, 200, 1 << 20])
def test_conv_factors_in_blocks_of_rows_equal_the_whole_product(block):
    """Rows folded a block at a time (each block at its own offset in the buckets) give the whole product's fold."""
    blk = countsketch.layout([(0, (9, 4, 3, 3)), (1, (500,))], 64, 1)[0]
    assert blk.window > 64 and blk.cols <= 64  # rows wrap the buckets, none wider than dim
    xpad = torch.randn(3, 4, 7, 7, dtype=torch.float64)
    c = torch.randn(3, 2, 9, 25, dtype=torch.float64)
    ref = torch.zeros(3, 2, 64, dtype=torch.float64)
    g = torch.einsum("mors,msd->mord", c, torch.nn.functional.unfold(xpad, 3).transpose(1, 2))  # (m, O, R, C kh kw)
    blk.formed(g.reshape(6, 9 * 36), ref.view(6, 64))
    out = torch.zeros(3, 2, 64, dtype=torch.float64)
    blk.conv_factors(c, xpad, (3, 3), (1, 1), (1, 1), out, None, block)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_the_timed_choice_adds_each_sample_once():
    """The first chunk times both ways on its first samples (each run several times into the features): those samples
    still get the sketch once, in that call and in later calls that find the measured table."""
    f, params, x = _cnn(3)
    x = torch.cat([x, x.flip(0)])  # 14 samples: more than the probe's 4
    sketch = ntkfunc.Sketch(40, seed=5, kind="countsketch")
    formed = ntkfunc.features_fn(f, sketch, implementation=1)(x, params)
    fn = ntkfunc.features_fn(f, sketch)
    for _ in range(2):
        torch.testing.assert_close(fn(x, params), formed, rtol=1e-10, atol=1e-10)
