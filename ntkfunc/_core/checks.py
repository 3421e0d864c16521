"""Argument checks shared by the public functions; each takes the caller's name (``api``).

As torch's validators take ``api: str``, every message starts with the public function
that was called, then says what was given and what was expected.
"""

from __future__ import annotations

from typing import Any

from ntkfunc._core.types import ApplyFn, Axes, VMapAxes

BATCH_COUPLED_ATTR = "__ntkfunc_batch_coupled__"
"""Attribute ``from_module`` sets on ``f`` when samples of a batch interact (BatchNorm with batch statistics)."""


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
        return x_axis, fx_axis
    return vmap_axes, vmap_axes


def refuse_batch_coupled(f: ApplyFn, vmap_axes: VMapAxes, api: str) -> None:
    """Refuse per-sample kernels of a function whose samples interact (marked by ``from_module``)."""
    reason = getattr(f, BATCH_COUPLED_ATTR, None)
    if reason and vmap_axes is not None:
        raise ValueError(
            f"{api}(vmap_axes={vmap_axes!r}): {reason}, so its output for one sample depends on the "
            "rest of the batch and a per-sample kernel would be wrong; pass vmap_axes=None (exact kernel "
            "of the whole batch) or call model.eval() before from_module"
        )
