"""Whole-dataset kernels against the machine's limit: CIFAR ResNet-18, one logit, ``kernel_matrix(f, p, x, None)``.

For each N and implementation, ONE fresh process measures, back to back (the limit before and
after the run, the faster of the two kept: the machine is shared):

- the **limit**: one batched forward+backward (parameter gradients, loader batches of 64) over
  the N samples, plus half the time of ``G @ G.T`` for a random ``(N, P)`` float32 ``G``
  (timed on column chunks of ``G`` that fit in memory and scaled to ``P``: the product is a
  sum over column chunks), i.e. the per-sample gradient work at batched speed plus the
  symmetric Gram GEMM;
- ``kernel_matrix(f, params, x, None, trace_axes=(-1,), implementation=...)`` with the default
  memory budget (or ``--budget``), its time, peak RSS above the process before the call, and
  where the time goes: rows (per-sample gradients formed), the row products (GEMM), the Gram
  route's contractions and the rest (planning, commits); the rows it computed against N.

When the budget cannot hold every sample's full gradient (``N * P * 4`` bytes), the
per-sample gradient passes a full-row panel scheme needs at least (``N (m + 1) / 2`` with
``m = N / R`` panels of the ``R`` rows that fit) are reported too, with the limit that
count implies. ``--baseline DIR`` runs the same measurement with the ``ntkfunc`` package in
``DIR`` (e.g. an export of an earlier commit) for before/after figures in one run; ``--rounds R``
alternates the two packages ``R`` times (one fresh process each) and the table adds the medians.

``--clock cpu`` measures everything (the limit's forward+backward and GEMM, the kernel and its
phases) in CPU seconds of the process (``time.process_time``), the measure that other jobs on a
shared machine move least; use it with ``--threads 1``. The limit is then measured once, after
the run. ``passes/sample`` is the per-sample rows computed divided by N (1 when every row is
formed once; ``x2`` rows are formed again for every panel of x1 rows the budget allows).

    python benchmarks/bench_scale.py --n 256 512 --impls auto 1
    python benchmarks/bench_scale.py --n 512 --impls auto --threads 1 --clock cpu --baseline /tmp/base --rounds 3
    python benchmarks/bench_scale.py --n 256 512 2048 --impls auto 1 --baseline /tmp/base --write out.json
    python benchmarks/bench_scale.py --n 16 --small   # seconds: a smoke run on a small CNN
    python benchmarks/bench_scale.py errors 64        # float32 at each precision= against float64
    python benchmarks/bench_scale.py rows --baseline /tmp/base --rounds 3   # per-sample rows, CPU time
    python benchmarks/bench_scale.py gram     # each Gram-route term's paths against the square GEMM, CPU time

``rows``: per-sample rows on each benchmark model (CIFAR ResNet-18 with one logit, the small CNN of
``--small``, the digits CNN with 10 logits), ONE thread, milliseconds of thread CPU time per sample
(median of 3 after a warm-up) of one batched forward+backward (one cotangent), of ``vmap(jacrev(f))``
over the samples (implementation 1's rows; ``vmap(grad)`` for one output) and of the rows
``kernel_matrix`` forms (``StructuredRows(routes="rows")``), one fresh process per package,
packages alternating ``--rounds`` times (medians over rounds), with checksums that must agree. For the rows,
also where their time goes: the capture's batched pass alone (``capture``: a forward and the input half of a
backward, the cotangents and operands of every rule), the rules' writes into the rows alone (``writes``), both on
the same chunk, and the system time of the rows (``system``, median of the timed calls: page faults of freshly
mapped memory).

``rows --in-kernel N``: the rows inside ``kernel_matrix(f, params, x, None, trace_axes=(-1,))`` on the ResNet-18,
N samples, ONE thread, 12 GB budget, for each tile width of ``--widths`` (``batch_size=``, one fresh process per width
and package): per sample formed, the user and system CPU time and the minor page faults of the rows phase
(``RowPanels._fill``), the first chunk of the call (its warm-up: the measured choices of ways) against the median
of the later ones, and the samples per chunk; and, in the same process, the same row source's ``compute`` on one
chunk into a reused buffer (``standalone``), which is what ``rows`` measures.

    python benchmarks/bench_scale.py rows --in-kernel 256 --widths 64 256 --baseline /tmp/base --rounds 1

``rows --jacobian-fn``: instead, ``ntkfunc.jacobian_fn`` of the per-sample cross-entropy (its default call,
as ``bench_peers.py``'s per-sample gradient rows: same models, inputs and sizes) against ``vmap(grad)`` in the
same process, ONE thread, process CPU time: the first call, the second (the first repeated call: it should
already take the faster measured way) and the medians of ``--reps`` interleaved calls after those two (each
of the pair first in every other pair: the second call of a pair runs on the heap the first left, about 0.1 ms
apart on the small CNN), with the ratio ``vmap(grad) / jacobian_fn`` (> 1: ntkfunc faster), one fresh process
per package, alternating. ``--n`` sets the samples (small batches show ``jacobian_fn``'s fixed cost per call;
``tiny`` is a Linear(8, 16)-ReLU-Linear(16, 3) MLP).

    python benchmarks/bench_scale.py rows --jacobian-fn --models cnn mlp --baseline /tmp/base --rounds 3
    python benchmarks/bench_scale.py rows --jacobian-fn --models tiny cnn mlp --n 2 --reps 201 --baseline /tmp/base  # fixed costs
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _model(small: bool):  # type: ignore[no-untyped-def]
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch
    from bench_blocked import ResNet18  # the CIFAR ResNet-18 of the earlier benchmarks

    torch.manual_seed(0)
    model = ResNet18(classes=1).eval()
    if small:  # a quarter-width stand-in for smoke runs
        model = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
            torch.nn.Conv2d(8, 16, 3, stride=2, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 1),
        ).eval()
    return model


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
"""``--clock``: wall time, or the CPU time of the process (all its threads)."""
CLOCK = CLOCKS["wall"]


def limit_seconds(model, x, threads: int) -> dict:  # type: ignore[no-untyped-def]
    """One batched forward+backward over ``x`` and half of ``G @ G.T`` for a random ``(N, P)`` G."""
    import torch

    n = x.shape[0]
    p = sum(t.numel() for t in model.parameters())
    model.zero_grad(set_to_none=True)
    model(x[:8]).sum().backward()  # warm-up
    t0 = CLOCK()
    for s in range(0, n, 64):
        model.zero_grad(set_to_none=True)
        model(x[s : s + 64]).sum().backward()
    fwd_bwd = CLOCK() - t0
    model.zero_grad(set_to_none=True)
    cols = max(1, min(p, int(2e9 // (4 * n))))  # a 2 GB chunk of G
    best = _gram_seconds(torch.randn(n, cols))
    gemm = best * p / cols
    return {"fwd_bwd": fwd_bwd, "half_gemm": gemm / 2, "limit": fwd_bwd + gemm / 2, "gemm_flops_per_s": 2.0 * n * n * cols / best,
            "fwd_bwd_per_sample": fwd_bwd / n, "P": p}


def _gram_seconds(g) -> float:  # type: ignore[no-untyped-def]
    """Best of two timings of ``g @ g.T`` after a warm-up."""
    g @ g.T
    return min(_timed(lambda: g @ g.T) for _ in range(2))


def _timed(fn) -> float:  # type: ignore[no-untyped-def]
    t0 = CLOCK()
    fn()
    return CLOCK() - t0


def min_full_row_passes(n: int, rows_fit: int) -> int:
    """Per-sample gradient passes of a symmetric kernel with full rows when ``rows_fit`` rows fit at once.

    A panel of ``R`` rows is computed once and every later row streamed once per panel:
    ``sum_p (N - p R)`` over ``m = ceil(N / R)`` panels (``N`` when everything fits).

    >>> min_full_row_passes(512, 1000), min_full_row_passes(512, 128)
    (512, 1280)
    """
    if rows_fit >= n:
        return n
    r = max(1, rows_fit - 1)  # one row's room streams the rest
    return sum(n - k * r for k in range(-(-n // r)))


def measure(n: int, impl: str, threads: int, budget: str | None, small: bool, precision: str, clock: str = "wall") -> dict:
    """One configuration, in this process (fresh: called through ``_measure``)."""
    import torch

    global CLOCK
    CLOCK = CLOCKS[clock]
    torch.set_num_threads(threads)
    import ntkfunc  # first: the package on PYTHONPATH (this tree or --baseline), before bench_blocked's path
    from ntkfunc._core.memory import SAFETY, parse_budget

    model = _model(small)
    f, params = ntkfunc.from_module(model)
    torch.manual_seed(1)
    x = torch.randn(n, 3, 32, 32)
    before = limit_seconds(model, x, threads) if clock == "wall" else None  # CPU time: once, after the run
    phases = _instrument()
    impl_arg = impl if impl == "auto" else int(impl)
    kw = {} if precision == "highest" else {"precision": precision}
    ntkfunc.kernel_matrix(f, params, x[:4], None, implementation=impl_arg, progress=False, **kw)  # warm-up (code paths)
    for key in phases:
        phases[key] = 0  # the warm-up's
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    budget_bytes = parse_budget(budget, torch.device("cpu"))
    t0 = CLOCK()
    k = ntkfunc.kernel_matrix(f, params, x, None, trace_axes=(-1,), implementation=impl_arg, memory_budget=budget_bytes,
                              progress=False, **kw)
    seconds = CLOCK() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    after = limit_seconds(model, x, threads)  # the machine is shared: the faster of two measurements around the run
    before = before or after
    lim = {key: min(before[key], after[key]) if key != "P" else before[key] for key in before}
    lim["gemm_flops_per_s"] = max(before["gemm_flops_per_s"], after["gemm_flops_per_s"])
    lim["limit"] = lim["fwd_bwd"] + lim["half_gemm"]
    assert bool(torch.isfinite(k).all())
    torch.save(k, f"/tmp/bench_scale_{os.getpid()}.pt")
    row_bytes = 4 * lim["P"]
    rows_fit = int(budget_bytes * SAFETY // row_bytes)
    passes = min_full_row_passes(n, rows_fit)
    out = {
        "n": n, "impl": impl, "threads": threads, "clock": clock, "precision": precision, "seconds": seconds, "budget": budget_bytes,
        "peak_above_start": peak - base, **lim, "ratio": seconds / lim["limit"], "full_rows_fit": rows_fit,
        "min_full_row_passes": passes, "limit_at_min_passes": passes * lim["fwd_bwd_per_sample"] + lim["half_gemm"],
        "kernel": f"/tmp/bench_scale_{os.getpid()}.pt", "load": os.getloadavg()[0], **phases,
    }
    out["ratio_at_min_passes"] = seconds / out["limit_at_min_passes"]
    out["passes_per_sample"] = phases["rows_computed"] / n
    return out


def _instrument() -> dict:
    """Time the phases of the panels (per-sample rows, row products, Gram terms) when the package has them."""
    phases: dict = {"rows_seconds": 0.0, "rows_computed": 0, "product_seconds": 0.0, "gram_seconds": 0.0, "block": 0, "panel": 0}
    try:
        from ntkfunc._dataset import panels
    except ImportError:  # pragma: no cover - an old package without the pipeline layout
        return phases
    if not hasattr(panels, "RowPanels"):
        return phases
    fill, gram, product = panels.RowPanels._fill, panels.RowPanels._gram, panels.product

    def timed_fill(self, src, i0, i1, target):  # type: ignore[no-untyped-def]
        t0 = CLOCK()
        r = fill(self, src, i0, i1, target)
        phases["rows_seconds"] += CLOCK() - t0
        phases["rows_computed"] += i1 - i0
        phases["block"], phases["panel"] = self.plan.block, self.plan.panel  # the tile side and x1 blocks a panel
        return r

    def timed_gram(self, f1, f2):  # type: ignore[no-untyped-def]
        t0 = CLOCK()
        r = gram(self, f1, f2)
        phases["gram_seconds"] += CLOCK() - t0
        return r

    def timed_product(*args):  # type: ignore[no-untyped-def]
        t0 = CLOCK()
        r = product(*args)
        phases["product_seconds"] += CLOCK() - t0
        return r

    panels.RowPanels._fill, panels.RowPanels._gram, panels.product = timed_fill, timed_gram, timed_product
    return phases


def precision_errors(n: int, threads: int, small: bool) -> list[dict]:
    """float32 kernels at each ``precision`` against the float64 kernel, ResNet-18 (one logit) and a digits CNN (10 logits).

    The float64 kernel is ntkfunc's own (implementation 1, tested against the independent float64
    reference of ``tests/reference.py``). Errors: max |K - K64| / max |K64|, and the median of
    |K - K64| / |K64| over the entries.
    """
    import torch

    torch.set_num_threads(threads)
    import ntkfunc

    torch.manual_seed(2)
    digits = ntkfunc.datasets.load_digits()[0][:n].float()
    cnn = torch.nn.Sequential(
        torch.nn.Conv2d(1, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(32, 64, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(64 * 4 * 4, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10),
    ).eval()
    rows = []
    for name, model, x in (("resnet18 (1 logit)", _model(small), torch.randn(n, 3, 32, 32)), ("digits CNN (10 logits, trace)", cnn, digits)):
        f, params = ntkfunc.from_module(model)
        f64, p64 = ntkfunc.from_module(model.double())
        ref = ntkfunc.kernel_matrix(f64, p64, x.double(), None, implementation=1, progress=False)
        model.float()
        for impl in ("auto", 1):
            for precision in ("highest", "tf32", "bf16"):
                k = ntkfunc.kernel_matrix(f, params, x, None, implementation=impl, precision=precision, progress=False).double()
                err = (k - ref).abs()
                rows.append({"model": name, "impl": str(impl), "precision": precision, "n": n,
                             "max_rel": float(err.max() / ref.abs().max()), "median_rel": float((err / ref.abs()).median())})
    return rows


def gram_rates(n: int = 512, tile: int = 64) -> list[dict]:
    """``gram``: each Gram-route term of the ResNet-18's rows (``StructuredRows(n, n)``, plus the 1x1 shortcut of the last
    stage) on one ``tile`` x ``tile`` tile, ONE thread, CPU ms (median of 3 after a warm-up) along each contraction path,
    its GFLOP/s (the path's FLOPs) and that against a 2048^3 GEMM in the same process."""
    import statistics

    import torch

    torch.set_num_threads(1)
    import ntkfunc
    from ntkfunc._core.problem import make_problem
    from ntkfunc._engines.rows.structured import StructuredRows
    from ntkfunc._engines.structured import kernel as structured
    from ntkfunc._engines.structured import plan

    def cpu(fn) -> float:  # type: ignore[no-untyped-def]
        fn()
        times = []
        for _ in range(3):
            t0 = time.process_time()
            fn()
            times.append(time.process_time() - t0)
        return statistics.median(times)

    model = _model(False)
    f, params = ntkfunc.from_module(model)
    torch.manual_seed(0)
    x = torch.randn(tile, 3, 32, 32)
    problem = make_problem(f, x[:1], None, params, 0, (), ())
    src = StructuredRows(problem, n, n, 8 << 30)
    names = list(params)
    shortcut = next(k for k, name in enumerate(names) if "layers.6.short.0.weight" in name)
    terms = {k: src.cap.covered[k] for k in sorted({*src.gram_params, shortcut})}
    pb = dataclasses.replace(problem, x1_leaves=[x], x2_leaves=None, n1=tile, n2=tile)
    factors = src._factors(pb, structured.side(pb, src.cap, 1, 0, tile), terms)  # each term's factors, as kernel_matrix keeps them
    a = torch.randn(2048, 2048)
    gemm = 2 * 2048 ** 3 / cpu(lambda: a @ a.T)
    out = []
    for k, (s1, c1) in zip(terms, factors.terms):
        eq = plan.gram_equation(src.layout, True, s1, s1, c1, c1)
        cheapest = min(eq.paths, key=lambda q: q.price.cost).name
        for q in eq.paths:
            seconds = cpu(lambda q=q, eq=eq: eq.run(src.limit, path=q))
            out.append({"param": names[k], "shape": list(problem.params.diff_leaves[k].shape), "gram_route_in_rows": k in src.gram_params,
                        "path": q.name, "ms": 1000 * seconds, "gflops": q.price.flops / seconds / 1e9, "of_gemm": q.price.flops / seconds / gemm,
                        "gemm_gflops": gemm / 1e9, "priced_cheapest": q.name == cheapest})
    return out


def rows_models() -> dict:
    """``rows``' models: name -> (model, inputs of one chunk)."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_blocked import digits_cnn

    g = torch.Generator().manual_seed(3)
    return {"resnet18 (1 logit)": (_model(False), torch.randn(32, 3, 32, 32, generator=g)),
            "small CNN (1 logit)": (_model(True), torch.randn(64, 3, 32, 32, generator=g)),
            "digits CNN (10 logits)": (digits_cnn().eval(), torch.randn(64, 1, 8, 8, generator=g))}


def rows_measure() -> dict:
    """``rows`` in this process (one thread): ms of thread CPU time per sample and checksums, per model."""
    import torch

    torch.set_num_threads(1)
    import ntkfunc
    from ntkfunc._core.heap import settle_heap
    from ntkfunc._core.problem import make_problem
    from ntkfunc._engines.rows.jacobian import JacobianRows

    settle_heap()  # the heap as kernel_matrix and jacobian_fn leave it (both packages): freed chunks reused, not faulted in again
    from ntkfunc._engines.rows.structured import StructuredRows

    system: list[float] = []  # ms of system time per sample of the last cpu_ms call's timed runs (median)

    def cpu_ms(fn, n: int) -> float:  # type: ignore[no-untyped-def]
        fn()  # warm-up: buffers, caches, measured choices
        times, sys_times = [], []
        for _ in range(3):
            t0, s0 = time.thread_time(), resource.getrusage(resource.RUSAGE_THREAD).ru_stime
            fn()
            times.append(time.thread_time() - t0)
            sys_times.append(resource.getrusage(resource.RUSAGE_THREAD).ru_stime - s0)
        system[:] = [1000 * sorted(sys_times)[1] / n]
        return 1000 * sorted(times)[1] / n

    out = {}
    for name, (model, x) in rows_models().items():
        f, params = ntkfunc.from_module(model)
        n = x.shape[0]
        problem = make_problem(f, x[:1], None, params, 0, (), ())

        def fwd_bwd(model=model, x=x) -> None:  # type: ignore[no-untyped-def]
            model.zero_grad(set_to_none=True)
            model(x).sum().backward()

        res = {"fwd_bwd": cpu_ms(fwd_bwd, n)}
        model.zero_grad(set_to_none=True)
        for key, src in (("vmap", JacobianRows(problem)), ("rows", StructuredRows(problem, routes="rows"))):
            buf = torch.empty(n, *src.out_shape, src.slots.width)
            res[key] = cpu_ms(lambda src=src, buf=buf, x=x, n=n: src.compute([x], buf, n), n)
            res[key + "_system"] = system[0]
            res[key + "_sum"] = float(buf.double().abs().sum())
            if key == "rows":
                res.update(rows_parts(src, problem, x, buf, cpu_ms))
            del buf
        out[name] = res
    return out


def rows_parts(src, problem, x, buf, cpu_ms) -> dict:  # type: ignore[no-untyped-def]
    """ms of thread CPU time per sample of the capture's batched pass alone and of the rules' writes alone (same chunk)."""
    from ntkfunc._core.ops import transform_friendly_attention
    from ntkfunc._engines.structured import kernel as structured

    n = x.shape[0]
    pb = dataclasses.replace(problem, x1_leaves=[x], x2_leaves=None, n1=n, n2=n)

    def side():  # type: ignore[no-untyped-def]
        with transform_friendly_attention():
            return structured.side(pb, src.cap, 1, 0, n)

    capture = cpu_ms(side, n)
    sd = side()
    writes = cpu_ms(lambda: src._write(pb, sd, buf), n)
    return {"capture": capture, "writes": writes}


def kernel_rows_measure(n: int, width: int) -> dict:
    """``rows --in-kernel`` in this process (one thread): the rows phase of ``kernel_matrix`` at tile width ``width``."""
    import torch

    torch.set_num_threads(1)
    import ntkfunc
    from ntkfunc._dataset import panels
    from ntkfunc._engines.rows import structured as rows_structured

    def usage() -> tuple[float, float, int]:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime, r.ru_stime, r.ru_minflt

    model = _model(False)
    f, params = ntkfunc.from_module(model)
    torch.manual_seed(1)
    x = torch.randn(n, 3, 32, 32)
    acc: dict = {"user": 0.0, "system": 0.0, "faults": 0, "formed": 0}
    chunks: list[float] = []
    sources: list = []
    fill, form = panels.RowPanels._fill, rows_structured.StructuredRows._form

    def timed_fill(self, src, i0, i1, target):  # type: ignore[no-untyped-def]
        a = usage()
        r = fill(self, src, i0, i1, target)
        b = usage()
        acc["user"] += b[0] - a[0]
        acc["system"] += b[1] - a[1]
        acc["faults"] += b[2] - a[2]
        acc["formed"] += i1 - i0
        acc["block"], acc["chunk"] = self.plan.block, self.plan.chunk
        if not sources or sources[-1] is not self.source:
            sources.append(self.source)
        return r

    def timed_form(self, way, xc, out, parts):  # type: ignore[no-untyped-def]
        t0 = time.process_time()
        r = form(self, way, xc, out, parts)
        chunks.append(1000 * (time.process_time() - t0) / out.shape[0])
        return r

    panels.RowPanels._fill, rows_structured.StructuredRows._form = timed_fill, timed_form
    ntkfunc.kernel_matrix(f, params, x[:4], None, progress=False)  # warm-up (code paths)
    acc.update(user=0.0, system=0.0, faults=0, formed=0)
    chunks.clear()
    sources.clear()
    ntkfunc.kernel_matrix(f, params, x, None, trace_axes=(-1,), memory_budget=12 << 30, batch_size=width, progress=False)
    formed = acc["formed"]
    out = {"n": n, "width": width, "block": acc["block"], "chunk": acc["chunk"], "formed": formed,
           "user": 1000 * acc["user"] / formed, "system": 1000 * acc["system"] / formed, "faults": acc["faults"] / formed,
           "first_chunk": chunks[0], "later_chunks": statistics.median(chunks[1:]) if len(chunks) > 1 else chunks[0]}
    src, g = sources[-1], acc["chunk"]  # the call's own row source (its Gram routes and measured ways), one chunk
    buf = torch.empty(g, *src.out_shape, src.slots.width)
    src.compute([x[:g]], buf, g)
    runs = []
    for _ in range(3):
        a = usage()
        src.compute([x[:g]], buf, g)
        b = usage()
        runs.append((b[0] - a[0], b[1] - a[1], b[2] - a[2]))
    runs.sort(key=lambda r: r[0] + r[1])
    out.update(standalone_user=1000 * runs[1][0] / g, standalone_system=1000 * runs[1][1] / g, standalone_faults=runs[1][2] / g,
               row_mb=4 * math.prod(src.out_shape) * src.slots.width / 2**20)
    return out


def kernel_rows_table(runs: list[dict]) -> str:
    lines = ["| package | width (block) | samples per chunk | in kernel_matrix: user | system | minor faults | first chunk | later "
             "chunks | standalone: user | system | minor faults | row (MB) |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['package']} | {r['width']} ({r['block']}) | {r['chunk']} | {r['user']:.1f} | {r['system']:.1f} | "
                     f"{r['faults']:.0f} | {r['first_chunk']:.1f} | {r['later_chunks']:.1f} | {r['standalone_user']:.1f} | "
                     f"{r['standalone_system']:.1f} | {r['standalone_faults']:.0f} | {r['row_mb']:.1f} |")
    return "\n".join(lines)


def grads_measure(name: str, reps: int, n: int | None = None) -> dict:
    """``rows --jacobian-fn`` in this process: CPU seconds of ``jacobian_fn(loss)`` and ``vmap(grad)`` on one model
    (``n`` samples, else the peers' size; ``tiny``: Linear(8, 16)-ReLU-Linear(16, 3), 4 samples by default)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from peer_models import load

    ntkfunc, bp = load(threads=1)
    if name == "tiny":
        import torch

        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)).eval()
        x, y = torch.randn(n or 4, 8), torch.randint(0, 3, (n or 4,))
    else:
        model, x, y = bp.build(name, n or bp.config(False)[name]["grads"])
    params = bp.named_params(model)
    jac = ntkfunc.jacobian_fn(bp.per_sample_loss(model))

    def cpu(fn) -> tuple[float, object]:  # type: ignore[no-untyped-def]
        t0 = time.process_time()
        out = fn()
        return time.process_time() - t0, out

    first, got = cpu(lambda: jac((x, y), params))
    ref = bp.vmap_grad(model, x, y)
    err = float(torch.stack([(got[k] - ref[k]).abs().max() / ref[k].abs().max() for k in ref]).max())  # NaN stays NaN
    second = cpu(lambda: jac((x, y), params))[0]
    ours, theirs = [], []
    for i in range(reps):  # each first in every other pair: the second call of a pair runs on a heap the first left
        first_ours = i % 2 == 0
        if not first_ours:
            theirs.append(cpu(lambda: bp.vmap_grad(model, x, y))[0])
        ours.append(cpu(lambda: jac((x, y), params))[0])
        if first_ours:
            theirs.append(cpu(lambda: bp.vmap_grad(model, x, y))[0])
    ntk, vmap = statistics.median(ours), statistics.median(theirs)
    return {"model": name, "n": x.shape[0], "first": first, "second": second, "jacobian_fn": ntk, "vmap_grad": vmap,
            "ratio": vmap / ntk, "err": err}


