"""Finishing, resuming and verifying a kernel output of ~20,000 tiles (issue 24): linear in the tiles.

A ``kernel_matrix(out="K.npy")`` run of a tiny model over ``N = blocks x block`` samples in tiles of
``block`` samples (``x2=None``: ``blocks (blocks + 1) / 2`` tiles; 200 x 10 gives 20,100) is timed in
phases:

- ``run``: the whole first call (computing every tile, committing each: write, ``fsync``, marker);
- ``finish``: its last step (every marker read once, the data file renamed, the manifest written),
  which re-read every marker once per tile before issue 20 (465 tiles: 216,225 reads; 3,240 tiles: 394 s);
- ``resume``: the same call again, nothing left to compute (every marker and its tile's checksum
  checked, completion recorded again);
- ``verify``: ``verify_kernel`` (markers, regions and every tile's checksum), ``verify --quick``
  (``data=False``) and ``load_kernel``.

Each source tree given with ``--trees`` is measured in its own subprocess (``PYTHONPATH`` = that
tree) in the same run, so that timings compare; repeated phases report the median of ``--reps``.

    python benchmarks/bench_finish.py --trees . ../main --blocks 200 --block 10
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_CHILD = r"""
import json, os, statistics, sys, time, torch
import ntkfunc
from ntkfunc._dataset import pipeline

blocks, block, reps, folder = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
torch.set_num_threads(1)
torch.manual_seed(0)
f, params = ntkfunc.from_module(torch.nn.Sequential(torch.nn.Linear(2, 1)))
x = torch.randn(blocks * block, 2)
out = os.path.join(folder, "K.npy")
finish = []
real = getattr(pipeline, "settle", None) or pipeline.finish  # the finishing step (settle since issue 20, finish before)

def timed(*a, **k):
    start = time.perf_counter()
    try:
        return real(*a, **k)
    finally:
        finish.append(time.perf_counter() - start)

setattr(pipeline, real.__name__, timed)
call = lambda: ntkfunc.kernel_matrix(f, params, x, batch_size=block, out=out, progress=False)
start = time.perf_counter()
call()
result = {"tiles": blocks * (blocks + 1) // 2, "run": time.perf_counter() - start, "finish": finish[0]}
phases = {"resume": call, "verify": lambda: ntkfunc.verify_kernel(out), "verify --quick": lambda: ntkfunc.verify_kernel(out, data=False),
          "load_kernel": lambda: ntkfunc.load_kernel(out)}
for name, fn in phases.items():
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    result[name] = statistics.median(times)
result["package"] = os.path.dirname(os.path.dirname(os.path.abspath(ntkfunc.__file__)))
print(json.dumps(result))
"""

PHASES = ["run", "finish", "resume", "verify", "verify --quick", "load_kernel"]


def measure(tree: Path, blocks: int, block: int, reps: int) -> dict:
    with tempfile.TemporaryDirectory(dir=ROOT / "out" if (ROOT / "out").is_dir() else None) as folder:
        env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
        # run in the empty folder: with -c, Python puts the working directory first on sys.path, before PYTHONPATH
        res = subprocess.run([sys.executable, "-c", _CHILD, str(blocks), str(block), str(reps), folder], env=env, cwd=folder,
                             capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{tree}: {res.stderr[-3000:]}")
    got = json.loads(res.stdout.strip().splitlines()[-1])
    if Path(got["package"]) != tree:
        raise SystemExit(f"{tree}: measured the package in {got['package']} instead")
    return got


def commit_of(tree: Path) -> str:
    res = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return res.stdout.strip() or "?"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trees", nargs="+", type=Path, default=[ROOT], help="source trees to measure (default: this one)")
    p.add_argument("--blocks", type=int, default=200, help="tile rows (tiles: blocks (blocks + 1) / 2; default 200: 20,100)")
    p.add_argument("--block", type=int, default=10, help="samples per tile side (default 10)")
    p.add_argument("--reps", type=int, default=3, help="repetitions of resume and verify (median; default 3)")
    args = p.parse_args()
    rows = []
    for tree in args.trees:
        got = measure(tree.resolve(), args.blocks, args.block, args.reps)
        rows.append((f"{tree} ({commit_of(tree)})", got))
        print(json.dumps({"tree": str(tree), **got}), file=sys.stderr)
    n = args.blocks * args.block
    print(f"Command: `python benchmarks/bench_finish.py --trees {' '.join(map(str, args.trees))} --blocks {args.blocks} "
          f"--block {args.block} --reps {args.reps}`  ")
    print(f"A {n:,} x {n:,} float32 kernel in {rows[0][1]['tiles']:,} tiles of {args.block} x {args.block} samples; seconds "
          f"(resume and verify: median of {args.reps}).\n")
    print("| tree | tiles | " + " | ".join(PHASES) + " |")
    print("|---|---|" + "---|" * len(PHASES))
    for name, got in rows:
        print(f"| {name} | {got['tiles']:,} | " + " | ".join(f"{got[k]:.2f}" for k in PHASES) + " |")


if __name__ == "__main__":
    main()
