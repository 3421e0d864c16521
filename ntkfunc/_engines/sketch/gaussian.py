"""The Gaussian (dense Johnson-Lindenstrauss) sketch, generated blockwise from the seed.

``Π`` has i.i.d. ``N(0, 1/dim)`` entries. A parameter's rows of ``Π`` are drawn in blocks of
:data:`BLOCK_ELEMENTS` numbers, block ``b`` of parameter ``leaf`` from ``(seed, "gaussian", leaf, b)``,
**in float32** on the CPU whatever the working dtype (then cast and moved: the same ``Π`` in
float32, float64 and bfloat16 runs, on every device and tiling), so any piece can be drawn alone.
Drawn blocks are kept, per device and dtype, as far as :func:`keep` allows (the source gives them
a share of its memory budget: :meth:`~ntkfunc._engines.rows.projected.ProjectedRows.chunk_for`),
so a ``Π`` that fits is drawn once per sketch and reused by every chunk and call; the rest is
drawn again where it is used. (Until this version, blocks were drawn in float64 and kept up to
256 MiB per parameter: the drawn values, and so the features, differ; the plan's record says
``"gaussian": "float32"``, which changes the fingerprint of features files.)

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
>>> bool(torch.equal(blk.rows(0, 6, torch.device("cpu"), torch.float64).float(), blk.rows(0, 6, torch.device("cpu"), torch.float32)))
True
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch

from ntkfunc._core.buffers import Buffers
from ntkfunc._engines.sketch import seeds

BLOCK_ELEMENTS = 1 << 21
"""Numbers of ``Π`` per generated block (8 MiB in float32)."""

CACHE_BYTES = 256 << 20
"""Bytes of drawn blocks a parameter keeps (per device and dtype) unless :func:`keep` says otherwise."""


@dataclasses.dataclass
class GaussianBlock:
    """One parameter's rows of a Gaussian ``Π`` (``numel x dim``), in blocks drawn from the seed.

    ``kept_bytes``: how many bytes of its drawn blocks it keeps (per device and dtype); blocks beyond
    are drawn again where they are used.
    """

    leaf: int
    numel: int
    dim: int
    seed: int
    kept_bytes: int = CACHE_BYTES
    _cache: dict = dataclasses.field(default_factory=dict, repr=False)

    kind = "gaussian"

    @property
    def block_rows(self) -> int:
        return max(1, BLOCK_ELEMENTS // self.dim)

    def nbytes(self, dtype: torch.dtype) -> int:
        """Bytes of the whole of this parameter's ``Π`` in ``dtype``."""
        return self.numel * self.dim * torch.empty((), dtype=dtype).element_size()

    def _block(self, b: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (b, str(device), dtype)
        held = self._cache.get(key)
        if held is not None:
            return held
        r0 = b * self.block_rows
        r1 = min(self.numel, r0 + self.block_rows)
        gen = seeds.generator(self.seed, "gaussian", self.leaf, b)
        block = torch.randn(r1 - r0, self.dim, generator=gen, dtype=torch.float32).mul_(1 / math.sqrt(self.dim))
        block = block.to(device=device, dtype=dtype)
        held_bytes = sum(t.numel() * t.element_size() for k, t in self._cache.items() if k[1:] == key[1:])
        if held_bytes + block.numel() * block.element_size() <= self.kept_bytes:
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


def keep(blocks: Sequence[GaussianBlock], allowance: float, dtype: torch.dtype) -> int:
    """Let ``blocks`` keep up to ``allowance`` bytes of drawn ``Π`` in ``dtype`` together (in order); returns the bytes given.

    Every byte kept saves drawing it again for each chunk of samples, whichever parameter it
    belongs to; a parameter that does not fit whole keeps its first blocks.

    >>> a, b = GaussianBlock(0, 1000, 256, 0), GaussianBlock(1, 4000, 256, 0)
    >>> keep([a, b], 2e6, torch.float32), a.kept_bytes, b.kept_bytes
    (2000000, 1024000, 976000)
    """
    left = max(0, int(allowance))
    for blk in blocks:
        blk.kept_bytes = min(left, blk.nbytes(dtype))
        left -= blk.kept_bytes
    return max(0, int(allowance)) - left


def blocks(params: list[tuple[int, tuple[int, ...]]], dim: int, seed: int) -> list[GaussianBlock]:
    """The Gaussian blocks of ``params`` (``(leaf, shape)``)."""
    return [GaussianBlock(leaf, math.prod(shape), dim, seed) for leaf, shape in params]
