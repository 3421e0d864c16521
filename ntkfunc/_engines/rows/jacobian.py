"""Implementation 1's rows: ``vmap(jacrev(f))`` (``vmap(grad(f))`` for one output entry per sample) per chunk,
concatenated into the caller's buffer."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.func import grad, jacrev, vmap

from ntkfunc._core.memory import backward_transient, itemsize
from ntkfunc._core.ops import transform_friendly_attention
from ntkfunc._core.problem import Problem
from ntkfunc._engines.rows.source import Factors, Flops, SampleBytes, Slots, block_size, chunks, out_shape, pair_flops, row_flops


class JacobianRows:
    """Implementation 1's rows: ``vmap(jacrev(f))`` per chunk, concatenated into the buffer."""

    def __init__(self, problem: Problem) -> None:
        self.problem = problem
        self.out_shape = out_shape(problem)
        self.slots = Slots.of(problem, range(len(problem.params.diff_leaves)))
        g = problem.sample_fn()
        if math.prod(self.out_shape) == 1:  # one output entry per sample (a per-sample loss): a gradient, no basis to vmap over
            # a 0-d output is grad's scalar as it is (no sum op, and its backward, per call); (1,) or (1, 1) are summed
            scalar = (lambda leaves, x: g(leaves, x)[0]) if self.out_shape == () else (lambda leaves, x: g(leaves, x)[0].sum())
            self._fn = vmap(grad(scalar), in_dims=(None, problem.x_axes))
        else:
            jac = vmap(jacrev(g, argnums=0), in_dims=(None, problem.x_axes))
            self._fn = lambda leaves, x: jac(leaves, x)[0]
        self._flops: Flops | None = None

    def fn(self, leaves: list[torch.Tensor], x: list[Any]) -> list[torch.Tensor]:
        """Per parameter ``(g, *out, *θ.shape)`` (``(g, *θ.shape)`` where a sample has one output entry) for the
        ``g`` samples of ``x``: ``vmap(jacrev(f))`` (``vmap(grad(f))`` for one entry, about 4 % faster: no vmap over
        a basis of cotangents), differentiable in ``leaves`` and ``x``."""
        return list(self._fn(leaves, x))

    def sample_bytes(self) -> SampleBytes:
        size = itemsize(self.problem.out_dtype)
        o = math.prod(self.out_shape)
        # vmap(jacrev) holds the Jacobian pieces and the concatenated row, plus the backward's activations
        return SampleBytes(o * self.slots.width * size, 0, o * self.slots.width * size + backward_transient(self.problem))

    def compute(self, x: list[Any], out: torch.Tensor, chunk: int) -> Factors | None:
        axes = self.problem.x_axes or []
        for s, e, xc in chunks(x, axes, block_size(x, axes), chunk):
            torch.cat(self.pieces(xc), dim=-1, out=out[s:e])
        return None

    def pieces(self, x: list[Any]) -> list[torch.Tensor]:
        """Per parameter ``(g, *out, numel)`` for the ``g`` samples of ``x`` in one pass (views of ``vmap(jacrev)``'s results)."""
        g = block_size(x, self.problem.x_axes or [])
        with transform_friendly_attention(self.problem.attention):
            jac = self.fn(self.problem.params.diff_leaves, x)
        return [j.reshape(g, *self.out_shape, -1) for j in jac]

    def gram(self, f1: Factors, f2: Factors) -> torch.Tensor | None:
        return None

    def flops(self) -> Flops:
        if self._flops is None:
            self._flops = Flops(row_flops(self.problem, self.out_shape), pair_flops(self.problem, self.out_shape, self.slots.width), 0.0)
        return self._flops
