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
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(p for p in (ROOT / "examples").glob("*.py") if not p.name.startswith("_"))

pytest.importorskip("matplotlib", reason="the examples need the optional extra ntkfunc[examples] (matplotlib)")

NEEDS = {"gpt2_token_ntk": "transformers"}  # examples that need a model library (ntkfunc[integrations])


def test_examples_found() -> None:
    assert SCRIPTS, f"no example scripts found in {ROOT / 'examples'}"


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_example_runs_quick(script: Path, tmp_path: Path) -> None:
    if script.stem in NEEDS:
        pytest.importorskip(NEEDS[script.stem], reason=f"{script.name} needs {NEEDS[script.stem]} (pip install -e '.[integrations]')")
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


def _common():
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import _common as common
    finally:
        sys.path.pop(0)
    return common


def test_digits_split_is_balanced_disjoint_and_sorted() -> None:
    C = _common()
    x_tr, y_tr, x_te, y_te = C.digits(25, 15, classes=(6, 9), seed=3)
    assert x_tr.shape == (25, 64) and x_te.shape == (15, 64)
    assert y_tr.tolist() == [0] * 13 + [1] * 12 and y_te.tolist() == [0] * 8 + [1] * 7
    # no test image is also a training image
    assert torch.cdist(x_tr, x_te).min() > 0
    img = C.digits(10, 10, seed=3, flat=False)[0]
    assert img.shape == (10, 1, 8, 8)


def test_digits_refuses_more_images_than_a_class_has() -> None:
    C = _common()
    with pytest.raises(ValueError, match=r"class 6 has \d+ images; expected at least 400"):
        C.digits(600, 200, classes=(6, 9))


def test_one_hot_and_accuracy() -> None:
    C = _common()
    t = C.one_hot(torch.tensor([2, 0]), 3)
    assert torch.allclose(t.sum(-1), torch.zeros(2), atol=1e-6) and int(t.argmax(-1)[0]) == 2
    assert C.accuracy(torch.tensor([[0.0, 1.0], [2.0, 1.0]]), torch.tensor([1, 1])) == 0.5
    assert C.accuracy(torch.tensor([0.3, -0.2, 0.1]), torch.tensor([1, 0, 0])) == 2 / 3
