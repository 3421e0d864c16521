"""The pNTK and spectrum examples run end to end at ``--quick`` size and write their PNGs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "script,png,expect",
    [
        ("pntk_vs_width.py", "pntk_vs_width.png", "fitted slope"),
        ("spectrum.py", "spectrum.png", "max_rel_diff"),
    ],
)
def test_example_runs_quick(script, png, expect, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), "--quick", "--out", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert expect in proc.stdout
    out = tmp_path / png
    if script == "spectrum.py":  # Lanczos agrees with the dense eigenvalues wherever both ran
        rows = [line.split() for line in proc.stdout.splitlines() if line.split() and line.split()[0].isdigit()]
        diffs = [float(r[-1]) for r in rows if r[-1] != "nan"]
        assert diffs and max(diffs) < 1e-8, proc.stdout
    assert out.is_file() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
