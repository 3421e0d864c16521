"""What a resumable output must match to be resumed: the fingerprint of a run.

A run's fingerprint records everything that determines its kernel:

- :data:`RESULTS_FORMAT`: a number that every fix changing what ntkfunc computes bumps, so that a
  file written before such a fix is never resumed or reused by a fixed version;
- ``f``'s name and, for a function made by :func:`ntkfunc.from_module` (or any ``f`` with a
  ``__ntkfunc_fingerprint__`` attribute), the module's structure and constants: class names,
  ``repr`` (layers and their settings: ``Tanh`` vs ``ReLU``), ``state_dict`` keys, training
  flags, the plain attributes of every submodule (hyper-parameters kept as attributes, such as
  ``self.clip = 3.0``, and tensors kept outside parameters and buffers) and every byte of its
  buffers and frozen parameters;
- for any other ``f``: what it captures (:func:`captured`): its closure cells, the globals of its
  module it reads, its default arguments (and those of the functions of its own module it calls,
  three calls deep), a ``functools.partial``'s arguments, a bound method's or a callable object's
  attributes: tensors and arrays byte by byte, numbers and strings by value, ``nn.Module``\\ s by
  structure, attributes and every byte of their state (other objects by their type only);
- ``params``: every byte;
- ``probe``: what ``f`` computes, whatever it is: summaries of its outputs, and of the gradient
  of a fixed combination of them, on :data:`PROBE_SAMPLES` evenly spread samples of x1 and of x2
  (first and last included), :data:`PROBE_CHUNK` at a time (one forward and one backward pass
  each: at most 8 passes of 4 samples). Compared with a tolerance (``sqrt(eps)`` of the output
  dtype, relative), so that another device or thread count still resumes, while a changed
  function or constant that shows on those samples does not;
- the data (``Samples.fingerprint``: every leaf of a pytree input, its structure and each leaf's batch axis) and
  the settings (trace and diagonal axes, the output's batch axis when ``vmap_axes`` is not 0, pNTK,
  implementation, shape, dtype).

Not detected: a change that shows on none of the probe samples and is in nothing ``f`` captures
as listed above (state reached through other objects, files ``f`` reads, a random generator).

:func:`differences` names what changed; the probe is named only when nothing else explains it.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import math
import types
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from ntkfunc._core.checks import FINGERPRINT_ATTR, split_vmap_axes
from ntkfunc._core.hashing import module_attributes, tensor_digest, value_text
from ntkfunc._core.problem import Problem
from ntkfunc._core.types import ApplyFn
from ntkfunc._dataset.data import Samples
from ntkfunc._dataset.job import Job, Shape
from ntkfunc._engines import Engine, Implementation

RESULTS_FORMAT = 1
"""The format of ntkfunc's results. Every fix that changes what ntkfunc computes (a wrong kernel or wrong features
corrected) MUST bump it: kernel outputs and features files record it in their fingerprint, and a file of another
results format is never resumed or reused (features files of another format get another name)."""
RESULTS_KEY = "results_format"
PROBE_KEY = "probe"
PROBE_SAMPLES = 16
"""Samples of each of x1 and x2 the probe of ``f`` runs on (all of them when there are fewer)."""
PROBE_CHUNK = 4
"""Samples per forward and backward pass of the probe."""
_FREQUENCIES = (0.7548776662466927, 0.5698402909980532, 0.9362712478923217, 0.3286379856917398)  # fixed projections
_CHUNK = 1 << 20
_CAPTURE_DEPTH = 3


def job_fingerprint(job: Job, shape: Shape, sketch: dict[str, Any] | None = None) -> dict[str, Any]:
    """The function, params, data, settings and kernel shape, as recorded in the manifest.

    ``sketch``: the resolved sketch of ``sketch=`` (kind, dim, seed and the kind of every parameter);
    without it, the sketch's settings (``dim``, ``seed``, ``kind``) when ``job`` has one.
    """
    problem = shape.problem
    fingerprint = {
        **results_format(),
        **function_identity(job.f, problem),
        PROBE_KEY: probe_fingerprint(problem, job.s1, None if job.symmetric else job.s2),
        "x1": job.s1.fingerprint(),
        "x2": None if job.symmetric else job.s2.fingerprint(),
        "trace_axes": list(job.trace),
        "diagonal_axes": list(job.diag),
        "pntk": bool(job.pntk),
        "implementation": _implementation_name(job.engine),
        "kernel_shape": list(shape.kshape),
        "dtype": str(problem.out_dtype),
    }
    if _output_axes(job) != "=0":  # the inputs' axes are in x1's and x2's fingerprints; the output's here
        fingerprint["output_batch_axis"] = _output_axes(job)
    if job.precision != "highest":  # reduced-precision products differ from IEEE ones: never mixed in one file
        fingerprint["precision"] = job.precision
    if sketch is not None:
        fingerprint["sketch"] = sketch
    elif job.sketch is not None:
        fingerprint["sketch"] = {"dim": job.sketch.dim, "seed": job.sketch.seed, "kind": job.sketch.kind}
    return fingerprint


def _output_axes(job: Job) -> str:
    """The output batch axes of ``vmap_axes`` (a pytree prefix of the outputs), as text independent of dict order."""
    _, fx_axis = split_vmap_axes(job.vmap_axes, "kernel_matrix")
    with_path, _ = torch.utils._pytree.tree_flatten_with_path(fx_axis)
    return ",".join(sorted(f"{torch.utils._pytree.keystr(p)}={a}" for p, a in with_path))


def results_format() -> dict[str, int]:
    """The results format, as every fingerprint (kernel outputs, features files) records it."""
    return {RESULTS_KEY: RESULTS_FORMAT}


def function_identity(fn: ApplyFn, problem: Problem) -> dict[str, Any]:
    """What is known exactly of ``fn``: its name, its module's structure and constants or what it captures (see the
    module doc), and the params' bytes."""
    p = problem.params
    identity = getattr(fn, FINGERPRINT_ATTR, None)
    return {
        "f": f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', type(fn).__name__)}",
        "module": identity() if callable(identity) else None,
        "captured": None if callable(identity) else captured(fn),
        "params": tensor_digest([t.detach() for t in p.leaves], p.names),
    }


