"""What a kernel function remembers between calls: typed, and owned by the function's closure.

``ntk_fn(f)`` returns a kernel that is usually called many times with inputs of the same
shapes (a kernel per training step, per tile). What depends only on those shapes is
found once and kept here: what the probe of ``f`` found (output shapes and structure),
and what the engines derive from shapes alone (planner measurements such as activation
sizes, the structured engine's capture, equations and per-parameter routes).
Parameter *values* are never kept: a call with the same shapes and new values computes
the new kernel. Nothing is shared between kernel functions.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

Signature = tuple
"""Structures, per-sample shapes, dtypes and devices of params and inputs (``problem.signature_of``)."""


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    """``f`` on the first sample of x1 and x2: output leaves (detached) and the output structure; and what its probe
    under ``vmap`` saw ``f`` call (True where it was not probed so): an op that ``BatchableOps`` computes another way
    (``batchable``), an attention function that ``transform_friendly_attention`` routes (``attention``)."""

    out1: list[torch.Tensor]
    out2: list[torch.Tensor]
    out_spec: Any
    batchable: bool = True
    attention: bool = True


ShapeKey = tuple[str, Signature, Any]
"""(what, signature, further parts such as sizes): the key of :attr:`KernelCache.derived`."""


@dataclasses.dataclass
class KernelCache:
    """Per kernel function: what depends on the input signature only.

    Attributes:
      probes: what the probe of ``f`` found, by signature.
      derived: anything else an engine derives from shapes, dtypes and structure alone
        (``Problem.remember``): activation sizes, the structured engine's capture,
        equations, prices and routes. Never tensors that hold parameter or input values.
    """

    probes: dict[Signature, ProbeResult] = dataclasses.field(default_factory=dict)
    derived: dict[ShapeKey, Any] = dataclasses.field(default_factory=dict)
