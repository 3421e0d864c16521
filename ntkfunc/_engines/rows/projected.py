"""Sketched per-sample gradients ("features") ``J(x) Π``: ``(b, *out, dim)`` for a block of samples.

One batched gradient pass per chunk of samples, as :mod:`ntkfunc._engines.rows.structured` does
for exact rows (implementations 3 and ``"auto"``: the structured capture's cotangents and
operands; implementation 1: ``vmap(jacrev(f))`` rows), then each parameter's part of ``Π``
(:mod:`~ntkfunc._engines.sketch.plan`) is applied by its route:

- ``"factors"`` / ``"fft"``: from the factors ``G = Σ_s c_s x_sᵀ`` of the parameter's rule
  (:meth:`~ntkfunc.rules.Rule.factors`: a 2-D convolution's cotangents and im2col patches, a
  linear layer's cotangents and inputs), in spans of samples that fit :data:`CACHE_BYTES`; the
  count sketch of a convolution either gathers the patches itself from
  :meth:`~ntkfunc.rules.Rule.padded_factors` or forms the gradient by the rule's fastest way and
  hashes it, whichever was measured faster for that layer's shape;
- ``"formed"``: the parameter's per-sample gradient formed into a reused buffer (a few samples
  at a time, at most :data:`WORK_BYTES`), by the same code as the exact rows
  (:meth:`~ntkfunc._engines.rows.structured.StructuredRows.write`), then projected.

No full row (``P`` numbers per output) is ever held: memory is the gradient pass's plus
one parameter's work buffers. The features of a sample do not depend on the chunk or block it
is computed in, nor on the route (up to float rounding). As a
:class:`~ntkfunc._engines.rows.source.RowSource`, a :class:`ProjectedRows` has one slot of
width ``dim`` and no Gram route.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import Any, Union

import torch
from torch.func import jacrev

from ntkfunc._core.buffers import Buffers
from ntkfunc._core.memory import backward_transient, itemsize
from ntkfunc._core.problem import Problem
from ntkfunc._engines.rows.jacobian import JacobianRows
from ntkfunc._engines.rows.source import (
    CHUNK,
    Factors,
    Flops,
    SampleBytes,
    Slots,
    block_size,
    chunk_size,
    chunks,
    pair_flops,
    row_flops,
)
from ntkfunc._engines.rows.structured import StructuredRows
from ntkfunc._engines.sketch import countsketch, gaussian, tensorsketch
from ntkfunc._engines.sketch.plan import SketchPlan, resolve
from ntkfunc._engines.structured import capture as capture_mod
from ntkfunc._engines.structured import kernel as structured
from ntkfunc.rules import Factorable
from ntkfunc.rules.conv import PROBE, choose_way

WORK_BYTES = 64 << 20
"""Most bytes of one parameter's work buffers (formed gradients, patches, FFT inputs) at a time."""

CACHE_BYTES = 2 << 20
"""Most bytes of one span's work buffers on the FFT route and a convolution's count sketch (spectra, patches in
bucket order, blocks of the gradient): small enough to stay in cache from their writing to their reading (the
FFT route took twice as long with 64 MB spans on the ResNet-18's 512-channel layers)."""

Block = Union[countsketch.CountSketchBlock, tensorsketch.TensorSketchBlock, gaussian.GaussianBlock]


def factorable(cap: capture_mod.Capture) -> dict[int, Factorable]:
    """Parameters whose per-sample gradient is ``Σ_s c_s x_sᵀ`` (:meth:`~ntkfunc.rules.Rule.factorable`), used as they are."""
    out: dict[int, Factorable] = {}
    for k, (e, role) in cap.covered.items():
        ev = cap.events[e]
        vm = ev.views.get(role)
        if vm is not None and not vm.trivial:
            continue  # a weight used through a view (w.T, a slice) is formed by its view-aware rule
        fac = ev.rule.factorable(role, ev.meta, ev.y_shape)
        if fac is not None:
            out[k] = fac
    return out