def _implementation_name(engine: Engine) -> str:
    """As earlier manifests recorded it: ``"auto"`` or the number."""
    return "auto" if engine.implementation == Implementation.AUTO else str(int(engine.implementation))


# --- what a hand-written f captures -----------------------------------------------------------------


def captured(fn: Any) -> dict[str, str]:
    """``{name: text}`` of the values ``fn`` captures (see the module doc), each :func:`value_text` (a module: its structure,
    attributes and state). Names are the variables' (``helper.table``: ``table`` as the function ``helper`` reads it).

    >>> table = torch.ones(3)
    >>> g = lambda p, x: p["w"] * table[x]
    >>> sorted(captured(g))
    ['table']
    """
    found: dict[str, str] = {}
    root = fn
    while isinstance(root, (functools.partial, types.MethodType)):
        root = root.func if isinstance(root, functools.partial) else root.__func__
    home = getattr(root, "__globals__", None) or getattr(vars(type(fn)).get("__call__"), "__globals__", None)
    seen: set[int] = set()

    def value(name: str, v: Any, depth: int) -> None:
        if isinstance(v, (types.ModuleType, type, types.BuiltinFunctionType, types.BuiltinMethodType)):
            return  # imports, classes and builtins: code, not data
        if isinstance(v, types.FunctionType):
            if v.__globals__ is home:  # a function of f's own module (or defined inside f): what it reads counts too
                visit(v, f"{name}.", depth + 1)
            return  # a library's function: not followed
        if isinstance(v, (functools.partial, types.MethodType)):
            visit(v, f"{name}.", depth + 1)
            return
        found[name] = _module_text(v) if isinstance(v, torch.nn.Module) else value_text(v)

    def visit(obj: Any, prefix: str, depth: int) -> None:
        if depth > _CAPTURE_DEPTH or id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, functools.partial):
            visit(obj.func, prefix, depth + 1)
            for i, a in enumerate(obj.args):
                value(f"{prefix}args[{i}]", a, depth)
            for k, a in obj.keywords.items():
                value(f"{prefix}{k}", a, depth)
        elif isinstance(obj, types.MethodType):
            owner = obj.__self__
            if isinstance(owner, torch.nn.Module) or not hasattr(owner, "__dict__"):
                value(f"{prefix}self", owner, depth)
            else:  # what the method reads of its object
                for k, a in sorted(vars(owner).items()):
                    value(f"{prefix}self.{k}", a, depth)
            visit(obj.__func__, prefix, depth + 1)
        elif isinstance(obj, types.FunctionType):
            code = obj.__code__
            for name, cell in zip(code.co_freevars, obj.__closure__ or ()):
                try:
                    contents = cell.cell_contents
                except ValueError:  # a cell not yet assigned
                    continue
                value(f"{prefix}{name}", contents, depth)
            for name in sorted(set(_global_names(code))):
                if name in obj.__globals__:
                    value(f"{prefix}{name}", obj.__globals__[name], depth)
            for i, d in enumerate(obj.__defaults__ or ()):
                value(f"{prefix}defaults[{i}]", d, depth)
            for k, d in (obj.__kwdefaults__ or {}).items():
                value(f"{prefix}{k}", d, depth)
        elif callable(obj) and hasattr(obj, "__dict__") and not isinstance(obj, torch.nn.Module):  # a callable object
            for k, a in sorted(vars(obj).items()):
                value(f"{prefix}{k}", a, depth)
            call = vars(type(obj)).get("__call__")  # the class's own __call__ (a function of the user's code)
            if isinstance(call, types.FunctionType):
                visit(call, prefix, depth + 1)
        elif isinstance(obj, torch.nn.Module):
            found[prefix.rstrip(".") or "module"] = _module_text(obj)

    visit(fn, "", 0)
    return found


def _global_names(code: types.CodeType) -> Iterator[str]:
    """The names ``code`` (and the code of the functions and comprehensions inside it) looks up."""
    yield from code.co_names
    for const in code.co_consts:
        if inspect.iscode(const):
            yield from _global_names(const)


