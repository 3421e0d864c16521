"""One call on one GPU: CUDA correctness of every implementation, then ``kernel_matrix`` throughput.

Sized to finish in at most 8 minutes on one H100/H200 (``--seconds``, default 420: later
steps are skipped, and say so, once the time is spent):

1. **Correctness**: ``ntk_fn`` (implementations 1, 2, 3, ``"auto"``) and ``kernel_matrix``
   (same) on CUDA for the test zoo against the float64 CPU reference
   (``tests/reference.py``), in float32 (TF32 off everywhere: cuBLAS and cuDNN) and in TF32
   (``precision="tf32"``, cuDNN's TF32 on), plus ``kernel_matrix(precision="bf16")``; and
   ``jacobian_fn(flat=True)`` (implementations 1, 3, ``"auto"``; with ``out=`` a buffer on the device
   where ``f`` has one output tensor) against the same on the CPU in float64, which the suite checks
   against the reference.
2. **GEMM rates** of the device: an 8192^3 float32 product in IEEE float32, TF32 and
   bfloat16 (float32 output), the yardstick of step 3.
3. **Throughput**: ``kernel_matrix(f, p, x, None)`` for ResNet-18 with one logit (the CIFAR
   variant at 32x32, and the ImageNet layout at 224x224, empirical-ntks' setting), N = 4096,
   in float32, TF32 and bf16: seconds, kernel entries/s, GFLOP/s of the exact kernel's
   Gram product (``N (N + 1) P`` FLOPs for the upper triangle, ``P`` the parameter count)
   and its fraction of the measured GEMM rate, per-sample rows computed (and their share of
   the time), peak GPU memory (``torch.cuda.max_memory_allocated``), and the extrapolation
   to a 60,000 x 50,000 kernel: rows at the measured seconds per row, computed once for x1
   and once per panel for x2 (panels as large as the default budget holds), plus 3e9 pairs
   at the measured seconds per pair.
4. ``devices="all"`` on the 32x32 model when the machine has more than one GPU.
5. **Sketched kernel** (the CIFAR ResNet-18 with one logit, TF32, ``Sketch(8192)``): the features of
   N = 4096 samples (``features_fn``) and ``kernel_matrix(..., sketch=)`` end to end, and the
   estimate for a 60,000 x 50,000 sketched kernel: 110,000 samples' features at the measured
   seconds per sample plus the ``60,000 x 50,000 x k`` product at the measured TF32 GEMM rate.

It prints a markdown report and writes ``gpu_check.json`` (and ``gpu_check.md``) to ``--out``
(default ``$OUT`` if set, else the working directory). ``--device cpu --small`` runs every
step at toy sizes on the CPU (seconds): the check that this script cannot fail for a silly
reason on the GPU.

    python benchmarks/gpu_check.py                      # on the GPU machine
    python benchmarks/gpu_check.py --device cpu --small # here
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

import torch
from torch import nn
from torch.utils import _pytree as pytree

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ntkfunc  # noqa: E402
from ntkfunc._core.memory import parse_budget  # noqa: E402
from tests.reference import max_rel_err, reference_kernel  # noqa: E402
from tests.zoo import CASES  # noqa: E402

ZOO = [c for c in CASES if c.name in ("mlp", "cnn", "layernorm_mlp", "attention_matmul", "resblock_groupnorm", "conv1d_multi_output",
                                       "embedding_int_inputs", "tied_weights")]
IMPLS = [1, 2, 3, "auto"]
MODES = {"float32": 1e-4, "tf32": 2e-2}  # max relative error allowed against float64


# --- models -------------------------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.c2, self.b2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.b2(self.c2(torch.relu(self.b1(self.c1(x))))) + self.short(x))


class ResNet18(nn.Module):
    """ResNet-18 with one logit: ``imagenet=False`` the CIFAR variant (3x3 stem, no max-pool), True the
    ImageNet layout (7x7 stride-2 stem, max-pool) for 224x224 inputs. ``width`` scales the channels."""

    def __init__(self, imagenet: bool, width: int = 64) -> None:
        super().__init__()
        if imagenet:
            self.stem = nn.Sequential(nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        else:
            self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        layers, cin = [], width
        for mult, stride in ((1, 1), (2, 2), (4, 2), (8, 2)):
            layers += [Block(cin, width * mult, stride), Block(width * mult, width * mult, 1)]
            cin = width * mult
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layers(self.stem(x)).mean(dim=(2, 3)))


# --- helpers ------------------------------------------------------------------------------------------


class Clock:
    """The time left of ``seconds``."""

    def __init__(self, seconds: float) -> None:
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()


def _to(tree, device):  # type: ignore[no-untyped-def]
    return pytree.tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, tree)


def _flags(mode: str) -> None:
    """float32: IEEE products in cuBLAS and cuDNN; tf32: TF32 in both (torch's new API where it has one)."""
    if not torch.cuda.is_available():
        return
    value = "tf32" if mode == "tf32" else "ieee"
    try:
        torch.backends.cuda.matmul.fp32_precision = value
        torch.backends.cudnn.conv.fp32_precision = value
    except (AttributeError, RuntimeError):
        torch.backends.cuda.matmul.allow_tf32 = mode == "tf32"
        torch.backends.cudnn.allow_tf32 = mode == "tf32"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def correctness(device: torch.device, clock: Clock, small: bool) -> list[dict]:
    rows = []
    cases = ZOO[:3] if small else ZOO
    for case in cases:
        f64, p64, a64, b64, vmap_axes = case.build(torch.float64)
        refs = {sym: reference_kernel(f64, p64, a64, None if sym else b64, (), ()) for sym in (False, True)}
        f, params, x1, x2, _ = case.build(torch.float32)
        for mode, tol in MODES.items():
            _flags(mode)
            for impl in IMPLS:
                if clock.left() < 0:
                    rows.append({"case": case.name, "mode": mode, "impl": str(impl), "status": "skipped (time)"})
                    continue
                row: dict = {"case": case.name, "mode": mode, "impl": str(impl), "tol": tol}
                try:
                    k = ntkfunc.ntk_fn(f, trace_axes=(), vmap_axes=vmap_axes, implementation=impl)(
                        _to(x1, device), _to(x2, device), _to(params, device))
                    assert k.device.type == device.type and k.dtype == torch.float32
                    row["ntk_fn"] = max_rel_err(k.cpu().double(), refs[False])
                    for sym in (False, True):
                        km = ntkfunc.kernel_matrix(f, _to(params, device), _to(x1, device), None if sym else _to(x2, device),
                                                   trace_axes=(), implementation=impl, batch_size=2, progress=False,
                                                   precision="tf32" if mode == "tf32" else "highest")
                        row["kernel_matrix" + ("_x2None" if sym else "")] = max_rel_err(km.cpu().double(), refs[sym])
                    if impl != 2:  # per-sample Jacobians: implementation 2 has none
                        row.update(jacobian_errors(f, params, x1, vmap_axes, impl, device, f64, p64, a64))
                    errs = [v for key, v in row.items() if key.startswith(("ntk_fn", "kernel_matrix", "jacobian_fn"))]
                    row["status"] = "ok" if max(errs) <= tol else "FAIL"
                except Exception as err:  # a failure is a finding: report it and go on
                    row["status"] = f"ERROR {type(err).__name__}: {str(err)[:200]}"
                    row["trace"] = traceback.format_exc()[-2000:]
                rows.append(row)
        _flags("float32")
        if clock.left() > 0:  # bf16 products in kernel_matrix
            row = {"case": case.name, "mode": "bf16", "impl": "auto", "tol": 5e-2}
            try:
                km = ntkfunc.kernel_matrix(f, _to(params, device), _to(x1, device), None, trace_axes=(), batch_size=2,
                                           progress=False, precision="bf16")
                row["kernel_matrix_x2None"] = max_rel_err(km.cpu().double(), refs[True])
                row["status"] = "ok" if row["kernel_matrix_x2None"] <= row["tol"] else "FAIL"
            except Exception as err:
                row["status"] = f"ERROR {type(err).__name__}: {str(err)[:200]}"
            rows.append(row)
    return rows


def jacobian_errors(f, params, x1, vmap_axes, impl, device: torch.device, f64, p64, a64) -> dict:  # type: ignore[no-untyped-def]
    """``jacobian_fn(flat=True)`` on ``device`` (and into a device buffer with ``out=``, where ``f`` has one output
    tensor) against the same on the CPU in float64: max relative errors by name."""
    jac = ntkfunc.jacobian_fn(f, vmap_axes, implementation=impl, flat=True)
    got = jac(_to(x1, device), _to(params, device))
    ref = ntkfunc.jacobian_fn(f64, vmap_axes, implementation=impl, flat=True)(a64, p64)
    errs = {"jacobian_fn": max_rel_err(_to(got, "cpu"), ref)}
    if isinstance(got, torch.Tensor) and vmap_axes is not None:
        buf = torch.empty_like(got)
        back = jac(_to(x1, device), _to(params, device), out=buf)
        assert back is buf and buf.device.type == device.type
        errs["jacobian_fn_out"] = max_rel_err(buf.cpu(), ref)
    return errs


def gemm_rates(device: torch.device, small: bool) -> dict:
    n = 1024 if small else 8192
    out = {}
    for mode in ("float32", "tf32", "bf16"):
        _flags(mode if mode != "bf16" else "float32")
        dtype = torch.bfloat16 if mode == "bf16" else torch.float32
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)

        def mm(a=a, b=b, mode=mode):  # type: ignore[no-untyped-def]
            if mode == "bf16" and device.type == "cuda":
                return torch.mm(a, b, out_dtype=torch.float32)
            return a @ b

        try:
            mm()
            _sync(device)
            best = math.inf
            for _ in range(3):
                t0 = time.perf_counter()
                mm()
                _sync(device)
                best = min(best, time.perf_counter() - t0)
            out[mode] = 2.0 * n**3 / best
        except Exception as err:
            out[mode] = float("nan")
            out[mode + "_error"] = str(err)[:200]
    _flags("float32")
    return out


