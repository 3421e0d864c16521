"""Every ``examples/*.py`` script runs with ``--quick`` and writes its PNG figures.

The numbers the examples print are covered by the library's unit tests; this checks that
each script still runs end to end against the current API (exit status 0, at least one
non-empty PNG in ``--out``, the shared command line accepted).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(p for p in (ROOT / "examples").glob("*.py") if not p.name.startswith("_"))

pytest.importorskip("matplotlib", reason="the examples need the optional extra ntkfunc[examples] (matplotlib)")


def test_examples_found() -> None:
    assert SCRIPTS, f"no example scripts found in {ROOT / 'examples'}"


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_example_runs_quick(script: Path, tmp_path: Path) -> None:
    out = tmp_path / "figures"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    proc = subprocess.run(
        [sys.executable, str(script), "--quick", "--out", str(out), "--seed", "1", "--device", "cpu"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"{script.name} --quick exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    pngs = sorted(out.glob("*.png"))
    assert pngs, f"{script.name} --quick wrote no PNG into {out}; stdout:\n{proc.stdout[-2000:]}"
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{png} is not a PNG file"
        assert png.stat().st_size > 1000, f"{png} is only {png.stat().st_size} bytes; expected a figure"
