"""The public forward-mode calls (``linearize``, ``taylor_expand(degree=2)``, ``ntk_vp_fn``) on bench_vs_nt's models.

CPU time of one thread, median of 15 calls after one warm-up, per model; with ``--baseline DIR`` (an export of
another commit: ``git archive <rev> ntkfunc benchmarks | tar -x -C DIR``) the two packages alternate in fresh
processes for ``--rounds`` rounds and the table gives each package's medians over rounds.

    python benchmarks/bench_forward_mode.py --baseline /tmp/base --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MODELS = ("attention", "resblock", "cnn")
CALLS = ("linearize", "taylor2", "ntk_vp")


def measure() -> dict[str, dict[str, float]]:
    """In this process (ntkfunc from PYTHONPATH): CPU ms of each call on each model."""
    import torch

    torch.set_num_threads(1)
    import ntkfunc

    sys.path.insert(0, HERE)
    import bench_vs_nt as bench
    from timing import median_seconds

    setups = {s["name"]: s for s in bench.setups(False, False)}
    out: dict[str, dict[str, float]] = {}
    for name in MODELS:
        model, x, _ = bench.build(setups[name])
        f, p = ntkfunc.from_module(model)
        p2 = {k: v + 0.01 * torch.randn_like(v) for k, v in p.items()}
        f_lin, f2 = ntkfunc.linearize(f, p), ntkfunc.taylor_expand(f, p, 2)
        vp, v = ntkfunc.ntk_vp_fn(f, x, None, p), torch.randn_like(f(p, x))

        def cpu_ms(fn, reps: int = 15) -> float:  # type: ignore[no-untyped-def]
            return 1e3 * median_seconds(fn, reps, time.process_time)

        out[name] = {"linearize": cpu_ms(lambda g=f_lin, q=p2, a=x: g(q, a)), "taylor2": cpu_ms(lambda g=f2, q=p2, a=x: g(q, a)),
                     "ntk_vp": cpu_ms(lambda g=vp, w=v: g(w))}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", default=None, help="an exported package to compare against (alternating processes)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--_measure", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._measure:
        print(json.dumps(measure()))
        return
    packages = {"this": ROOT} | ({"baseline": args.baseline} if args.baseline else {})
    runs: dict[str, list[dict[str, dict[str, float]]]] = {k: [] for k in packages}
    for _ in range(args.rounds):
        for label, src in packages.items():
            env = dict(os.environ, PYTHONPATH=src)
            res = subprocess.run([sys.executable, __file__, "--_measure"], env=env, capture_output=True, text=True, check=True)
            runs[label].append(json.loads(res.stdout.strip().splitlines()[-1]))
    print("| model | package | " + " | ".join(f"{c} (ms)" for c in CALLS) + " |")
    print("|---|---|" + "---|" * len(CALLS))
    for name in MODELS:
        for label, rs in runs.items():
            cells = [f"{statistics.median(r[name][c] for r in rs):.2f}" for c in CALLS]
            print(f"| {name} | {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
