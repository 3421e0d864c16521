"""Non-finite kernel entries: found, named by the samples they come from, and raised, warned or kept.

Every public kernel function takes ``nonfinite="raise" | "warn" | "ignore"`` (default
``"raise"``) and checks its result here: a ``FloatingPointError`` (or a ``RuntimeWarning``)
names the x1 and x2 samples whose kernel entries are NaN or infinite. Under ``torch.func``
transforms (an ensemble ``vmap``, ``grad`` through a kernel) the check looks through the
wrappers at the values themselves and reports only the count.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Literal

import torch

from ntkfunc._core.layout import Layout
from ntkfunc._core.pytree import tree_leaves
from ntkfunc._core.types import PyTree

NonFinite = Literal["raise", "warn", "ignore"]
MODES = ("raise", "warn", "ignore")
_ft = torch._C._functorch


def check_mode(nonfinite: object, api: str) -> NonFinite:
    """``nonfinite`` if it is one of :data:`MODES`, else a ValueError naming ``api``.

    >>> check_mode("warn", "ntk_fn")
    'warn'
    """
    if not isinstance(nonfinite, str) or nonfinite not in MODES:
        raise ValueError(f"{api}(nonfinite={nonfinite!r}): expected 'raise', 'warn' or 'ignore'")
    return nonfinite  # type: ignore[return-value]


def _values(t: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The tensor under any ``torch.func`` wrappers, and whether there were any."""
    wrapped = False
    while _ft.is_functorch_wrapped_tensor(t):
        t, wrapped = _ft.get_unwrapped(t), True
    return t, wrapped


def _few(idx: list[int], k: int = 10) -> str:
    return str(idx[:k])[:-1] + (f", ... ({len(idx)} in all)]" if len(idx) > k else "]")


def nonfinite_message(block: torch.Tensor, positions: Sequence[int], api: str, where: str = "",
                      offsets: tuple[int, int] = (0, 0), label: str = "kernel") -> str | None:
    """None if every entry of ``block`` is finite, else a message naming the samples they come from.

    ``positions``: where the batch axes are in ``block`` (``Layout.batch_positions``: x1's and
    x2's, one shared axis, or none); ``offsets``: the first x1 and x2 sample of ``block``;
    ``label``: what the entries are (``"kernel"``, ``"NTK"``, ``"NNGP"``).

    >>> k = torch.zeros(3, 2); k[1, 0] = float("nan")
    >>> print(nonfinite_message(k, (0, 1), "ntk_fn"))  # doctest: +ELLIPSIS
    ntk_fn: 1 non-finite kernel entries, from x1 samples [1] and x2 samples [0]; expected finite values (...)
    """
    values, wrapped = _values(block)
    if values.device.type == "meta" or values.is_complex():
        return None
    bad = ~torch.isfinite(values.detach())
    if not bool(bad.any()):
        return None
    count = int(bad.sum())
    if wrapped or not positions:
        origin = " (under a torch.func transform: samples not located)" if wrapped else ""
    else:
        keep1 = [d for d in range(bad.ndim) if d != positions[0]]
        rows = (offsets[0] + torch.nonzero(bad.any(dim=keep1) if keep1 else bad).flatten()).tolist()
        if len(positions) == 2:
            keep2 = [d for d in range(bad.ndim) if d != positions[1]]
            cols = (offsets[1] + torch.nonzero(bad.any(dim=keep2) if keep2 else bad).flatten()).tolist()
        else:
            cols = rows
        origin = f", from x1 samples {_few(rows)} and x2 samples {_few(cols)}"
    return (
        f"{api}: {count} non-finite {label} entries{where}{origin}; expected finite values "
        "(check these samples' inputs and f's outputs on them for NaN/inf or overflow)"
    )


def report(message: str | None, nonfinite: str, *, stacklevel: int = 2, raised: str = "") -> None:
    """Raise ``FloatingPointError(message + raised)``, warn, or do nothing, per ``nonfinite``."""
    if message is None or nonfinite == "ignore":
        return
    if nonfinite == "raise":
        raise FloatingPointError(message + raised)
    warnings.warn(message, RuntimeWarning, stacklevel=stacklevel + 1)


def check_kernels(result: PyTree, layouts: Sequence[Layout], nonfinite: NonFinite, api: str,
                  param_names: Sequence[str] | None = None, *, label: str = "kernel", stacklevel: int = 2) -> None:
    """Check every kernel of ``result``: one per output leaf (in ``layouts``' order), or with
    ``param_names`` (``per_param=True``) one per differentiated parameter and output leaf.
    """
    if nonfinite == "ignore":
        return
    kernels = [t for t in tree_leaves(result) if isinstance(t, torch.Tensor)]
    n_out = len(layouts)
    for k, block in enumerate(kernels):
        parts = []
        if param_names is not None:
            name = param_names[k // n_out]
            parts.append(f"parameter params{name}" if name.startswith("[") else f"parameter {name}")
        if n_out > 1:
            parts.append(f"output leaf {k % n_out}")
        where = f" ({', '.join(parts)})" if parts else ""
        message = nonfinite_message(block, layouts[k % n_out].batch_positions(), api, where, label=label)
        hint = "; pass nonfinite='warn' or nonfinite='ignore' to return them"
        report(message, nonfinite, stacklevel=stacklevel + 1, raised=hint)
