"""What a resumable output must match to be resumed: the fingerprint of a run.

A run's fingerprint records everything that determines its kernel:

- ``f``'s name and, for a function made by :func:`ntkfunc.from_module` (or any ``f`` with a
  ``__ntkfunc_fingerprint__`` attribute), the module's structure and constants: class names,
  ``repr`` (layers and their settings: ``Tanh`` vs ``ReLU``), ``state_dict`` keys, training
  flags and every byte of its buffers and frozen parameters;
- ``params``: every byte;
- ``probe``: what ``f`` computes, whatever it is: summaries of its outputs, and of the gradient
  of a fixed combination of them, on x1's first, middle and last samples. Compared with a
  tolerance (``sqrt(eps)`` of the output dtype, relative), so that another device or thread
  count still resumes, while a changed function (or a constant captured in its closure) does not;
- the data (``Samples.fingerprint``) and the settings (axes, pNTK, implementation, shape, dtype).

:func:`differences` names what changed; the probe is named only when nothing else explains it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from ntkfunc._core.checks import FINGERPRINT_ATTR
from ntkfunc._core.hashing import tensor_digest
from ntkfunc._core.problem import Problem
from ntkfunc._core.types import ApplyFn
from ntkfunc._dataset.data import Samples
from ntkfunc._dataset.job import Job, Shape
from ntkfunc._engines import Engine, Implementation

PROBE_KEY = "probe"
_FREQUENCIES = (0.7548776662466927, 0.5698402909980532, 0.9362712478923217, 0.3286379856917398)  # fixed projections
_CHUNK = 1 << 20


def job_fingerprint(job: Job, shape: Shape, sketch: dict[str, Any] | None = None) -> dict[str, Any]:
    """The function, params, data, settings and kernel shape, as recorded in the manifest.

    ``sketch``: the resolved sketch of ``sketch=`` (kind, dim, seed and the kind of every parameter).
    """
    problem = shape.problem
    fingerprint = {
        **function_identity(job.f, problem),
        PROBE_KEY: probe_fingerprint(problem, job.s1),
        "x1": job.s1.fingerprint(),
        "x2": None if job.symmetric else job.s2.fingerprint(),
        "trace_axes": list(job.trace),
        "diagonal_axes": list(job.diag),
        "pntk": bool(job.pntk),
        "implementation": _implementation_name(job.engine),
        "kernel_shape": list(shape.kshape),
        "dtype": str(problem.out_dtype),
    }
    if job.precision != "highest":  # reduced-precision products differ from IEEE ones: never mixed in one file
        fingerprint["precision"] = job.precision
    if sketch is not None:
        fingerprint["sketch"] = sketch
    return fingerprint


def function_identity(fn: ApplyFn, problem: Problem) -> dict[str, Any]:
    """What is known exactly of ``fn``: its name, its module's structure and constants (see the module doc), the params' bytes."""
    p = problem.params
    identity = getattr(fn, FINGERPRINT_ATTR, None)
    return {
        "f": f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', type(fn).__name__)}",
        "module": identity() if callable(identity) else None,
        "params": tensor_digest([t.detach() for t in p.leaves], p.names),
    }


def _implementation_name(engine: Engine) -> str:
    """As earlier manifests recorded it: ``"auto"`` or the number."""
    return "auto" if engine.implementation == Implementation.AUTO else str(int(engine.implementation))


def summary(tensors: Sequence[torch.Tensor]) -> list[float]:
    """Fixed projections of the entries of ``tensors`` (as one vector), then its squared norm.

    >>> a = summary([torch.ones(3)]); len(a), a[-1]
    (5, 3.0)
    """
    sums = [0.0] * (len(_FREQUENCIES) + 1)
    offset = 0
    for t in tensors:
        flat = t.detach().reshape(-1)
        for start in range(0, flat.numel(), _CHUNK):
            part = flat[start : start + _CHUNK].to(torch.float64)
            idx = torch.arange(offset + start, offset + start + part.numel(), dtype=torch.float64, device=part.device)
            for k, c in enumerate(_FREQUENCIES):
                sums[k] += float((part * torch.cos(idx * c * math.pi)).sum())
            sums[-1] += float((part * part).sum())
        offset += flat.numel()
    return sums


def probe_fingerprint(problem: Problem, s1: Samples) -> dict[str, Any]:
    """Summaries of ``f``'s outputs and of one gradient of them on up to 3 samples of x1 (see the module doc)."""
    picks = sorted({0, len(s1) // 2, len(s1) - 1})
    x = torch.cat([s1.get(i, i + 1) for i in picks]).to(problem.device)
    leaves = [t.detach().requires_grad_(True) for t in problem.params.diff_leaves]
    with torch.enable_grad():
        out = problem.f(problem.params.rebuild(leaves), x)
        outs = [o for o in torch.utils._pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]
        weights = [torch.cos(torch.arange(o.numel(), dtype=o.dtype, device=o.device) * 0.6180339887).reshape(o.shape) for o in outs]
        scalar = sum(((o * w).sum() for o, w in zip(outs, weights)), torch.zeros((), device=problem.device))
        raw = torch.autograd.grad(scalar, leaves, allow_unused=True) if scalar.requires_grad else (None,) * len(leaves)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(leaves, raw)]
    return {"samples": picks, "dtype": str(problem.out_dtype), "outputs": summary(outs), "gradient": summary(grads)}


def _close(a: Sequence[float], b: Sequence[float], rtol: float) -> bool:
    if len(a) != len(b):
        return False
    scale = math.sqrt(max(a[-1], b[-1], 0.0))
    tol = rtol * scale + 1e-300
    return all(abs(x - y) <= tol for x, y in zip(a[:-1], b[:-1])) and abs(math.sqrt(max(a[-1], 0.0)) - math.sqrt(max(b[-1], 0.0))) <= tol


def probes_match(old: Any, new: Any) -> bool:
    """Whether two probe fingerprints agree within ``sqrt(eps)`` of their dtype (relative)."""
    if not isinstance(old, dict) or not isinstance(new, dict) or old.get("samples") != new.get("samples"):
        return False
    dtype = getattr(torch, str(new.get("dtype", "torch.float32")).replace("torch.", ""), torch.float32)
    rtol = math.sqrt(torch.finfo(dtype).eps) if dtype.is_floating_point else 1e-6
    return all(_close(old.get(k, []), new.get(k, []), rtol) for k in ("outputs", "gradient"))


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between two fingerprints: the exact entries that differ, or else (only) a changed probe of f.

    >>> differences({"x1": "a", "probe": None}, {"x1": "b", "probe": None})
    ['x1']
    """
    exact = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if k == PROBE_KEY or a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):  # name the part that differs (module.structure, ...)
            exact += [f"{k}.{j}" for j in sorted(set(a) | set(b)) if a.get(j) != b.get(j)]
        else:
            exact.append(k)
    if exact:
        return exact
    if not probes_match(old.get(PROBE_KEY), new.get(PROBE_KEY)):
        return ["f (its outputs or gradients on x1's probe samples: the function, or a constant it captures, changed)"]
    return []
