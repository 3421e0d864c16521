"""Registry of structured-derivative rules, keyed by the primitive (aten op) they handle.

A rule turns what a captured primitive saw (its non-parameter operands and the
cotangents of its output for x1 and x2) into that primitive's contribution to the
kernel, without forming the Jacobian with respect to the parameter. Families live in
their own modules and add themselves with :func:`register`. A primitive without a
rule is never an error: the structured implementation falls back to Jacobian
contraction for the parameters it consumes, so kernels stay exact.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

Rule = Callable[..., Any]

RULES: dict[Any, Rule] = {}


def register(*ops: Any) -> Callable[[Rule], Rule]:
    """Decorator: ``@register(aten.mm.default, aten.addmm.default)`` makes ``rule`` handle those ops.

    Refuses an op that already has a rule (rules never shadow each other silently).
    """
    if not ops:
        raise ValueError("register: expected at least one op")

    def add(rule: Rule) -> Rule:
        for op in ops:
            if op in RULES:
                raise KeyError(f"{op} already has rule {RULES[op].__name__}; refusing {rule.__name__}")
            RULES[op] = rule
        return rule

    return add


def lookup(op: Any) -> Optional[Rule]:
    """The rule for ``op``, or None (the caller then falls back to Jacobian contraction)."""
    return RULES.get(op)
