"""What a resumable output must match to be resumed: the fingerprint of a run."""

from __future__ import annotations

from typing import Any

from ntkfunc._core.problem import Problem
from ntkfunc._core.types import ApplyFn, PyTree
from ntkfunc._dataset.data import Samples, tensor_fingerprint
from ntkfunc._engines import Engine, Implementation


def job_fingerprint(
    fn: ApplyFn, params: PyTree, problem: Problem, s1: Samples, s2: Samples | None, trace: tuple, diag: tuple,
    pntk: bool, engine: Engine, kshape: tuple,
) -> dict[str, Any]:
    """The function's name, params, data, settings and kernel shape, as recorded in the manifest."""
    p = problem.params
    return {
        "f": f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', type(fn).__name__)}",
        "params": tensor_fingerprint([t.detach() for t in p.leaves], p.names),
        "x1": s1.fingerprint(),
        "x2": None if s2 is None else s2.fingerprint(),
        "trace_axes": list(trace),
        "diagonal_axes": list(diag),
        "pntk": bool(pntk),
        "implementation": _implementation_name(engine),
        "kernel_shape": list(kshape),
        "dtype": str(problem.out_dtype),
    }


def _implementation_name(engine: Engine) -> str:
    """As earlier manifests recorded it: ``"auto"`` or the number."""
    return "auto" if engine.implementation == Implementation.AUTO else str(int(engine.implementation))