def grads_table(runs: dict[str, list[dict]]) -> str:
    """Per model and package: medians over rounds (and each round's ratio)."""
    lines = ["| model | N | package | first call (s) | second call (ms) | jacobian_fn (ms) | vmap(grad) (ms) | "
             "difference (ms) | vmap(grad) / jacobian_fn | per round |", "|---|---|---|---|---|---|---|---|---|---|"]

    def ms(seconds: float) -> str:
        return f"{1000 * seconds:.2f}" if abs(seconds) < 0.01 else f"{1000 * seconds:.1f}"

    for model in sorted({r["model"] for rs in runs.values() for r in rs}):
        for package, rs in runs.items():
            mine = [r for r in rs if r["model"] == model]
            med = {k: statistics.median(r[k] for r in mine) for k in ("first", "second", "jacobian_fn", "vmap_grad", "ratio")}
            diff = statistics.median(r["jacobian_fn"] - r["vmap_grad"] for r in mine)  # per process, then the median
            lines.append(f"| {model} | {mine[0]['n']} | {package} | {med['first']:.2f} | {ms(med['second'])} | "
                         f"{ms(med['jacobian_fn'])} | {ms(med['vmap_grad'])} | {ms(diff)} | {med['ratio']:.2f} | "
                         + ", ".join(f"{r['ratio']:.2f}" for r in mine) + " |")
    return "\n".join(lines)


