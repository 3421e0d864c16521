"""Sketched eNTKs (``kernel_matrix(..., sketch=Sketch(k))``): accuracy against the exact kernel, speed per phase and end to end.

Modes (each prints a markdown table and, with ``--write``, appends JSON rows):

- ``rates``: the cost-model constants of ``ntkfunc._engines.sketch.plan.RATES`` on this
  machine (float32 GEMM FLOP/s, scattered element traffic, real FFT of length k).
- ``phases``: per-sample rates on the CIFAR ResNet-18 with one logit (``bench_blocked.ResNet18``,
  random 3x32x32 data), measured on ``--chunk`` samples after a warm-up: the batched
  forward+backward (the floor), the **exact per-sample gradients** (full rows, as the exact
  ``kernel_matrix`` forms them), the **sketched features** (the same cotangent pass plus the
  projection, split into the two), and the float32 GEMM rate of the ``(N, k)`` feature
  products. From them, the estimated end-to-end time of an ``N x N`` sketched kernel:
  ``N t_features + N² k / GEMM rate`` (``x2=None`` computes the tiles on and above the
  diagonal: about ``N² k`` FLOP).
- ``speed``: ``kernel_matrix(f, params, x, None, sketch=Sketch(k), out=...)`` end to end for
  ``--n`` samples (features to ``.npy``, then the kernel to ``.npy``), the time of each stage,
  against the estimate of the same process's ``phases``.
- ``e2e``: a sketched kernel of a whole dataset end to end through the public API, out of core:
  ``feature_matrix(f, params, x, Sketch(k), out=<folder>/K.npy.features)`` on ``--feature-threads``
  threads, then ``kernel_matrix(f, params, x, None, sketch=Sketch(k), features=<that folder>,
  out=<folder>/K.npy)`` on ``--threads`` (it finds the features), on ``--n`` random CIFAR-shaped
  images (3x32x32) through ``cifar_cnn()`` (four 3x3 convolutions, 32-256 channels, one logit:
  388,673 parameters), then ``verify_kernel``. Prints the phase table (features, Gram
  products, writes and ``fsync`` of the tiles in the background thread, finishing, verify), the
  load average and the peak RSS. ``--kill-at F``: first runs the same call in a child process and
  kills it (SIGKILL) once a fraction ``F`` of the kernel's tiles are committed, then runs it again
  here and reports how many feature chunks and tiles that run computed (the others were resumed).
  The output folder is removed afterwards unless ``--keep``.
- ``ratio``: sketched features against a batched forward+backward of the same samples (ResNet-18,
  one logit, ``Sketch(8192)``), thread CPU time of one thread in one process, this package against
  ``--baseline`` (an earlier export) in alternating fresh processes, medians of ``--rounds``.
- ``accuracy``: the exact kernel (``kernel_matrix``, float32, implementation ``"auto"``) against
  the sketched one at ``k``, on ``--model digits`` (the 284k-parameter digits CNN of
  ``bench_blocked``: ``--n`` training images against themselves and the rest of the 1,797
  images as a test set, for kernel regression) or ``--model resnet`` (``--n`` random images):
  relative Frobenius error, top-10 eigenvalue errors, the error estimate
  (``Sketch.error_estimate``), and for the digits the test accuracy of kernel regression
  (``predict.gradient_descent_mse``, ``t = ∞``) with either kernel.
- ``kinds``: every ``Sketch`` kind at the same ``k`` on small CNNs (traced outputs, the default
  kernel): the relative Frobenius error against the exact float64 kernel, mean and spread over
  ``--seeds`` sketches, its ratio to the Gaussian projection's, and the features' time per sample.
  CNNs: the digits CNN, a CIFAR-like CNN whose last layer reads ``k`` features, one whose last
  layer reads ``2 k`` (rows wider than ``k``).

    python benchmarks/bench_sketch.py rates
    python benchmarks/bench_sketch.py phases --n 10000 50000
    python benchmarks/bench_sketch.py speed --n 10000
    python benchmarks/bench_sketch.py ratio --baseline /tmp/base --rounds 3
    python benchmarks/bench_sketch.py e2e --n 5000 --kill-at 0.4 --folder /var/tmp
    python benchmarks/bench_sketch.py e2e --n 50000 --folder /var/tmp
    python benchmarks/bench_sketch.py accuracy --model digits --n 1000
    python benchmarks/bench_sketch.py accuracy --model resnet --n 500
    python benchmarks/bench_sketch.py kinds --dim 2048 --n 64 --seeds 6
    python benchmarks/bench_sketch.py phases --small --chunk 8 --n 100    # seconds: a smoke run
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_blocked import ResNet18, digits_cnn  # noqa: E402

import ntkfunc  # noqa: E402
from ntkfunc import predict  # noqa: E402
from ntkfunc._core.problem import make_problem  # noqa: E402
from ntkfunc._engines.rows import StructuredRows  # noqa: E402
from ntkfunc._engines.rows import projected as sketch_rows  # noqa: E402


def _timed(fn) -> float:  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def resnet(small: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    if small:  # a small stand-in for smoke runs
        return torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
            torch.nn.Conv2d(8, 16, 3, stride=2, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 1),
        ).eval()
    return ResNet18(classes=1).eval()


# --- rates ------------------------------------------------------------------------------------


def rates(dim: int) -> dict:
    """GEMM FLOP/s (float32, 2048 x 2048 x 2048), element traffic (index_add of 16 M scattered floats), rfft of length dim."""
    a = torch.randn(2048, 2048)
    a @ a
    gemm = min(_timed(lambda: a @ a) for _ in range(3))
    src, idx = torch.randn(1 << 24), torch.randint(0, dim, (1 << 24,))
    out = torch.zeros(dim)
    out.index_add_(0, idx, src)
    scatter = min(_timed(lambda: out.index_add_(0, idx, src)) for _ in range(3))
    v = torch.randn(256, dim)
    torch.fft.rfft(v)
    fft = min(_timed(lambda: torch.fft.rfft(v)) for _ in range(3)) / 256
    return {"mode": "rates", "gemm_flop_per_s": 2 * 2048 ** 3 / gemm, "element_s": scatter / (3 << 24),
            "fft_s": fft, "fft_unit_s": fft / (dim * math.log2(dim)), "dim": dim}


# --- phases -----------------------------------------------------------------------------------


def phases(small: bool, dim: int, chunk: int, kind: str) -> dict:
    """Per-sample seconds of each phase on ``chunk`` random CIFAR images (after a warm-up on another chunk)."""
    model = resnet(small)
    f, params = ntkfunc.from_module(model)
    n_params = sum(v.numel() for v in params.values())
    x = torch.randn(2 * chunk, 3, 32, 32)
    warm, meas = x[:chunk], x[chunk:]

    model.zero_grad(set_to_none=True)
    model(warm).sum().backward()
    model.zero_grad(set_to_none=True)
    fwd_bwd = _timed(lambda: model(meas).sum().backward()) / chunk
    model.zero_grad(set_to_none=True)

    pb = make_problem(f, warm[:1], None, params, 0, (), ())
    exact = StructuredRows(pb, routes="rows")
    buf = torch.empty(chunk, 1, exact.slots.width)
    exact.compute([warm], buf, chunk)
    t_exact = _timed(lambda: exact.compute([meas], buf, chunk)) / chunk


    side_s = collections.defaultdict(float)
    orig_side = sketch_rows.structured.side

    def side(*a, **k):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        try:
            return orig_side(*a, **k)
        finally:
            side_s["side"] += time.perf_counter() - t0

    src = sketch_rows.ProjectedRows(pb, kind, dim, 0, True)
    feats = torch.empty(chunk, 1, dim)
    src.compute([warm], feats, chunk)
    sketch_rows.structured.side = side
    try:
        t_feat = _timed(lambda: src.compute([meas], feats, chunk)) / chunk
    finally:
        sketch_rows.structured.side = orig_side
    t_side = side_s["side"] / chunk

    g = torch.randn(2048, dim)
    g @ g.T
    gemm = min(_timed(lambda: g @ g.T) for _ in range(2))
    return {
        "mode": "phases", "model": "small" if small else "ResNet18(classes=1)", "P": n_params, "dim": dim, "kind": kind,
        "chunk": chunk, "threads": torch.get_num_threads(), "fwd_bwd_s": fwd_bwd, "exact_rows_s": t_exact,
        "features_s": t_feat, "cotangent_pass_s": t_side, "projection_s": t_feat - t_side,
        "gemm_flop_per_s": 2.0 * 2048 * 2048 * dim / gemm, "plan": str(src.plan),
    }


def estimate(ph: dict, n: int) -> dict:
    """Estimated seconds of an ``n x n`` sketched kernel from the phase rates."""
    feat = n * ph["features_s"]
    gemm = n * n * ph["dim"] / ph["gemm_flop_per_s"]
    return {"n": n, "features_s": feat, "gemm_s": gemm, "total_s": feat + gemm}


# --- speed ------------------------------------------------------------------------------------


def speed(n: int, small: bool, dim: int, kind: str, folder: Path) -> dict:
    """``kernel_matrix(..., sketch=)`` end to end on ``n`` random images, to ``.npy`` files in ``folder``."""
    from ntkfunc._dataset import features as featuring

    model = resnet(small)
    f, params = ntkfunc.from_module(model)
    x = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    stage = {}
    orig_compute, orig_estimate = featuring.compute, featuring.estimate

    def compute(*a, **k):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        try:
            return orig_compute(*a, **k)
        finally:
            stage["features_s"] = time.perf_counter() - t0

    def est(*a, **k):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        try:
            return orig_estimate(*a, **k)
        finally:
            stage["error_estimate_s"] = time.perf_counter() - t0

    featuring.compute, featuring.estimate = compute, est
    try:
        out = folder / f"K{n}.npy"
        t0 = time.perf_counter()
        k = ntkfunc.kernel_matrix(f, params, x, None, sketch=ntkfunc.Sketch(dim, kind=kind), out=str(out),
                                  progress=sys.stderr.isatty())
        total = time.perf_counter() - t0
    finally:
        featuring.compute, featuring.estimate = orig_compute, orig_estimate
    manifest = json.loads(Path(str(out) + ".manifest.json").read_text())
    run = manifest.get("sketch_run", {})
    return {"mode": "speed", "n": n, "dim": dim, "kind": kind, "total_s": total, **stage,
            "kernel_s": total - stage.get("features_s", 0.0), "shape": list(k.shape),
            "error_estimate": run.get("error_estimate", {}).get("relative_frobenius"), "peak_rss_gb": _rss_gb()}


def _rss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


# --- features against a forward+backward, CPU time --------------------------------------------------

_RATIO = """
import json, statistics, sys, time
import torch
sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[1] + "/benchmarks")
torch.set_num_threads(1)
from bench_blocked import ResNet18
import ntkfunc
from ntkfunc._core.problem import make_problem
from ntkfunc._engines.rows.projected import ProjectedRows
torch.manual_seed(0)
model = ResNet18(classes=1).eval()
f, params = ntkfunc.from_module(model)
x = torch.randn(64, 3, 32, 32)
src = ProjectedRows(make_problem(f, x[:1], None, params, 0, (), ()), "auto", 8192, 0, True)
out = torch.empty(32, 1, 8192)
src.compute([x[:32]], out, 32)
for p in model.parameters():
    p.requires_grad_(True)