def _module_text(module: torch.nn.Module) -> str:
    """A module a hand-written ``f`` captures: its classes, ``repr``, attributes and every byte of its state."""
    state = module.state_dict(keep_vars=True)
    h = hashlib.sha256()
    h.update(repr([type(m).__qualname__ for m in module.modules()]).encode())
    h.update(value_text(repr(module)).encode())
    h.update(module_attributes(module).encode())
    h.update(tensor_digest([t.detach() for t in state.values()], list(state)).encode())
    return f"module:{h.hexdigest()}"


# --- what f computes on probe samples ---------------------------------------------------------------


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


def probe_samples(n: int, count: int = PROBE_SAMPLES) -> list[int]:
    """``count`` evenly spread sample indices of ``n`` (all of them when ``n <= count``), first and last included.

    >>> probe_samples(3), probe_samples(100, 4)
    ([0, 1, 2], [0, 33, 66, 99])
    """
    if n <= count:
        return list(range(n))
    return sorted({round(k * (n - 1) / (count - 1)) for k in range(count)})


def probe_fingerprint(problem: Problem, s1: Samples, s2: Samples | None = None) -> dict[str, Any]:
    """Summaries of ``f``'s outputs and of one gradient of them on spread samples of x1 (and x2), a few at a time."""
    sides = [("x1", s1)] + ([("x2", s2)] if s2 is not None else [])
    picks = {name: probe_samples(len(s)) for name, s in sides}
    passes = [(s, picks[name][a : a + PROBE_CHUNK]) for name, s in sides for a in range(0, len(picks[name]), PROBE_CHUNK)]
    leaves = [t.detach().requires_grad_(True) for t in problem.params.diff_leaves]
    outputs, gradients = [], []
    for s, indices in passes:  # one side per pass: x1 and x2 may differ in their other axes (sequence lengths)
        x = torch.utils._pytree.tree_map(lambda t: t.to(problem.device), s.take(indices))
        with torch.enable_grad():
            out = problem.f(problem.params.rebuild(leaves), x)
            outs = [o for o in torch.utils._pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]
            weights = [torch.cos(torch.arange(o.numel(), dtype=o.dtype, device=o.device) * 0.6180339887).reshape(o.shape) for o in outs]
            scalar = sum(((o * w).sum() for o, w in zip(outs, weights)), torch.zeros((), device=problem.device))
            raw = torch.autograd.grad(scalar, leaves, allow_unused=True) if scalar.requires_grad else (None,) * len(leaves)
        outputs.append(summary(outs))
        gradients.append(summary([torch.zeros_like(p) if g is None else g for p, g in zip(leaves, raw)]))
    return {"samples": picks, "dtype": str(problem.out_dtype), "outputs": outputs, "gradient": gradients}


def _close(a: Sequence[float], b: Sequence[float], rtol: float) -> bool:
    """Within ``rtol`` of the norm; a non-finite summary (NaN outputs on a probe sample) only matches the same one."""
    if len(a) != len(b) or not a:
        return False
    if not all(math.isfinite(v) for v in (*a, *b)):
        return all(x == y or (math.isnan(x) and math.isnan(y)) for x, y in zip(a, b))
    scale = math.sqrt(max(a[-1], b[-1], 0.0))
    tol = rtol * scale + 1e-300
    return all(abs(x - y) <= tol for x, y in zip(a[:-1], b[:-1])) and abs(math.sqrt(max(a[-1], 0.0)) - math.sqrt(max(b[-1], 0.0))) <= tol


def probes_match(old: Any, new: Any) -> bool:
    """Whether two probe fingerprints agree within ``sqrt(eps)`` of their dtype (relative), pass by pass."""
    if not isinstance(old, dict) or not isinstance(new, dict) or old.get("samples") != new.get("samples"):
        return False
    dtype = getattr(torch, str(new.get("dtype", "torch.float32")).replace("torch.", ""), torch.float32)
    rtol = math.sqrt(torch.finfo(dtype).eps) if dtype.is_floating_point else 1e-6
    for k in ("outputs", "gradient"):
        a, b = old.get(k), new.get(k)
        if not isinstance(a, list) or not isinstance(b, list) or len(a) != len(b):
            return False
        if not all(isinstance(x, list) and isinstance(y, list) and _close(x, y, rtol) for x, y in zip(a, b)):
            return False
    return True


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
        if isinstance(a, dict) and isinstance(b, dict):  # name the part that differs (module.structure, captured.table, ...)
            parts = [j for j in sorted(set(a) | set(b)) if a.get(j) != b.get(j)]
            exact += [f"{k}.{j}" for j in parts if not (j == "attributes" and "structure" in parts)]  # other layers: other attributes
        else:
            exact.append(k)
    if exact:
        return exact
    if not probes_match(old.get(PROBE_KEY), new.get(PROBE_KEY)):
        return ["f (its outputs or gradients on the probe samples of x1 and x2: the function, or a constant it captures, changed)"]
    return []
