"""ntkfunc vs neural-tangents (JAX): empirical NTK implementations 1, 2, 3 in one run.

For every setup the PyTorch model is built once (seeded), its weights and the inputs are
written to an ``.npz``, and both libraries compute the same kernel from those arrays:

- neural-tangents 0.6.5: ``jax.jit(nt.empirical_ntk_fn(apply_fn, trace_axes, vmap_axes=0,
  implementation=i))`` on a JAX twin of the model (``benchmarks/nt_side.py``), run by the
  python of a separate JAX environment (``--nt-python``, made by ``benchmarks/nt_setup.sh``);
- ntkfunc: ``ntkfunc.ntk_fn(f, trace_axes, implementation=i)`` with
  ``f, params = ntkfunc.from_module(model)`` (public API only), in a worker of this python.

Each measurement: one warm-up call (for NT: trace + XLA compile + run; its kernel is kept
for the agreement check), then up to ``--reps`` timed calls (NT with
``block_until_ready``), stopping once ``--rep-seconds`` have been spent timing; the cell
is their median. The two sides alternate per implementation (NT 1, ntkfunc 1, NT 2, ...,
ntkfunc auto) in two long-lived worker processes, so they see similar machine load and
neither runs while the other is timed. A measurement still running after ``--timeout``
seconds is killed (its worker is restarted) and reported as ``> T s``, or, when the
warm-up call had finished, as that first call's time marked ``†``.

Threads: both workers are pinned to the same ``--threads`` CPUs (``sched_setaffinity``)
and get ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` = ``--threads``; ntkfunc calls
``torch.set_num_threads``; XLA sizes its CPU intra-op (Eigen) pool from ``NPROC`` (set
to ``--threads``; ``--xla_cpu_multi_thread_eigen`` stays at its default, true, so XLA
uses those threads as torch does). ``--xla-flags`` passes extra ``XLA_FLAGS``.

Machine load: the machine is shared, and torch's OpenMP threads slow down far more than
XLA's thread pool when other processes compete for the 2 cores (ntkfunc 3 on mlp512 went
from 0.015 s to 0.29 s under a concurrent pytest while NT 3 went from 0.012 s to 0.03 s).
Before each measurement the driver waits up to ``--wait-quiet`` seconds until other
processes use under ``--busy`` cores (``/proc/stat``); each worker reports the CPU used by
other processes (and stolen by the hypervisor) during its timed calls; a disturbed cell is
re-measured (``--retries``, when it took under ``--retry-under`` s) and otherwise marked ``‡``.

Agreement: ``max |K - K_ref| / max |K_ref|`` (relative to the kernel's scale; entrywise
relative errors are meaningless for near-zero off-diagonal entries), K_ref = ntkfunc
implementation 1 (or the first ntkfunc kernel that finished). NT i is also compared to
ntkfunc i. Errors above ``--tol`` (1e-3, float32) are flagged.

Usage:
    bash benchmarks/nt_setup.sh                        # once: JAX env in /work/nt-venv
    python benchmarks/bench_vs_nt.py --out benchmarks/RESULTS-nt.md --json benchmarks/results-nt.json
    python benchmarks/bench_vs_nt.py --quick           # tiny sizes: smoke test, well under a minute
    python benchmarks/bench_vs_nt.py --large --only resnet18,transformer --reps 3 --timeout 300 --append --out ...
    python benchmarks/bench_vs_nt.py --only mlp512,cnn --impls 1,3
    python benchmarks/bench_vs_nt.py --ntkfunc-src /tmp/ntkfunc-HEAD ...  # measure an exported commit
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import queue
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from timing import cpu_sample, foreign, timed_calls  # benchmarks/ is this script's folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.join(ROOT, "benchmarks")
DEFAULT_NT_PYTHON = os.environ.get("NT_PYTHON", "/work/nt-venv/bin/python")
CPUS_ENV = "NTK_BENCH_CPUS"
SRC_ENV = "NTK_BENCH_NTKFUNC_SRC"


# --- setups --------------------------------------------------------------------------------


def setups(quick: bool, large: bool) -> list[dict[str, Any]]:
    """Name, architecture and sizes of every row (``--quick``: tiny sizes, same names)."""
    q = quick
    out: list[dict[str, Any]] = [
        dict(name="mlp512", kind="mlp", widths=[64, 32 if q else 512, 32 if q else 512, 10], act="relu",
             n=8 if q else 64, trace=False),
        dict(name="mlp512-trace", kind="mlp", widths=[64, 32 if q else 512, 32 if q else 512, 10], act="relu",
             n=8 if q else 64, trace=True),
        dict(name="mlp2048", kind="mlp", widths=[64, 64 if q else 2048, 64 if q else 2048, 10], act="relu",
             n=4 if q else 32, trace=False),
        dict(name="cnn", kind="cnn", n=4 if q else 64, trace=False),
        dict(name="attention", kind="attention", d=16 if q else 64, heads=2 if q else 4, t=4 if q else 16,
             n=4 if q else 16, trace=False),
        dict(name="resblock", kind="resblock", c=4 if q else 16, hw=8 if q else 16, n=4 if q else 16, trace=False),
    ]
    if large:
        out += [
            dict(name="resnet18", kind="resnet18", width=8 if q else 64, n=2 if q else 4, trace=False),
            dict(name="transformer", kind="transformer", d=32 if q else 128, heads=2 if q else 4,
                 n=2 if q else 16, trace=False),
        ]
    return out


def describe(s: dict[str, Any]) -> str:
    k = s["kind"]
    if k == "mlp":
        return f"MLP {'→'.join(map(str, s['widths']))} ({s['act']}), x (N, 64)"
    if k == "cnn":
        return "Conv2d(1,16,3,p=1)-ReLU-Conv2d(16,32,3,s=2,p=1)-ReLU-Flatten-Linear(512,10), x (N, 1, 8, 8)"
    if k == "attention":
        return (f"self-attention d={s['d']}, {s['heads']} heads (Linear q/k/v/out, softmax), mean-pool, "
                f"Linear(d,10); x (N, {s['t']}, {s['d']})")
    if k == "resblock":
        return (f"Conv(3,{s['c']})-ReLU, residual block conv-relu-conv + skip, ReLU, global mean pool, "
                f"Linear({s['c']},10); x (N, 3, {s['hw']}, {s['hw']})")
    if k == "resnet18":
        return f"ResNet-18 of bench_impls.py (width {s['width']}, BatchNorm eval), x (N, 3, 32, 32)"
    return f"Transformer encoder block of bench_impls.py (d={s['d']}, {s['heads']} heads, patch 4), x (N, 3, 32, 32)"


def _bench_impls_models():  # type: ignore[no-untyped-def]
    """``_models()`` of benchmarks/bench_impls.py (ResNet-18, Transformer encoder block)."""
    spec = importlib.util.spec_from_file_location("_bench_impls", os.path.join(HERE, "bench_impls.py"))
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod._models()


def build(s: dict[str, Any]):  # type: ignore[no-untyped-def]
    """``(model.eval(), x, meta)``: the PyTorch model, its inputs, and what nt_side.py needs."""
    import math

    import torch
    import torch.nn.functional as F
    from torch import nn

    class SelfAttention(nn.Module):
        def __init__(self, d: int, heads: int, out: int = 10) -> None:
            super().__init__()
            self.heads = heads
            self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
            self.head = nn.Linear(d, out)

        def forward(self, x):  # type: ignore[no-untyped-def]  # (N, T, d)
            n, t, d = x.shape

            def split(h):  # type: ignore[no-untyped-def]
                return h.reshape(n, t, self.heads, d // self.heads).transpose(1, 2)

            s = split(self.q(x)) @ split(self.k(x)).transpose(-1, -2) / math.sqrt(d // self.heads)
            a = torch.softmax(s, -1) @ split(self.v(x))
            h = self.o(a.transpose(1, 2).reshape(n, t, d))
            return self.head(h.mean(1))

    class ResBlockNet(nn.Module):
        def __init__(self, c: int, cin: int = 3, out: int = 10) -> None:
            super().__init__()
            self.stem = nn.Conv2d(cin, c, 3, padding=1)
            self.conv1 = nn.Conv2d(c, c, 3, padding=1)
            self.conv2 = nn.Conv2d(c, c, 3, padding=1)
            self.head = nn.Linear(c, out)

        def forward(self, x):  # type: ignore[no-untyped-def]
            z = F.relu(self.stem(x))
            z = F.relu(z + self.conv2(F.relu(self.conv1(z))))
            return self.head(z.mean((2, 3)))

    torch.manual_seed(0)
    k, n = s["kind"], s["n"]
    meta: dict[str, Any] = {"kind": k}
    if k == "mlp":
        w = s["widths"]
        layers: list[nn.Module] = []
        for i in range(len(w) - 1):
            layers += [nn.Linear(w[i], w[i + 1])] + ([nn.ReLU() if s["act"] == "relu" else nn.Tanh()] if i < len(w) - 2 else [])
        model: nn.Module = nn.Sequential(*layers)
        meta.update(linears=[str(2 * i) for i in range(len(w) - 1)], act=s["act"])
        x = torch.randn(n, w[0])
    elif k == "cnn":
        model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1),
                              nn.ReLU(), nn.Flatten(), nn.Linear(32 * 4 * 4, 10))
        x = torch.randn(n, 1, 8, 8)
    elif k == "attention":
        model = SelfAttention(s["d"], s["heads"])
        meta.update(heads=s["heads"])
        x = torch.randn(n, s["t"], s["d"])
    elif k == "resblock":
        model = ResBlockNet(s["c"])
        x = torch.randn(n, 3, s["hw"], s["hw"])
    elif k == "resnet18":
        model = _bench_impls_models()["resnet18"](width=s["width"])
        strides = [1 if (i // 2 == 0 or i % 2 == 1) else 2 for i in range(8)]
        meta.update(strides=strides)
        x = torch.randn(n, 3, 32, 32)
    elif k == "transformer":
        model = _bench_impls_models()["transformer"](d=s["d"], heads=s["heads"])
        meta.update(heads=s["heads"], patch=model.patch)
        x = torch.randn(n, 3, 32, 32)
    else:
        raise ValueError(k)
    return model.eval(), x.float(), meta


def write_npz(s: dict[str, Any], path: str) -> dict[str, Any]:
    """Weights (trainable: ``params/``; float buffers: ``consts/``), inputs and meta."""
    import numpy as np
    import torch

    model, x, meta = build(s)
    trainable = {k for k, v in model.named_parameters() if v.requires_grad}
    arrays = {}
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            arrays[("params/" if k in trainable else "consts/") + k] = v.detach().float().numpy()
    with torch.no_grad():
        out_shape = list(model(x).shape)
    np.savez(path, x=x.numpy(), meta=np.array(json.dumps(meta)), **arrays)
    n_params = sum(v.numel() for k, v in model.named_parameters() if k in trainable)
    return {"n_params": n_params, "out_shape": out_shape, "x_shape": list(x.shape)}


# --- the ntkfunc worker (runs in this python) ------------------------------------------------


def _pin_cpus_from_env() -> None:
    cpus = os.environ.get(CPUS_ENV)
    if cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {int(c) for c in cpus.split(",")})


def torch_measure(req: dict[str, Any], emit) -> None:  # type: ignore[no-untyped-def]
    import numpy as np
    import torch

    import ntkfunc

    model, _, _ = build(req["setup"])
    with np.load(req["npz"]) as z:
        state = {k.split("/", 1)[1]: torch.from_numpy(z[k]) for k in z.files if k.startswith(("params/", "consts/"))}
        x = torch.from_numpy(z["x"])
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(m.endswith("num_batches_tracked") for m in missing), (missing, unexpected)
    f, params = ntkfunc.from_module(model)
    impl = req["impl"]
    impl = "auto" if impl == "auto" else ntkfunc.Implementation(int(impl))
    kernel = ntkfunc.ntk_fn(f, trace_axes=tuple(req["trace_axes"]), implementation=impl,
                            memory_budget=req.get("budget"))
    t0 = time.perf_counter()
    k = kernel(x, None, params)
    first = time.perf_counter() - t0
    np.save(req["kernel_out"], k.detach().cpu().numpy())
    emit({"event": "warmup", "first_s": first, "kernel_shape": list(k.shape)})
    del k
    timed_calls(lambda: kernel(x, None, params), req["reps"], req["rep_seconds"], emit, req.get("clock", "wall"))
    emit({"event": "done", "n_params": sum(p.numel() for p in params.values())})


def torch_worker(threads: int) -> None:
    _pin_cpus_from_env()
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    sys.stdout = sys.stderr

    def emit(event: dict[str, Any]) -> None:
        out.write(json.dumps(event) + "\n")
        out.flush()

    import torch

    torch.set_num_threads(threads)
    torch.set_num_interop_threads(threads)
    sys.path.insert(0, os.environ.get(SRC_ENV) or ROOT)
    import ntkfunc

    # one tiny kernel per implementation, so lazy imports do not land in the first measurement
    tiny = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).eval()
    f, params = ntkfunc.from_module(tiny)
    for impl in (1, 2, 3, "auto"):
        try:
            ntkfunc.ntk_fn(f, trace_axes=(), implementation=impl)(torch.randn(2, 3), None, params)
        except Exception:  # an implementation this version lacks: its measurements report the error
            pass
    emit({"event": "ready", "torch": torch.__version__, "ntkfunc": getattr(ntkfunc, "__version__", "?"),
          "ntkfunc_file": ntkfunc.__file__})
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            torch_measure(json.loads(line), emit)
        except Exception as e:  # reported, the worker keeps serving
            emit({"event": "error", "error": f"{type(e).__name__}: {e}"[:300]})


# --- workers driven from the main process ----------------------------------------------------


class Worker:
    """A long-lived child answering JSON requests with JSON event lines; killed on timeout."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log_path: str) -> None:
        self.name, self.cmd, self.env, self.log_path = name, cmd, env, log_path
        self.proc: subprocess.Popen | None = None  # type: ignore[type-arg]
        self.events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.info: dict[str, Any] = {}

    def _reader(self, proc: subprocess.Popen, q: queue.Queue[dict[str, Any] | None]) -> None:  # type: ignore[type-arg]
        assert proc.stdout is not None
        for line in proc.stdout:
            try:
                q.put(json.loads(line))
            except json.JSONDecodeError:
                pass
        q.put(None)

    def start(self, timeout: float = 180.0) -> None:
        log = open(self.log_path, "a")
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                     text=True, env=self.env, cwd=ROOT)
        log.close()
        self.events = queue.Queue()
        threading.Thread(target=self._reader, args=(self.proc, self.events), daemon=True).start()
        ev = self._next(time.perf_counter() + timeout)
        if not ev or ev.get("event") != "ready":
            self.stop()
            raise RuntimeError(f"{self.name} worker did not start: {self.log_tail()}")
        self.info = ev

    def _next(self, deadline: float) -> dict[str, Any] | None:
        try:
            return self.events.get(timeout=max(0.0, deadline - time.perf_counter()))
        except queue.Empty:
            return {"event": "timeout"}

    def log_tail(self) -> str:
        try:
            with open(self.log_path) as fh:
                lines = [ln.strip() for ln in fh.read().splitlines() if ln.strip()]
            return lines[-1][:200] if lines else "(no output)"
        except OSError:
            return "(no log)"

    def request(self, req: dict[str, Any], timeout: float) -> tuple[list[dict[str, Any]], str]:
        """Events of one measurement and how it ended: done, error, timeout or died."""
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        deadline, events = time.perf_counter() + timeout, []
        while True:
            ev = self._next(deadline)
            if ev is None:
                self.proc = None
                return events, "died"
            if ev["event"] == "timeout":
                self.kill()
                return events, "timeout"
            events.append(ev)
            if ev["event"] in ("done", "error"):
                return events, ev["event"]

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # our own child, by its Popen handle
            self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None