model(x[:32]).sum().backward()
fb, fe = [], []
for _ in range(3):
    t0 = time.thread_time(); model.zero_grad(); model(x[32:]).sum().backward(); fb.append(time.thread_time() - t0)
    t0 = time.thread_time(); src.compute([x[32:]], out, 32); fe.append(time.thread_time() - t0)
print(json.dumps({"fwd_bwd_ms": 1e3 * statistics.median(fb) / 32, "features_ms": 1e3 * statistics.median(fe) / 32,
                  "checksum": float(out.double().abs().sum())}))
"""


def ratio(baseline: Path | None, rounds: int) -> list[dict]:
    """ResNet-18 (one logit): ``model(x).sum().backward()`` and ``ProjectedRows.compute`` (``Sketch(8192)``) on the same 32
    samples in one process, thread CPU time, one thread, median of 3 calls; this package and ``baseline`` (an export of an
    earlier commit) alternating in fresh processes, ``rounds`` times."""
    import subprocess

    packages = [("this", ROOT)] + ([("baseline", baseline)] if baseline else [])
    runs: dict[str, list[dict]] = {name: [] for name, _ in packages}
    for _ in range(rounds):
        for name, root in packages:
            done = subprocess.run([sys.executable, "-c", _RATIO, str(root)], capture_output=True, text=True, check=True)
            runs[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
    rows = []
    for name, rs in runs.items():
        med = {k: sorted(r[k] for r in rs)[len(rs) // 2] for k in ("fwd_bwd_ms", "features_ms")}
        rows.append({"mode": "ratio", "package": name, **med, "ratio": med["features_ms"] / med["fwd_bwd_ms"],
                     "checksum": rs[0]["checksum"], "rounds": rs})
    return rows


# --- e2e ------------------------------------------------------------------------------------------


def cifar_cnn() -> torch.nn.Module:
    """A CIFAR-shaped CNN with one logit (3x32x32 inputs; 388,673 parameters; about 30 MFLOP per forward)."""
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(128, 256, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, 1),
    ).eval()


def e2e_data(n: int) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _e2e_call(n: int, dim: int, kind: str, out: Path, progress: bool, threads: tuple[int, int],
              wall: dict[str, float] | None = None) -> torch.Tensor:
    """``feature_matrix(out=<out>.features)`` on ``threads[0]`` threads, then ``kernel_matrix(sketch=, features=, out=)``
    (which finds those features) on ``threads[1]``."""
    f, params = ntkfunc.from_module(cifar_cnn())
    x, sketch, folder = e2e_data(n), ntkfunc.Sketch(dim, kind=kind), str(out) + ".features"
    torch.set_num_threads(threads[0])
    t0 = time.perf_counter()
    ntkfunc.feature_matrix(f, params, x, sketch, out=folder, progress=progress)
    if wall is not None:
        wall["feature_matrix"] = time.perf_counter() - t0
        print(f"[{wall['feature_matrix']:.0f} s] feature_matrix done", file=sys.stderr, flush=True)
    torch.set_num_threads(threads[1])
    return ntkfunc.kernel_matrix(f, params, x, None, sketch=sketch, features=folder, out=str(out), progress=progress)


def e2e_run(n: int, dim: int, kind: str, out: Path, threads: tuple[int, int]) -> dict:
    """:func:`_e2e_call` in this process with every phase timed (wall seconds), then ``verify_kernel``."""
    from ntkfunc._dataset import features as featuring
    from ntkfunc._dataset import runner

    wall: dict[str, float] = collections.defaultdict(float)
    count: dict[str, int] = collections.defaultdict(int)
    patched = []

    def timed(owner, name: str, label) -> None:  # type: ignore[no-untyped-def]
        orig = getattr(owner, name)

        def call(*a, **k):  # type: ignore[no-untyped-def]
            key, units = label(a)
            t0 = time.perf_counter()
            try:
                return orig(*a, **k)
            finally:
                wall[key] += time.perf_counter() - t0
                count[key] += units
                if key == "Gram" and count[key] % 25 == 0:  # a trace, should the run be cut off
                    print(f"[{time.perf_counter() - start:.0f} s] {key}: {count[key] or ''} in {wall[key]:.0f} s", file=sys.stderr, flush=True)

        patched.append((owner, name, orig))
        setattr(owner, name, call)

    timed(featuring, "compute", lambda a: ("features found", 0))
    timed(featuring, "estimate", lambda a: ("error estimate", 0))
    timed(featuring.Chunks, "compute", lambda a: ("feature chunks", len(a[2])))
    timed(runner.Tiles, "compute", lambda a: ("Gram", len(a[2])))
    timed(runner.Runner, "commit", lambda a: ("writes: tiles" if isinstance(a[0].work, runner.Tiles) else "writes: feature chunks", 1))
    sampler = MemorySampler()
    load0 = os.getloadavg()
    cpu0 = time.process_time()
    t0 = start = time.perf_counter()
    try:
        k = _e2e_call(n, dim, kind, out, sys.stderr.isatty(), threads, wall)
    finally:
        for owner, name, orig in reversed(patched):
            setattr(owner, name, orig)
    total = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    load1 = os.getloadavg()
    t1 = time.perf_counter()
    report = ntkfunc.verify_kernel(out)
    verify = time.perf_counter() - t1
    memory = sampler.close()
    chunks = json.loads(Path(str(out) + ".manifest.json").read_text()).get("sketch_run", {})
    return {"mode": "e2e", "n": n, "dim": dim, "kind": kind, "model": "cifar_cnn", "P": 388673, "shape": list(k.shape),
            "total_s": total, "cpu_s": cpu, "verify_s": verify, "verified_tiles": report.tiles,
            "phases_s": dict(wall), "units": dict(count), "kernel_bytes": k.numel() * k.element_size(),
            "features_bytes": n * dim * 4, "load_before": load0, "load_after": load1, "peak_rss_gb": _rss_gb(), **memory,
            "feature_threads": threads[0], "gram_threads": threads[1],
            "error_estimate": chunks.get("error_estimate", {}).get("relative_frobenius")}


class MemorySampler:
    """Largest anonymous and file-backed resident memory of this process (``RssAnon``, ``RssFile`` of
    ``/proc/self/status``, sampled every ``every`` seconds in a thread): the kernel's memory map counts in the
    peak RSS once the finished file is read, the process's own memory is the anonymous part."""

    def __init__(self, every: float = 0.5) -> None:
        import threading

        self.peak = {"RssAnon": 0, "RssFile": 0}
        self.every, self.stop = every, threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.stop.is_set():
            try:
                for line in Path("/proc/self/status").read_text().splitlines():
                    key, _, value = line.partition(":")
                    if key in self.peak:
                        self.peak[key] = max(self.peak[key], int(value.split()[0]) * 1024)
            except OSError:  # not Linux
                return
            self.stop.wait(self.every)

    def close(self) -> dict[str, float]:
        self.stop.set()
        self.thread.join()
        return {"peak_anon_gb": self.peak["RssAnon"] / 2 ** 30, "peak_file_gb": self.peak["RssFile"] / 2 ** 30}