def rows_table(runs: dict[str, list[dict]]) -> str:
    """Medians over rounds, per package and model."""
    lines = ["| model | package | fwd+bwd (ms/sample) | vmap(jacrev) (ms/sample) | rows (ms/sample) | rows / fwd+bwd | rows / vmap "
             "| capture | writes | system | checksums (vmap, rows) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for model in runs[next(iter(runs))][0]:
        for package, rs in runs.items():
            med = {k: statistics.median(r[model].get(k, math.nan) for r in rs)
                   for k in ("fwd_bwd", "vmap", "rows", "capture", "writes", "rows_system")}
            r0 = rs[0][model]
            lines.append(f"| {model} | {package} | {med['fwd_bwd']:.2f} | {med['vmap']:.2f} | {med['rows']:.2f} | "
                         f"{med['rows'] / med['fwd_bwd']:.2f} | {med['rows'] / med['vmap']:.2f} | {med['capture']:.2f} | "
                         f"{med['writes']:.2f} | {med['rows_system']:.2f} | {r0['vmap_sum']:.6g}, {r0['rows_sum']:.6g} |")
    return "\n".join(lines)


def rows_main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description="per-sample rows against a batched forward+backward and vmap(jacrev)")
    ap.add_argument("--baseline", type=Path, help="a directory holding an earlier ntkfunc package: before figures")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--jacobian-fn", action="store_true", help="jacobian_fn(loss) against vmap(grad) (module docstring)")
    ap.add_argument("--models", nargs="+", default=["cnn", "mlp", "resnet18"], help="with --jacobian-fn (and tiny: a small MLP)")
    ap.add_argument("--reps", type=int, default=11, help="with --jacobian-fn: interleaved timed calls per process")
    ap.add_argument("--n", type=int, help="with --jacobian-fn: samples (default: the peers' size; 4 for the tiny MLP)")
    ap.add_argument("--in-kernel", type=int, metavar="N", help="the rows phase of kernel_matrix on N samples (module docstring)")
    ap.add_argument("--widths", type=int, nargs="+", default=[64, 256], help="with --in-kernel: tile widths (batch_size=)")
    args = ap.parse_args(argv)
    packages = [("this", ROOT)] + ([("baseline", args.baseline)] if args.baseline else [])
    runs: dict[str, list[dict]] = {name: [] for name, _ in packages}
    if args.in_kernel:
        found = []
        for _ in range(args.rounds):
            for width in args.widths:
                for name, root in packages:
                    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(root))
                    res = subprocess.run([sys.executable, "-W", "ignore", __file__, "_kernel_rows", str(args.in_kernel), str(width)],
                                         capture_output=True, text=True, env=env, cwd=str(root), check=True)
                    found.append({"package": name, **json.loads(res.stdout.strip().splitlines()[-1])})
                    print(json.dumps(found[-1]), flush=True)
        print(kernel_rows_table(found))
        return
    if args.jacobian_fn:
        for _ in range(args.rounds):
            for model in args.models:
                for name, root in packages:
                    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(root))
                    res = subprocess.run([sys.executable, "-W", "ignore", __file__, "_grads", model, str(args.reps), str(args.n or 0)],
                                         capture_output=True, text=True, env=env, cwd=str(root), check=True)
                    runs[name].append(json.loads(res.stdout.strip().splitlines()[-1]))
                    print(name, json.dumps(runs[name][-1]), flush=True)
        print(grads_table(runs))
        return
    for _ in range(args.rounds):
        for name, root in packages:
            env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(root))
            res = subprocess.run([sys.executable, __file__, "_rows"], capture_output=True, text=True, env=env, cwd=str(root), check=True)
            runs[name].append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(name, json.dumps(runs[name][-1]), flush=True)
    print(rows_table(runs))


