"""ntkfunc implementations 1 and 2 vs the two methods of PyTorch's "Neural Tangent Kernels" tutorial.

The baselines are written here as the tutorial writes them:

- tutorial Jacobian contraction: ``vmap(jacrev(f_single))`` for x1 and x2, flatten each
  parameter's Jacobian, one ``einsum`` per parameter, ``stack(...).sum(0)``;
- tutorial NTK-vector products: ``vmap(vmap(get_ntk))`` over all (x1, x2) pairs, each
  pair doing one VJP at x1 and a vmapped JVP at x2 over the identity basis.

Every measurement runs in a fresh subprocess (peak RSS = ``ru_maxrss`` minus the RSS
before the kernel call), under an address-space limit so that a method that runs out
of memory fails cleanly (reported as OOM) instead of endangering the machine.
Times are medians of ``--repeats`` runs after one warm-up; ratios compare methods
measured in the same run.

    python benchmarks/bench_core.py                 # full table -> benchmarks/RESULTS.md section
    python benchmarks/bench_core.py --quick         # small sizes, seconds
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call, jacrev, jvp, vjp, vmap

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ntkfunc  # noqa: E402

# --- models -----------------------------------------------------------------------


def mlp(width: int, d_in: int = 128, classes: int = 10) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, classes))


class SmallCNN(nn.Module):
    """The tutorial's CNN: three 3x3 convs (32 channels) on 32x32 RGB, then a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2, self.conv3 = nn.Conv2d(3, 32, 3), nn.Conv2d(32, 32, 3), nn.Conv2d(32, 32, 3)
        self.fc = nn.Linear(21632, 10)

    def forward(self, x):
        x = self.conv3(self.conv2(self.conv1(x).relu()).relu()).relu()
        return self.fc(x.flatten(1))


class AttentionBlock(nn.Module):
    """A pre-norm transformer encoder block (matmul attention + MLP), mean-pooled to 10 outputs."""

    def __init__(self, d: int = 64, heads: int = 4, t: int = 16) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.head = nn.Linear(d, 10)

    def forward(self, x):
        n, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, -1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(n, t, d))
        x = x + self.mlp(self.norm2(x))
        return self.head(x.mean(1))


def build(model_name: str, n: int):
    torch.manual_seed(0)
    if model_name.startswith("mlp"):
        model, shape = mlp(int(model_name[3:])), (128,)
    elif model_name == "cnn":
        model, shape = SmallCNN(), (3, 32, 32)
    else:
        model, shape = AttentionBlock(), (16, 64)
    model.eval()
    return model, torch.randn(n, *shape), torch.randn(n, *shape)


# --- the tutorial's two methods ----------------------------------------------------


def tutorial_jacobian_contraction(fnet_single, params, x1, x2, compute):
    jac1 = vmap(jacrev(fnet_single), (None, 0))(params, x1)
    jac1 = [j.flatten(2) for j in jac1.values()]
    jac2 = vmap(jacrev(fnet_single), (None, 0))(params, x2)
    jac2 = [j.flatten(2) for j in jac2.values()]
    expr = {"full": "Naf,Mbf->NMab", "trace": "Naf,Maf->NM"}[compute]
    return torch.stack([torch.einsum(expr, j1, j2) for j1, j2 in zip(jac1, jac2)]).sum(0)


def tutorial_ntk_vps(func, params, x1, x2, compute):
    def get_ntk(x1, x2):
        def func_x1(params):
            return func(params, x1)

        def func_x2(params):
            return func(params, x2)

        output, vjp_fn = vjp(func_x1, params)

        def get_ntk_slice(vec):
            vjps = vjp_fn(vec)
            _, jvps = jvp(func_x2, (params,), vjps)
            return jvps

        basis = torch.eye(output.numel(), dtype=output.dtype, device=output.device).view(output.numel(), -1)
        return vmap(get_ntk_slice)(basis)

    result = vmap(vmap(get_ntk, (None, 0)), (0, None))(x1, x2)
    if compute == "trace":
        return torch.einsum("NMKK->NM", result)
    return result


def tutorial_trace_scale(compute: str, classes: int = 10) -> float:
    """The tutorial's trace is a sum over outputs; neural-tangents' (and ntkfunc's) is a mean."""
    return 1.0 / classes if compute == "trace" else 1.0


# --- one measurement (in a subprocess) ---------------------------------------------


def make_runner(method: str, model_name: str, n: int, compute: str, budget: str):
    model, x1, x2 = build(model_name, n)
    params = {k: v.detach() for k, v in model.named_parameters()}
    f = lambda p, x: functional_call(model, p, (x,))  # noqa: E731
    f_single = lambda p, x: functional_call(model, p, (x.unsqueeze(0),)).squeeze(0)  # noqa: E731
    trace_axes = () if compute == "full" else (-1,)
    scale = tutorial_trace_scale(compute)
    if method == "tutorial-1":
        run = lambda: tutorial_jacobian_contraction(f_single, params, x1, x2, compute) * scale  # noqa: E731
    elif method == "tutorial-2":
        run = lambda: tutorial_ntk_vps(f_single, params, x1, x2, compute) * scale  # noqa: E731
    else:
        kernel = ntkfunc.ntk_fn(f, trace_axes=trace_axes, implementation=int(method[-1]), memory_budget=budget)
        run = lambda: kernel(x1, x2, params)  # noqa: E731
    return run, sum(p.numel() for p in params.values())


