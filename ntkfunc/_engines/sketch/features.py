"""Features of any ``f``: pytree outputs, any batch axes, ``vmap_axes=None``; what ``features_fn`` and ``sketched_ntk_fn`` call.

The gradient machinery (:class:`~ntkfunc._engines.rows.projected.ProjectedRows`) wants one output
tensor with the batch axis first: :mod:`ntkfunc._engines.rows.outputs` wraps any other ``f`` and
cuts the features back into its output leaves: leaf ``(N, *out_leaf)`` gets features
``(N, *out_leaf, dim)`` (batch first, the leaf's other axes in order), which is the
batch-first layout :meth:`~ntkfunc._core.layout.Layout.contract` takes. With
``vmap_axes=None`` the whole batch is one unit and leaf ``out`` gets ``(*out, dim)``.

Each call probes ``f`` (``make_problem``, cached per input signature) and draws nothing new:
the sketch's tables are kept per parameter structure in the closure's cache.
"""

from __future__ import annotations

from typing import Any

import torch

from ntkfunc._core.cache import KernelCache
from ntkfunc._core.memory import SAFETY, parse_budget
from ntkfunc._core.problem import Problem, make_problem
from ntkfunc._core.types import ApplyFn, MemoryBudget, PyTree, VMapAxes
from ntkfunc._engines.rows import outputs
from ntkfunc._engines.rows.projected import ProjectedRows


class Featurizer:
    """``features(x, params) -> (problem of f, [features per output leaf])`` for one ``f`` and sketch.

    ``structured``: per-sample gradients from the structured capture (implementations 3 and
    ``"auto"``), else ``vmap(jacrev)`` (implementation 1). Keeps probe results and the sketch's
    tables between calls (its own caches, owned by the public function's closure).
    """

    def __init__(self, f: ApplyFn, kind: str, dim: int, seed: int, vmap_axes: VMapAxes, structured: bool,
                 memory_budget: MemoryBudget, api: str) -> None:
        self.f, self.kind, self.dim, self.seed = f, kind, dim, seed
        self.vmap_axes, self.structured, self.memory_budget, self.api = vmap_axes, structured, memory_budget, api
        self.cache = KernelCache()
        self.cat_cache = KernelCache()
        self.tables: dict = {}

    def problem(self, x1: PyTree, x2: PyTree | None, params: PyTree, trace_axes: Any = (), diagonal_axes: Any = ()) -> Problem:
        """The checked problem of ``f`` (layouts, output structure) for these inputs."""
        return make_problem(self.f, x1, x2, params, self.vmap_axes, trace_axes, diagonal_axes, self.cache, api=self.api)

    def source(self, p0: Problem, x: PyTree, params: PyTree) -> ProjectedRows:
        """The sketched-rows source for ``x`` under ``p0``'s output structure (``f`` wrapped if needed)."""
        rp = outputs.rows_problem(p0, x, params, self.vmap_axes, self.cache, self.cat_cache)
        return ProjectedRows(rp, self.kind, self.dim, self.seed, self.structured, self.tables)

    def features(self, p0: Problem, x: PyTree, params: PyTree) -> list[torch.Tensor]:
        """Features of ``x`` per output leaf of ``f`` (``p0`` gives the leaves' shapes)."""
        src = self.source(p0, x, params)
        rp = src.problem
        budget = parse_budget(self.memory_budget, rp.device) * SAFETY
        if rp.vmapped:
            out = torch.empty((rp.n1, *src.out_shape, self.dim), dtype=rp.out_dtype, device=rp.device)
            src.compute(rp.x1_leaves, out, src.chunk_for(budget))
        else:
            out = src.whole_batch(rp.x1_leaves)
        return outputs.split(out, p0, rp)
