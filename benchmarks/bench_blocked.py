"""Whole-dataset kernels: ``kernel_matrix`` vs empirical-ntks' strategy, and ResNet-18 throughput.

(a) ``compare``: the same model, data and memory budget for
    - ``empirical-ntks`` strategy, reimplemented here: the N x P Jacobian is computed in
      chunks along P (groups of parameter tensors whose N x P0 chunk fits the budget), each
      chunk held in RAM for all samples (``vmap(jacrev)`` over loader batches of 50), and
      ``K += J_chunk @ J_chunk.T`` as a blocked matmul (column blocks);
    - ``ntkfunc.kernel_matrix`` (implementation 1: sample tiles, Jacobian reuse, upper tiles only).
    Each runs in a fresh subprocess; peak memory = ``ru_maxrss`` minus the RSS before the call.
(b) ``resnet``: a CIFAR ResNet-18 (3x3 stem, no max-pool, 11.2M parameters, eval-mode BatchNorm)
    on random 3x32x32 inputs: the trace kernel (O = 10) and the pNTK (O = 1), timed at a size
    that runs in minutes on a small CPU, split into Jacobian time and contraction rate, and
    extrapolated to 3,500 x 2,500 and 60,000 x 50,000; the contraction rate is compared with
    the machine's measured float32 matmul peak.

    python benchmarks/bench_blocked.py compare   # (a)
    python benchmarks/bench_blocked.py resnet    # (b)
    python benchmarks/bench_blocked.py all --write benchmarks/RESULTS-blocked.md
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ntkfunc  # noqa: E402
from ntkfunc.datasets import load_digits  # noqa: E402

# --- models -----------------------------------------------------------------------


def digits_cnn() -> nn.Module:
    """284k parameters on 8x8 digits: the (a) model."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(64 * 4 * 4, 256), nn.ReLU(), nn.Linear(256, 10),
    )


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.b1(self.c1(x)))
        return torch.relu(self.b2(self.c2(h)) + self.short(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 inputs (as in empirical-ntks' CIFAR-10 runs): 11,173,962 parameters."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(512, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layers(self.stem(x)).mean(dim=(2, 3)))


# --- (a) the empirical-ntks strategy ---------------------------------------------------


def empirical_ntks_pntk(model: nn.Module, x: torch.Tensor, budget: int, loader_batch: int = 50, col_chunk: int = 20000) -> torch.Tensor:
    """K = J J^T of g(x) = sum_o f_o(x)/sqrt(O), with J computed in chunks along P, as empirical-ntks' ntk.py.

    For each chunk ``[c0, c1)`` of the flattened parameter vector (``grad-chunksize``, chosen so
    that the N x P0 chunk plus one loader batch of full per-sample gradients fits ``budget``),
    every sample's gradient is recomputed batch by batch and its chunk copied into an N x P0
    buffer held in RAM; then ``K += J_c J_c^T`` by column blocks (``mm-col-chunksize``).
    """
    params = {k: v.detach() for k, v in model.named_parameters()}
    n, itemsize = x.shape[0], x.element_size()
    p = sum(t.numel() for t in params.values())
    p0 = int((0.7 * budget - 2 * loader_batch * p * itemsize) // (n * itemsize))
    if p0 < 1:
        raise MemoryError(f"budget {budget} too small for a loader batch of {loader_batch} gradients")

    def g(prm: dict, xi: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, prm, (xi.unsqueeze(0),))
        return out.sum() / math.sqrt(out.shape[-1])

    grads_fn = vmap(jacrev(g), in_dims=(None, 0))
    kernel = torch.zeros(n, n, dtype=x.dtype)
    for c0 in range(0, p, p0):
        c1 = min(c0 + p0, p)
        jac = torch.empty(n, c1 - c0, dtype=x.dtype)  # the chunk of J for all samples, held in RAM
        for s in range(0, n, loader_batch):
            grads = grads_fn(params, x[s : s + loader_batch])
            flat = torch.cat([grads[k].reshape(grads[k].shape[0], -1) for k in params], 1)
            jac[s : s + loader_batch] = flat[:, c0:c1]
            del grads, flat
        for c in range(0, n, col_chunk):  # blocked matmul over column chunks
            kernel[:, c : c + col_chunk] += jac @ jac[c : c + col_chunk].T
        del jac
    return kernel


def _measure(method: str, n: int, budget: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = digits_cnn().eval()
    x = load_digits()[0][:n]
    f, params = ntkfunc.from_module(model)
    # warm up both code paths at a tiny size (allocator, imports), then measure
    empirical_ntks_pntk(model, x[:4], budget)
    ntkfunc.kernel_matrix(f, params, x[:4], pntk=True, progress=False)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    if method == "empirical-ntks":
        k = empirical_ntks_pntk(model, x, budget)
    else:
        k = ntkfunc.kernel_matrix(f, params, x, pntk=True, memory_budget=budget, implementation=1, progress=False)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    torch.save(k, f"/tmp/bench_blocked_{method}.pt")
    return {"method": method, "seconds": seconds, "peak_bytes": peak - base, "n": n, "budget": budget, "P": sum(p.numel() for p in params.values())}


def compare(n: int, budget: int, threads: int) -> list[dict]:
    rows = []
    for method in ("empirical-ntks", "ntkfunc"):
        res = subprocess.run([sys.executable, __file__, "_measure", method, str(n), str(budget), str(threads)], capture_output=True, text=True)
        if res.returncode:
            raise SystemExit(res.stderr)
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    a, b = (torch.load(f"/tmp/bench_blocked_{m}.pt") for m in ("empirical-ntks", "ntkfunc"))
    err = ((a - b).abs().max() / a.abs().max()).item()
    for r in rows:
        r["max_rel_diff"] = err
    return rows


# --- (b) ResNet-18 throughput ------------------------------------------------------


def matmul_peak(threads: int, size: int = 2048, repeats: int = 5) -> float:
    """Measured float32 matmul FLOP/s (best of ``repeats``) with ``threads`` threads."""
    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * size**3 / best


def _timed(fn) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def resnet(n1: int, n2: int, threads: int, budget: str) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = ResNet18().eval()
    f, params = ntkfunc.from_module(model)
    p = sum(t.numel() for t in params.values())
    x1, x2 = torch.randn(n1, 3, 32, 32), torch.randn(n2, 3, 32, 32)
    peak = matmul_peak(threads)
    out = {"P": p, "threads": threads, "matmul_peak_flops": peak, "n1": n1, "n2": n2, "budget": budget}
    from ntkfunc._core.layout import Layout
    from ntkfunc._dataset.panels import RowPanels

    for kernel, kw, o in (("trace", {}, 10), ("pntk", {"pntk": True}, 1)):
        stats = {"jac_seconds": 0.0, "jac_samples": 0, "contract_seconds": 0.0}
        orig_jac, orig_contract = RowPanels._fill, Layout.contract

        def jac(self, src, i0, i1, target, orig_jac=orig_jac, stats=stats):  # type: ignore[no-untyped-def]
            t0 = time.perf_counter()
            r = orig_jac(self, src, i0, i1, target)
            stats["jac_seconds"] += time.perf_counter() - t0
            stats["jac_samples"] += i1 - i0
            return r

        def contract(self, a, b, n, orig_contract=orig_contract, stats=stats):  # type: ignore[no-untyped-def]
            t0 = time.perf_counter()
            r = orig_contract(self, a, b, n)
            stats["contract_seconds"] += time.perf_counter() - t0
            return r

        RowPanels._fill, Layout.contract = jac, contract
        try:
            ntkfunc.kernel_matrix(f, params, x1[:1], x2[:1], implementation=1, progress=False, **kw)  # warm-up
            for key in stats:
                stats[key] = 0 if isinstance(stats[key], int) else 0.0
            start = time.perf_counter()
            k = ntkfunc.kernel_matrix(f, params, x1, x2, implementation=1, memory_budget=budget, progress=False, **kw)
            total = time.perf_counter() - start
        finally:
            RowPanels._fill, Layout.contract = orig_jac, orig_contract
        assert torch.isfinite(k).all()
        flops = 2.0 * n1 * n2 * o * p
        per_jac = stats["jac_seconds"] / max(stats["jac_samples"], 1)
        rate = flops / max(stats["contract_seconds"], 1e-9)
        row = {
            "seconds": total, "entries_per_s": n1 * n2 / total, "jac_seconds_per_sample": per_jac,
            "jacobians_computed": stats["jac_samples"], "contraction_flops_per_s": rate,
            "fraction_of_matmul_peak": flops / total / peak, "contraction_fraction_of_peak": rate / peak,
        }
        for name, (a, b) in {"3500x2500": (3500, 2500), "60000x50000": (60000, 50000)}.items():
            # each sample's Jacobian once (the budget-dependent recomputation is not modelled) + the contraction at the measured rate
            row[f"extrapolated_seconds_{name}"] = (a + b) * per_jac + 2.0 * a * b * o * p / rate
        out[kernel] = row
    return out


def _markdown(cmp: list[dict], rn: dict, commands: list[str]) -> str:
    cpu = f"{os.cpu_count()} CPU cores (shared), torch {torch.__version__}, no GPU"
    lines = ["# kernel_matrix benchmarks", "", f"Machine: {cpu}. Commands:", "", "```"] + commands + ["```", ""]
    a, b = cmp
    lines += [
        f"## (a) empirical-ntks' strategy vs kernel_matrix (pNTK, {a['n']} x {a['n']} digits, CNN with {a['P']:,} parameters, "
        f"budget {a['budget'] / 1e6:.0f} MB)",
        "",
        "| method | time (s) | peak memory above baseline (MB) |",
        "|---|---|---|",
    ]
    for r in cmp:
        lines.append(f"| {r['method']} | {r['seconds']:.2f} | {r['peak_bytes'] / 1e6:.0f} |")
    lines += ["", f"Speed-up: {a['seconds'] / b['seconds']:.2f}x; max relative difference of the kernels: {a['max_rel_diff']:.1e}.", ""]
    lines += [
        f"## (b) ResNet-18 (CIFAR, {rn['P']:,} parameters), random 3x32x32 data, N1={rn['n1']}, N2={rn['n2']}, budget {rn['budget']}, {rn['threads']} threads",
        "",
        f"Measured float32 matmul peak: {rn['matmul_peak_flops'] / 1e9:.1f} GFLOP/s.",
        "",
        "| kernel | time (s) | entries/s | Jacobian s/sample | contraction GFLOP/s | contraction / peak | whole run / peak "
        "| 3,500 x 2,500 (extrapolated) | 60,000 x 50,000 (extrapolated) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for kernel in ("trace", "pntk"):
        r = rn[kernel]
        lines.append(
            f"| {kernel} | {r['seconds']:.1f} | {r['entries_per_s']:.2f} | {r['jac_seconds_per_sample']:.2f} | "
            f"{r['contraction_flops_per_s'] / 1e9:.1f} | {r['contraction_fraction_of_peak']:.0%} | {r['fraction_of_matmul_peak']:.1%} | "
            f"{_dur(r['extrapolated_seconds_3500x2500'])} | {_dur(r['extrapolated_seconds_60000x50000'])} |"
        )
    return "\n".join(lines) + "\n"


def _dur(s: float) -> str:
    if s < 3600:
        return f"{s / 60:.1f} min"
    if s < 86400 * 3:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.0f} days"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_measure":
        method, n, budget, threads = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
        print(json.dumps(_measure(method, n, budget, threads)))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["compare", "resnet", "all"])
    ap.add_argument("--n", type=int, default=1000, help="(a) samples (default 1000)")
    ap.add_argument("--budget", type=int, default=300_000_000, help="(a) memory budget in bytes (default 300 MB)")
    ap.add_argument("--n1", type=int, default=12)
    ap.add_argument("--n2", type=int, default=8)
    ap.add_argument("--resnet-budget", default="6GB")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write", type=Path, help="write a markdown report here")
    args = ap.parse_args()
    cmp = compare(args.n, args.budget, args.threads) if args.what in ("compare", "all") else []
    for r in cmp:
        print(json.dumps(r))
    rn = resnet(args.n1, args.n2, args.threads, args.resnet_budget) if args.what in ("resnet", "all") else {}
    if rn:
        print(json.dumps(rn, indent=1))
    if args.write and cmp and rn:
        args.write.write_text(_markdown(cmp, rn, ["python benchmarks/bench_blocked.py " + " ".join(sys.argv[1:])]))
        print(f"wrote {args.write}")


if __name__ == "__main__":
    main()