def run_one(n: int, impl: str, threads: int, budget: str | None, small: bool, precision: str, package: Path | None,
            clock: str = "wall") -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(package or ROOT))
    cmd = [sys.executable, __file__, "_measure", str(n), impl, str(threads), budget or "", "1" if small else "0", precision, clock]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(package or ROOT))
    if res.returncode:
        return {"n": n, "impl": impl, "error": res.stderr.strip().splitlines()[-1] if res.stderr.strip() else f"exit {res.returncode}"}
    row = json.loads(res.stdout.strip().splitlines()[-1])
    row["package"] = "baseline" if package else "this"
    return row


def table(rows: list[dict]) -> str:
    """The markdown table of the issue (limit, time, ratio) plus the phases."""
    lines = [
        "| N | package | impl | fwd+bwd (s) | half GEMM (s) | limit (s) | time (s) | ratio | rows (s) | products (s) | Gram (s) | other (s) "
        "| rows computed | passes/sample | peak RSS (GB) | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['n']} | {r.get('package', '')} | {r['impl']} | | | | failed: {r['error'][:60]} | | | | | | | | | |")
            continue
        other = r["seconds"] - r["rows_seconds"] - r["product_seconds"] - r["gram_seconds"]
        phased = r["rows_computed"] > 0
        lines.append(
            f"| {r['n']} | {r['package']} | {r['impl']} | {r['fwd_bwd']:.1f} | {r['half_gemm']:.1f} | {r['limit']:.1f} | {r['seconds']:.1f} | "
            f"{r['ratio']:.2f} | "
            + (f"{r['rows_seconds']:.1f} | {r['product_seconds']:.1f} | {r['gram_seconds']:.1f} | {other:.1f} | {r['rows_computed']} | "
               f"{r['rows_computed'] / r['n']:.2f} | " if phased else "- | - | - | - | - | - | ")
            + f"{r['peak_above_start'] / 1e9:.2f} | {r['load']:.1f} |"
        )
    return "\n".join(lines)


