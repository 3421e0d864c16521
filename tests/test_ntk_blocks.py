"""Diagonal tiles of ``x2=None`` contracted in sample blocks (``Layout.contract_self``): the blocks above the
diagonal contracted, those below mirrored; exact on every output layout, and in kernels against float64."""

from __future__ import annotations

import pytest
import torch

import ntkfunc
import ntkfunc._core.layout as layout
from ntkfunc._core.layout import Layout
from tests.reference import max_rel_err, reference_kernel
from tests.zoo import CASES, settings

CASE_BY_NAME = {c.name: c for c in CASES}


@pytest.mark.parametrize("blocks", [2, 3, 4, 7])
@pytest.mark.parametrize(
    ("ndim", "batch_axis", "trace", "diagonal", "shape"),
    [
        (2, 0, (), (), (13, 3, 11)),  # (samples, outputs, parameters)
        (2, 0, (1,), (), (9, 4, 6)),
        (3, 0, (1,), (), (10, 4, 5, 7)),
        (3, 0, (), (1,), (11, 3, 4, 6)),
        (3, 0, (), (2,), (8, 3, 4, 5)),
        (3, 1, (), (), (12, 3, 4, 6)),
        (3, 0, (2,), (1,), (7, 3, 4, 5)),
    ],
)
def test_blocks_equal_the_full_contraction(ndim, batch_axis, trace, diagonal, shape, blocks, monkeypatch):
    """Any number of blocks (uneven last block included) gives the full product's kernel, up to float64 rounding."""
    monkeypatch.setattr(layout, "BLOCK_ROWS", 1)
    monkeypatch.setattr(layout, "MAX_BLOCKS", blocks)
    lay = Layout.make(ndim, batch_axis, trace, diagonal)
    torch.manual_seed(0)
    j = torch.randn(*shape, dtype=torch.float64)
    lhs1, lhs2, out = lay.operand_subscripts(1)
    full = torch.einsum(f"{lhs1},{lhs2}->{out}", j, j)
    got = lay.contract_self(j, 1)
    assert got.shape == full.shape
    assert torch.allclose(got, full, rtol=0, atol=1e-12)


def test_small_products_stay_whole(monkeypatch):
    """Below two blocks of BLOCK_ROWS rows the product is not split (no einsum per block)."""
    calls = []
    original = Layout.contract
    monkeypatch.setattr(Layout, "contract", lambda self, a, b, n: calls.append(a.shape[0]) or original(self, a, b, n))
    lay = Layout.make(2, 0, (), ())
    lay.contract_self(torch.randn(15, 10, 4), 1)  # 150 rows: one product
    assert calls == [15]
    calls.clear()
    lay.contract_self(torch.randn(64, 10, 4), 1)  # 640 rows: MAX_BLOCKS blocks, block i against blocks i..
    assert calls == [16, 16, 16, 16]


@pytest.mark.parametrize("name", ["mlp", "cnn", "attention_matmul", "pytree", "batch_axis_1"])
def test_kernels_with_many_blocks_match_reference(name, monkeypatch):
    """Implementation 1 with x2=None and every diagonal tile in blocks of one sample, on every setting."""
    monkeypatch.setattr(layout, "BLOCK_ROWS", 1)
    monkeypatch.setattr(layout, "MAX_BLOCKS", 100)
    case = CASE_BY_NAME[name]
    f, params, x1, _, vmap_axes = case.build(torch.float64)
    for tr, dg in settings(case):
        k = ntkfunc.ntk_fn(f, tr, dg, vmap_axes, implementation=1)(x1, None, params)
        assert max_rel_err(k, reference_kernel(f, params, x1, None, tr, dg)) <= 1e-10, (tr, dg)
