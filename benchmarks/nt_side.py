"""The neural-tangents (JAX) side of ``benchmarks/bench_vs_nt.py``.

Runs in the separate JAX environment (``benchmarks/nt_setup.sh``), never in the project
venv: it imports only numpy, jax and neural_tangents. ``bench_vs_nt.py`` writes, per
setup, an ``.npz`` holding the PyTorch model's weights (``params/<name>``: trainable
parameters under their ``named_parameters`` names; ``consts/<name>``: buffers such as
BatchNorm running statistics), the inputs ``x`` and a JSON ``meta`` string that names the
architecture and its hyper-parameters. This file holds the JAX twins of those PyTorch
models, written in PyTorch's layouts (Linear ``(out, in)`` with ``x @ W.T + b``;
convolutions OIHW on NCHW through ``lax.conv_general_dilated``), so the same arrays give
the same function.

Linear layers are written as ``lax.dot_general(x, W, contracting x's last axis with W's
axis 1)``, not as the literal ``x @ W.T``: neural-tangents' structured derivatives
(implementation 3) apply their rule to the primitive that consumes a parameter, and in
``x @ W.T`` that primitive is ``transpose``, whose rule only permutes, so the weight's
Jacobian would be formed in full as in implementation 1 (measured: NT 3 then runs at
NT 1's speed on the MLPs). ``--nt-linear matmul_t`` in bench_vs_nt.py selects the literal form.

One measurement: ``jax.jit(nt.empirical_ntk_fn(apply_fn, trace_axes, vmap_axes=0,
implementation=i))``, one warm-up call (compile + run, its kernel is saved as ``.npy``),
then up to ``reps`` timed calls with ``block_until_ready`` (stopping once ``rep_seconds``
have been spent timing); the median is reported by the caller.

Modes:
    nt_side.py --worker                 # JSON requests on stdin, JSON events on stdout
    nt_side.py --npz F --impl 3 --kernel-out K.npy [--trace-axes -1]   # one measurement

Threads: the caller sets ``NPROC`` (XLA's CPU client sizes its Eigen intra-op pool from
it, see ``xla/pjrt/utils.cc:DefaultThreadPoolSize``) and the CPU affinity of this process
before jax is imported; ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` likewise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import types
from collections.abc import Callable
from typing import Any

from timing import timed_calls  # benchmarks/ is this script's folder


def _import_nt():  # type: ignore[no-untyped-def]
    # neural_tangents/__init__.py imports `experimental`, which needs TensorFlow; it is not
    # used here, so a stub module takes its place.
    sys.modules.setdefault("neural_tangents.experimental", types.ModuleType("neural_tangents.experimental"))
    import neural_tangents as nt

    return nt


# --- JAX twins of the PyTorch models ---------------------------------------------------


def make_apply(meta: dict[str, Any], consts: dict[str, Any], linear_mode: str = "dot_general") -> Callable[[Any, Any], Any]:
    """Returns ``apply_fn(params, x)`` for the architecture described by ``meta``.

    ``linear_mode``: ``"dot_general"`` (default) contracts ``x`` with axis 1 of ``W`` directly;
    ``"matmul_t"`` writes the literal ``x @ W.T``, whose jaxpr transposes ``W`` first.
    """
    import jax
    import jax.numpy as jnp
    from jax import lax

    def linear(p, name, x):  # type: ignore[no-untyped-def]  # torch's x @ W.T + b, W (out, in)
        w = p[name + ".weight"]
        if linear_mode == "matmul_t":
            y = x @ w.T
        else:  # the same product without a transpose of W (see the module docstring)
            y = lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())))
        return y + p[name + ".bias"] if name + ".bias" in p else y

    def conv(p, name, x, stride=1, padding=1):  # type: ignore[no-untyped-def]
        y = lax.conv_general_dilated(
            x, p[name + ".weight"], (stride, stride), [(padding, padding)] * 2,
            dimension_numbers=("NCHW", "OIHW", "NCHW"),
        )
        return y + p[name + ".bias"][None, :, None, None] if name + ".bias" in p else y

    def batchnorm(p, name, x, eps=1e-5):  # type: ignore[no-untyped-def]  # eval mode: running statistics
        mean, var = consts[name + ".running_mean"], consts[name + ".running_var"]
        scale = p[name + ".weight"] * lax.rsqrt(var + eps)
        return (x - mean[None, :, None, None]) * scale[None, :, None, None] + p[name + ".bias"][None, :, None, None]

    def layernorm(p, name, x, eps=1e-5):  # type: ignore[no-untyped-def]
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) * lax.rsqrt(var + eps) * p[name + ".weight"] + p[name + ".bias"]

    def attention(q, k, v):  # type: ignore[no-untyped-def]  # (n, heads, T, dh)
        s = q @ jnp.swapaxes(k, -1, -2) / jnp.sqrt(jnp.float32(q.shape[-1]))
        return jax.nn.softmax(s, axis=-1) @ v

    act = {"relu": jax.nn.relu, "tanh": jnp.tanh}
    kind = meta["kind"]

    if kind == "mlp":  # nn.Sequential(Linear, act, Linear, act, ..., Linear)
        names, a = meta["linears"], act[meta["act"]]

        def apply_fn(p, x):  # type: ignore[no-untyped-def]
            for name in names[:-1]:
                x = a(linear(p, name, x))
            return linear(p, names[-1], x)

    elif kind == "cnn":  # Conv2d(1,16,3,p=1)-ReLU-Conv2d(16,32,3,s=2,p=1)-ReLU-Flatten-Linear

        def apply_fn(p, x):  # type: ignore[no-untyped-def]
            h = jax.nn.relu(conv(p, "0", x))
            h = jax.nn.relu(conv(p, "2", h, stride=2))
            return linear(p, "5", h.reshape(h.shape[0], -1))

    elif kind == "attention":  # SelfAttention in bench_vs_nt.py
        heads = meta["heads"]

        def apply_fn(p, x):  # type: ignore[no-untyped-def]  # (n, T, d)
            n, t, d = x.shape

            def split(h):  # type: ignore[no-untyped-def]
                return h.reshape(n, t, heads, d // heads).transpose(0, 2, 1, 3)

            a = attention(split(linear(p, "q", x)), split(linear(p, "k", x)), split(linear(p, "v", x)))
            h = linear(p, "o", a.transpose(0, 2, 1, 3).reshape(n, t, d))
            return linear(p, "head", h.mean(1))

    elif kind == "resblock":  # ResBlockNet in bench_vs_nt.py

        def apply_fn(p, x):  # type: ignore[no-untyped-def]
            z = jax.nn.relu(conv(p, "stem", x))
            z = jax.nn.relu(z + conv(p, "conv2", jax.nn.relu(conv(p, "conv1", z))))
            return linear(p, "head", z.mean((2, 3)))

    elif kind == "resnet18":  # ResNet18 of benchmarks/bench_impls.py (BatchNorm in eval mode)
        strides = meta["strides"]

        def apply_fn(p, x):  # type: ignore[no-untyped-def]
            h = jax.nn.relu(batchnorm(p, "stem.1", conv(p, "stem.0", x)))
            for i, s in enumerate(strides):
                b = f"layers.{i}."
                y = jax.nn.relu(batchnorm(p, b + "bn1", conv(p, b + "conv1", h, stride=s)))
                y = batchnorm(p, b + "bn2", conv(p, b + "conv2", y))
                short = h
                if b + "short.0.weight" in p:
                    short = batchnorm(p, b + "short.1", conv(p, b + "short.0", h, stride=s, padding=0))
                h = jax.nn.relu(y + short)
            return linear(p, "head", h.mean((2, 3)))

    elif kind == "transformer":  # EncoderBlock of benchmarks/bench_impls.py
        heads, patch = meta["heads"], meta["patch"]

        def apply_fn(p, x):  # type: ignore[no-untyped-def]  # (n, 3, H, W)
            n, c, hh, ww = x.shape
            gh, gw = hh // patch, ww // patch
            # F.unfold(x, p, stride=p).transpose(1, 2): features in (c, ki, kj) order, patches row-major
            t = x.reshape(n, c, gh, patch, gw, patch).transpose(0, 2, 4, 1, 3, 5).reshape(n, gh * gw, c * patch * patch)
            h = linear(p, "embed", t) + p["pos"]
            d = h.shape[-1]
            qkv = linear(p, "qkv", layernorm(p, "ln1", h)).reshape(n, -1, 3, heads, d // heads).transpose(2, 0, 3, 1, 4)
            a = attention(qkv[0], qkv[1], qkv[2]).transpose(0, 2, 1, 3).reshape(h.shape)
            h = h + linear(p, "proj", a)
            h = h + linear(p, "mlp2", jax.nn.gelu(linear(p, "mlp1", layernorm(p, "ln2", h)), approximate=False))
            return linear(p, "head", h.mean(1))

    else:
        raise ValueError(f"unknown model kind {kind!r}")
    return apply_fn


def load(npz_path: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], Any]:
    import jax.numpy as jnp
    import numpy as np

    with np.load(npz_path) as z:
        meta = json.loads(str(z["meta"]))
        params = {k[len("params/"):]: jnp.asarray(z[k]) for k in z.files if k.startswith("params/")}
        consts = {k[len("consts/"):]: jnp.asarray(z[k]) for k in z.files if k.startswith("consts/")}
        x = jnp.asarray(z["x"])
    return meta, params, consts, x


# --- one measurement ------------------------------------------------------------------------


def measure(req: dict[str, Any], emit: Callable[[dict[str, Any]], None]) -> None:
    import jax
    import numpy as np

    nt = _import_nt()
    meta, params, consts, x = load(req["npz"])
    apply_fn = make_apply(meta, consts, req.get("linear", "dot_general"))
    kfn = jax.jit(nt.empirical_ntk_fn(apply_fn, trace_axes=tuple(req["trace_axes"]), vmap_axes=0,
                                      implementation=int(req["impl"])))
    t0 = time.perf_counter()
    k = kfn(x, None, params)
    k.block_until_ready()
    first = time.perf_counter() - t0
    np.save(req["kernel_out"], np.asarray(k))
    emit({"event": "warmup", "first_s": first, "kernel_shape": list(k.shape)})
    del k
    timed_calls(lambda kfn=kfn: kfn(x, None, params).block_until_ready(), req["reps"], req["rep_seconds"], emit,
                req.get("clock", "wall"))
    n_params = int(sum(v.size for v in jax.tree_util.tree_leaves(params)))
    emit({"event": "done", "n_params": n_params})
    del kfn
    jax.clear_caches()


def _protocol_stream():  # type: ignore[no-untyped-def]
    """The real stdout carries the JSON events; anything else printed goes to stderr."""
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    sys.stdout = sys.stderr

    def emit(event: dict[str, Any]) -> None:
        out.write(json.dumps(event) + "\n")
        out.flush()

    return emit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true", help="serve JSON requests from stdin")
    ap.add_argument("--npz")
    ap.add_argument("--impl", type=int, default=1)
    ap.add_argument("--trace-axes", default="", help="comma-separated, empty for the full kernel")
    ap.add_argument("--kernel-out", default="nt_kernel.npy")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rep-seconds", type=float, default=10.0)
    args = ap.parse_args()
    cpus = os.environ.get("NTK_BENCH_CPUS")  # set by bench_vs_nt.py: the same CPUs as the ntkfunc side
    if cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {int(c) for c in cpus.split(",")})
    emit = _protocol_stream()
    if args.worker:
        import jax

        nt = _import_nt()
        # a tiny kernel per implementation first, so backend start-up is not in the first measurement
        for impl in (1, 2, 3):
            tiny = jax.jit(nt.empirical_ntk_fn(lambda p, x: jax.numpy.tanh(x @ p), trace_axes=(), vmap_axes=0,
                                               implementation=impl))
            tiny(jax.numpy.ones((2, 3)), None, jax.numpy.ones((3, 2))).block_until_ready()
        jax.clear_caches()
        emit({"event": "ready", "jax": jax.__version__, "nt": nt.__version__})
        for line in sys.stdin:
            if not line.strip():
                continue
            req = json.loads(line)
            try:
                measure(req, emit)
            except Exception as e:  # reported to the caller, the worker keeps serving
                emit({"event": "error", "error": f"{type(e).__name__}: {e}"[:300]})
        return
    trace = [int(a) for a in args.trace_axes.split(",") if a.strip()]
    measure(dict(npz=args.npz, impl=args.impl, trace_axes=trace, kernel_out=args.kernel_out,
                 reps=args.reps, rep_seconds=args.rep_seconds), emit)


if __name__ == "__main__":
    main()
