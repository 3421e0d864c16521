"""What a kernel function remembers between calls: typed, and owned by the function's closure.

``ntk_fn(f)`` returns a kernel that is usually called many times with inputs of the same
shapes (a kernel per training step, per tile). What depends only on those shapes is
found once and kept here: what the probe of ``f`` found (output shapes and structure)
and ``"auto"``'s per-parameter routes. Nothing is shared between kernel functions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

Signature = tuple
"""Structures, per-sample shapes, dtypes and devices of params and inputs (``problem.signature_of``)."""


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    """``f`` on the first sample of x1 and x2: output leaves (detached) and the output structure."""

    out1: list[torch.Tensor]
    out2: list[torch.Tensor]
    out_spec: Any


@dataclasses.dataclass(frozen=True)
class RouteChoice:
    """``"auto"``'s decision for one signature and size.

    Attributes:
      moved: covered parameter index -> why it takes Jacobian contraction instead of its rule.
      outright: no parameter takes a rule: run implementation 1 for everything.
    """

    moved: Mapping[int, str]
    outright: bool


RouteKey = tuple[Signature, int, int, bool]
"""(signature, N1, N2, rules enabled)."""


@dataclasses.dataclass
class KernelCache:
    """Per kernel function: probe results by input signature and auto's routes by signature and sizes."""

    probes: dict[Signature, ProbeResult] = dataclasses.field(default_factory=dict)
    routes: dict[RouteKey, RouteChoice] = dataclasses.field(default_factory=dict)