def _markers(folder: Path) -> int:
    return len(list(folder.iterdir())) if folder.is_dir() else 0


def e2e_kill(n: int, dim: int, kind: str, out: Path, fraction: float, threads: tuple[int, int]) -> dict:
    """Run the call in a child process and SIGKILL it once ``fraction`` of the kernel's tiles are committed."""
    import signal
    import subprocess

    child = subprocess.Popen([sys.executable, __file__, "e2e-child", "--n", str(n), "--dim", str(dim), "--kind", kind,
                              "--feature-threads", str(threads[0]), "--threads", str(threads[1]), "--out", str(out)])
    tiles = Path(str(out) + ".tiles")
    total = None
    t0 = time.perf_counter()
    try:
        while child.poll() is None:
            time.sleep(0.02)
            manifest = Path(str(out) + ".manifest.json")
            if total is None and manifest.exists():
                from ntkfunc._dataset.fileformat import unit_keys

                m = json.loads(manifest.read_text())
                total = len(unit_keys(m["grid"], tuple(m["shape"])))
            if total and _markers(tiles) >= fraction * total:
                child.send_signal(signal.SIGKILL)
                child.wait()
                break
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    return {"killed_after_s": time.perf_counter() - t0, "tiles_committed_at_kill": _markers(tiles), "tiles_total": total,
            "returncode": child.returncode}


