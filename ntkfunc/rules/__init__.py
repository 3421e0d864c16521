"""Registry of structured-derivative rules, keyed by the torch function they handle.

A rule knows one primitive ``y = op(θ, a)`` that is *linear in its parameter* θ
(a linear layer's weight or bias, a convolution kernel, a norm's affine, a broadcast
scale, an embedding table). It has three small jobs:

- ``match(args, kwargs, is_param)``: which arguments are parameters (``{role: tensor}``),
  or None when this call is outside what the rule handles (the parameters it consumes
  then fall back to Jacobian contraction; never a wrong kernel).
- ``capture(args, kwargs, is_param)``: run inside ``f`` (under ``vmap``/``jacrev``):
  the non-parameter operands to keep (e.g. the layer input, a norm's normalised
  input; None in place of a parameter) and static settings (stride, padding, ...).
- ``structure(role, operands, meta, y_shape)``: the Jacobian ``∂y/∂θ`` as an einsum
  factorisation :class:`Structure`. The NTK contribution of θ is then
  ``Σ_θ (c₁ ∂y₁/∂θ)(c₂ ∂y₂/∂θ)`` with ``c = ∂f/∂y`` the output cotangents, which
  ``ntkfunc._structured`` contracts with ``opt_einsum`` in one expression per
  parameter, letting it choose between forming ``J`` and the cheaper Gram paths
  (``(c₁ c₂ᵀ) ⊙ (x₁ x₂ᵀ)`` for a linear layer).

Families live in their own modules (``linear``, ``conv``, ``norm``, ``elementwise``,
``embedding``) and add themselves with :func:`register`.
"""

from __future__ import annotations

import dataclasses
import string
from typing import Any, Callable, Optional, Sequence

import torch

Tensor = torch.Tensor
IsParam = Callable[[Any], bool]


@dataclasses.dataclass
class Structure:
    """``∂y/∂θ`` of one sample as an einsum: ``J[θ] = Σ c[y] ∏ operands`` (letters local to the rule).

    Attributes:
      y_shape: shape (per sample) of a view of the primitive's output ``y``; ``y`` names its axes.
      y: one letter per axis of ``y_shape``.
      theta: letters of the parameter's axes (those shared by the two samples' factors).
      operands: ``(letters, tensor)`` pairs; each tensor has a leading sample axis (of size
        ``b``, the block of samples, or 1 when shared by all) that the letters do not name.
      scale: constant factor of ``∂y/∂θ`` (e.g. ``-1`` for ``a - θ``).
    """

    y_shape: tuple[int, ...]
    y: str
    theta: str
    operands: list[tuple[str, Tensor]]
    scale: float = 1.0


class Rule:
    """Base class of a rule; subclasses set ``name`` and override the three methods."""

    name = "rule"

    def match(self, args: tuple, kwargs: dict, is_param: IsParam) -> Optional[dict[str, Tensor]]:
        raise NotImplementedError(f"Subclass {type(self).__name__} must define match()")

    def capture(self, args: tuple, kwargs: dict, is_param: IsParam) -> tuple[list[Optional[Tensor]], dict[str, Any]]:
        raise NotImplementedError(f"Subclass {type(self).__name__} must define capture()")

    def structure(self, role: str, operands: Sequence[Tensor], meta: dict[str, Any], y_shape: tuple[int, ...]) -> Structure:
        raise NotImplementedError(f"Subclass {type(self).__name__} must define structure()")


RULES: dict[Any, Rule] = {}


def register(*ops: Any) -> Callable[[type], type]:
    """Class decorator: ``@register(torch.nn.functional.linear)`` makes the rule handle those functions.

    Refuses a function that already has a rule (rules never shadow each other silently).
    """
    if not ops:
        raise ValueError("register: expected at least one op")

    def add(cls: type) -> type:
        rule = cls()
        for op in ops:
            if op in RULES:
                raise KeyError(f"{op} already has rule {RULES[op].name}; refusing {rule.name}")
            RULES[op] = rule
        return cls

    return add


def lookup(op: Any) -> Optional[Rule]:
    """The rule for ``op``, or None (the caller then falls back to Jacobian contraction)."""
    try:
        return RULES.get(op)
    except TypeError:  # unhashable callables
        return None


EXPANSIONS: dict[Any, Callable[..., Any]] = {}


def expand(*ops: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: ``fn`` re-implements ``op`` in primitives that have rules (or returns NotImplemented).

    The capture runs ``fn`` instead of a fused op that consumes parameters (such as
    ``multi_head_attention_forward``), so the primitives inside get their rules.
    """

    def add(fn: Callable[..., Any]) -> Callable[..., Any]:
        for op in ops:
            if op in EXPANSIONS:
                raise KeyError(f"{op} already has expansion {EXPANSIONS[op].__name__}")
            EXPANSIONS[op] = fn
        return fn

    return add


def expansion(op: Any) -> Optional[Callable[..., Any]]:
    """The expansion of ``op`` into ruled primitives, or None."""
    try:
        return EXPANSIONS.get(op)
    except TypeError:
        return None


# --- helpers shared by the families --------------------------------------------------

LETTERS = string.ascii_letters


def bind(args: tuple, kwargs: dict, names: Sequence[str], defaults: dict[str, Any]) -> Optional[dict[str, Any]]:
    """Arguments by name (positional first); None if an unknown keyword is given."""
    if len(args) > len(names) or any(k not in names for k in kwargs):
        return None
    bound = dict(defaults)
    bound.update(zip(names, args))
    bound.update(kwargs)
    return bound


def einsum_structure(
    inputs: Sequence[str],
    output: str,
    theta_index: int,
    tensors: Sequence[Optional[Tensor]],
    theta_shape: Sequence[int],
    y_shape: Sequence[int],
    scale: float = 1.0,
) -> Structure:
    """The structure of ``y = einsum(inputs -> output)`` with respect to operand ``theta_index``.

    ``tensors`` are the other operands (batch-first; None at ``theta_index``). Size-1 axes that
    broadcast are dropped; a θ axis that appears nowhere else (y only depends on its sum)
    gets an operand of ones, so that summing it over θ gives its size.
    """
    sizes: dict[str, int] = {}
    for letters, shape in [(output, tuple(y_shape)), (inputs[theta_index], tuple(theta_shape))] + [
        (s, tuple(t.shape[1:])) for s, t in zip(inputs, tensors) if t is not None
    ]:
        for c, d in zip(letters, shape):
            sizes[c] = max(sizes.get(c, 1), d)
    operands = []
    for s, t in zip(inputs, tensors):
        if t is None:
            continue
        keep = [i for i, c in enumerate(s) if not (t.shape[1 + i] == 1 and sizes[c] > 1)]
        if len(keep) < len(s):
            t = t.reshape(t.shape[0], *[t.shape[1 + i] for i in keep])
            s = "".join(s[i] for i in keep)
        operands.append((s, t))
    seen = set(output).union(*[set(s) for s, _ in operands])
    theta = ""
    for c, d in zip(inputs[theta_index], theta_shape):
        if d == 1 and sizes[c] > 1:
            continue
        if c not in seen:
            operands.append((c, torch.ones(1, d)))  # leading size 1: shared by all samples
        theta += c
    return Structure(tuple(y_shape), output, theta, operands, scale)


# Families register themselves on import.
from ntkfunc.rules import attention, conv, elementwise, embedding, linear, norm  # noqa: E402,F401
