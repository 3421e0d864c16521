"""``group_kernels``: sum per-parameter kernels per module / layer.

``ntk_fn(..., per_param=True)`` returns one kernel per parameter tensor, in a pytree
with the structure of ``params``. Parameters are named by their path in that pytree,
with components joined by dots: ``{"0.weight": ...}`` (what ``from_module`` gives) is
named ``0.weight``, ``{"enc": {"w": ...}}`` is ``enc.w`` and ``[w, (v,)]`` gives ``0``
and ``1.0``. The group of a name is chosen by ``by``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Union

import torch
from torch.utils import _pytree as pytree

from ntkfunc._core.types import PyTree

GroupBy = Union[None, int, Sequence[str], Callable[[str], str]]


def _key_str(entry: object) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def param_names(params: PyTree) -> list[str]:
    """Dotted names of the leaves of a parameter pytree, in ``tree_flatten`` order.

    >>> param_names({"enc": {"w": 0, "b": 1}, "head": [2, (3,)]})
    ['enc.w', 'enc.b', 'head.0', 'head.1.0']
    """
    with_path, _ = pytree.tree_flatten_with_path(params)
    return [".".join(_key_str(e) for e in path) or "params" for path, _ in with_path]


def _group_of(name: str, by: GroupBy) -> str:
    parts = name.split(".")
    if by is None:  # the module: everything but the last component
        return ".".join(parts[:-1]) if len(parts) > 1 else name
    if isinstance(by, bool) or isinstance(by, int):
        if isinstance(by, bool) or by < 1:
            raise ValueError(f"group_kernels(by={by!r}): expected a depth >= 1 (number of leading name components)")
        return ".".join(parts[:by])
    if callable(by):
        key = by(name)
        if not isinstance(key, str):
            raise TypeError(f"group_kernels(by=...): the function returned {key!r} for {name!r}; expected a str")
        return key
    for prefix in by:  # whole components only: "1" matches "1.weight", not "10.weight"
        if name == prefix or name.startswith(prefix + "."):
            return prefix
    raise ValueError(f"group_kernels(by={list(by)!r}): parameter {name!r} matches none of the prefixes; expected each parameter to match one")


def group_kernels(kernels: PyTree, by: GroupBy = None, *, params: PyTree | None = None) -> dict[str, PyTree]:
    """Sum per-parameter kernels per group of parameters; returns ``{group: kernel}``.

    Args:
      kernels: the result of ``ntk_fn(f, ..., per_param=True)(x1, x2, params)``.
      by: how a parameter's dotted name picks its group:

        - ``None`` (default): its module, i.e. the name without its last component
          (``"encoder.layer1.weight" -> "encoder.layer1"``, ``"0.bias" -> "0"``);
        - an int ``d``: the first ``d`` components (``1``: top-level blocks);
        - a sequence of prefixes: the first prefix that equals the name or a leading run
          of its components (every parameter must match one);
        - a callable ``name -> group``.
      params: the params pytree the kernels were computed at. Needed only when ``f``
        returns a pytree (each parameter then holds a pytree of kernels): it tells where
        the parameter level ends. Without it every tensor is taken to be one parameter's
        kernel.

    Groups come in order of first appearance; each value has the shape (or output
    pytree) of the full kernel, and all values sum to the full kernel. Parameters
    without a kernel (``None``: integer constants) are skipped.

    Example:
      >>> import torch, ntkfunc
      >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
      >>> f, params = ntkfunc.from_module(model)
      >>> per = ntkfunc.ntk_fn(f, per_param=True)(torch.randn(5, 4), None, params)
      >>> layers = ntkfunc.group_kernels(per)
      >>> list(layers), layers["0"].shape
      (['0', '2'], torch.Size([5, 5]))
      >>> bool(torch.allclose(layers["0"], per["0.weight"] + per["0.bias"]))
      True
    """
    if params is not None:
        spec = pytree.tree_structure(params)
        try:
            per = spec.flatten_up_to(kernels)
        except (ValueError, TypeError) as err:
            raise ValueError(
                f"group_kernels: kernels of structure {pytree.tree_structure(kernels)} do not have the structure "
                f"of params {spec} (plus a kernel per parameter); expected the output of ntk_fn(..., per_param=True) "
                "at these params"
            ) from err
        names = param_names(params)
    else:
        with_path, _ = pytree.tree_flatten_with_path(kernels)
        per, names = [], []
        for path, leaf in with_path:
            if leaf is None:  # a constant (integer) parameter
                continue
            if not isinstance(leaf, torch.Tensor):
                raise TypeError(
                    f"group_kernels: found a {type(leaf).__name__} among the kernels; expected the tensors returned "
                    "by ntk_fn(..., per_param=True)"
                )
            per.append(leaf)
            names.append(".".join(_key_str(e) for e in path) or "params")
    groups: dict[str, PyTree] = {}
    for name, kernel in zip(names, per):
        if kernel is None:
            continue
        key = _group_of(name, by)
        groups[key] = kernel if key not in groups else pytree.tree_map(torch.add, groups[key], kernel)
    if not groups:
        raise ValueError("group_kernels: no kernel found; expected the output of ntk_fn(..., per_param=True)")
    return groups
