"""Implementation 1 against ``"auto"`` (the default of ``ntk_fn``), model by model, in one process each.

``"auto"`` is the default only if it is never slower than implementation 1 beyond noise. This
script times both on

- the **test zoo** (``tests/zoo.py``, every architecture at its test size: N1 = 5, N2 = 3),
  traced (the default ``trace_axes``) and full (``trace_axes=()``) kernels;
- the **benchmark zoo**: the models of ``bench_core.py`` (MLPs of width 256-2048, the
  tutorial's CNN, an attention block; N = 8 or 16, x1 against x2) and of ``bench_impls.py``
  (MLPs with O = 1, 10, 100, a small CNN, a Transformer block, a CIFAR ResNet-18; x2 = None).

Two ways of calling are timed, because they pay different costs:

- ``repeat``: one kernel function called again and again (a kernel per training step): auto's
  route decision is remembered per input signature and sizes, as implementation 1's probe of ``f``;
- ``first``: a fresh ``ntk_fn(f)`` per call (what ``ntkfunc.ntk_fn(f)(x1, x2, params)`` in a
  loop does): every call probes ``f`` again, and auto decides its routes again (what it priced
  of ``f``'s calls per input signature is kept with ``f``);
- ``new-f``: the same with a new function object wrapping ``f`` each time: nothing known of it,
  the first call a kernel of a new function makes. Caches of the process (opt_einsum's paths,
  torch's kernels) are warm in all modes: a new process pays more, once.

Each model runs in its own subprocess; after one warm-up call of each, the calls are
interleaved (1, auto, 1, auto, ...) so that both see the same load, and the table gives
medians. ``ratio`` = auto / implementation 1 (> 1: auto slower); ``noise`` = the larger of the
two spreads (interquartile range / median) of the timed calls: a ratio within ``1 + noise``
is not a measured slowdown.

    python benchmarks/bench_default.py --threads 1 --reps 9           # both zoos
    python benchmarks/bench_default.py --zoo test --reps 15           # the test zoo only
    python benchmarks/bench_default.py --quick                        # seconds: a smoke test
    python benchmarks/bench_default.py --baseline ../before           # also the code before a change, model by model
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

IMPLS = (1, "auto")


# --- the two zoos ---------------------------------------------------------------------


def test_zoo() -> list[dict[str, Any]]:
    from tests import zoo

    out = []
    for case in zoo.CASES:
        for kernel in ("traced", "full"):
            out.append({"zoo": "test", "model": case.name, "kernel": kernel, "n": 5})
    return out


def bench_zoo(quick: bool) -> list[dict[str, Any]]:
    if quick:
        return [{"zoo": "core", "model": "mlp256", "kernel": "full", "n": 8},
                {"zoo": "impls", "model": "cnn", "kernel": "full", "n": 4, "out": 10}]
    out = []
    for model in ("mlp256", "mlp1024", "mlp2048", "cnn", "attention"):  # bench_core's grid
        for kernel in ("full", "traced"):
            n = 16 if model.startswith("mlp") else 8
            if model == "mlp2048":
                n = 8  # implementation 1: 10-30 s a call at N = 16
            out.append({"zoo": "core", "model": model, "kernel": kernel, "n": n})
    for width, o in ((256, 1), (256, 10), (256, 100), (1024, 1), (1024, 10)):  # bench_impls' MLPs that impl 1 finishes
        out.append({"zoo": "impls", "model": "mlp", "width": width, "out": o, "kernel": "full", "n": 32})
    out.append({"zoo": "impls", "model": "cnn", "kernel": "full", "n": 16, "out": 10})
    out.append({"zoo": "impls", "model": "transformer", "kernel": "full", "n": 16, "out": 10})
    out.append({"zoo": "impls", "model": "resnet18", "kernel": "full", "n": 4, "out": 10})
    return out


def build(spec: dict[str, Any]):  # type: ignore[no-untyped-def]
    """``(f, params, x1, x2, vmap_axes, trace_axes)`` for one row of the table."""
    import torch

    import ntkfunc

    if spec["zoo"] == "test":
        from tests import zoo

        case = next(c for c in zoo.CASES if c.name == spec["model"])
        f, params, x1, x2, vmap_axes = case.build(torch.float32)
        traced: tuple[int, ...] = (0,) if vmap_axes == 1 else (-1,)  # batch_axis_1: outputs (O, N)
        return f, params, x1, x2, vmap_axes, traced if spec["kernel"] == "traced" else ()
    trace = (-1,) if spec["kernel"] == "traced" else ()
    if spec["zoo"] == "core":
        import bench_core

        model, x1, x2 = bench_core.build(spec["model"], spec["n"])
        f, params = ntkfunc.from_module(model)
        return f, params, x1, x2, 0, trace
    import bench_impls

    model, x = bench_impls.build(spec)
    f, params = ntkfunc.from_module(model)
    return f, params, x, None, 0, trace


def label(spec: dict[str, Any]) -> str:
    if spec["zoo"] == "impls" and spec["model"] == "mlp":
        return f"mlp w={spec['width']} O={spec['out']}"
    return spec["model"]


# --- one model (child process) ---------------------------------------------------------


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    import ntkfunc

    torch.set_num_threads(spec["threads"])
    f, params, x1, x2, vmap_axes, trace = build(spec)

    def fresh(impl: Any, new_f: bool = False):  # type: ignore[no-untyped-def]
        g = (lambda p, x: f(p, x)) if new_f else f  # noqa: E731  # a new function object: nothing remembered of f
        return ntkfunc.ntk_fn(g, trace_axes=trace, vmap_axes=vmap_axes, implementation=impl)

    kernels = {i: fresh(i) for i in IMPLS}
    results = {i: kernels[i](x1, x2, params) for i in IMPLS}  # warm-up (and the repeat kernels' decisions)
    pairs = zip(torch.utils._pytree.tree_leaves(results["auto"]), torch.utils._pytree.tree_leaves(results[1]))
    err = float(torch.stack([(a - b).abs().max() / b.abs().max() for a, b in pairs]).max())  # NaN stays NaN
    times: dict[str, dict[Any, list[float]]] = {m: {i: [] for i in IMPLS} for m in spec["modes"]}
    deadline = time.perf_counter() + spec["seconds"]
    for rep in range(spec["reps"]):
        if rep >= 3 and time.perf_counter() > deadline:
            break
        for i in IMPLS:
            for mode in spec["modes"]:
                t0 = time.perf_counter()
                (kernels[i] if mode == "repeat" else fresh(i, new_f=mode == "new-f"))(x1, x2, params)
                times[mode][i].append(time.perf_counter() - t0)
    n_params = sum(t.numel() for t in torch.utils._pytree.tree_leaves(params) if t.is_floating_point())
    return {"times": {m: {str(i): v for i, v in t.items()} for m, t in times.items()}, "max_rel_diff": err, "n_params": n_params}


def measure(spec: dict[str, Any], timeout: float, root: str = ROOT) -> dict[str, Any]:
    """One model in a fresh process, with the ntkfunc of ``root`` (a checkout that has this script)."""
    cmd = [sys.executable, os.path.join(root, "benchmarks", os.path.basename(__file__)), "--one", json.dumps(spec)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=root)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout > {timeout:.0f} s"}
    if res.returncode != 0:
        return {"error": (res.stderr.strip().splitlines() or ["failed"])[-1][:160]}
    return json.loads(res.stdout.strip().splitlines()[-1])


# --- summary ---------------------------------------------------------------------------


def spread(ts: list[float]) -> float:
    """Interquartile range over the median (0 with fewer than 4 calls)."""
    if len(ts) < 4:
        return 0.0
    q = statistics.quantiles(ts, n=4)
    return (q[2] - q[0]) / statistics.median(ts)


def summarise(r: dict[str, Any], mode: str) -> tuple[float, float, float, float] | None:
    if "error" in r or mode not in r["times"]:
        return None
    t1, ta = r["times"][mode]["1"], r["times"][mode]["auto"]
    m1, ma = statistics.median(t1), statistics.median(ta)
    return m1, ma, ma / m1, max(spread(t1), spread(ta))


def fmt_s(s: float) -> str:
    return f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s"


def table(rows: list[tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]], modes: list[str]) -> list[str]:
    """One line per model: per mode, both medians, their ratio and noise (and the baseline's ratio, if run)."""
    baseline = any(b is not None for _, _, b in rows)
    head = ["zoo", "model", "N", "kernel"]
    for m in modes:
        head += [f"{m}: impl 1", f"{m}: auto", f"{m}: auto / 1"] + ([f"{m}: before"] if baseline else []) + [f"{m}: noise"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for spec, r, b in rows:
        cells = [spec["zoo"], label(spec), str(spec["n"]), spec["kernel"]]
        for m in modes:
            s = summarise(r, m)
            before = None if b is None else summarise(b, m)
            was = [] if not baseline else ["-" if before is None else f"{before[2]:.2f}"]
            if s is None:
                cells += [r.get("error", "-"), "", "", *was, ""]
                continue
            m1, ma, ratio, noise = s
            flag = " **slower**" if ratio > 1 + max(noise, 0.05) else ""
            cells += [fmt_s(m1), fmt_s(ma), f"{ratio:.2f}{flag}", *was, f"{noise:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--zoo", choices=("test", "bench", "all"), default="all")
    ap.add_argument("--only", default=None, help="comma-separated model names")
    ap.add_argument("--modes", default="repeat,first,new-f", help="comma-separated: repeat, first, new-f")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=9, help="timed calls of each implementation and mode (interleaved)")
    ap.add_argument("--seconds", type=float, default=60.0, help="stop after this many seconds per model (at least 3 reps)")
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None, help="write the raw times here")
    ap.add_argument("--baseline", default=None, help="a checkout of the code before the change (with this script in its "
                    "benchmarks/): each model runs there too, right before, and the table adds its ratio")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(json.loads(args.one))))
        return
    modes = args.modes.split(",")
    specs = []
    if args.zoo in ("test", "all") and not args.quick:
        specs += test_zoo()
    if args.zoo in ("bench", "all"):
        specs += bench_zoo(args.quick)
    if args.quick:
        specs = test_zoo()[:2] + specs
    if args.only:
        wanted = set(args.only.split(","))
        specs = [s for s in specs if s["model"] in wanted or label(s) in wanted]
    rows: list[tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]] = []
    for spec in specs:
        full = dict(spec, threads=args.threads, reps=args.reps, seconds=args.seconds, modes=modes)
        b = None if args.baseline is None else measure(full, args.timeout, os.path.abspath(args.baseline))
        r = measure(full, args.timeout)
        rows.append((spec, r, b))
        print(table([(spec, r, b)], modes)[-1], flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump([{"spec": s, "result": r, "baseline": b} for s, r, b in rows], fh, indent=1)
    import torch

    cmd = "python benchmarks/bench_default.py " + " ".join(sys.argv[1:])
    print(f"\nCommand: `{cmd.strip()}` (torch {torch.__version__}, {args.threads} thread(s), float32, CPU)\n")
    print("\n".join(table(rows, modes)))
    worst = [summarise(r, m) for _, r, _ in rows for m in modes]
    ratios = [w[2] for w in worst if w is not None]
    if ratios:
        print(f"\nmedian ratio {statistics.median(ratios):.2f}, max {max(ratios):.2f}")


if __name__ == "__main__":
    main()
