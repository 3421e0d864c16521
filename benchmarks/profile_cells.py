"""Where the time goes in a few bench_vs_nt cells: median per call, the same kernel function on one
sample (its fixed part), and the top functions of one call under cProfile.

Usage: python benchmarks/profile_cells.py [--threads 1] [--only attention,resblock] [--ops] [--impls 1,auto]
(cells: attention 1/2/3, resblock 1/2, mlp512 3 and 2, mlp512-trace 3; wall time of the calls, so run it
on a quiet machine)

``--ops``: instead of cProfile, the aten ops of 10 calls timed one by one (thread CPU time around each op, inside a
``TorchDispatchMode``: the ops as they run under the transforms), with the FLOPs torch's ``FlopCounterMode`` gives
them (grouped convolution backwards counted by :func:`conv_backward_flops`), against this machine's GEMM rate (a
1,024-cube ``mm`` in the same process): "the limit" is the call's FLOPs at that rate, so "call / limit" says how
far above its own arithmetic a cell runs. ``--impls`` picks implementations (default: the cells above).
"""

from __future__ import annotations

import collections
import cProfile
import io
import math
import os
import pstats
import sys
import time
from collections.abc import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

import bench_vs_nt as bench  # noqa: E402
import torch  # noqa: E402
from timing import median_seconds  # noqa: E402

import ntkfunc  # noqa: E402

CELLS = [("attention", 1), ("attention", 2), ("attention", 3), ("resblock", 1), ("resblock", 2), ("mlp512", 3),
         ("mlp512-trace", 3), ("mlp512", 2)]


def gemm_rate() -> float:
    """FLOP/s of a 1,024-cube float32 ``mm`` here (median of 5, thread CPU time)."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    return 2 * 1024**3 / median_seconds(lambda: a @ b, 5)


def conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,  # type: ignore[no-untyped-def]
                        _output_padding, _groups, output_mask, out_shape=None, **kwargs) -> int:
    """FLOPs of ``aten.convolution_backward`` with groups: each asked-for gradient costs what the forward does,
    ``2 x numel(the convolution's output) x numel(weight) / weight.shape[0]`` (torch 2.13's own formula leaves the
    groups out of the weight gradient: ``groups`` times too many where ``vmap`` folds the samples into the groups)."""
    out_numel = math.prod(x_shape if transposed else grad_out_shape)
    return 2 * out_numel * math.prod(w_shape[1:]) * (int(output_mask[0]) + int(output_mask[1]))


def op_table(call: Callable[[], object], calls: int = 10, rows: int = 14) -> str:
    """The aten ops of ``calls`` runs of ``call``, per call: thread CPU ms, FLOPs and rate (module docstring)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: conv_backward_flops}) as counter:
        call()
    flops = {str(op): n for op, n in counter.get_flop_counts().get("Global", {}).items()}
    seconds: dict[str, float] = collections.defaultdict(float)

    class Timed(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            t0 = time.thread_time()
            out = func(*args, **(kwargs or {}))
            seconds[str(func.overloadpacket)] += time.thread_time() - t0
            return out

    plain = median_seconds(call, calls)
    with Timed():
        for _ in range(calls):
            call()
    rate = gemm_rate()
    total = sum(flops.values())
    lines = [f"call {plain * 1e3:.2f} ms (thread CPU, median of {calls}); ops timed one by one {sum(seconds.values()) / calls * 1e3:.2f} "
             f"ms; {total / 1e6:.0f} MFLOP; GEMM rate {rate / 1e9:.0f} GFLOP/s, so the limit is {total / rate * 1e3:.2f} ms and "
             f"call / limit = {plain * rate / max(total, 1):.2f}",
             "| op | ms per call | MFLOP per call | GFLOP/s | / GEMM rate |", "|---|---|---|---|---|"]
    for op, sec in sorted(seconds.items(), key=lambda kv: -kv[1])[:rows]:
        ms, f = sec / calls * 1e3, flops.get(op, 0)
        speed = f"{f / (sec / calls) / 1e9:.0f} | {f / (sec / calls) / rate:.2f}" if f else "— | —"
        lines.append(f"| {op} | {ms:.3f} | {f / 1e6:.1f} | {speed} |")
    return "\n".join(lines)


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default=None, help="comma-separated setup names")
    ap.add_argument("--ops", action="store_true", help="per-op times and FLOPs against the GEMM rate (module docstring)")
    ap.add_argument("--impls", default=None, help="comma-separated implementations (1, 2, 3, auto) instead of the cells'")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    setups = {s["name"]: s for s in bench.setups(False, False)}
    cells: list[tuple[str, int | str]] = CELLS
    if args.impls:
        names = args.only.split(",") if args.only else sorted({n for n, _ in CELLS})
        cells = [(n, int(i) if i.isdigit() else i) for n in names for i in args.impls.split(",")]
    for name, impl in cells:
        if args.only and name not in args.only.split(","):
            continue
        s = setups[name]
        model, x, _ = bench.build(s)
        f, p = ntkfunc.from_module(model)
        kernel = ntkfunc.ntk_fn(f, trace_axes=(-1,) if s["trace"] else (), implementation=impl)
        if args.ops:
            kernel(x, None, p)
            print(f"=== {name} impl {impl}: " + op_table(lambda k=kernel, a=x, q=p: k(a, None, q)))
            continue
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
