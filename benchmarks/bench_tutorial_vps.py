"""Implementation 2 against the torch.func NTK tutorial's NTK-vector-products method on the CIFAR ResNet-18.

Both compute the full kernel ``(N, N, 10, 10)`` of ``x2 = None`` with the same algorithm family (VJPs at x1,
JVPs at x2). One thread, CPU time; each process runs one ntkfunc package (this checkout, or ``--baseline DIR``
exported with ``git archive REV ntkfunc benchmarks | tar -x -C DIR``) and times both methods interleaved,
``--rounds`` calls each after a warm-up that also checks they agree. Processes of the two packages alternate.
The tutorial's vmapped cotangents hold ``N² O P`` floats (about 7 GB at N = 4), so N = 8 (29 GB) does not fit
a 23 GB machine.

    python benchmarks/bench_tutorial_vps.py --n 4 --baseline /tmp/base --processes 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measure(n: int, rounds: int) -> dict:
    """In this process: CPU seconds of implementation 2 and of the tutorial's method, interleaved."""
    import torch
    from peer_models import load

    ntkfunc, bp = load(threads=1)
    model, x, _ = bp.build("resnet18", n)
    f, params = ntkfunc.from_module(model)
    ntk = ntkfunc.ntk_fn(f, implementation=2, trace_axes=())
    methods = {"implementation 2": lambda: ntk(x, None, params), "tutorial NTK-vps": lambda: bp.tutorial_ntk_vps(model, x, False)}
    with torch.no_grad():
        first = {k: m() for k, m in methods.items()}
    a, b = first.values()
    err = float((a - b).abs().max() / b.abs().max())
    times: dict[str, list[float]] = {k: [] for k in methods}
    for _ in range(rounds):
        for k, m in methods.items():
            t0 = time.process_time()
            m()
            times[k].append(time.process_time() - t0)
    return {"package": ntkfunc.__file__, "err": err, "times": times}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--processes", type=int, default=2, help="processes per package, alternating")
    ap.add_argument("--baseline", default=None, help="an exported older ntkfunc (folder holding ntkfunc/)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.n, args.rounds)))
        return
    packages = {"this checkout": str(ROOT)} | ({"baseline": args.baseline} if args.baseline else {})
    runs: dict[str, list[dict]] = {k: [] for k in packages}
    for _ in range(args.processes):
        for label, path in packages.items():
            env = {**os.environ, "PYTHONPATH": path}
            out = subprocess.run([sys.executable, __file__, "--child", "--n", str(args.n), "--rounds", str(args.rounds)],
                                 env=env, capture_output=True, text=True, check=True)
            runs[label].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"ResNet-18, full kernel, N = {args.n}, one thread, CPU s (median of each process's {args.rounds} calls)\n")
    print("| package | process | implementation 2 | tutorial NTK-vps | implementation 2 / tutorial | max rel. diff |")
    print("|---|---|---|---|---|---|")
    for label, rs in runs.items():
        for i, r in enumerate(rs):
            a, b = (statistics.median(r["times"][k]) for k in ("implementation 2", "tutorial NTK-vps"))
            print(f"| {label} | {i + 1} | {a:.2f} | {b:.2f} | {a / b:.2f} | {r['err']:.1e} |")


if __name__ == "__main__":
    main()
