"""Diagonal tiles of ``x2=None`` contracted in sample blocks (``Layout.contract_self``): the blocks above the
diagonal contracted, those below mirrored; exact on every output layout, and in kernels against float64. The
parameters' products accumulated into one result (``Layout.contract_sum`` / ``contract_self_sum``) equal the sum of
one einsum each."""

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
    """Below two blocks of BLOCK_ROWS rows the product is not split (one matrix product)."""
    rows = []
    original = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda a, b: rows.append(a.shape[1]) or original(a, b))
    lay = Layout.make(2, 0, (), ())
    lay.contract_self(torch.randn(15, 10, 4), 1)  # 150 rows: one product
    assert rows == [150]
    rows.clear()
    lay.contract_self(torch.randn(64, 10, 4), 1)  # 640 rows: MAX_BLOCKS blocks, block i against blocks i..
    assert rows == [160, 160, 160, 160]


SUM_LAYOUTS = [
    (2, 0, (), (), (13, 3)),
    (2, 0, (1,), (), (9, 4)),
    (3, 0, (1,), (), (10, 4, 5)),
    (3, 0, (), (1,), (11, 3, 4)),
    (3, 0, (), (2,), (8, 3, 4)),
    (3, 1, (), (), (12, 3, 4)),
    (3, 0, (2,), (1,), (7, 3, 4)),
    (3, 0, (0,), (), (6, 3, 4)),
    (2, 0, (), (0,), (5, 3)),
    (2, None, (), (), (4, 3)),
]


@pytest.mark.parametrize("blocks", [1, 2, 3, 7])
@pytest.mark.parametrize(("ndim", "batch_axis", "trace", "diagonal", "shape"), SUM_LAYOUTS)
def test_sums_over_parameters_equal_the_einsums(ndim, batch_axis, trace, diagonal, shape, blocks, monkeypatch):
    """``contract_sum`` and ``contract_self_sum`` of operands with different parameter shapes (0 to 3 trailing axes) equal
    the sum of one einsum each, on every layout (traced, diagonal, batch axis traced or diagonal, no batch axis), the
    symmetric one in any number of blocks; and they differentiate as the einsums do."""
    monkeypatch.setattr(layout, "BLOCK_ROWS", 1)
    monkeypatch.setattr(layout, "MAX_BLOCKS", blocks)
    lay = Layout.make(ndim, batch_axis, trace, diagonal)
    torch.manual_seed(0)
    extras = [(), (5,), (2, 3), (2, 1, 2)]
    ones = [torch.randn(*shape, *e, dtype=torch.float64, requires_grad=True) for e in extras]
    others = [torch.randn(*shape, *e, dtype=torch.float64) for e in extras]
    lhs = [lay.operand_subscripts(len(e)) for e in extras]
    want = sum(torch.einsum(f"{l1},{l2}->{o}", a, b) for (l1, l2, o), a, b in zip(lhs, ones, others))
    got = lay.contract_sum([(a, b, len(e)) for a, b, e in zip(ones, others, extras)])
    assert got.shape == want.shape and torch.allclose(got, want, rtol=0, atol=1e-12)
    want_self = sum(torch.einsum(f"{l1},{l2}->{o}", a, a) for (l1, l2, o), a in zip(lhs, ones))
    got_self = lay.contract_self_sum([(a, len(e)) for a, e in zip(ones, extras)])
    assert got_self.shape == want_self.shape and torch.allclose(got_self, want_self, rtol=0, atol=1e-12)
    weights = torch.randn(want_self.shape, dtype=torch.float64)
    g_want = torch.autograd.grad((want_self * weights).sum(), ones)
    g_got = torch.autograd.grad((got_self * weights).sum(), ones)
    assert all(torch.allclose(a, b, rtol=0, atol=1e-12) for a, b in zip(g_got, g_want))


def test_sums_map_over_an_ensemble():
    """Under ``torch.func.vmap`` (an ensemble of parameters) each member's sum is its own."""
    lay = Layout.make(2, 0, (), ())
    torch.manual_seed(0)
    j, h = torch.randn(3, 6, 2, 5, dtype=torch.float64), torch.randn(3, 6, 2, 4, 2, dtype=torch.float64)
    both = torch.func.vmap(lambda a, b: lay.contract_self_sum([(a, 1), (b, 2)]))(j, h)
    for m in range(3):
        assert torch.allclose(both[m], lay.contract(j[m], j[m], 1) + lay.contract(h[m], h[m], 2), rtol=0, atol=1e-12)


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