def passes(n1: int, n2: int, panel: int) -> float:
    """Rows computed for an ``n1 x n2`` kernel with panels of ``panel`` x1 rows: x1 once, x2 once per panel."""
    panel = max(1, panel)
    return n1 + math.ceil(n1 / panel) * n2 if panel < n1 else n1 + n2


def throughput(device: torch.device, clock: Clock, small: bool, rates: dict, devices: object = None) -> list[dict]:
    rows = []
    n = 64 if small else 4096
    configs = [("resnet18-32", False, 32), ("resnet18-224", True, 224)]
    for name, imagenet, hw in configs:
        torch.manual_seed(0)
        model = ResNet18(imagenet, width=8 if small else 64).eval().to(device)
        f, params = ntkfunc.from_module(model)
        p = sum(t.numel() for t in params.values())
        x = torch.randn(n, 3, hw if not small else min(hw, 64), hw if not small else min(hw, 64))
        for mode in ("float32", "tf32", "bf16"):
            if devices is not None and mode != "tf32":
                continue
            row: dict = {"model": name, "mode": mode, "N": n, "P": p, "devices": str(devices or device)}
            if clock.left() < (30 if small else 60):
                row["status"] = "skipped (time)"
                rows.append(row)
                continue
            _flags("tf32" if mode == "tf32" else "float32")
            try:
                row.update(_measured_run(f, params, x, p, device, devices, mode, rates))
            except Exception as err:
                row["status"] = f"ERROR {type(err).__name__}: {str(err)[:200]}"
                row["trace"] = traceback.format_exc()[-2000:]
            finally:
                _flags("float32")
            rows.append(row)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def _measured_run(f, params, x, p: int, device: torch.device, devices: object, mode: str, rates: dict) -> dict:  # type: ignore[no-untyped-def]
    """One timed ``kernel_matrix(f, params, x, None)``, with the rows' share of the time and the panels it had."""
    from ntkfunc._dataset import panels

    n = x.shape[0]
    seen: list = []
    rows_s = [0.0]
    init, fill = panels.RowPanels.__init__, panels.RowPanels._fill

    def spy(self, *a, **kw):  # type: ignore[no-untyped-def]
        init(self, *a, **kw)
        seen.append(self)

    def timed_fill(self, *a):  # type: ignore[no-untyped-def]
        _sync(self.device)
        t0 = time.perf_counter()
        r = fill(self, *a)
        _sync(self.device)  # the rows' share of the run (a sync per block: a little slower overall)
        rows_s[0] += time.perf_counter() - t0
        return r

    panels.RowPanels.__init__, panels.RowPanels._fill = spy, timed_fill
    try:
        ntkfunc.kernel_matrix(f, params, x[:8].to(device), None, progress=False)  # warm-up
        seen.clear()
        rows_s[0] = 0.0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        _sync(device)
        t0 = time.perf_counter()
        k = ntkfunc.kernel_matrix(f, params, x, None, progress=False, devices=devices,
                                  precision={"float32": "highest", "tf32": "tf32", "bf16": "bf16"}[mode])
        _sync(device)
        seconds = time.perf_counter() - t0
    finally:
        panels.RowPanels.__init__, panels.RowPanels._fill = init, fill
    assert bool(torch.isfinite(k).all())
    computed = sum(s.rows_computed for s in seen)
    pairs = n * (n + 1) / 2
    flops = 2.0 * pairs * p  # the exact kernel's Gram product, upper triangle
    sb = seen[0].source.sample_bytes()
    ratio = torch.empty((), dtype=seen[0].storage).element_size() / 4
    capacity = int(0.7 * parse_budget(None, device) / (sb.rows * ratio + sb.kept))  # rows a panel can hold
    per_row = rows_s[0] / max(computed, 1)
    per_pair = max(seconds - rows_s[0], 0.0) / pairs
    return {
        "status": "ok", "seconds": seconds, "entries_per_s": n * n / seconds, "gflop_per_s": flops / seconds / 1e9,
        "fraction_of_gemm": flops / seconds / rates.get(mode, float("nan")), "rows_computed": computed,
        "rows_seconds": rows_s[0], "panel_rows": max(s.panel_size for s in seen), "panel_capacity": capacity,
        "peak_gpu_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0,
        "extrapolated_60000x50000_s": passes(60000, 50000, capacity) * per_row + 60000 * 50000 * per_pair,
    }


