"""Pytree helpers: torch's ``_pytree`` under stable names, prefix broadcasting of axes, and leaf paths as printed."""

from __future__ import annotations

import re
from typing import Any

from torch.utils import _pytree as pytree

from ntkfunc._core.types import PyTree

tree_flatten = pytree.tree_flatten
tree_unflatten = pytree.tree_unflatten
tree_map = pytree.tree_map
tree_leaves = pytree.tree_leaves
tree_structure = pytree.tree_structure


def broadcast_prefix(prefix: PyTree, tree: PyTree, *, api: str = "ntk_fn", what: str = "vmap_axes") -> list[Any]:
    """Leaves of ``prefix`` repeated to match the leaves of ``tree``.

    ``prefix`` is an int/None (applies to every leaf) or a pytree whose structure is a
    prefix of ``tree``'s (as in ``torch.func.vmap``'s ``in_dims``).

    >>> broadcast_prefix(0, {"a": 1, "b": (2, 3)})
    [0, 0, 0]
    >>> broadcast_prefix({"a": 0, "b": 1}, {"a": 1, "b": (2, 3)})
    [0, 1, 1]
    """
    if prefix is None or isinstance(prefix, int):
        return [prefix] * len(tree_leaves(tree))
    result = pytree._broadcast_to_and_flatten(prefix, tree_structure(tree))
    if result is None:
        raise ValueError(
            f"{api}({what}={prefix!r}): does not match the structure of the inputs "
            f"{tree_structure(tree)}; expected an int, None, or a pytree prefix of it"
        )
    return result


def display_name(path: str) -> str:
    """A pytree path as ``explain`` and sketch plans print it: ``"['enc']['w']"`` -> ``"enc.w"``, ``"[0][1]"`` -> ``"0.1"``.

    >>> display_name("['enc']['w']"), display_name("[0][1]"), display_name("w")
    ('enc.w', '0.1', 'w')
    """
    parts = re.findall(r"\['([^']*)'\]|\[(\d+)\]|\.(\w+)", path)
    return ".".join(a or b or c for a, b, c in parts) or path
