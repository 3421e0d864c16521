"""The models and methods of ``bench_peers.py`` for other benchmarks, with the ntkfunc package on PYTHONPATH.

``bench_peers.py`` puts this checkout first on ``sys.path``; a benchmark that times an exported baseline package
must import ntkfunc before loading it, and load it by path (it is no package). One place does both:

    ntkfunc, bp = load(threads=1)
    model, x, y = bp.build("cnn", 64)
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load(threads: int = 1) -> tuple[ModuleType, ModuleType]:
    """``(ntkfunc, bench_peers)``: torch set to ``threads``, ntkfunc imported from PYTHONPATH first."""
    import torch

    torch.set_num_threads(threads)
    import ntkfunc  # first: the package on PYTHONPATH, whatever bench_peers puts on sys.path

    spec = importlib.util.spec_from_file_location("_bench_peers", ROOT / "benchmarks" / "bench_peers.py")
    assert spec is not None and spec.loader is not None
    bp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bp)
    return ntkfunc, bp
