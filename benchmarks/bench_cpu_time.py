"""CPU seconds of the whole-dataset engine's phases, before and after a change, on a shared machine.

Wall-clock times on a machine that other jobs share move by 20-100 % with their load; the CPU
time a single-threaded process spends in a phase moves far less (cache and memory-bandwidth
effects remain: compare medians of several runs, interleaved). For the CIFAR ResNet-18 with one
logit (``bench_blocked.ResNet18(classes=1)``), ONE thread, this measures in one fresh process per
package:

- ``rows``: exact per-sample gradients (``StructuredRows(routes="rows")``, every parameter a
  slot), ms of thread CPU time per sample on a chunk of 32 after a warm-up chunk;
- ``features``: sketched features (``ProjectedRows``, ``Sketch(8192, kind="auto")``), same;
- ``kernel_matrix``: ``kernel_matrix(f, params, x)`` for N = 96 in memory, process CPU seconds
  (the runner's commit thread included);

and prints a checksum of each result, which must agree between the packages.
``--baseline DIR`` runs the same in a process whose ``ntkfunc`` is the one in ``DIR`` (an
export of an earlier commit: ``git archive <rev> ntkfunc benchmarks | tar -x -C DIR``),
alternating the two ``--rounds`` times.

    python benchmarks/bench_cpu_time.py --baseline /tmp/base --rounds 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measure(root: Path) -> dict:
    """The three phases with the ``ntkfunc`` package under ``root`` (this process must not have imported another)."""
    sys.path.insert(0, str(root))
    sys.path.insert(0, str(root / "benchmarks"))
    import torch

    torch.set_num_threads(1)
    from bench_blocked import ResNet18

    import ntkfunc
    from ntkfunc._core.problem import make_problem

    try:  # the row sources' home since issue 20
        from ntkfunc._engines.rows import StructuredRows
        from ntkfunc._engines.rows.projected import ProjectedRows as Projected
    except ImportError:  # earlier layouts
        from ntkfunc._engines.persample import StructuredRows  # type: ignore[no-redef]
        from ntkfunc._engines.sketch.rows import SketchRows as Projected  # type: ignore[no-redef]

    torch.manual_seed(0)
    model = ResNet18(classes=1).eval()
    f, params = ntkfunc.from_module(model)
    x = torch.randn(64, 3, 32, 32)
    problem = make_problem(f, x[:1], None, params, 0, (), ())

    def per_sample(source, width: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
        out = torch.empty(32, 1, width)
        source.compute([x[:32]], out, 32)  # warm-up: buffers, caches
        times = []
        for _ in range(3):
            t0 = time.thread_time()
            source.compute([x[32:]], out, 32)
            times.append(time.thread_time() - t0)
        return 1000 * min(times) / 32, float(out.double().abs().sum())

    rows = StructuredRows(problem, routes="rows")
    rows_ms, rows_sum = per_sample(rows, rows.slots.width)
    del rows
    feats_ms, feats_sum = per_sample(Projected(problem, "auto", 8192, 0, True), 8192)
    xs = torch.randn(96, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ntkfunc.kernel_matrix(f, params, xs[:8], progress=False)
    t0 = time.process_time()
    k = ntkfunc.kernel_matrix(f, params, xs, progress=False)
    km_s = time.process_time() - t0
    return {"rows_ms": rows_ms, "features_ms": feats_ms, "kernel_matrix_s": km_s,
            "checksums": [rows_sum, feats_sum, float(k.double().sum())]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", type=Path, help="a directory holding an earlier ntkfunc package")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--one", type=Path, help=argparse.SUPPRESS)  # internal: measure this package, print JSON
    args = ap.parse_args()
    if args.one is not None:
        print(json.dumps(measure(args.one)))
        return
    packages = [("this", ROOT)] + ([("baseline", args.baseline)] if args.baseline else [])
    runs: dict[str, list[dict]] = {name: [] for name, _ in packages}
    for _ in range(args.rounds):
        for name, root in packages:
            out = subprocess.run([sys.executable, __file__, "--one", str(root)], capture_output=True, text=True, check=True)
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print("| package | rows (ms/sample) | features (ms/sample) | kernel_matrix N=96 (CPU s) | checksums |")
    print("|---|---|---|---|---|")
    for name, rs in runs.items():
        med = {key: statistics.median(r[key] for r in rs) for key in ("rows_ms", "features_ms", "kernel_matrix_s")}
        sums = ", ".join(f"{s:.6g}" for s in rs[0]["checksums"])
        print(f"| {name} | {med['rows_ms']:.1f} | {med['features_ms']:.1f} | {med['kernel_matrix_s']:.2f} | {sums} |")


if __name__ == "__main__":
    main()