def blocks_of(plan: SketchPlan) -> dict[int, Block]:
    """Each parameter's piece of ``Π``, by leaf; the count sketch laid out over its parameters together."""
    by_kind: dict[str, list[tuple[int, tuple[int, ...]]]] = {}
    for p in plan.params:
        by_kind.setdefault(p.kind, []).append((p.leaf, p.shape))
    made: list[Block] = []
    made += countsketch.layout(by_kind.get("countsketch", []), plan.dim, plan.seed)
    made += tensorsketch.blocks(by_kind.get("tensorsketch", []), plan.dim, plan.seed)
    made += gaussian.blocks(by_kind.get("gaussian", []), plan.dim, plan.seed)
    return {b.leaf: b for b in made}


class ProjectedRows:
    """Features of blocks of samples of a probed one-sample ``problem`` (batch axis 0 after wrapping): a
    :class:`~ntkfunc._engines.rows.source.RowSource` whose rows are ``J(x) Π`` (one slot of width ``dim``).

    ``structured_rows``: gradients from the structured capture (implementations 3 / ``"auto"``), else
    ``vmap(jacrev)`` rows (implementation 1). ``plan``: the resolved sketch. ``out_shape``: the
    per-sample output shape; features are ``(b, *out_shape, dim)``. ``tables``: a cache (owned by
    the caller) of the drawn tables, by parameter structure, so that repeated calls draw nothing.
    """

    def __init__(self, problem: Problem, kind: str, dim: int, seed: int, structured_rows: bool = True,
                 tables: dict | None = None) -> None:
        self.problem = problem
        self.dim = dim
        self.vmapped = problem.vmapped
        self.src: StructuredRows | JacobianRows | None = None
        cap: capture_mod.Capture | None = None
        if self.vmapped:
            self.src = StructuredRows(problem, routes="rows") if structured_rows else JacobianRows(problem)
            cap = self.src.cap if isinstance(self.src, StructuredRows) else capture_mod.discover(problem)
            self.out_shape = self.src.out_shape
        else:
            self.out_shape = tuple(problem.out_shapes1[0])
        self.slots = Slots((0,), (0,), (dim,))
        leaves = problem.params.diff_leaves
        self.factorable = factorable(cap) if cap is not None else {}
        self.plan = resolve(kind, dim, seed, problem.params.diff_names, [tuple(t.shape) for t in leaves],
                            math.prod(self.out_shape) if self.vmapped else 1, self.factorable,
                            fast_routes=isinstance(self.src, StructuredRows))
        self.cap = cap
        key = tuple((p.leaf, p.kind, p.shape) for p in self.plan.params) + (dim, seed)
        tables = {} if tables is None else tables  # the caller's cache: tables drawn once per parameter structure
        if key not in tables:
            tables[key] = blocks_of(self.plan)
        self.blocks = tables[key]
        self.buffers = Buffers()
        self.outputs = math.prod(self.out_shape)
        self.offsets = [0]
        for t in leaves:
            self.offsets.append(self.offsets[-1] + t.numel())
        self._flops: Flops | None = None

    # --- sizes -----------------------------------------------------------------------------
    def sample_bytes(self) -> SampleBytes:
        """Per sample: a row of ``dim`` features per output; while a chunk is computed, the gradient pass's
        transient, the features accumulated and (implementation 1) the gradient rows."""
        size = itemsize(self.problem.out_dtype)
        row = self.outputs * self.dim * size
        grads = self.outputs * self.offsets[-1] * size if isinstance(self.src, JacobianRows) else 0
        return SampleBytes(row, 0, backward_transient(self.problem) + grads + row)

    def chunk_for(self, budget: float) -> int:
        """Samples per gradient pass within ``budget`` bytes (:func:`~ntkfunc._engines.rows.source.chunk_size`).

        A Gaussian ``Π`` is kept (:func:`~ntkfunc._engines.sketch.gaussian.keep`) in up to half of
        ``budget``, so that it is drawn once, not for every chunk; the passes get the rest.
        """
        gauss = [b for b in self.blocks.values() if isinstance(b, gaussian.GaussianBlock)]
        kept = gaussian.keep(gauss, budget / 2, self.problem.out_dtype) if gauss else 0
        return chunk_size(budget - kept, self.sample_bytes())

    def flops(self) -> Flops:
        """A row costs the gradient pass (its projection is not counted); a pair the product of two feature rows."""
        if self._flops is None:
            self._flops = Flops(row_flops(self.problem, self.out_shape), pair_flops(self.problem, self.out_shape, self.dim), 0.0)
        return self._flops

    def gram(self, f1: Factors, f2: Factors) -> None:
        """No Gram route: every parameter is in the features."""
        return None

    # --- features ----------------------------------------------------------------------------
    def compute(self, x: list[Any], out: torch.Tensor, chunk: int = CHUNK) -> None:
        """Fill ``out`` ``(b, *out_shape, dim)`` (contiguous) with the features of the samples ``x`` (input leaves)."""
        if not self.vmapped:
            out.copy_(self.whole_batch(x))
            return
        axes = self.problem.x_axes or []
        for s, e, xc in chunks(x, axes, block_size(x, axes), chunk):
            target = out[s:e].view(e - s, self.outputs, self.dim)
            target.zero_()
            if isinstance(self.src, StructuredRows):
                self._structured(xc, e - s, target)
            else:
                self._jacobian(xc, e - s, target)

    def _structured(self, xc: list[Any], g: int, target: torch.Tensor) -> None:
        assert isinstance(self.src, StructuredRows) and self.cap is not None
        pb = dataclasses.replace(self.problem, x1_leaves=xc, x2_leaves=None, n1=g, n2=g)
        sd = structured.side(pb, self.cap, 1, 0, g)
        for p in self.plan.params:
            blk = self.blocks[p.leaf]
            if p.route != "formed" and self._from_factors(pb, p.route, p.leaf, blk, sd, g, target):
                continue
            self._formed(pb, p.leaf, blk, sd, 0, g, g, target)

    def _formed(self, pb: Problem, leaf: int, blk: Block, sd: structured.Side, start: int, stop: int, g: int,
                target: torch.Tensor) -> None:
        """Samples ``start:stop`` (of the side's ``g``) of parameter ``leaf``: its gradient formed by the rows' own code
        (a few samples at a time, within :data:`WORK_BYTES`), then projected into ``target[start:stop]``."""
        assert isinstance(self.src, StructuredRows)
        for a, z in self._spans(stop - start, self.outputs * blk.numel):
            a, z = a + start, z + start
            part = sd if (a, z) == (0, g) else _narrow(sd, a, z, g)
            rows = self.buffers.get("formed", (z - a, *self.out_shape, blk.numel), target)
            self.src.write(pb, part, leaf, rows)
            blk.formed(rows.view((z - a) * self.outputs, blk.numel), target[a:z].reshape((z - a) * self.outputs, self.dim),
                       self.buffers)

    def _from_factors(self, pb: Problem, route: str, leaf: int, blk: Block, sd: structured.Side, g: int,
                      target: torch.Tensor) -> bool:
        """The ``factors`` / ``fft`` route for one parameter, from its rule's factors; False when this call is
        outside it (then: formed).

        The FFT route and a convolution's count sketch work on spans of samples whose buffers fit
        :data:`CACHE_BYTES`; a convolution's count sketch is computed the faster of two ways, timed
        once per layer shape (:func:`~ntkfunc.rules.conv.choose_way`, the table in ``self.buffers.seconds``):
        ``"patches"`` (its patches gathered into bucket order, one ``bmm`` per block of rows
        folded at once, :meth:`~ntkfunc._engines.sketch.countsketch.CountSketchBlock.conv_factors`)
        or ``"gradient"`` (the per-sample gradient formed by the rule's own fastest way, then
        hashed: no patches when its rows are few and its positions many). Both give the same features.
        """
        assert self.cap is not None
        e, role = self.cap.covered[leaf]
        ev = self.cap.events[e]
        if any(t is not None and t.shape[0] != g for t in sd.operands[e]):
            return False  # an operand shared by all samples
        fac = self.factorable[leaf]
        cot = sd.cot[0][e]

        def operands(a: int, z: int) -> list[torch.Tensor | None]:
            return [None if t is None else t[a:z] for t in sd.operands[e]]

        if route == "factors" and ev.rule.padded_factors(role, operands(0, 1), cot[:1], ev.meta, ev.y_shape) is not None:
            assert isinstance(blk, countsketch.CountSketchBlock)
            per_sample = self.outputs * fac.rows * fac.positions + fac.positions * blk.stride

            def patches(a: int, z: int) -> None:
                for a2, z2 in self._spans(z - a, per_sample, CACHE_BYTES):
                    a2, z2 = a2 + a, z2 + a
                    pf = ev.rule.padded_factors(role, operands(a2, z2), cot[a2:z2], ev.meta, ev.y_shape)
                    assert pf is not None
                    blk.conv_factors(pf.c, pf.x, pf.kernel, pf.stride, pf.dilation, target[a2:z2], self.buffers, CACHE_BYTES)

            def gradient(a: int, z: int) -> None:
                self._formed(pb, leaf, blk, sd, a, z, g, target)

            ways: dict[str, Callable[[int, int], None]] = {"patches": patches, "gradient": gradient}
            shapes = tuple(None if t is None else tuple(t.shape[1:]) for t in sd.operands[e])
            key = ("countsketch-conv2d", leaf, shapes, tuple(cot.shape[1:]), str(target.device))
            probe = min(g, PROBE) if key not in self.buffers.seconds else 0
            kept = target[:probe].clone()  # the ways add to target: timing them adds to the probed samples several times
            best = choose_way(self.buffers, key, ways, g, target.device)
            if probe:
                target[:probe].copy_(kept)
                ways[best](0, probe)
            return True
        per_sample = self.outputs * fac.rows * max(fac.positions, 1) + fac.positions * fac.cols
        per_sample += (self.outputs + 1) * fac.positions * self.dim if route == "fft" else self.outputs * fac.rows * fac.cols
        for a, z in self._spans(g, per_sample, CACHE_BYTES if route == "fft" else WORK_BYTES):
            factors = ev.rule.factors(role, operands(a, z), cot[a:z], ev.meta, ev.y_shape, self.buffers)
            if factors is None:
                return False
            c, x = factors
            if route == "fft":
                assert isinstance(blk, tensorsketch.TensorSketchBlock)
                blk.fft(c, x, target[a:z], self.buffers)
            else:
                assert isinstance(blk, countsketch.CountSketchBlock)
                blk.factors(c, x, target[a:z], self.buffers)
        return True

    def _jacobian(self, xc: list[Any], g: int, target: torch.Tensor) -> None:
        assert isinstance(self.src, JacobianRows)
        rows = self.buffers.get("rows", (g, *self.out_shape, self.offsets[-1]), target)
        self.src.compute(xc, rows, g)
        flat = rows.view(g * self.outputs, -1)
        for p in self.plan.params:
            a, z = self.offsets[p.leaf], self.offsets[p.leaf + 1]
            self.blocks[p.leaf].formed(flat[:, a:z], target.view(g * self.outputs, self.dim), self.buffers)

    def whole_batch(self, x: list[Any]) -> torch.Tensor:
        """``vmap_axes=None``: the features of the batch as one unit, ``(*out, dim)`` (reverse-mode Jacobian)."""
        leaves = self.problem.params.diff_leaves
        fn = self.problem.batch_fn()
        jac = jacrev(lambda p: fn(p, x)[0])(leaves)
        m = self.outputs
        out = torch.zeros(m, self.dim, dtype=self.problem.out_dtype, device=self.problem.device)
        for p in self.plan.params:
            self.blocks[p.leaf].formed(jac[p.leaf].reshape(m, -1), out, self.buffers)
        return out.view(*self.out_shape, self.dim)

    def _spans(self, g: int, per_sample_elements: int, budget: int = WORK_BYTES) -> Iterator[tuple[int, int]]:
        """Sub-chunks of the ``g`` samples whose work buffers stay within ``budget`` bytes."""
        size = itemsize(self.problem.out_dtype)
        m = max(1, min(g, budget // max(1, per_sample_elements * size)))
        for a in range(0, g, m):
            yield a, min(a + m, g)


def _narrow(sd: structured.Side, a: int, z: int, g: int) -> structured.Side:
    """The side pass of samples ``a:z`` of its ``g`` (operands shared by all samples kept whole)."""
    def cut(t: torch.Tensor | None) -> torch.Tensor | None:
        return t if t is None or t.shape[0] != g else t[a:z]

    return structured.Side(
        cot=[[c[a:z] for c in leaf] for leaf in sd.cot],
        operands=[[cut(t) for t in ev] for ev in sd.operands],
        fb_jac=[[j[a:z] for j in leaf] for leaf in sd.fb_jac],
        cap=sd.cap,
    )
