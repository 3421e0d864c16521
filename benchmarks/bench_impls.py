"""Implementations 1, 2 and 3 side by side: time and peak memory on a scaling study.

Models: MLPs of width 256..4096 with O = 1, 10, 100 outputs (full O x O kernel), a
small CNN, a ResNet-18 at CIFAR resolution (written here, no download) and a
Transformer encoder block (ViT-style, hand-written attention on nn.Linear). Every
measurement runs in a fresh subprocess (peak RSS from ``resource.getrusage``), with one
warm-up call and then the median of up to ``--reps`` timed calls. A run that exceeds
``--timeout`` seconds is reported as such (the machine is shared: compare ratios from
the same run, not absolute times across runs).

Usage (writes a markdown table):
    python benchmarks/bench_impls.py --out benchmarks/RESULTS-impls.md
    python benchmarks/bench_impls.py --quick           # a few small configs, for a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- models ------------------------------------------------------------------------


def _models():  # type: ignore[no-untyped-def]
    import torch
    import torch.nn.functional as F
    from torch import nn

    class BasicBlock(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.short = nn.Sequential()
            if stride != 1 or cin != cout:
                self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):  # type: ignore[no-untyped-def]
            h = F.relu(self.bn1(self.conv1(x)))
            return F.relu(self.bn2(self.conv2(h)) + self.short(x))

    class ResNet18(nn.Module):
        """ResNet-18 for 32x32 inputs (3x3 stem, no max-pool), BatchNorm in eval mode."""

        def __init__(self, classes: int = 10, width: int = 64) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
            layers, cin = [], width
            for i, mult in enumerate((1, 2, 4, 8)):
                cout = width * mult
                layers += [BasicBlock(cin, cout, 1 if i == 0 else 2), BasicBlock(cout, cout, 1)]
                cin = cout
            self.layers = nn.Sequential(*layers)
            self.head = nn.Linear(cin, classes)

        def forward(self, x):  # type: ignore[no-untyped-def]
            return self.head(self.layers(self.stem(x)).mean((2, 3)))

    class EncoderBlock(nn.Module):
        """Patch embedding + one pre-norm Transformer encoder block + mean-pooled head."""

        def __init__(self, d: int = 128, heads: int = 4, patch: int = 4, classes: int = 10) -> None:
            super().__init__()
            self.heads, self.patch = heads, patch
            self.embed = nn.Linear(3 * patch * patch, d)
            self.pos = nn.Parameter(0.02 * torch.randn(64, d))
            self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.qkv = nn.Linear(d, 3 * d)
            self.proj = nn.Linear(d, d)
            self.mlp1, self.mlp2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
            self.head = nn.Linear(d, classes)

        def forward(self, x):  # type: ignore[no-untyped-def]  # (N, 3, 32, 32)
            n, p = x.shape[0], self.patch
            t = F.unfold(x, p, stride=p).transpose(1, 2)  # (N, 64, 3*p*p)
            h = self.embed(t) + self.pos
            q, k, v = self.qkv(self.ln1(h)).reshape(n, -1, 3, self.heads, h.shape[-1] // self.heads).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(h.shape)
            h = h + self.proj(a)
            h = h + self.mlp2(F.gelu(self.mlp1(self.ln2(h))))
            return self.head(h.mean(1))

    def mlp(width: int, out: int):  # type: ignore[no-untyped-def]
        return nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, out))

    def cnn():  # type: ignore[no-untyped-def]
        return nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64 * 8 * 8, 10),
        )

    return {"mlp": mlp, "cnn": cnn, "resnet18": ResNet18, "transformer": EncoderBlock}


def build(spec: dict[str, Any]):  # type: ignore[no-untyped-def]
    import torch

    torch.manual_seed(0)
    models = _models()
    if spec["model"] == "mlp":
        model = models["mlp"](spec["width"], spec["out"])
        x = torch.randn(spec["n"], 64)
    else:
        model = models[spec["model"]]()
        x = torch.randn(spec["n"], 3, 32, 32)
    return model.eval(), x


# --- one measurement (child process) -------------------------------------------------


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    sys.path.insert(0, ROOT)
    import ntkfunc

    torch.set_num_threads(spec["threads"])
    model, x = build(spec)
    f, params = ntkfunc.from_module(model)
    kernel = ntkfunc.ntk_fn(f, trace_axes=tuple(spec["trace_axes"]), implementation=spec["impl"], memory_budget=spec["budget"])
    t0 = time.perf_counter()
    k = kernel(x, None, params)
    first = time.perf_counter() - t0
    times = []
    deadline = time.perf_counter() + spec["rep_seconds"]
    for _ in range(spec["reps"]):
        if time.perf_counter() > deadline:
            break
        t0 = time.perf_counter()
        kernel(x, None, params)
        times.append(time.perf_counter() - t0)
    return {
        "first_s": first,
        "median_s": statistics.median(times) if times else first,
        "timed_calls": len(times),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "kernel_shape": list(k.shape),
        "checksum": float(k.double().abs().sum()),
        "n_params": sum(p.numel() for p in params.values()),
    }


def measure(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--one", json.dumps(spec)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout > {timeout:.0f} s"}
    if res.returncode != 0:
        return {"error": (res.stderr.strip().splitlines() or ["failed"])[-1][:120]}
    return json.loads(res.stdout.strip().splitlines()[-1])


# --- the study ------------------------------------------------------------------------


def configs(quick: bool) -> list[dict[str, Any]]:
    if quick:
        return [dict(model="mlp", width=256, out=10, n=8), dict(model="cnn", n=4)]
    out = [dict(model="mlp", width=2048, out=10, n=32), dict(model="transformer", n=16),
           dict(model="resnet18", n=4), dict(model="cnn", n=16)]
    for width in (256, 1024, 2048, 4096):
        for o in (1, 10, 100):
            if (width, o) != (2048, 10):
                out.append(dict(model="mlp", width=width, out=o, n=32))
    return out


def skip_reason(cfg: dict[str, Any], impl: Any) -> str | None:
    """Configurations trimmed because implementation 1 or 2 would take many minutes here.

    Implementation 2 costs N² O forward passes (N = 32): on MLPs it runs only at width 256
    with O <= 10. Implementation 1 holds N O P Jacobian entries: it is skipped at width
    4096 with O >= 10 and width 2048 with O = 100.
    """
    if cfg["model"] != "mlp":
        return None
    w, o = cfg["width"], cfg["out"]
    if impl == 2 and (w > 256 or o == 100):
        return "skipped (N² O passes: minutes)"
    if impl == 1 and ((w == 4096 and o >= 10) or (w == 2048 and o == 100)):
        return "skipped (minutes)"
    return None


def fmt(r: dict[str, Any]) -> tuple[str, str]:
    if "error" in r:
        return r["error"], ""
    return f"{r['median_s']:.3f}", f"{r['peak_rss_mb']:.0f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "RESULTS-impls.md"))
    ap.add_argument("--json", default=None, help="also write raw results here")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--impls", default="1,2,3,auto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rep-seconds", type=float, default=5.0, help="stop timing more calls after this")
    ap.add_argument("--timeout", type=float, default=300.0, help="per measurement (seconds)")
    ap.add_argument("--budget", default="3GB", help="memory_budget passed to every implementation")
    ap.add_argument("--only", default=None, help="comma-separated model names (mlp, cnn, resnet18, transformer)")
    ap.add_argument("--append", action="store_true", help="append the table to --out instead of overwriting it")
    ap.add_argument("--first", type=int, default=None, help="only the first N configurations (the four headline models)")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(json.loads(args.one))))
        return

    impls = [i if i == "auto" else int(i) for i in args.impls.split(",")]
    rows, raw = [], []
    wanted = None if args.only is None else set(args.only.split(","))
    for cfg in configs(args.quick)[: args.first]:
        if wanted is not None and cfg["model"] not in wanted:
            continue
        results = {}
        for impl in impls:
            reason = skip_reason(cfg, impl)
            if reason:
                results[impl] = {"error": reason}
                continue
            spec = dict(cfg, impl=impl, trace_axes=[], threads=args.threads, reps=args.reps,
                        rep_seconds=args.rep_seconds, budget=args.budget)
            results[impl] = measure(spec, args.timeout)
            print(json.dumps({**cfg, "impl": impl, **results[impl]}), flush=True)
        raw.append({"config": cfg, "results": {str(k): v for k, v in results.items()}})
        rows.append((cfg, results))
    write_markdown(args, impls, rows)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(raw, fh, indent=1)


def write_markdown(args: argparse.Namespace, impls: list[int], rows: list) -> None:  # type: ignore[type-arg]
    import platform

    import torch

    head = ["model", "N", "O", "params"]
    for i in impls:
        head += [f"impl {i} s", f"impl {i} MB"]
    head += ["impl 1 / impl 3"] + (["best fixed / auto"] if "auto" in impls else [])
    lines = [
        "# Implementations side by side (full O x O kernel, `trace_axes=()`)",
        "",
        f"Command: `python benchmarks/bench_impls.py{' --quick' if args.quick else ''}"
        f"{' --only ' + args.only if args.only else ''}{' --first ' + str(args.first) if args.first else ''}"
        f" --impls {args.impls} --threads {args.threads} --reps {args.reps} "
        f"--rep-seconds {args.rep_seconds:.0f} --timeout {args.timeout:.0f} --budget {args.budget}`  ",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (shared with other jobs), "
        f"torch {torch.__version__}, {args.threads} threads, float32, `memory_budget={args.budget}`.  ",
        "Times: median of up to "
        f"{args.reps} calls after one warm-up call (each configuration in a fresh process); MB: peak RSS of that process.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for cfg, results in rows:
        name = f"mlp w={cfg['width']}" if cfg["model"] == "mlp" else cfg["model"]
        o = cfg.get("out", 10)
        n_params = next((r["n_params"] for r in results.values() if "n_params" in r), "")
        cells = [name, str(cfg["n"]), str(o), f"{n_params / 1e6:.2f}M" if n_params else ""]
        for i in impls:
            cells += list(fmt(results[i]))
        r1, r3 = results.get(1, {}), results.get(3, {})
        ratio = f"{r1['median_s'] / r3['median_s']:.1f}x" if "median_s" in r1 and "median_s" in r3 else ""
        cells.append(ratio)
        if "auto" in impls:
            fixed = [r["median_s"] for i, r in results.items() if i != "auto" and "median_s" in r]
            ra = results.get("auto", {})
            cells.append(f"{min(fixed) / ra['median_s']:.2f}x" if fixed and "median_s" in ra else "")
        lines.append("| " + " | ".join(cells) + " |")
    with open(args.out, "a" if args.append else "w") as fh:
        fh.write(("\n" if args.append else "") + "\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