def e2e_markdown(row: dict) -> str:
    ph, units = row["phases_s"], row["units"]
    lines = [f"N = {row['n']:,}, k = {row['dim']} ({row['kind']}), {row['model']} ({row['P']:,} parameters, one logit), "
             f"{row['feature_threads']} thread(s) for the features, {row['gram_threads']} for the kernel; "
             f"kernel {row['kernel_bytes'] / 1e9:.2f} GB float32, features {row['features_bytes'] / 1e9:.2f} GB",
             "", "| phase | wall | units |", "|---|---|---|"]
    order = ["feature_matrix", "feature chunks", "writes: feature chunks", "features found", "error estimate", "Gram", "writes: tiles"]
    names = {"feature_matrix": "features: `feature_matrix(out=)`", "feature chunks": "  of which computing chunks",
             "writes: feature chunks": "  of which writes of chunks (background thread)",
             "features found": "kernel_matrix: its features file found and checked, error estimate", "error estimate": "  of which the error estimate",
             "Gram": "kernel_matrix: Gram products (tiles)", "writes: tiles": "kernel_matrix: writes + fsync of tiles (background thread, overlaps the Gram)"}
    for key in order:
        if key in ph:
            lines.append(f"| {names[key]} | {_s(ph[key])} | {units.get(key, '') or ''} |")
    rest = row["total_s"] - ph.get("feature_matrix", 0.0) - ph.get("features found", 0.0) - ph.get("Gram", 0.0)
    lines.append(f"| kernel_matrix: the rest (plan, rates measured, waits for writes, finishing) | {_s(rest)} | |")
    lines.append(f"| **features + kernel total** | **{_s(row['total_s'])}** (CPU {_s(row['cpu_s'])}) | |")
    lines.append(f"| verify_kernel (every tile's checksum) | {_s(row['verify_s'])} | {row['verified_tiles']} tiles, all match |")
    lines.append(f"| **end to end** | **{_s(row['total_s'] + row['verify_s'])}** | |")
    lines += ["", f"load average before {', '.join(f'{v:.1f}' for v in row['load_before'])}; after "
              f"{', '.join(f'{v:.1f}' for v in row['load_after'])}; peak RSS {row['peak_rss_gb']:.2f} GB "
              f"(sampled: anonymous {row.get('peak_anon_gb', float('nan')):.2f} GB, file-backed {row.get('peak_file_gb', float('nan')):.2f} GB); "
              f"estimated relative error {row['error_estimate']:.3g}"]
    if "resume" in row:
        r = row["resume"]
        how = "killed (SIGKILL)" if r["returncode"] == -9 else f"ended with return code {r['returncode']}"
        lines.append(f"resume: a first run {how} after {_s(r['killed_after_s'])} with {r['tiles_committed_at_kill']} of "
                     f"{r['tiles_total']} tiles committed; this run computed {units.get('feature chunks', 0)} feature chunks and "
                     f"{units.get('Gram', 0)} tiles")
    return "\n".join(lines)


