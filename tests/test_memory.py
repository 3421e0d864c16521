"""The memory budget is respected: a subprocess's peak RSS grows by less than the budget."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

_SCRIPT = textwrap.dedent(
    """
    import json, resource, torch, ntkfunc
    torch.manual_seed(0)
    torch.set_num_threads(2)
    model = torch.nn.Sequential(torch.nn.Linear(1024, 2048), torch.nn.Tanh(),
                                torch.nn.Linear(2048, 1024), torch.nn.Tanh(), torch.nn.Linear(1024, 10))
    f, params = ntkfunc.from_module(model.eval())
    n_params = sum(p.numel() for p in params.values())
    x = torch.randn(32, 1024)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    k = ntkfunc.ntk_fn(f, memory_budget="2GB")(x, None, params)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"n_params": n_params, "peak": peak, "baseline": baseline, "shape": list(k.shape),
                      "finite": bool(torch.isfinite(k).all()), "sym": float((k - k.T).abs().max()),
                      "jacobian_bytes": 32 * 10 * n_params * 4}))
    """
)


def test_four_million_parameter_mlp_fits_a_two_gigabyte_budget():
    out = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=600, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["n_params"] > 4_000_000
    assert r["jacobian_bytes"] > 5e9  # the whole Jacobian would not fit
    assert r["shape"] == [32, 32] and r["finite"] and r["sym"] == 0.0
    used = r["peak"] - r["baseline"]  # the process (torch, model, data) before the call is not the kernel's
    assert used < 2e9, f"the kernel took the peak RSS {used / 1e9:.2f} GB above its start: over the 2 GB budget"
