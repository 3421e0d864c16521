"""A whole-dataset kernel job run as a subprocess by tests/test_blocked.py (kill/resume, torchrun, RSS).

``python tests/blocked_job.py [--out K.npy] [--sleep S] [--result R.npy] [--scale 2]``
(``--result``: then also compute the kernel in memory and save it)
(also under ``python -m torch.distributed.run --nproc_per_node=2``). Each process prints one
JSON line, ``{"rank": r, "computed": n}``: the number of tiles it computed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ntkfunc  # noqa: E402
from ntkfunc._dataset import runner  # noqa: E402
from ntkfunc.module import from_module  # noqa: E402


def build(scale: float = 1.0):
    """``(f, params, x)``: a small float64 CNN and 14 inputs (the same in every process)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 3, 3, padding=1), torch.nn.Tanh(), torch.nn.Flatten(), torch.nn.Linear(3 * 6 * 6, 4)
    ).double()
    f, params = from_module(model)
    x = torch.randn(14, 1, 6, 6, dtype=torch.float64) * scale
    return f, params, x


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--result", default=None)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    f, params, x = build(args.scale)
    computed = []
    original = runner.Runner.commit

    def commit(self, tile, block, bar, seconds):  # count tiles (and slow them down, to be killed mid-run)
        original(self, tile, block, bar, seconds)
        computed.append(tile.key)
        time.sleep(args.sleep)

    runner.Runner.commit = commit
    ntkfunc.kernel_matrix(f, params, x, trace_axes=(), out=args.out, batch_size=args.batch_size, progress=False)
    rank = int(os.environ.get("RANK", "0"))
    if args.result:  # also the in-memory result, saved by rank 0
        k = ntkfunc.kernel_matrix(f, params, x, trace_axes=(), batch_size=args.batch_size, progress=False)
        if rank == 0:
            np.save(args.result, k.numpy())
    # One write per line: torchrun runs each rank with ``python -u``, where ``print`` writes the
    # text and its newline in two calls, so two ranks' lines could interleave on the shared stdout.
    sys.stdout.write(json.dumps({"rank": rank, "computed": len(computed)}) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
