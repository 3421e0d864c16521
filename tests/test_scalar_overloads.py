"""Forward-mode calls of models with tensor-by-number ops (``h / 4.0``, ``2 * h + 1``): ``BatchableOps(scalar_overloads=
True)`` sends them to the ``.Scalar`` overloads inside ``ntk_vp_fn``, ``linearize`` and ``taylor_expand``; the results
equal the float64 reference and the plain ``torch.func.jvp`` bit for bit."""

from __future__ import annotations

import pytest
import torch
from torch.func import jvp

import ntkfunc
from ntkfunc._core.batchable import BatchableOps
from tests.reference import max_rel_err, reference_kernel


def scalar_model(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    h = torch.tanh(x @ params["w1"] / 4.0 + 1)
    h = 2 * h - 0.5 + h * 3
    return (h - 1) @ params["w2"] / 2


def make(dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    params = {"w1": torch.randn(5, 7, generator=g, dtype=dtype), "w2": torch.randn(7, 3, generator=g, dtype=dtype)}
    return params, torch.randn(4, 5, generator=g, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ntk_vp_matches_reference(dtype: torch.dtype) -> None:
    params, x = make(dtype)
    v = torch.randn(4, 3, dtype=dtype)
    got = ntkfunc.ntk_vp_fn(scalar_model, x, None, params)(v)
    theta = reference_kernel(scalar_model, {k: p.double() for k, p in params.items()}, x.double(), None, trace_axes=())
    want = torch.einsum("ijab,jb->ia", theta, v.double())  # theta: (N1, N2, O1, O2)
    assert max_rel_err(got, want) < (1e-5 if dtype == torch.float32 else 1e-12)


def test_linearize_bitwise_equal_to_plain_jvp() -> None:
    params, x = make(torch.float32)
    moved = {k: p + 0.1 * torch.randn_like(p) for k, p in params.items()}
    got = ntkfunc.linearize(scalar_model, params)(moved, x)
    keys = list(params)
    delta = tuple(moved[k] - params[k] for k in keys)
    out, tangent = jvp(lambda *ps: scalar_model(dict(zip(keys, ps)), x), tuple(params[k] for k in keys), delta)
    assert torch.equal(got, out + tangent)


def test_mode_sends_only_tensor_by_number_calls() -> None:
    x = torch.randn(6)
    sent: list[object] = []

    class Spy(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            sent.append(func)
            return func(*args, **(kwargs or {}))

    with Spy(), BatchableOps(scalar_overloads=True):
        a = x / 4.0 + 1
        b = x * x - x
    assert torch.equal(a, x / 4.0 + 1) and torch.equal(b, x * x - x)
    ops = [getattr(f, "__name__", str(f)) for f in sent]
    assert ops == ["div.Scalar", "add.Scalar", "mul", "sub"], ops  # tensor-by-number calls as .Scalar overloads, others unchanged