def summarise(events: list[dict[str, Any]], how: str, timeout: float, worker: Worker) -> dict[str, Any]:
    r: dict[str, Any] = {}
    times = [e["s"] for e in events if e["event"] == "call"]
    for e in events:
        if e["event"] == "warmup":
            r.update(first_s=e["first_s"], kernel_shape=e["kernel_shape"])
        elif e["event"] == "done":
            r["n_params"] = e["n_params"]
        elif e["event"] == "error":
            r["error"] = e["error"]
    if how == "died":
        r["error"] = f"worker died: {worker.log_tail()}"
    if how == "timeout":
        r["timed_out"] = True
    for e in events:
        # /proc/stat counts in jiffies (10 ms): over a short timed phase the estimate is noise, and
        # the caller's reading just before the measurement is used instead
        if e["event"] == "load" and e["wall"] >= 0.5:
            r.update(foreign_cores=e["foreign"], steal_cores=e["steal"])
    if times:
        r.update(median_s=statistics.median(times), min_s=min(times), timed_calls=len(times), times_s=times)
    elif how == "timeout" and "first_s" in r:
        r["first_only"] = True
    elif how == "timeout":
        r["error"] = f"> {timeout:.0f} s"
    return r


# --- table ------------------------------------------------------------------------------------


def seconds(r: dict[str, Any] | None) -> float | None:
    """The time used for ratios: the median, or the first call's time when only that finished."""
    if not r or "error" in r:
        return None
    if "median_s" in r:
        return float(r["median_s"])
    return float(r["first_s"]) if r.get("first_only") else None


