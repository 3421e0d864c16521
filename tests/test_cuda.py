"""CUDA: same numbers as the float64 reference, dtype and device preserved."""

from __future__ import annotations

import pytest
import torch
from torch.utils import _pytree as pytree

import ntkfunc
from tests.reference import max_rel_err, reference_kernel
from tests.zoo import CASES, implementations

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


def _to(tree, device):
    return pytree.tree_map(lambda t: t.to(device), tree)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("impl", implementations())
@pytest.mark.parametrize("case", [c for c in CASES if c.name in ("mlp", "cnn", "attention_matmul", "pytree")], ids=str)
def test_cuda_matches_reference(case, impl, dtype, tol):
    f, params, x1, x2, vmap_axes = case.build(dtype)
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # TF32 would change float32 numbers by ~1e-3
    try:
        k = ntkfunc.ntk_fn(f, trace_axes=(), vmap_axes=vmap_axes, implementation=impl)(
            _to(x1, "cuda"), _to(x2, "cuda"), _to(params, "cuda"))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    for leaf in pytree.tree_leaves(k):
        assert leaf.device.type == "cuda" and leaf.dtype == dtype
    f64, p64, a, b, _ = case.build(torch.float64)
    assert max_rel_err(pytree.tree_map(lambda t: t.cpu(), k), reference_kernel(f64, p64, a, b, (), ())) <= tol


@pytest.mark.parametrize("impl", [None, 1, 3], ids=str)
@pytest.mark.parametrize("case", [c for c in CASES if c.name in ("mlp", "cnn", "attention_matmul")], ids=str)
def test_cuda_jacobian_fn_and_out_match_the_cpu_in_float64(case, impl):
    """Per-sample Jacobians on CUDA (a new result and into a CUDA buffer with ``out=``) against the CPU's in float64,
    which ``tests/test_jacobian_fn.py`` checks against the reference."""
    f, params, x1, _, vmap_axes = case.build(torch.float64)
    jac = ntkfunc.jacobian_fn(f, vmap_axes, implementation=impl, flat=True)
    ref = jac(x1, params)
    got = jac(_to(x1, "cuda"), _to(params, "cuda"))
    assert got.device.type == "cuda" and max_rel_err(got.cpu(), ref) <= 1e-10
    buf = torch.empty_like(got)
    assert jac(_to(x1, "cuda"), _to(params, "cuda"), out=buf) is buf and max_rel_err(buf.cpu(), ref) <= 1e-10
    with pytest.raises(ValueError, match="on cpu; expected .* on cuda"):
        jac(_to(x1, "cuda"), _to(params, "cuda"), out=ref)
