"""torchrun ranks that disagree (and ``feature_matrix`` and pytree inputs under ranks), run by tests/test_blocked.py
under ``torch.distributed.run --nproc_per_node=2``.

``python tests/ranks_job.py OUT_DIR``: per scenario every rank calls ``kernel_matrix`` and prints one
JSON line ``{"rank", "scenario", "error", "computed", "sum"}`` (``error``: the message it raised, or
None; ``computed``: tiles and feature chunks it committed; ``sum``: of the kernel it returned).

- ``unseeded``: the script forgot ``torch.manual_seed``: each rank builds its own random model;
- ``data``: the data depend on the rank;
- ``sketch``: unseeded, with a sketch whose features stay in memory;
- ``file``: unseeded, with a file output;
- ``same``: every rank alike: computed, the same kernel on every rank;
- ``features-file``, ``features-memory``: ``feature_matrix`` (chunks of 3 samples) with every rank alike, into
  ``OUT_DIR/feats`` (the ranks share the chunks) or in memory (every rank computes all); ``sum``: of the features;
- ``features-unseeded``: ``feature_matrix`` with each rank's own random model, into ``OUT_DIR/other``;
- ``pytree-file``: a dict input (``{"x", "mask"}``, :func:`build_dict`) with every rank alike, into ``OUT_DIR/Kd.npy``;
- ``pytree-data``: the same with a mask that depends on the rank (one leaf of the input differs).
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ntkfunc  # noqa: E402
from ntkfunc._dataset import features as featuring  # noqa: E402
from ntkfunc._dataset import runner  # noqa: E402


def build(seed: int, data_seed: int = 0):
    """``(f, params, x)``: a small float64 MLP (weights from ``seed``) and 10 inputs (from ``data_seed``)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    f, params = ntkfunc.from_module(model)
    x = torch.randn(10, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(data_seed))
    return f, params, x


def build_dict(seed: int, mask_seed: int = 0):
    """``(g, params, inputs)``: :func:`build`'s MLP reading ``inputs["x"] * inputs["mask"]`` (a pytree input of 10 samples)."""
    f, params, x = build(seed)
    mask = (torch.rand(10, 5, generator=torch.Generator().manual_seed(100 + mask_seed)) > 0.3).double()

    def g(p, inputs):
        return f(p, inputs["x"] * inputs["mask"])

    return g, params, {"x": x, "mask": mask}


def main() -> None:
    torch.set_num_threads(1)
    folder = sys.argv[1]
    rank = int(os.environ.get("RANK", "0"))
    # the script's own group (kernel_matrix joins it), with a short timeout: a rank left waiting fails instead of hanging
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
    computed = []
    original = runner.Runner.commit

    def commit(self, unit, block, bar, seconds):
        original(self, unit, block, bar, seconds)
        computed.append(unit)

    runner.Runner.commit = commit
    scenarios = {
        "unseeded": (build(seed=rank), {}),
        "data": (build(seed=0, data_seed=rank), {}),
        "sketch": (build(seed=rank), {"sketch": ntkfunc.Sketch(64)}),
        "file": (build(seed=rank), {"out": os.path.join(folder, "K.npy")}),
        "same": (build(seed=0), {}),
    }
    featuring.CHUNK_SAMPLES = 3  # feature_matrix: 4 chunks of the 10 samples
    scenarios.update({
        "features-file": (build(seed=0), {"out": os.path.join(folder, "feats")}),
        "features-memory": (build(seed=0), {}),
        "features-unseeded": (build(seed=rank), {"out": os.path.join(folder, "other")}),
        "pytree-file": (build_dict(seed=0), {"out": os.path.join(folder, "Kd.npy")}),
        "pytree-data": (build_dict(seed=0, mask_seed=rank), {}),
    })
    for name, ((f, params, x), kwargs) in scenarios.items():
        computed.clear()
        error, total = None, None
        try:
            if name.startswith("features-"):
                total = float(ntkfunc.feature_matrix(f, params, x, ntkfunc.Sketch(16, seed=1), progress=False, **kwargs).tensor.sum())
            else:
                total = float(ntkfunc.kernel_matrix(f, params, x, batch_size=3, progress=False, **kwargs).sum())
        except ValueError as err:
            error = str(err)
        # one write per line: the ranks share stdout
        sys.stdout.write(json.dumps({"rank": rank, "scenario": name, "error": error, "computed": len(computed), "sum": total}) + "\n")
        sys.stdout.flush()
    # leave the group and collect it while Python is alive, as kernel_matrix's own group does at exit (else a gloo thread
    # still releasing the last collective's tensors can abort the process during finalisation)
    dist.destroy_process_group()
    gc.collect()


if __name__ == "__main__":
    main()