BUSY = 0.3  # cores used by other processes above which a cell is marked ‡ (set by --busy)


def busy(r: dict[str, Any] | None) -> bool:
    return bool(r) and (r.get("foreign_cores", 0.0) + r.get("steal_cores", 0.0)) > BUSY  # type: ignore[union-attr]


def cell(r: dict[str, Any] | None) -> str:
    if r is None:
        return ""
    if "error" in r:
        return r["error"] if r["error"].startswith(">") else "error: " + r["error"][:70].replace("|", "/")
    mark = " ‡" if busy(r) else ""
    if "median_s" in r:
        return (f"{r['median_s']:.3g}" if r["median_s"] < 100 else f"{r['median_s']:.0f}") + mark
    return f"{r['first_s']:.3g} †"


def machine_foreign(seconds: float = 1.0) -> float:
    """Cores busy outside this process over ``seconds`` (the workers are idle meanwhile)."""
    a = cpu_sample()
    time.sleep(seconds)
    f = foreign(a, cpu_sample())
    return f["foreign"] + f["steal"]


def wait_quiet(limit: float, max_wait: float) -> float:
    """Waits (up to ``max_wait`` s) until other processes use under ``limit`` cores; returns the last reading."""
    deadline = time.perf_counter() + max_wait
    while True:
        load = machine_foreign()
        if load < limit or time.perf_counter() > deadline:
            return load