def sketched(device: torch.device, clock: Clock, small: bool, rates: dict) -> dict:
    """Step 5: sketched features and kernel of the CIFAR ResNet-18 (TF32), with the 60,000 x 50,000 estimate."""
    n, k = (64, 256) if small else (4096, 8192)
    row: dict = {"model": "resnet18-32", "mode": "tf32", "N": n, "k": k}
    if clock.left() < (20 if small else 90):
        return {**row, "status": "skipped (time)"}
    torch.manual_seed(0)
    model = ResNet18(False, width=8 if small else 64).eval().to(device)
    f, params = ntkfunc.from_module(model)
    x = torch.randn(n, 3, 32, 32, device=device)
    _flags("tf32")
    try:
        sketch = ntkfunc.Sketch(k, seed=0)
        feats = ntkfunc.features_fn(f, sketch)
        feats(x[:8], params)  # warm-up
        _sync(device)
        t0 = time.perf_counter()
        phi = feats(x, params)
        _sync(device)
        feature_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        kern = ntkfunc.kernel_matrix(f, params, x, None, sketch=sketch, precision="tf32", progress=False)
        _sync(device)
        kernel_s = time.perf_counter() - t0
        assert bool(torch.isfinite(kern).all()) and phi.shape[0] == n
        per_sample = feature_s / n
        gemm = 2.0 * 60000 * 50000 * k / rates.get("tf32", float("nan"))
        row.update({"status": "ok", "features_s": feature_s, "features_ms_per_sample": 1e3 * per_sample, "kernel_s": kernel_s,
                    "estimate_60000x50000_s": 110000 * per_sample + gemm, "estimate_gemm_s": gemm})
    except Exception as err:
        row["status"] = f"ERROR {type(err).__name__}: {str(err)[:200]}"
        row["trace"] = traceback.format_exc()[-2000:]
    finally:
        _flags("float32")
    return row