# --- accuracy ---------------------------------------------------------------------------------


def accuracy(model_name: str, n: int, dim: int, kind: str, seeds: int) -> dict:
    """Exact vs sketched kernel at ``dim``: Frobenius and top-10 eigenvalue errors; kernel regression on the digits."""
    if model_name == "digits":
        from ntkfunc.datasets import load_digits

        torch.manual_seed(0)
        model = digits_cnn()
        images, labels = load_digits(torch.float32)
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
        x = images[order].reshape(-1, 1, 8, 8)
        x = (x - x[:n].mean()) / x[:n].std()
        y = labels[order]
        x_rows, n_test = x, len(x) - n
    else:
        model = resnet(False)
        x_rows = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(2))
        n_test = 0
    f, params = ntkfunc.from_module(model)
    x_tr = x_rows[:n]
    t0 = time.perf_counter()
    exact = ntkfunc.kernel_matrix(f, params, x_rows, x_tr, progress=sys.stderr.isatty()).double()
    t_exact = time.perf_counter() - t0
    k_tr = exact[:n]
    eig = torch.linalg.eigvalsh(k_tr).flip(0)[:10]
    row = {"mode": "accuracy", "model": model_name, "P": sum(v.numel() for v in params.values()), "n": n,
           "n_test": n_test, "dim": dim, "kind": kind, "exact_s": t_exact, "seeds": []}
    if n_test:
        row["accuracy_exact"] = _regression(k_tr, exact[n:], y[:n], y[n:])
    for seed in range(seeds):
        sketch = ntkfunc.Sketch(dim, seed=seed, kind=kind)
        t0 = time.perf_counter()
        feats = ntkfunc.features_fn(f, sketch)(x_rows, params)
        t_feat = time.perf_counter() - t0
        o = feats.shape[1]
        kh = (torch.einsum("aod,bod->ab", feats, feats[:n]) / o).double()
        kh_tr = kh[:n]
        eh = torch.linalg.eigvalsh(kh_tr).flip(0)[:10]
        res = {"seed": seed, "features_s": t_feat, "frobenius": float((kh_tr - k_tr).norm() / k_tr.norm()),
               "estimate": sketch.error_estimate(feats[:n]).relative,
               "eig_rel_err": ((eh - eig).abs() / eig).tolist()}
        if n_test:
            res["accuracy"] = _regression(kh_tr, kh[n:], y[:n], y[n:])
        row["seeds"].append(res)
    row["top10_eigenvalues"] = eig.tolist()
    return row