def rel_err(k: Any, ref: Any) -> float | None:
    import numpy as np

    if k is None or ref is None or k.shape != ref.shape:
        return None
    scale = float(np.abs(ref).max()) or 1.0
    return float(np.abs(k.astype(np.float64) - ref.astype(np.float64)).max() / scale)


def fmt_err(e: float | None, tol: float) -> str:
    if e is None:
        return ""
    return f"{e:.1e}" + (" **!**" if e > tol else "")


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a and b else ""


def _show_path(path: str) -> str:
    rel = os.path.relpath(path, ROOT)
    return path if rel.startswith("..") else rel


def write_markdown(args: argparse.Namespace, rows: list[dict[str, Any]], info: dict[str, Any]) -> str:
    impls = args.impl_list
    nt_impls = [i for i in impls if i != "auto"]
    cols_nt = [f"NT {i}" for i in nt_impls]
    cols_tk = [f"ntkfunc {i}" for i in impls]
    lines = [
        "# ntkfunc vs neural-tangents: empirical NTK (`x2=None`, float32, CPU)",
        "",
        f"Command: `{info['command']}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs (shared with other jobs; load average "
        f"{info['load_start']} at start, {info['load_end']} at end); both sides pinned to CPUs {info['cpus']}, "
        f"{args.threads} threads (torch.set_num_threads; XLA `NPROC={args.threads}`"
        f"{', XLA_FLAGS=' + repr(args.xla_flags) if args.xla_flags else ''}).  ",
        f"Versions: torch {info.get('torch', '?')}, ntkfunc {info.get('ntkfunc', '?')} "
        f"(`{_show_path(os.path.dirname(info.get('ntkfunc_file', '?')))}`{info.get('ntkfunc_rev', '')}); "
        f"jax {info.get('jax', '?')}, neural-tangents {info.get('nt', '?')}; JAX twins write Linear as "
        + ("`lax.dot_general(x, W)` contracting W's axis 1 (no transpose of W)" if args.nt_linear == "dot_general"
           else "the literal `x @ W.T`") + ".  ",
        f"Times in seconds ({'CPU time of the worker process, all its threads' if args.clock == 'cpu' else 'wall clock'}): "
        f"median of up to {args.reps} calls (stopping after {args.rep_seconds:g} s of timed calls) "
        "after one warm-up call; NT is `jax.jit(nt.empirical_ntk_fn(..., vmap_axes=0, implementation=i))` "
        "(warm-up = trace + compile + run, see the last table), ntkfunc is `ntkfunc.ntk_fn(..., implementation=i)` "
        f"(memory_budget {args.budget or 'default'}). `> {args.timeout:.0f} s`: killed at the per-measurement "
        "timeout; `†`: only the warm-up call finished before the timeout (its time is shown).  ",
        f"`‡`: other processes used more than {args.busy:g} cores (over the timed calls, from `/proc/stat` minus the "
        "worker's own CPU time, plus hypervisor steal; over the 1 s before the measurement when the timed calls took "
        f"under 0.5 s) even after waiting up to {args.wait_quiet:g} s for "
        f"a quiet machine and {args.retries} re-measurements: that cell is unreliable (torch's OpenMP threads suffer "
        "far more from a busy 2-core machine than XLA's thread pool).  ",
        "Ratios < 1: ntkfunc is faster. agree: worst `max|K - K_ref| / max|K_ref|` over all kernels of the row "
        f"(K_ref = ntkfunc 1), flagged **!** above {args.tol:g}.",
        "",
        "| " + " | ".join(["setup"] + cols_nt + cols_tk + ["best ratio (ntkfunc best / NT best)", "agree"]) + " |",
        "|" + "---|" * (len(cols_nt) + len(cols_tk) + 3),
    ]
    for row in rows:
        nt_best = [t for t in (seconds(row["nt"].get(str(i))) for i in nt_impls) if t]
        tk_best = [t for t in (seconds(row["ntkfunc"].get(str(i))) for i in impls) if t]
        errs = [e for e in row["err_vs_ref"].values() if e is not None]
        worst = max(errs, key=lambda e: (e != e, e)) if errs else None  # a NaN is the worst
        agree = "" if worst is None else (f"ok ({worst:.0e})" if worst <= args.tol else f"**NO** ({worst:.1e})")
        cells = [row["setup"]["name"]] + [cell(row["nt"].get(str(i))) if row["nt"] else "n/a" for i in nt_impls]
        cells += [cell(row["ntkfunc"].get(str(i))) for i in impls]
        cells += [ratio(min(tk_best) if tk_best else None, min(nt_best) if nt_best else None), agree]
        lines.append("| " + " | ".join(cells) + " |")

    lines += ["", "## Per implementation: ntkfunc i / NT i", "",
              "| setup | " + " | ".join(str(i) for i in nt_impls) + " | ntkfunc auto / NT best |",
              "|" + "---|" * (len(nt_impls) + 2)]
    for row in rows:
        cells = [row["setup"]["name"]]
        for i in nt_impls:
            cells.append(ratio(seconds(row["ntkfunc"].get(str(i))), seconds(row["nt"].get(str(i)))))
        nt_best = [t for t in (seconds(row["nt"].get(str(i))) for i in nt_impls) if t]
        cells.append(ratio(seconds(row["ntkfunc"].get("auto")), min(nt_best) if nt_best else None))
        lines.append("| " + " | ".join(cells) + " |")

    lines += ["", f"## Agreement: max |K - K_ref| / max |K_ref| (K_ref = ntkfunc 1 unless noted; **!** > {args.tol:g})", "",
              "| setup | ref | " + " | ".join(cols_nt + [c for c in cols_tk if c != "ntkfunc 1"])
              + " | NT i vs ntkfunc i (worst) |",
              "|" + "---|" * (len(cols_nt) + len(cols_tk) + 2)]
    for row in rows:
        e = row["err_vs_ref"]
        cells = [row["setup"]["name"], row["ref"] or "none"]
        cells += [fmt_err(e.get(f"nt {i}"), args.tol) for i in nt_impls]
        cells += [fmt_err(e.get(f"ntkfunc {i}"), args.tol) for i in impls if i != 1]
        pair = [v for v in row["err_nt_vs_ntkfunc"].values() if v is not None]
        cells.append(fmt_err(max(pair), args.tol) if pair else "")
        lines.append("| " + " | ".join(cells) + " |")

    lines += ["", "## Setups", "", "| setup | model | N | kernel | params | other load, cores (worst cell) |",
              "|---|---|---|---|---|---|"]
    for row in rows:
        s = row["setup"]
        shape = row["info"]["out_shape"]
        kshape = f"({s['n']}, {s['n']})" if s["trace"] else f"({s['n']}, {s['n']}, {shape[-1]}, {shape[-1]})"
        trace = " traced (`trace_axes=(-1,)`)" if s["trace"] else " full (`trace_axes=()`)"
        loads = [r.get("foreign_cores", 0.0) + r.get("steal_cores", 0.0)
                 for side in ("nt", "ntkfunc") for r in row[side].values() if "foreign_cores" in r]
        worst = f"{max(loads):.2f}" if loads else ""
        lines.append(f"| {s['name']} | {describe(s)} | {s['n']} | {kshape}{trace} | {row['info']['n_params']:,} | {worst} |")

    lines += ["", "## First (warm-up) call, seconds", "",
              "| setup | " + " | ".join(cols_nt + cols_tk) + " |", "|" + "---|" * (len(cols_nt) + len(cols_tk) + 1)]
    for row in rows:
        cells = [row["setup"]["name"]]
        for side, keys in (("nt", nt_impls), ("ntkfunc", impls)):
            for i in keys:
                r = row[side].get(str(i)) or {}
                cells.append(f"{r['first_s']:.3g}" if "first_s" in r else cell(r) if r else "")
        lines.append("| " + " | ".join(cells) + " |")
    if info.get("nt_missing"):
        lines += ["", f"NT side skipped: {info['nt_missing']}"]
    return "\n".join(lines) + "\n"