def measure(methods: list[str], model_name: str, n: int, compute: str, repeats: int, budget: str) -> dict:
    """Times: rounds over the methods in turn (same load for each); peak RSS if one method."""
    runners = {m: make_runner(m, model_name, n, compute, budget) for m in methods}
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = {m: {"times": [], "n_params": runners[m][1]} for m in methods}
    for m in methods:  # warm-up
        out[m]["checksum"] = float(runners[m][0]().double().sum())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    for _ in range(repeats):
        for m in methods:
            start = time.perf_counter()
            runners[m][0]()
            out[m]["times"].append(time.perf_counter() - start)
    for m in methods:
        out[m]["time"] = statistics.median(out[m]["times"]) if out[m]["times"] else None
        out[m]["peak"] = peak if len(methods) == 1 else None
    return out


def run_subprocess(args: list[str], mem_limit: int, timeout: int) -> dict:
    def limit():  # pragma: no cover - runs in the child
        resource.setrlimit(resource.RLIMIT_AS, (mem_limit, mem_limit))

    try:
        out = subprocess.run([sys.executable, __file__, "--one", *args], capture_output=True, text=True,
                             preexec_fn=limit, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout > {timeout} s"}
    if out.returncode != 0:
        oom = any(s in out.stderr for s in ("MemoryError", "DefaultCPUAllocator", "out of memory", "bad_alloc"))
        last = (out.stderr.strip().splitlines() or [f"exit code {out.returncode}"])[-1]
        return {"error": "OOM" if oom else last[:120]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", nargs=6, metavar=("METHODS", "MODEL", "N", "COMPUTE", "REPEATS", "BUDGET"), help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="small sizes (seconds)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mem-limit-gb", type=float, default=10.0, help="address-space limit per measurement")
    parser.add_argument("--budget", default="4GB", help="ntkfunc memory_budget")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "RESULTS-core.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        methods, model_name, n, compute, repeats, budget = args.one
        print(json.dumps(measure(methods.split(","), model_name, int(n), compute, int(repeats), budget)))
        return

    if args.quick:
        grid = [("mlp256", 8, "full"), ("mlp256", 8, "trace"), ("attention", 4, "full")]
    else:
        grid = [(m, 16, c) for m in ("mlp256", "mlp1024", "mlp2048") for c in ("full", "trace")]
        grid += [("cnn", 8, "full"), ("cnn", 8, "trace"), ("attention", 8, "full"), ("attention", 8, "trace"),
                 ("mlp4096", 16, "trace")]
    methods = ["tutorial-1", "ntkfunc-1", "tutorial-2", "ntkfunc-2"]
    limit = int(args.mem_limit_gb * 2**30)
    rows = []
    for model_name, n, compute in grid:
        chosen = [m for m in methods if not (m.endswith("2") and model_name in ("mlp2048", "mlp4096"))]
        res: dict = {m: {"error": "skipped (N^2 O forward passes: minutes)"} for m in methods if m not in chosen}
        for m in chosen:  # peak memory: one method per process
            res[m] = run_subprocess([m, model_name, str(n), compute, "0", args.budget], limit, timeout=900)
            res[m] = res[m].get(m, res[m])
        timed = [m for m in chosen if "error" not in res[m]]
        if timed:  # times: the methods that fit, interleaved in one process
            times = run_subprocess([",".join(timed), model_name, str(n), compute, str(args.repeats), args.budget], limit, 1800)
            for m in timed:
                res[m]["time"] = times[m]["time"] if m in times else None
        print(model_name, n, compute, res, flush=True)
        rows.append((model_name, n, compute, res))
    write_table(rows, methods, args)


def _fmt(r: dict) -> str:
    if "error" in r:
        return r["error"]
    t = "?" if r.get("time") is None else f"{r['time'] * 1e3:.0f} ms"
    return f"{t} / {r['peak'] / 2**20:.0f} MiB"


def write_table(rows, methods, args) -> None:
    cmd = "python benchmarks/bench_core.py" + (" --quick" if args.quick else "")
    lines = [
        "## ntkfunc vs the PyTorch NTK tutorial (implementations 1 and 2)",
        "",
        f"Command: `{cmd}` (torch {torch.__version__}, {args.threads} threads, CPU, float32, "
        f"ntkfunc memory_budget={args.budget}, address-space limit {args.mem_limit_gb:g} GiB per measurement). "
        "Each cell: median time (methods interleaved in one process, so they share the machine's load) / peak RSS "
        "above the process's start (one process per method). Ratio = tutorial time / ntkfunc time "
        "for the same algorithm (> 1: ntkfunc faster).",
        "",
        "| model | N1 = N2 | kernel | " + " | ".join(methods) + " | ratio 1 | ratio 2 | agree |",
        "|---|---|---|" + "---|" * len(methods) + "---|---|---|",
    ]
    for model_name, n, compute, res in rows:
        def ratio(a, b, res=res):
            ra, rb = res[a], res[b]
            if "error" in ra and "error" not in rb:
                return "tutorial " + ra["error"]
            if "error" in ra or "error" in rb or not ra.get("time") or not rb.get("time"):
                return "-"
            return f"{ra['time'] / rb['time']:.2f}x"

        ok = [r["checksum"] for r in res.values() if "error" not in r]
        agree = "yes" if ok and max(ok) - min(ok) <= 1e-3 * max(abs(c) for c in ok) else ("-" if len(ok) < 2 else "NO")
        n_params = next((r["n_params"] for r in res.values() if "n_params" in r), 0)
        lines.append(f"| {model_name} ({n_params:,} params) | {n} | {compute} | " + " | ".join(_fmt(res[m]) for m in methods)
                     + f" | {ratio('tutorial-1', 'ntkfunc-1')} | {ratio('tutorial-2', 'ntkfunc-2')} | {agree} |")
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
