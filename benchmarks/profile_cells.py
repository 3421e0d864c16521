"""Where the time goes in a few bench_vs_nt cells: median per call, the same kernel function on one
sample (its fixed part), and the top functions of one call under cProfile.

Usage: python benchmarks/profile_cells.py [--threads 1] [--only attention,resblock]
(cells: attention 1/2/3, resblock 1/2, mlp512 3 and 2, mlp512-trace 3; wall time of the calls, so run it
on a quiet machine)
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

import bench_vs_nt as bench  # noqa: E402
import torch  # noqa: E402
from timing import median_seconds  # noqa: E402

import ntkfunc  # noqa: E402

CELLS = [("attention", 1), ("attention", 2), ("attention", 3), ("resblock", 1), ("resblock", 2), ("mlp512", 3),
         ("mlp512-trace", 3), ("mlp512", 2)]


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default=None, help="comma-separated setup names")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    setups = {s["name"]: s for s in bench.setups(False, False)}
    for name, impl in CELLS:
        if args.only and name not in args.only.split(","):
            continue
        s = setups[name]
        model, x, _ = bench.build(s)
        f, p = ntkfunc.from_module(model)
        kernel = ntkfunc.ntk_fn(f, trace_axes=(-1,) if s["trace"] else (), implementation=impl)
        t = median_seconds(lambda k=kernel, a=x, q=p: k(a, None, q), 3 if impl == 2 and name.startswith("mlp") else 7, time.perf_counter)
        t1 = median_seconds(lambda k=kernel, a=x[:1], q=p: k(a, None, q), 5, time.perf_counter)
        prof = cProfile.Profile()
        prof.enable()
        kernel(x, None, p)
        prof.disable()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(12)
        print(f"=== {name} impl {impl}: median {t * 1e3:.2f} ms, 1-sample call {t1 * 1e3:.2f} ms")
        print("\n".join(line for line in out.getvalue().splitlines()[6:] if line.strip()))


if __name__ == "__main__":
    main()