def medians(rows: list[dict]) -> str:
    """Per N, package and implementation: the medians over rounds of the time, limit, ratio and phases."""
    import statistics

    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if "error" not in r:
            groups.setdefault((r["n"], r["package"], r["impl"]), []).append(r)
    keys = ("fwd_bwd", "half_gemm", "limit", "seconds", "ratio", "rows_seconds", "product_seconds", "gram_seconds", "rows_computed")
    lines = ["| N | package | impl | rounds | fwd+bwd (s) | half GEMM (s) | limit (s) | time (s) | ratio | rows (s) | products (s) "
             "| Gram (s) | passes/sample |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (n, package, impl), rs in groups.items():
        m = {k: statistics.median(r[k] for r in rs) for k in keys}
        lines.append(f"| {n} | {package} | {impl} | {len(rs)} | {m['fwd_bwd']:.1f} | {m['half_gemm']:.1f} | {m['limit']:.1f} | "
                     f"{m['seconds']:.1f} | {m['ratio']:.2f} | {m['rows_seconds']:.1f} | {m['product_seconds']:.1f} | "
                     f"{m['gram_seconds']:.1f} | {m['rows_computed'] / n:.2f} |")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "errors":
        sys.path.insert(0, str(ROOT))  # this tree's ntkfunc
        n = int(sys.argv[2]) if len(sys.argv) > 2 else 64
        rows = precision_errors(n, 2, "--small" in sys.argv)
        print("| model | impl | precision | N | max error / max entry | median relative error |\n|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['model']} | {r['impl']} | {r['precision']} | {r['n']} | {r['max_rel']:.1e} | {r['median_rel']:.1e} |")
        return
    if len(sys.argv) > 1 and sys.argv[1] == "gram":
        sys.path.insert(0, str(ROOT))  # this tree's ntkfunc
        print("| parameter | shape | Gram route in rows (N = 512) | path | priced cheapest | ms per 64 x 64 tile | GFLOP/s (the path's FLOPs) "
              "| of the square GEMM |\n|---|---|---|---|---|---|---|---|")
        for r in gram_rates():
            print(f"| {r['param']} | {tuple(r['shape'])} | {'yes' if r['gram_route_in_rows'] else 'no'} | {r['path']} | "
                  f"{'yes' if r.get('priced_cheapest') else 'no'} | {r['ms']:.1f} | {r['gflops']:.1f} | {r['of_gemm']:.0%} (GEMM {r['gemm_gflops']:.1f}) |")
        return
    if len(sys.argv) > 1 and sys.argv[1] == "rows":
        rows_main(sys.argv[2:])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_grads":
        n = int(sys.argv[4]) if len(sys.argv) > 4 else 0
        print(json.dumps(grads_measure(sys.argv[2], int(sys.argv[3]), n or None)))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_kernel_rows":
        print(json.dumps(kernel_rows_measure(int(sys.argv[2]), int(sys.argv[3]))))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_rows":
        print(json.dumps(rows_measure()))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_measure":
        n, impl, threads, budget, small, precision = sys.argv[2:8]
        clock = sys.argv[8] if len(sys.argv) > 8 else "wall"
        print(json.dumps(measure(int(n), impl, int(threads), budget or None, small == "1", precision, clock)))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--impls", nargs="+", default=["auto", "1"])
    ap.add_argument("--baseline", type=Path, help="a directory holding an earlier ntkfunc package: before figures")
    ap.add_argument("--baseline-max-n", type=int, default=512, help="largest N for baseline runs (default 512)")
    ap.add_argument("--impl1-max-n", type=int, default=512, help="largest N for implementation 1 (default 512)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budget", default=None, help="memory budget (default: kernel_matrix's default)")
    ap.add_argument("--precision", default="highest")
    ap.add_argument("--small", action="store_true", help="a small CNN instead of ResNet-18 (smoke runs)")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="wall time, or the process's CPU time (with --threads 1)")
    ap.add_argument("--rounds", type=int, default=1, help="alternate the packages this many times (medians in a second table)")
    ap.add_argument("--write", type=Path, help="write the rows as JSON here")
    args = ap.parse_args()
    rows = []
    for n in args.n:
        for impl in args.impls:
            if impl == "1" and n > args.impl1_max_n:
                continue
            for _ in range(args.rounds):
                if args.baseline and n <= args.baseline_max_n:
                    rows.append(run_one(n, impl, args.threads, args.budget, args.small, "highest", args.baseline, args.clock))
                    print(json.dumps(rows[-1]), flush=True)
                rows.append(run_one(n, impl, args.threads, args.budget, args.small, args.precision, None, args.clock))
                print(json.dumps(rows[-1]), flush=True)
    print(table(rows))
    if args.rounds > 1:
        print(medians(rows))
    if args.write:
        args.write.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
