"""Rows read from stored features: a features file (or tensor) ``(N, *out, dim)`` served as rows of width ``dim``.

The kernel stage of ``kernel_matrix(sketch=...)`` multiplies these rows exactly as it
multiplies per-sample gradients, so tiling, panels, the out-of-core output, resume and
progress are the exact kernel's own.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ntkfunc._core.memory import itemsize
from ntkfunc._core.problem import Problem
from ntkfunc._engines.rows.source import Factors, Flops, SampleBytes, Slots
from ntkfunc._engines.structured.plan import jacobian_contraction_flops


class StoredRows:
    """A :class:`~ntkfunc._engines.rows.source.RowSource` whose rows are stored features ``(b, *out, dim)``."""

    def __init__(self, problem: Problem, dim: int) -> None:
        self.problem = problem
        self.out_shape = tuple(problem.sample_out_shapes(1)[0])
        self.slots = Slots((0,), (0,), (dim,))

    def sample_bytes(self) -> SampleBytes:
        row = math.prod(self.out_shape) * self.slots.width * itemsize(self.problem.out_dtype)
        return SampleBytes(row, 0, row)

    def compute(self, x: list[Any], out: torch.Tensor, chunk: int) -> Factors | None:
        out.copy_(x[0].reshape(out.shape))
        return None

    def gram(self, f1: Factors, f2: Factors) -> torch.Tensor | None:
        return None

    def flops(self) -> Flops:
        """A row costs its copy; a pair the product of two feature rows; no Gram route."""
        o = math.prod(self.out_shape)
        return Flops(float(o * self.slots.width),
                     float(jacobian_contraction_flops(self.problem.layouts[0], 1, self.out_shape, (self.slots.width,))), 0.0)
