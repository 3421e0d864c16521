"""The kernel function's cache keeps what depends on shapes only: new values give the new kernel."""

from __future__ import annotations

import pytest
import torch
from torch.utils import _pytree as pytree

import ntkfunc
from ntkfunc import rules
from ntkfunc.rules.base import RULES, Rule, Structure
from tests.reference import max_rel_err, reference_kernel
from tests.zoo import CASES, implementations

CASE_BY_NAME = {c.name: c for c in CASES}


def _perturbed(params, seed):
    gen = torch.Generator().manual_seed(seed)
    return pytree.tree_map(
        lambda t: t + 0.5 * torch.randn(t.shape, generator=gen, dtype=t.dtype) if t.is_floating_point() else t, params
    )


@pytest.mark.parametrize("impl", implementations())
@pytest.mark.parametrize("case_name", ["mlp", "cnn", "attention_matmul", "layernorm_mlp", "pytree", "tied_weights"])
def test_changed_parameter_values_give_the_changed_kernel(case_name, impl):
    """Same shapes, new values (a training step): the cached probe, capture, routes and plans do not
    freeze anything that depends on values."""
    f, params, x1, x2, vmap_axes = CASE_BY_NAME[case_name].build(torch.float64)
    tr = () if CASE_BY_NAME[case_name].out_ndim == 2 else (1,)
    kernel = ntkfunc.ntk_fn(f, trace_axes=tr, vmap_axes=vmap_axes, implementation=impl)
    for seed, x2_ in [(None, x2), (1, x2), (2, None), (3, x2)]:
        p = params if seed is None else _perturbed(params, seed)
        xa = x1 if seed is None else pytree.tree_map(lambda t: t.flip(0), x1)  # new input values too
        k = kernel(xa, x2_, p)
        assert max_rel_err(k, reference_kernel(f, p, xa, x2_, tr, ())) <= 1e-10


def test_repeated_call_skips_the_capture(monkeypatch):
    from ntkfunc._engines.structured import capture

    calls = []
    original = capture.discover
    monkeypatch.setattr(capture, "discover", lambda *a, **k: calls.append(1) or original(*a, **k))
    f, params, x1, x2, _ = CASE_BY_NAME["cnn"].build(torch.float64)
    kernel = ntkfunc.ntk_fn(f, trace_axes=(), implementation=3)
    kernel(x1, x2, params)
    first = len(calls)
    kernel(x1, x2, _perturbed(params, 0))
    assert first >= 1 and len(calls) == first  # the second call reused the capture
    kernel(x1[:2], x2, params)  # the batch size is not part of the signature: still reused
    assert len(calls) == first
    as32 = pytree.tree_map(lambda t: t.float() if t.is_floating_point() else t, params)
    kernel(x1.float(), x2.float(), as32)  # another signature (dtype): captured again
    assert len(calls) > first


class _Lerp(Rule):
    """``torch.lerp(x, w, s) = x + s (w - x)`` for a parameter ``w``, with the scalar ``s`` read into
    ``meta`` (its value!) instead of being returned as an operand."""

    name = "test_lerp"
    names = ("input", "end", "weight")

    def match(self, a, is_param):
        ok = is_param(a["end"]) and not is_param(a["input"]) and isinstance(a["weight"], torch.Tensor)
        return {"end": a["end"]} if ok and a["weight"].ndim == 0 else None

    def capture(self, a, is_param):
        return [], {"s": float(a["weight"])}

    def structure(self, role, operands, meta, y_shape):
        return Structure(tuple(y_shape), "az", "z", [], meta["s"])


def test_a_rule_that_reads_values_into_meta_is_captured_again():
    """A capture whose meta holds tensor values (``Capture.static`` false) is never reused across calls."""
    assert rules.lookup(torch.lerp) is None
    RULES[torch.lerp] = _Lerp()
    try:
        torch.manual_seed(0)
        scale = torch.tensor(1.0, dtype=torch.float64)  # a constant of f that changes between calls (a buffer)

        def f(p, x):
            return torch.tanh(torch.lerp(x, p["w"], scale)) @ p["v"]

        params = {"w": torch.randn(4, dtype=torch.float64), "v": torch.randn(4, 2, dtype=torch.float64)}
        kernel = ntkfunc.ntk_fn(f, trace_axes=(), implementation=3)
        x = torch.randn(5, 4, dtype=torch.float64)
        report = ntkfunc.explain(f, params, x, trace_axes=())
        assert {r.name: r.rule for r in report.params}["w"] == "test_lerp:end"  # the rule is used, not a fallback
        for s in (1.0, 3.0, -2.0):
            scale.fill_(s)
            assert max_rel_err(kernel(x, None, params), reference_kernel(f, params, x, None, (), ())) <= 1e-10
    finally:
        del RULES[torch.lerp]


def test_a_non_contiguous_parameter_is_another_signature(monkeypatch):
    """Views of a non-contiguous parameter fall back (``views.ViewMap.of``), so contiguity is part of
    the signature: a contiguous call after a non-contiguous one is captured again and gets its rule.
    Both kernels are exact."""
    from ntkfunc._engines.structured import capture

    found = []
    original = capture.discover
    monkeypatch.setattr(capture, "discover", lambda *a, **k: found.append(original(*a, **k)) or found[-1])
    torch.manual_seed(0)

    def f(p, x):
        return torch.tanh(x @ p["w"].T)

    x = torch.randn(3, 4, dtype=torch.float64)
    kernel = ntkfunc.ntk_fn(f, trace_axes=(), implementation=3)
    q = {"w": torch.randn(4, 5, dtype=torch.float64).T}  # (5, 4), not contiguous
    p = {"w": torch.randn(5, 4, dtype=torch.float64)}
    with rules.forced():
        for params in (q, p):
            assert max_rel_err(kernel(x, None, params), reference_kernel(f, params, x, None, (), ())) <= 1e-10
    assert len(found) == 2 and 0 in found[0].fallback and 0 in found[1].covered
