"""Argument checks shared by the public functions; each takes the caller's name (``api``).

As torch's validators take ``api: str``, every message starts with the public function
that was called, then says what was given and what was expected.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils import _pytree as pytree

from ntkfunc._core.types import ApplyFn, Axes, PyTree, VMapAxes

BATCH_COUPLED_ATTR = "__ntkfunc_batch_coupled__"
"""Attribute ``from_module`` sets on ``f`` when samples of a batch interact (BatchNorm with batch statistics)."""

FINGERPRINT_ATTR = "__ntkfunc_fingerprint__"
"""A zero-argument callable attribute returning JSON data that changes whenever what its owner computes or holds
does: ``from_module`` sets it on ``f`` (the module's structure and constants), a Dataset may define it (its
contents). ``kernel_matrix`` records it in a resumable output's fingerprint."""


def as_axes_tuple(axes: Axes) -> tuple[int, ...]:
    """``-1 -> (-1,)``, ``[0, 2] -> (0, 2)`` (the values are checked against an output later)."""
    return (axes,) if isinstance(axes, int) else tuple(axes)


def check_bool(value: Any, name: str, api: str) -> bool:
    """``value`` if it is True or False, else a TypeError naming ``api(name=...)``.

    >>> check_bool(True, "per_param", "ntk_fn")
    True
    """
    if not isinstance(value, bool):
        raise TypeError(f"{api}({name}={value!r}): expected True or False")
    return value


