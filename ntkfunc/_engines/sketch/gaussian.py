"""The Gaussian (dense Johnson-Lindenstrauss) sketch, generated blockwise from the seed.

``Π`` has i.i.d. ``N(0, 1/dim)`` entries. It is never stored whole: a parameter's rows of
``Π`` are drawn in blocks of :data:`BLOCK_ELEMENTS` numbers, block ``b`` of parameter ``leaf``
from ``(seed, "gaussian", leaf, b)`` (float64 on the CPU, then cast and moved), so any piece
can be drawn alone and the same seed gives the same ``Π`` on every device and tiling. Blocks
are kept (per device and dtype) up to :data:`CACHE_BYTES` and redrawn beyond.

The reference sketch: its columns are independent, so its variance is exactly
``Var[K̂_nm] = (K_nn K_mm + K_nm²) / dim`` (what :mod:`~ntkfunc._engines.sketch.error`
estimates for every kind). It costs ``2 P dim`` FLOPs per gradient row (a matrix product), so it is for small
models; the count sketch and TensorSketch cost ``O(P)`` or less.

>>> import torch
>>> blk = GaussianBlock(leaf=0, numel=6, dim=4, seed=0)
>>> out = torch.zeros(2, 4, dtype=torch.float64)
>>> blk.formed(torch.eye(2, 6, dtype=torch.float64), out)
>>> bool(torch.equal(out[0], blk.rows(0, 1, torch.device("cpu"), torch.float64)[0]))   # row 0 of Π
True
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ntkfunc._core.buffers import Buffers
from ntkfunc._engines.sketch import seeds

BLOCK_ELEMENTS = 1 << 21
"""Numbers of ``Π`` per generated block (16 MiB in float64)."""

CACHE_BYTES = 256 << 20
"""Generated blocks kept per sketch source (per device and dtype); beyond, blocks are redrawn."""


@dataclasses.dataclass
class GaussianBlock:
    """One parameter's rows of a Gaussian ``Π`` (``numel x dim``), in blocks drawn from the seed."""

    leaf: int
    numel: int
    dim: int
    seed: int
    _cache: dict = dataclasses.field(default_factory=dict, repr=False)

    kind = "gaussian"

    @property
    def block_rows(self) -> int:
        return max(1, BLOCK_ELEMENTS // self.dim)

    def _block(self, b: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (b, str(device), dtype)
        held = self._cache.get(key)
        if held is not None:
            return held
        r0 = b * self.block_rows
        r1 = min(self.numel, r0 + self.block_rows)
        gen = seeds.generator(self.seed, "gaussian", self.leaf, b)
        block = torch.randn(r1 - r0, self.dim, generator=gen, dtype=torch.float64).div_(math.sqrt(self.dim)).to(device=device, dtype=dtype)
        if sum(t.numel() * t.element_size() for t in self._cache.values()) + block.numel() * block.element_size() <= CACHE_BYTES:
            self._cache[key] = block
        return block

    def rows(self, r0: int, r1: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Rows ``r0:r1`` of this parameter's ``Π`` (for tests and inspection)."""
        out = []
        for b in range(r0 // self.block_rows, -(-r1 // self.block_rows)):
            lo = b * self.block_rows
            blk = self._block(b, device, dtype)
            out.append(blk[max(r0 - lo, 0) : min(r1 - lo, blk.shape[0])])
        return torch.cat(out)

    def formed(self, g: torch.Tensor, out: torch.Tensor, ws: Buffers | None = None) -> None:
        """``out += g Π`` for ``g`` ``(M, numel)`` into ``out`` ``(M, dim)``, one matrix product per block."""
        g = g.reshape(g.shape[0], -1)
        for b in range(-(-self.numel // self.block_rows)):
            r0 = b * self.block_rows
            blk = self._block(b, g.device, g.dtype)
            out.addmm_(g[:, r0 : r0 + blk.shape[0]], blk)


def blocks(params: list[tuple[int, tuple[int, ...]]], dim: int, seed: int) -> list[GaussianBlock]:
    """The Gaussian blocks of ``params`` (``(leaf, shape)``)."""
    return [GaussianBlock(leaf, math.prod(shape), dim, seed) for leaf, shape in params]
