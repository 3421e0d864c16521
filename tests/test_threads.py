"""Thread safety: what each implementation and from_module guarantee, and torch's global flags left as found."""

from __future__ import annotations

import threading

import pytest
import torch

import ntkfunc
from ntkfunc._core.ops import transform_friendly_attention
from ntkfunc._engines import ENGINES
from tests.concurrency import in_threads
from tests.reference import max_rel_err, reference_kernel

SDPA_FLAGS = ("flash_sdp_enabled", "mem_efficient_sdp_enabled", "math_sdp_enabled", "cudnn_sdp_enabled")


def _flags():
    """The process-wide attention flags a kernel computation sets: SDPA backends and the MHA fast path."""
    return {**{name: getattr(torch.backends.cuda, name)() for name in SDPA_FLAGS}, "mha_fastpath": torch.backends.mha.get_fastpath_enabled()}


def _mlp(dtype=torch.float64):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).to(dtype)
    f, params = ntkfunc.from_module(model)
    return model, f, params, torch.randn(9, 4, dtype=dtype)


def test_overlapping_attention_blocks_restore_the_global_sdpa_flags():
    """Regression: thread A enters, B enters, A leaves, B leaves: B restored A's math-only state, for good."""
    before = _flags()
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    inside = []

    def a():
        with transform_friendly_attention():
            a_in.set()
            b_in.wait(5)
        a_out.set()

    def b():
        a_in.wait(5)
        with transform_friendly_attention():
            b_in.set()
            a_out.wait(5)
            inside.append(_flags())  # still math-only while B computes

    in_threads(a, b)
    assert inside == [dict(before, flash_sdp_enabled=False, mem_efficient_sdp_enabled=False, math_sdp_enabled=True,
                           cudnn_sdp_enabled=False, mha_fastpath=False)]
    assert _flags() == before


def test_threaded_runs_leave_the_sdpa_flags_as_found():
    """End to end: kernel_matrix over 4 worker threads, and ntk_fn in 4 threads, leave the flags as they found them.

    The interleaving that left flash attention disabled depends on timing (it passes on the old
    code too when the threads happen not to overlap that way); the test above forces it.
    """
    _, f, params, _ = _mlp()
    x = torch.randn(30, 4, dtype=torch.float64)
    before = _flags()
    k = ntkfunc.kernel_matrix(f, params, x, implementation=3, batch_size=2, devices=["cpu"] * 4, progress=False)
    assert max_rel_err(k, reference_kernel(f, params, x, None)) <= 1e-10
    assert _flags() == before
    kernel = ntkfunc.ntk_fn(f)
    in_threads(*[lambda: [kernel(x[:4], None, params) for _ in range(10)] for _ in range(4)])
    assert _flags() == before


def test_implementation_2_over_several_devices_gives_the_right_kernel():
    """Implementation 2 in kernel_matrix's concurrent workers (its forward-mode sections take turns on one lock)."""
    assert ENGINES[2].thread_safe
    _, f, params, x = _mlp()
    for _ in range(3):
        k = ntkfunc.kernel_matrix(f, params, x, x[:5], implementation=2, batch_size=2, devices=["cpu", "cpu"], progress=False)
        assert max_rel_err(k, reference_kernel(f, params, x, x[:5])) <= 1e-10


@pytest.mark.parametrize("impl", [e for e in ENGINES if ENGINES[e].thread_safe])
def test_thread_safe_implementations_agree_across_threads(impl):
    _, f, params, x = _mlp()
    kernel = ntkfunc.ntk_fn(f, implementation=impl)
    ref = reference_kernel(f, params, x, None)
    results = []
    in_threads(*[lambda: results.append(kernel(x, None, params)) for _ in range(4)])
    assert len(results) == 4 and all(max_rel_err(k, ref) <= 1e-10 for k in results)


def _main_and_worker(call):
    """``call()`` in this (the main) thread and in a worker thread: (result or error) of each."""
    out = []

    def capture():
        try:
            out.append(call())
        except Exception as err:
            out.append(err)

    capture()
    in_threads(capture)
    return out


def test_from_module_refuses_a_params_dict_missing_a_key_in_every_thread():
    """Regression: the main thread used the module's own tensor, a worker thread a meta tensor (another kernel)."""
    _, f, params, x = _mlp()
    partial = {k: v for k, v in params.items() if k != "0.bias"}
    for got in _main_and_worker(lambda: ntkfunc.ntk_fn(f)(x, None, partial)):
        assert isinstance(got, ValueError)
        assert "from_module's f(params, x): params lacks ['0.bias']; expected every trainable parameter of Sequential" in str(got)
    extra = dict(params, **{"9.weight": torch.ones(2, dtype=torch.float64)})
    with pytest.raises(ValueError, match=r"params has \['9.weight'\], which Sequential has no parameter or buffer of"):
        f(extra, x)


def test_from_module_refuses_a_mode_changed_afterwards_in_every_thread():
    """Regression: model.train() after from_module was seen by the main thread, ignored by worker threads."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Dropout(0.5), torch.nn.Linear(6, 3)).double().eval()
    f, params = ntkfunc.from_module(model)
    x = torch.randn(5, 4, dtype=torch.float64)
    ok = _main_and_worker(lambda: ntkfunc.ntk_fn(f)(x, None, params))
    assert torch.equal(ok[0], ok[1])
    model.train()
    for got in _main_and_worker(lambda: ntkfunc.ntk_fn(f)(x, None, params)):
        assert isinstance(got, ValueError)
        assert "submodules ['(the module)', '0', '1', '2'] were switched to training mode after from_module" in str(got)
    model.eval()
    again = _main_and_worker(lambda: ntkfunc.ntk_fn(f)(x, None, params))
    assert torch.equal(again[0], ok[0]) and torch.equal(again[1], ok[0])


def test_readme_thread_safety_table_matches_the_registry():
    """The README's "Thread safety" rows say yes exactly for the implementations registered thread_safe."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = text.split("### Thread safety", 1)[1].split("\n\n")[1]
    said = {}
    for row in table.splitlines():
        cells = [c.strip() for c in row.strip("|").split("|")]
        if len(cells) == 2 and cells[0].startswith("implementation"):
            names = re.findall(r"`([^`]+)`", cells[0].split("(")[0])
            for name in names:
                said[0 if name == '"auto"' else int(name)] = cells[1].startswith("yes")
    assert said == {e: ENGINES[e].thread_safe for e in ENGINES}, said
