"""Structured-derivative rules: the extension point of implementation 3.

``ntkfunc.rules`` holds the registry (:data:`RULES`, keyed by the torch function a rule
handles), the base class :class:`Rule` and its output :class:`Structure`, and one module
per family of primitives. To add a rule, subclass :class:`Rule`, decorate it with
``@register(the_torch_function)``, and test it with :func:`ntkfunc.testing.check_rule`
(see the README's "Development" section).

Example:
  >>> import torch
  >>> from ntkfunc import rules
  >>> rules.lookup(torch.nn.functional.conv2d).name
  'conv2d'
  >>> rules.lookup(torch.tanh) is None  # no rule: Jacobian contraction for its parameters
  True
"""

from ntkfunc.rules.base import (
    EXPANSIONS,
    LETTERS,
    RULES,
    Bound,
    Factorable,
    IsParam,
    Meta,
    PaddedFactors,
    Rule,
    Structure,
    Tensor,
    Window,
    bind,
    check_structure,
    disabled,
    einsum_structure,
    enabled,
    expand,
    expansion,
    forced,
    is_forced,
    lookup,
    register,
    window_offset_range,
    window_out_size,
)

# Families register themselves on import.
from ntkfunc.rules import attention, concat, conv, elementwise, embedding, linear, norm, parametrize, recurrent  # noqa: E402,F401  isort: skip

__all__ = [
    "EXPANSIONS", "LETTERS", "RULES", "Bound", "Factorable", "IsParam", "Meta", "PaddedFactors", "Rule", "Structure",
    "Tensor", "Window", "window_offset_range", "window_out_size",
    "bind", "check_structure", "disabled", "einsum_structure", "enabled", "expand", "expansion", "forced", "is_forced", "lookup", "register",
]
