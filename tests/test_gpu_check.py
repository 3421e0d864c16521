"""``benchmarks/gpu_check.py``, the one script a lent GPU runs, at toy sizes on the CPU: it must not fail there for a
silly reason, and every check it makes must pass (device time is too scarce to find a typo on the GPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_at_toy_sizes_on_the_cpu_and_every_check_passes(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--small", "--out",
                          str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    rows = result["correctness"]
    assert rows and all(r["status"] == "ok" for r in rows), [r for r in rows if r["status"] != "ok"]
    checked = {key for r in rows for key in r if key.startswith(("ntk_fn", "kernel_matrix", "jacobian_fn"))}
    assert checked == {"ntk_fn", "kernel_matrix", "kernel_matrix_x2None", "jacobian_fn", "jacobian_fn_out"}
    assert all(r["status"] == "ok" for r in result["throughput"]), result["throughput"]
    assert result["sketched"]["status"] == "ok", result["sketched"]
    assert (tmp_path / "gpu_check.md").read_text().startswith("# GPU check")