def check_positive_int(value: Any, name: str, api: str, *, allow_none: bool = False) -> int | None:
    """``value`` if it is a positive int (or None when ``allow_none``), else a ValueError.

    >>> check_positive_int(3, "batch_size", "kernel_matrix")
    3
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        expected = "a positive int or None" if allow_none else "a positive int"
        raise ValueError(f"{api}({name}={value!r}): expected {expected}")
    return value


def split_vmap_axes(vmap_axes: VMapAxes, api: str = "ntk_fn") -> tuple[Any, Any]:
    """``(input axes, output axes)`` of ``vmap_axes`` (an int/pytree/None, or NT's ``(x, fx, {})``).

    >>> split_vmap_axes(0), split_vmap_axes((1, 0, {}))
    ((0, 0), (1, 0))
    """
    if isinstance(vmap_axes, tuple) and len(vmap_axes) == 3 and isinstance(vmap_axes[2], dict):
        x_axis, fx_axis, kw = vmap_axes
        if kw:
            raise ValueError(f"{api}(vmap_axes={vmap_axes!r}): keyword-argument axes are not supported; expected {{}}")
        _check_axis_tree(x_axis, vmap_axes, api)
        _check_axis_tree(fx_axis, vmap_axes, api)
        return x_axis, fx_axis
    _check_axis_tree(vmap_axes, vmap_axes, api)
    return vmap_axes, vmap_axes


def _check_axis_tree(axes: Any, given: VMapAxes, api: str) -> None:
    """Every leaf of a (pytree of) batch axes is an int or None, else a TypeError naming ``api``."""
    for leaf in pytree.tree_leaves(axes):
        if leaf is not None and (isinstance(leaf, bool) or not isinstance(leaf, int)):
            raise TypeError(
                f"{api}(vmap_axes={given!r}): {leaf!r} is a {type(leaf).__name__}; expected the batch axis as an "
                "int, None (samples interact: the whole batch at once), a pytree of them matching x, or "
                "(x_axes, fx_axes, {})"
            )


def refuse_batch_coupled(f: ApplyFn, vmap_axes: VMapAxes, api: str) -> None:
    """Refuse per-sample kernels of a function whose samples interact (marked by ``from_module``)."""
    reason = getattr(f, BATCH_COUPLED_ATTR, None)
    if reason and vmap_axes is not None:
        raise ValueError(
            f"{api}(vmap_axes={vmap_axes!r}): {reason}, so its output for one sample depends on the "
            "rest of the batch and a per-sample kernel would be wrong; pass vmap_axes=None (exact kernel "
            "of the whole batch) or call model.eval() before from_module"
        )


# --- failures of f, explained -------------------------------------------------------------


def _floating(tree: PyTree) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(tree) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def input_mismatch(params: PyTree, inputs: dict[str, PyTree]) -> tuple[type[Exception], str] | None:
    """``(error type, what disagrees)`` when the inputs' floating dtype or device differ from params', else None.

    >>> input_mismatch({"w": torch.ones(2)}, {"x1": torch.ones(3, 2, dtype=torch.float64)})[1]
    'x1 is torch.float64 and params are torch.float32; expected inputs of the dtype of params (e.g. x1.to(torch.float32))'
    """
    p = _floating(params)
    if not p:
        return None
    p_dtypes = sorted({str(t.dtype) for t in p})
    p_devices = sorted({str(t.device) for t in p})
    for name, x in inputs.items():
        tensors = [t for t in pytree.tree_leaves(x) if isinstance(t, torch.Tensor)]
        far = sorted({str(t.device) for t in tensors if t.ndim > 0} - set(p_devices))
        if far:
            return ValueError, (
                f"{name} is on {', '.join(far)} and params on {', '.join(p_devices)}; expected inputs on the device of "
                f"params (e.g. {name}.to({p_devices[0]!r}))"
            )
        dtypes = sorted({str(t.dtype) for t in tensors if t.is_floating_point()} - set(p_dtypes))
        if dtypes:
            return TypeError, (
                f"{name} is {', '.join(dtypes)} and params are {', '.join(p_dtypes)}; expected inputs of the dtype of "
                f"params (e.g. {name}.to({p_dtypes[0]}))"
            )
    return None


_VMAP_CONTROL_FLOW = "use a Tensor in some data-dependent control flow"  # torch.func.vmap's error
_OWN_MESSAGE = "from_module:"  # errors ntkfunc's own f raises already say what to do


class VmapFailure(RuntimeError):
    """``f`` runs on one sample without ``vmap`` but fails under it (raised by the probe of ``make_problem``).

    Attributes:
      op: the torch function (as ``f`` called it) that raised, or None if none did.
      error: torch's exception.
    """

    def __init__(self, op: str | None, error: BaseException) -> None:
        self.op = op
        self.error = error
        super().__init__(f"f(params, x) runs on one sample without vmap but fails under torch.func.vmap over samples{_at(op, error)}")


def _at(op: str | None, error: BaseException) -> str:
    """`` in torch.lstm (aten::...; torch says: ...)``: where a transform failed, and torch's first line."""
    text = str(error).strip()
    first = text.splitlines()[0] if text else type(error).__name__
    aten = sorted(set(re.findall(r"aten::\w+(?:\.\w+)?", text)))
    where = f" in {op}" if op else ""
    return f"{where} ({', '.join(aten + [f'torch says: {first}'])})"


@contextlib.contextmanager
def explained_f_errors(api: str, params: PyTree, inputs: dict[str, PyTree], vmap_axes: VMapAxes = 0, *,
                       without_vmap: str = "pass vmap_axes=None to compute the kernel of the whole batch at once without vmap") -> Iterator[None]:
    """Re-raise torch's errors from running ``f`` with what the caller gave and what was expected.

    - inputs whose floating dtype or device differ from params' (torch says e.g. ``mat1 and mat2
      must have the same dtype``): a TypeError / ValueError naming both;
    - a tensor's value used in Python control flow (or ``.item()``) under ``vmap``: a ValueError
      that says so, and what computes the kernel without ``vmap`` (``without_vmap``);
    - any other op that fails under ``vmap`` although ``f`` runs on one sample without it
      (:class:`VmapFailure`: boolean-mask indexing, ops without a batching rule, in-place
      writes into tensors that are not batched): a ValueError naming the op, with torch's
      message, and ``without_vmap``.
    """
    try:
        yield
    except RuntimeError as err:
        cause = err.error if isinstance(err, VmapFailure) else err
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if _VMAP_CONTROL_FLOW in str(cause):
            raise ValueError(
                f"{api}(vmap_axes={vmap_axes!r}): f uses a tensor's value in Python control flow (an if/while on a "
                "tensor, .item(), bool(...)), which torch.func.vmap cannot batch over samples; expected f built from "
                f"tensor ops (e.g. torch.where instead of if), or {without_vmap}"
            ) from cause
        if isinstance(err, VmapFailure):
            if str(cause).startswith(_OWN_MESSAGE):
                raise cause from cause.__cause__
            raise ValueError(
                f"{api}(vmap_axes={vmap_axes!r}): {err}; expected f built from ops that vmap can batch (torch.where or a "
                "product with the mask instead of boolean indexing x[mask]; out-of-place ops on tensors created inside f), "
                f"or {without_vmap}"
            ) from cause
        mismatch = input_mismatch(params, inputs)
        if mismatch is None:
            raise
        kind, what = mismatch
        raise kind(f"{api}: f(params, x) failed ({first}): {what}") from err