# --- main -------------------------------------------------------------------------------------


def parse_impls(text: str) -> list[int | str]:
    out: list[int | str] = []
    for tok in text.split(","):
        tok = tok.strip()
        if tok:
            out.append("auto" if tok == "auto" else int(tok))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--nt-python", default=DEFAULT_NT_PYTHON, help="python of the JAX env (default %(default)s)")
    ap.add_argument("--out", default=None, help="write the markdown here (default: print only)")
    ap.add_argument("--append", action="store_true", help="append the markdown to --out instead of overwriting it")
    ap.add_argument("--json", default=None, help="write raw results here")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    ap.add_argument("--large", action="store_true", help="add ResNet-18 and the Transformer encoder block")
    ap.add_argument("--only", default=None, help="comma-separated setup names")
    ap.add_argument("--impls", default="1,2,3", help="implementations for both sides (ntkfunc also runs auto)")
    ap.add_argument("--no-auto", action="store_true", help="do not run ntkfunc's auto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rep-seconds", type=float, default=10.0, help="stop timing more calls after this")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="time the calls by wall clock or by each worker process's CPU time (all its threads)")
    ap.add_argument("--timeout", type=float, default=120.0, help="per measurement (seconds)")
    ap.add_argument("--budget", default=None, help="ntkfunc memory_budget (default: the library's)")
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument("--busy", type=float, default=0.3,
                    help="cores used by other processes (from /proc/stat) above which a cell counts as disturbed (‡)")
    ap.add_argument("--wait-quiet", type=float, default=None,
                    help="before each measurement wait up to this many seconds for the machine to fall under --busy "
                         "(default 30, 0 with --quick: no load check)")
    ap.add_argument("--retries", type=int, default=2, help="re-measure a disturbed cell up to this many times")
    ap.add_argument("--retry-under", type=float, default=30.0, help="... if the measurement took less than this (s)")
    ap.add_argument("--nt-linear", choices=["dot_general", "matmul_t"], default="dot_general",
                    help="how the JAX twins write Linear layers (see benchmarks/nt_side.py)")
    ap.add_argument("--xla-flags", default="", help="extra XLA_FLAGS for the NT side")
    ap.add_argument("--ntkfunc-src", default=None,
                    help="folder holding the ntkfunc package to measure (default: this checkout), e.g. an "
                         "export of a commit: git archive HEAD ntkfunc | tar -x -C /tmp/ntkfunc-head")
    ap.add_argument("--keep", default=None, help="keep the .npz and kernels in this folder")
    args = ap.parse_args()
    if args.worker:
        torch_worker(args.threads)
        return

    global BUSY
    BUSY = args.busy
    if args.wait_quiet is None:
        args.wait_quiet = 0.0 if args.quick else 30.0
    impls = parse_impls(args.impls)
    if not args.no_auto and "auto" not in impls:
        impls.append("auto")
    args.impl_list = impls
    nt_impls = [i for i in impls if i != "auto"]
    chosen = setups(args.quick, args.large or bool(args.only and {"resnet18", "transformer"} & set(args.only.split(","))))
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {s["name"] for s in setups(False, True)}
        if unknown:
            ap.error(f"unknown setup(s) {sorted(unknown)}; known: {[s['name'] for s in setups(False, True)]}")
        chosen = [s for s in chosen if s["name"] in wanted]

    cpus = sorted(os.sched_getaffinity(0))[: args.threads] if hasattr(os, "sched_getaffinity") else []
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               OPENBLAS_NUM_THREADS=str(args.threads), NPROC=str(args.threads), JAX_PLATFORMS="cpu",
               **{CPUS_ENV: ",".join(map(str, cpus))})
    env.pop("XLA_FLAGS", None)
    if args.ntkfunc_src:
        env[SRC_ENV] = os.path.abspath(args.ntkfunc_src)
    if args.xla_flags:
        env["XLA_FLAGS"] = args.xla_flags
    work = args.keep or tempfile.mkdtemp(prefix="bench_vs_nt_")
    os.makedirs(work, exist_ok=True)
    info: dict[str, Any] = {
        "command": "python benchmarks/bench_vs_nt.py" + (" " + shlex.join(sys.argv[1:]) if sys.argv[1:] else ""),
        "cpus": ",".join(map(str, cpus)), "load_start": " ".join(f"{v:.1f}" for v in os.getloadavg()),
    }

    tk = Worker("ntkfunc", [sys.executable, os.path.abspath(__file__), "--worker", "--threads", str(args.threads)],
                env, os.path.join(work, "ntkfunc-worker.log"))
    try:
        tk.start()
    except RuntimeError as e:
        sys.exit(f"{e}\n(the ntkfunc being measured does not import; --ntkfunc-src DIR measures another copy)")
    info.update(tk.info)
    src_root = os.path.dirname(os.path.dirname(info.get("ntkfunc_file", "")))
    if os.path.abspath(src_root) == ROOT:
        try:
            rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
            dirty = subprocess.run(["git", "status", "--porcelain", "ntkfunc"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
            info["ntkfunc_rev"] = f" at {rev}{' + uncommitted changes' if dirty else ''}" if rev else ""
        except OSError:
            pass
    nt: Worker | None = None
    if not os.path.exists(args.nt_python):
        info["nt_missing"] = (f"{args.nt_python} not found; create the JAX env with `bash benchmarks/nt_setup.sh` "
                              "or pass --nt-python")
        print("NOTE: " + info["nt_missing"] + " -- measuring ntkfunc only", file=sys.stderr)
        nt_impls_run: list[int | str] = []
    else:
        nt = Worker("nt", [args.nt_python, os.path.join(HERE, "nt_side.py"), "--worker"], env,
                    os.path.join(work, "nt-worker.log"))
        try:
            nt.start()
            info.update(nt.info)
            nt_impls_run = list(nt_impls)
        except RuntimeError as e:
            info["nt_missing"] = str(e)
            print("NOTE: " + str(e) + " -- measuring ntkfunc only", file=sys.stderr)
            nt, nt_impls_run = None, []

    import numpy as np

    rows = []
    for s in chosen:
        npz = os.path.join(work, f"{s['name']}.npz")
        row_info = write_npz(s, npz)
        trace = [-1] if s["trace"] else []
        row: dict[str, Any] = {"setup": s, "info": row_info, "nt": {}, "ntkfunc": {}}
        order: list[tuple[str, int | str]] = []
        for i in impls:
            if i in nt_impls_run:
                order.append(("nt", i))
            order.append(("ntkfunc", i))
        kernels: dict[str, Any] = {}
        for side, i in order:
            kpath = os.path.join(work, f"{s['name']}-{side}-{i}.npy")
            if os.path.exists(kpath):
                os.remove(kpath)
            req = dict(npz=npz, impl=i, trace_axes=trace, reps=args.reps, rep_seconds=args.rep_seconds,
                       kernel_out=kpath, setup=s, budget=args.budget, linear=args.nt_linear, clock=args.clock)
            worker = nt if side == "nt" else tk
            assert worker is not None
            r: dict[str, Any] = {}
            for attempt in range(args.retries + 1):
                before = wait_quiet(args.busy, args.wait_quiet) if args.wait_quiet > 0 else None
                events, how = worker.request(req, args.timeout)
                new = summarise(events, how, args.timeout, worker)
                new.update(load_before=before, attempt=attempt)
                if "foreign_cores" not in new and before is not None:
                    new.update(foreign_cores=before, steal_cores=0.0)
                if not r or (busy(r) and new.get("foreign_cores", 9.0) < r.get("foreign_cores", 9.0)):
                    r = new
                spent = new.get("first_s", args.timeout) + sum(new.get("times_s", []))
                if not busy(r) or "error" in new or spent > args.retry_under:
                    break
            row[side][str(i)] = r
            if os.path.exists(kpath) and "error" not in r:
                kernels[f"{side} {i}"] = np.load(kpath)
            print(json.dumps({"setup": s["name"], "side": side, "impl": i,
                              **{k: v for k, v in r.items() if k != "times_s"}}), flush=True)
        ref_key = next((f"ntkfunc {i}" for i in [1, 3, "auto", 2] if f"ntkfunc {i}" in kernels), None)
        ref = kernels.get(ref_key) if ref_key else None
        row["ref"] = ref_key
        row["err_vs_ref"] = {k: rel_err(v, ref) for k, v in kernels.items() if k != ref_key}
        row["err_nt_vs_ntkfunc"] = {str(i): rel_err(kernels.get(f"nt {i}"), kernels.get(f"ntkfunc {i}"))
                                    for i in nt_impls}
        bad = {k: v for k, v in row["err_vs_ref"].items() if v is not None and v > args.tol}
        if bad:
            print(f"WARNING {s['name']}: kernels disagree with {ref_key} beyond {args.tol:g}: {bad}", file=sys.stderr)
        rows.append(row)
        if not args.keep:
            for f in os.listdir(work):
                if f.startswith(s["name"] + "-") or f == f"{s['name']}.npz":
                    os.remove(os.path.join(work, f))

    tk.stop()
    if nt is not None:
        nt.stop()
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    info["load_end"] = " ".join(f"{v:.1f}" for v in os.getloadavg())
    md = write_markdown(args, rows, info)
    print(md)
    if args.out:
        with open(args.out, "a" if args.append else "w") as fh:
            fh.write(("\n" if args.append else "") + md)
        print(f"wrote {args.out}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"info": info, "args": {k: v for k, v in vars(args).items()}, "rows": rows}, fh, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