def report(result: dict) -> str:
    lines = [f"# GPU check: {result['device_name']}", "", f"torch {result['torch']}, {result['seconds']:.0f} s", ""]
    lines += ["## Correctness (max relative error vs float64 CPU reference)", "",
              "| case | mode | impl | ntk_fn | kernel_matrix | kernel_matrix x2=None | jacobian_fn | jacobian_fn out= | status |",
              "|---|---|---|---|---|---|---|---|---|"]

    def fmt(v: object) -> str:
        return f"{v:.1e}" if isinstance(v, float) else "-"

    for r in result["correctness"]:
        lines.append(f"| {r['case']} | {r['mode']} | {r['impl']} | {fmt(r.get('ntk_fn'))} | {fmt(r.get('kernel_matrix'))} | "
                     f"{fmt(r.get('kernel_matrix_x2None'))} | {fmt(r.get('jacobian_fn'))} | {fmt(r.get('jacobian_fn_out'))} | {r['status']} |")
    g = result["gemm"]
    lines += ["", "## GEMM rates (TFLOP/s)", "", " | ".join(f"{k} {v / 1e12:.1f}" for k, v in g.items() if isinstance(v, float)), ""]
    lines += ["## kernel_matrix throughput (ResNet-18, one logit, x2=None)", "",
              "| model | mode | devices | N | time (s) | rows (s) | entries/s | GFLOP/s | of GEMM rate | rows computed | panel rows "
              "| peak GPU GB | 60k x 50k (min) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["throughput"]:
        if r.get("status") != "ok":
            lines.append(f"| {r['model']} | {r['mode']} | {r['devices']} | {r['N']} | {r.get('status')} | | | | | | | | |")
            continue
        lines.append(
            f"| {r['model']} | {r['mode']} | {r['devices']} | {r['N']} | {r['seconds']:.1f} | {r['rows_seconds']:.1f} | {r['entries_per_s']:.3g} | "
            f"{r['gflop_per_s']:.0f} | "
            f"{r['fraction_of_gemm']:.0%} | {r['rows_computed']} | {r['panel_rows']} | {r['peak_gpu_bytes'] / 1e9:.1f} | "
            f"{r['extrapolated_60000x50000_s'] / 60:.1f} |"
        )
    sk = result.get("sketched")
    if sk is not None:
        lines += ["", f"## Sketched kernel (ResNet-18 CIFAR, one logit, TF32, k = {sk['k']})", "",
                  "| N | features (s) | features (ms/sample) | kernel_matrix(sketch=) (s) | 60k x 50k estimate (min) | of which the product (min) | status |",
                  "|---|---|---|---|---|---|---|"]
        if sk.get("status") == "ok":
            lines.append(f"| {sk['N']} | {sk['features_s']:.1f} | {sk['features_ms_per_sample']:.3f} | {sk['kernel_s']:.1f} | "
                         f"{sk['estimate_60000x50000_s'] / 60:.1f} | {sk['estimate_gemm_s'] / 60:.1f} | ok |")
        else:
            lines.append(f"| {sk['N']} | | | | | | {sk.get('status')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="toy sizes (the CPU smoke run)")
    ap.add_argument("--seconds", type=float, default=420.0, help="time budget; later steps are skipped once spent")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: --device cuda but torch.cuda.is_available() is False; use --device cpu --small here")
    torch.manual_seed(0)
    clock = Clock(args.seconds)
    start = time.perf_counter()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result: dict = {"device_name": name, "torch": torch.__version__, "small": args.small}
    result["correctness"] = correctness(device, Clock(min(clock.left(), args.seconds * 0.3)), args.small)
    result["gemm"] = gemm_rates(device, args.small)
    result["throughput"] = throughput(device, clock, args.small, result["gemm"])
    if device.type == "cuda" and torch.cuda.device_count() > 1 and clock.left() > 60:
        result["throughput"] += throughput(device, clock, args.small, result["gemm"], devices="all")[:1]
    result["sketched"] = sketched(device, clock, args.small, result["gemm"])
    result["seconds"] = time.perf_counter() - start
    text = report(result)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(result, indent=1, default=str))
    (args.out / "gpu_check.md").write_text(text)
    bad = [r for r in result["correctness"] + [result["sketched"]] if r["status"] not in ("ok",) and not r["status"].startswith("skipped")]
    if bad:
        print(f"gpu_check: {len(bad)} correctness rows failed", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