def kind_models(dim: int) -> dict:
    """``name -> (model, inputs)`` for ``kinds``: small CNNs with 10 logits."""
    from torch import nn

    from ntkfunc.datasets import load_digits

    images = load_digits(torch.float32)[0]
    digits = (images - images.mean()) / images.std()

    def cifar(channels: int) -> nn.Module:  # 3x16x16 inputs; the last layer reads channels * 64 features
        return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, channels, 3, stride=2, padding=1), nn.ReLU(),
                             nn.Flatten(), nn.Linear(channels * 64, 10))

    torch.manual_seed(0)
    return {"digits CNN": (digits_cnn().eval(), digits), f"CNN, last layer {dim} wide": (cifar(dim // 64).eval(), None),
            f"CNN, last layer {2 * dim} wide": (cifar(2 * dim // 64).eval(), None)}


def kinds(n: int, dim: int, names: list[str], seeds: int) -> list[dict]:
    """Each kind's error at ``dim`` against the exact kernel (float64), traced over the 10 logits."""
    rows = []
    for model_name, (model, data) in kind_models(dim).items():
        x = data[:n] if data is not None else torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(1))
        f, params = ntkfunc.from_module(model)
        f64, p64 = ntkfunc.from_module(model.double())
        exact = ntkfunc.ntk_fn(f64)(x.double(), None, p64)
        model.float()
        plan = str(ntkfunc.Sketch(dim).explain(f, params, x[:2]))
        for kind in names:
            errs, times = [], []
            for seed in range(seeds):
                feats = ntkfunc.features_fn(f, ntkfunc.Sketch(dim, seed=seed, kind=kind))
                feats(x[:2], params)  # tables drawn (and kept) outside the timing, as a second call finds them
                t0 = time.perf_counter()
                phi = feats(x, params).double()
                times.append(time.perf_counter() - t0)
                k_hat = torch.einsum("aod,bod->ab", phi, phi) / phi.shape[1]
                errs.append(float((k_hat - exact).norm() / exact.norm()))
            mean = sum(errs) / len(errs)
            std = (sum((e - mean) ** 2 for e in errs) / max(len(errs) - 1, 1)) ** 0.5
            rows.append({"mode": "kinds", "model": model_name, "P": sum(v.numel() for v in params.values()), "n": n, "dim": dim,
                         "kind": kind, "errors": errs, "error": mean, "error_std": std, "features_ms_per_sample": 1e3 * min(times) / n,
                         "plan": plan})
        gauss = next((r["error"] for r in rows if r["model"] == model_name and r["kind"] == "gaussian"), None)
        for r in rows:
            if r["model"] == model_name and gauss:
                r["vs_gaussian"] = r["error"] / gauss
    return rows


def kinds_markdown(rows: list[dict]) -> str:
    lines = ["| model | parameters | kind | relative error (mean ± std over seeds) | / Gaussian's | features ms/sample |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['vs_gaussian']:.2f}" if "vs_gaussian" in r else "-"
        lines.append(f"| {r['model']} | {r['P']:,} | {r['kind']} | {r['error']:.4f} ± {r['error_std']:.4f} | {ratio} | "
                     f"{r['features_ms_per_sample']:.3f} |")
    return "\n".join(lines)


def _regression(k_tr: torch.Tensor, k_te: torch.Tensor, y_tr: torch.Tensor, y_te: torch.Tensor) -> float:
    t = torch.nn.functional.one_hot(y_tr, 10).double() - 0.1
    fx = predict.gradient_descent_mse(k_tr, t, diag_reg=1e-4)(None, None, torch.zeros(len(y_te), 10, dtype=torch.float64), k_te)
    return float((fx.argmax(-1) == y_te).double().mean())


# --- output -----------------------------------------------------------------------------------


def _s(s: float) -> str:
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"


def markdown(row: dict, estimates: list[dict]) -> str:
    m = row["mode"]
    if m == "rates":
        return (f"GEMM {row['gemm_flop_per_s'] / 1e9:.0f} GFLOP/s, {row['element_s'] * 1e9:.2f} ns per scattered element, "
                f"rfft({row['dim']}) {row['fft_s'] * 1e6:.1f} us ({row['fft_unit_s'] * 1e12:.0f} ps per n log2 n)")
    if m == "phases":
        lines = [f"{row['model']} ({row['P']:,} parameters), k = {row['dim']}, kind={row['kind']!r}, chunk {row['chunk']}, "
                 f"{row['threads']} threads", "",
                 "| phase | ms/sample |", "|---|---|"]
        for key, name in (("fwd_bwd_s", "batched forward+backward (floor)"), ("exact_rows_s", "exact per-sample gradients (full rows)"),
                          ("features_s", "sketched features (total)"), ("cotangent_pass_s", "  of which the cotangent pass"),
                          ("projection_s", "  of which the projection")):
            lines.append(f"| {name} | {1e3 * row[key]:.1f} |")
        lines += ["", f"sketched features / exact per-sample gradients: {row['features_s'] / row['exact_rows_s']:.2f}; "
                  f"feature GEMM {row['gemm_flop_per_s'] / 1e9:.0f} GFLOP/s", ""]
        lines += ["| N x N | features | GEMM | estimated total |", "|---|---|---|---|"]
        lines += [f"| {e['n']:,} | {_s(e['features_s'])} | {_s(e['gemm_s'])} | {_s(e['total_s'])} |" for e in estimates]
        return "\n".join(lines)
    if m == "speed":
        return (f"N = {row['n']:,}, k = {row['dim']}: total {_s(row['total_s'])} (features {_s(row.get('features_s', 0))}, "
                f"of which error estimate {_s(row.get('error_estimate_s', 0))}; kernel {_s(row['kernel_s'])}), "
                f"peak RSS {row['peak_rss_gb']:.1f} GB, estimated relative error {row['error_estimate']:.3g}")
    seeds = row["seeds"]
    mean = lambda key: sum(s[key] for s in seeds) / len(seeds)  # noqa: E731
    eig = [sum(s["eig_rel_err"][i] for s in seeds) / len(seeds) for i in range(10)]
    out = (f"{row['model']} ({row['P']:,} parameters), N = {row['n']}, k = {row['dim']}, kind={row['kind']!r}, "
           f"{len(seeds)} seeds: relative Frobenius error {mean('frobenius'):.4f} (estimate {mean('estimate'):.4f}); "
           f"top-10 eigenvalue relative errors {', '.join(f'{e:.4f}' for e in eig)}; exact {_s(row['exact_s'])}, "
           f"features {_s(mean('features_s'))}")
    if "accuracy_exact" in row:
        out += (f"; kernel regression test accuracy ({row['n_test']} images) exact {row['accuracy_exact']:.4f}, "
                f"sketched {', '.join(format(s['accuracy'], '.4f') for s in seeds)}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=["rates", "phases", "speed", "accuracy", "kinds", "e2e", "e2e-child", "ratio"])
    p.add_argument("--n", type=int, nargs="+", default=[10000], help="N (phases: the N x N kernels to estimate)")
    p.add_argument("--dim", type=int, default=8192)
    p.add_argument("--kind", default="auto", help="the sketch's kind (kinds: a comma-separated list; default all)")
    p.add_argument("--chunk", type=int, default=32, help="phases: samples per measured chunk")
    p.add_argument("--model", choices=["digits", "resnet"], default="digits")
    p.add_argument("--seeds", type=int, default=2, help="accuracy: sketches per model")
    p.add_argument("--small", action="store_true", help="a small CNN instead of ResNet-18 (smoke runs)")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads (e2e: of the kernel stage)")
    p.add_argument("--folder", type=Path, default=None, help="speed: where the .npy files go (default: a temporary folder)")
    p.add_argument("--baseline", type=Path, default=None, help="ratio: a directory holding an earlier ntkfunc package")
    p.add_argument("--rounds", type=int, default=3, help="ratio: rounds of alternating processes")
    p.add_argument("--feature-threads", type=int, default=1,
                   help="e2e: threads of feature_matrix (small gradient passes: a second thread on a shared machine only spins)")
    p.add_argument("--kill-at", type=float, default=None, help="e2e: kill a first run once this fraction of tiles is in")
    p.add_argument("--keep", action="store_true", help="e2e: keep the output folder")
    p.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)  # e2e-child: the output file
    p.add_argument("--write", type=Path, default=None, help="append the JSON rows to this file")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    rows: list[dict] = []
    if a.mode == "rates":
        rows.append(rates(a.dim))
        print(markdown(rows[0], []))
    elif a.mode == "phases":
        ph = phases(a.small, a.dim, a.chunk, a.kind)
        ph["estimates"] = [estimate(ph, n) for n in a.n]
        rows.append(ph)
        print(ph["plan"])
        print(markdown(ph, ph["estimates"]))
    elif a.mode == "speed":
        ph = phases(a.small, a.dim, a.chunk, a.kind)
        rows.append(ph)
        print(markdown(ph, [estimate(ph, n) for n in a.n]))
        with tempfile.TemporaryDirectory(dir=a.folder) as tmp:
            for n in a.n:
                r = speed(n, a.small, a.dim, a.kind, Path(tmp))
                r["estimated_s"] = estimate(ph, n)["total_s"]
                rows.append(r)
                print(markdown(r, []) + f"; estimated {_s(r['estimated_s'])}", flush=True)
    elif a.mode == "ratio":
        rows = ratio(a.baseline, a.rounds)
        print("| package | forward+backward (ms/sample) | features (ms/sample) | features / forward+backward | checksum |")
        print("|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['package']} | {r['fwd_bwd_ms']:.1f} | {r['features_ms']:.1f} | {r['ratio']:.2f} | {r['checksum']:.6g} |")
    elif a.mode == "e2e-child":
        _e2e_call(a.n[0], a.dim, a.kind, a.out, False, (a.feature_threads, a.threads))
    elif a.mode == "e2e":
        import shutil

        folder = Path(tempfile.mkdtemp(prefix="sketch-e2e-", dir=a.folder))
        try:
            out = folder / "K.npy"
            threads = (a.feature_threads, a.threads)
            resume = e2e_kill(a.n[0], a.dim, a.kind, out, a.kill_at, threads) if a.kill_at is not None else None
            r = e2e_run(a.n[0], a.dim, a.kind, out, threads)
            if resume is not None:
                r["resume"] = resume
            rows.append(r)
            print(e2e_markdown(r), flush=True)
        finally:
            if a.keep:
                print(f"kept {folder}")
            else:
                shutil.rmtree(folder, ignore_errors=True)
    elif a.mode == "kinds":
        names = ["auto", "countsketch", "tensorsketch", "gaussian"] if a.kind == "auto" else a.kind.split(",")
        rows = kinds(a.n[0], a.dim, names, a.seeds)
        for plan in dict.fromkeys(r["plan"] for r in rows):
            print(plan)
        print(kinds_markdown(rows))
    else:
        for n in a.n:
            rows.append(accuracy(a.model, n, a.dim, a.kind, a.seeds))
            print(markdown(rows[-1], []), flush=True)
    if a.write:
        with a.write.open("a") as fh:
            for r in rows:
                fh.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
