"""The count sketch of ntkfunc: a sparse JL projection whose hash follows each parameter's matrix shape.

Every parameter tensor ``θ`` is viewed as a matrix of ``R = shape[0]`` rows and
``D = numel / R`` columns (a linear layer's ``(out, in)``, a convolution's
``(C_out, C_in kh kw)``, a vector as ``(n, 1)``). Its coordinate ``(i, j)`` goes to the bucket

    h(i, j) = (base + π_r(i) D' + π_c(j)) mod dim,     with sign  s_r(i) s_c(j),

where ``π_r``, ``π_c`` are uniformly random permutations of the rows and columns, ``s_r``,
``s_c`` Rademacher signs, ``D' >= D`` the smallest row stride coprime with ``dim`` (when the
parameter wraps around the ``dim`` buckets), and ``base`` the parameter's offset. Then
``Π`` has one ``±1`` per row, so ``E[Π Πᵀ] = I`` (the sketch is unbiased), and:

- **exact when ``dim`` holds everything**: if the parameters' padded sizes ``Σ R D'`` fit in
  ``dim`` they are laid out one after the other (``base`` cumulative plus one random
  rotation): no two coordinates share a bucket, ``Π Πᵀ = I`` and the sketched kernel *is*
  the exact kernel;
- otherwise each parameter gets an independent uniform ``base``, so two coordinates of
  different parameters collide with probability exactly ``1/dim``; within a parameter, by the
  symmetry of the random permutations, two coordinates in different rows and columns collide
  with one common probability ``≈ 1/dim`` and two in the same row never (``D' <= dim``), and
  every bucket receives the same number of coordinates. The error terms' signs are products
  ``s_r s_c``, whose only extra 4-wise correlations (rectangles of coordinates) need two
  collisions at once, which a coprime stride rules out for ``R <= dim / 2``: the variance of
  ``<Πa, Πb>`` is that of a count sketch, ``≈ (|a|²|b|² + <a, b>²) / dim``;
- **rows wider than ``dim``** (``D > dim``) collide with themselves, and by the hash alone the
  same pairs of columns would collide, with the same signs, in every row: a last layer's
  gradients for different outputs (one row each) would then share one error, which a trace
  over the outputs does not average away. So the ``dim``-long pieces of such a parameter's
  window (what :func:`fold` adds up) get independent random signs ``t``, drawn from
  ``(seed, "countsketch", leaf, "folds")``: the collisions of each row have their own signs.
  Parameters whose rows fit in ``dim`` have ``t = 1`` (their hash is unchanged).

Why this hash: applied to a per-sample weight gradient ``G = Σ_s c_s x_sᵀ`` it needs no
per-coordinate gather. Permuting and flipping the *factors* (``c``'s rows, ``x``'s columns,
``x`` padded to ``D'`` columns with zeros) and multiplying them gives ``G`` already in
bucket order, and the sketch is a plain reshape-and-sum of its ``R D'`` entries into
``dim`` buckets (:meth:`CountSketchBlock.factors`). A gradient formed any other way
(reverse mode, another rule) takes the same hash by one gather (:meth:`CountSketchBlock.formed`),
so both routes give the same features.

>>> import torch
>>> blocks = layout([(0, (3, 5)), (1, (3,))], dim=32, seed=0)     # 15 + 3 <= 32: exact
>>> g = torch.randn(2, 18, dtype=torch.float64)                   # two gradient rows
>>> out = torch.zeros(2, 32, dtype=torch.float64)
>>> blocks[0].formed(g[:, :15], out); blocks[1].formed(g[:, 15:], out)
>>> bool(torch.allclose(out @ out.T, g @ g.T))                     # Π Πᵀ = I
True
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch

from ntkfunc._core.buffers import Buffers
from ntkfunc._engines.sketch import seeds
from ntkfunc.rules import window_out_size


def matrix_view(shape: Sequence[int]) -> tuple[int, int]:
    """``(rows, columns)`` of a parameter of ``shape``: its first axis against the rest (vectors are columns).

    >>> matrix_view((64, 3, 3, 3)), matrix_view((10,)), matrix_view(())
    ((64, 27), (10, 1), (1, 1))
    """
    if not shape:
        return 1, 1
    rows = int(shape[0])
    return rows, int(math.prod(shape)) // max(rows, 1)


def row_stride(rows: int, cols: int, dim: int) -> int:
    """``D'``: ``cols``, or the smallest larger stride coprime with ``dim`` when rows wrap around the buckets.

    >>> row_stride(512, 4608, 8192), row_stride(4, 6, 64), row_stride(10, 1, 8)
    (4609, 6, 1)
    """
    if rows == 1 or rows * cols <= dim:
        return cols
    stride = cols
    while math.gcd(stride, dim) != 1:
        stride += 1
    return stride


@dataclasses.dataclass
class CountSketchBlock:
    """One parameter's part of the count sketch (see the module docstring).

    ``leaf``: the parameter's position among the differentiated leaves (the documented
    order); ``rows``/``cols``: its matrix view; ``stride``: ``D'``; ``base``: its first bucket.
    Tables are drawn from ``(seed, "countsketch", leaf)`` on first use and kept per device.
    """

    leaf: int
    rows: int
    cols: int
    stride: int
    base: int
    dim: int
    seed: int
    _tables: dict = dataclasses.field(default_factory=dict, repr=False)

    kind = "countsketch"

    @property
    def numel(self) -> int:
        return self.rows * self.cols

    @property
    def window(self) -> int:
        """Buckets this parameter's padded layout spans before folding (``R D'``)."""
        return self.rows * self.stride

    def _cpu(self) -> dict[str, torch.Tensor]:
        if "cpu" not in self._tables:
            gen = seeds.generator(self.seed, "countsketch", self.leaf)
            perm_r, perm_c = seeds.permutation(self.rows, gen), seeds.permutation(self.cols, gen)
            s_r, s_c = seeds.signs(self.rows, gen), seeds.signs(self.cols, gen)
            inv_r, inv_c = torch.argsort(perm_r), torch.argsort(perm_c)  # position -> original index
            self._tables["cpu"] = {"inv_r": inv_r, "inv_c": inv_c, "s_r": s_r[inv_r], "s_c": s_c[inv_c]}
        return self._tables["cpu"]

    def tables(self, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """``inv_r``/``inv_c`` (bucket-order position -> index) and the signs in that order, on ``device``
        (and ``folds``, the signs of the window's ``dim``-long pieces, for rows wider than ``dim``)."""
        key = (str(device), dtype)
        if key not in self._tables:
            cpu = dict(self._cpu())
            if self.cols > self.dim:  # rows that collide with themselves
                cpu["folds"] = seeds.signs(-(-self.window // self.dim), seeds.generator(self.seed, "countsketch", self.leaf, "folds"))
            self._tables[key] = {k: v.to(device) if k.startswith("inv") else v.to(device=device, dtype=dtype) for k, v in cpu.items()}
        return self._tables[key]

    def formed(self, g: torch.Tensor, out: torch.Tensor, ws: Buffers | None = None) -> None:
        """``out += g Π`` for formed gradients ``g`` ``(M, numel)`` (C order) into ``out`` ``(M, dim)``."""
        ws = ws or Buffers()
        t = self.tables(g.device, g.dtype)
        m = g.shape[0]
        v = g.reshape(m, self.rows, self.cols).index_select(1, t["inv_r"])
        padded = ws.get("cs-formed", (m, self.rows, self.stride), g)
        _select_columns(v, t["inv_c"], padded)
        padded[..., : self.cols].mul_(t["s_r"][:, None]).mul_(t["s_c"])
        fold(padded.view(m, self.window), self.base, out, t.get("folds"))

    def factors(self, c: torch.Tensor, x: torch.Tensor, out: torch.Tensor, ws: Buffers | None = None) -> None:
        """``out += vec(c x) Π`` for ``G = c x`` with ``c`` ``(m, O, R, S)``, ``x`` ``(m, S, D)``; ``out`` ``(m, O, dim)``.

        The factors are permuted and flipped so that one ``bmm`` gives ``G`` in bucket order
        (``x`` padded with zero columns to the stride ``D'``), then folded. When ``x`` has more
        positions than ``G`` has rows (``S > O R``: early convolutions, whose patches outnumber
        the gradient), the columns are permuted in ``G`` after the product instead: the same
        ``G``, one gather of ``O R D`` entries instead of ``S D``.
        """
        ws = ws or Buffers()
        t = self.tables(c.device, c.dtype)
        m, o, r, s = c.shape
        cp = c.index_select(2, t["inv_r"]).mul_(t["s_r"][:, None]).reshape(m, o * r, s)
        g = ws.get("cs-g", (m, o * r, self.stride), x)
        if s > o * r:
            g0 = ws.get("cs-g0", (m, o * r, self.cols), x)
            torch.bmm(cp, x, out=g0)  # (m, O R, D): rows in bucket order
            _select_columns(g0, t["inv_c"], g)
            g[..., : self.cols].mul_(t["s_c"])
        else:
            xp = ws.get("cs-x", (m, s, self.stride), x)
            _select_columns(x, t["inv_c"], xp)
            xp[..., : self.cols].mul_(t["s_c"])
            torch.bmm(cp, xp, out=g)  # (m, O R, D'): rows and columns already in bucket order
        fold(g.view(m * o, self.window), self.base, out.view(m * o, self.dim), t.get("folds"))


    def conv_factors(self, c: torch.Tensor, xpad: torch.Tensor, kernel: Sequence[int], stride: Sequence[int],
                     dilation: Sequence[int], out: torch.Tensor, ws: Buffers | None = None, block_bytes: int | None = None) -> None:
        """:meth:`factors` of a 2-D convolution from its padded input ``xpad`` ``(m, C, Hp, Wp)`` and ``c`` ``(m, O, R, S)``.

        The patches are gathered straight into bucket order with their signs (one
        ``index_select`` from ``[x, -x, 0]``: im2col, the column permutation, the signs and
        the zero padding to ``D'`` in one pass), then one ``bmm`` and the fold, as :meth:`factors`.
        ``block_bytes``: the product is formed and folded a block of rows at a time, each block at
        most this many bytes (it is folded while still in cache; rows wider than ``dim``, whose
        folds carry signs, are formed whole).
        """
        ws = ws or Buffers()
        t = self.tables(c.device, c.dtype)
        m, o, r, s = c.shape
        chans, hp, wp = (int(v) for v in xpad.shape[1:])
        n = chans * hp * wp
        idx = self._patch_index((chans, hp, wp), tuple(kernel), tuple(stride), tuple(dilation), xpad.device)
        if idx.numel() != s * self.stride:
            raise AssertionError(f"conv_factors: {idx.numel() // self.stride} positions from the geometry, {s} cotangents")
        src = ws.get("cs-src", (m, 2 * n + 1), xpad)
        src[:, :n].copy_(xpad.reshape(m, n))
        torch.neg(src[:, :n], out=src[:, n : 2 * n])
        src[:, 2 * n].zero_()
        xp = ws.get("cs-x", (m, s * self.stride), xpad)
        torch.index_select(src, 1, idx, out=xp)
        cp = c.index_select(2, t["inv_r"]).mul_(t["s_r"][:, None]).reshape(m, o * r, s)
        if block_bytes is None or "folds" in t:
            g = ws.get("cs-g", (m, o * r, self.stride), xpad)
            torch.bmm(cp, xp.view(m, s, self.stride), out=g)
            fold(g.view(m * o, self.window), self.base, out.view(m * o, self.dim), t.get("folds"))
            return
        rows = max(1, min(r, block_bytes // (m * self.stride * xpad.element_size())))
        outs = out.view(m, o, self.dim)
        for j in range(o):
            for r0 in range(0, r, rows):
                r1 = min(r, r0 + rows)
                g = ws.get("cs-g", (m, r1 - r0, self.stride), xpad)
                torch.bmm(cp[:, j * r + r0 : j * r + r1], xp.view(m, s, self.stride), out=g)
                fold(g.view(m, (r1 - r0) * self.stride), (self.base + r0 * self.stride) % self.dim, outs[:, j])

    def _patch_index(self, shape: tuple[int, int, int], kernel: tuple[int, ...], stride: tuple[int, ...],
                     dilation: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """``(S D')`` flat positions in ``[x, -x, 0]`` (each ``C Hp Wp`` long) of the signed, bucket-ordered patches."""
        key = ("patches", shape, kernel, stride, dilation, str(device))
        if key not in self._tables:
            chans, hp, wp = shape
            (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
            if chans * kh * kw != self.cols:
                raise AssertionError(f"_patch_index: {chans}x{kh}x{kw} patches for {self.cols} columns")
            cpu = self._cpu()
            j = cpu["inv_c"]
            n = chans * hp * wp
            col = (j // (kh * kw)) * hp * wp + ((j // kw) % kh) * dh * wp + (j % kw) * dw + n * (cpu["s_c"] < 0).long()
            ho, wo = window_out_size(hp, kh, sh, dh), window_out_size(wp, kw, sw, dw)
            base = ((torch.arange(ho) * sh)[:, None] * wp + (torch.arange(wo) * sw)[None, :]).reshape(-1)
            idx = torch.full((ho * wo, self.stride), 2 * n, dtype=torch.long)
            idx[:, : self.cols] = base[:, None] + col[None, :]
            self._tables[key] = idx.reshape(-1).to(device)
        return self._tables[key]


def _select_columns(v: torch.Tensor, index: torch.Tensor, target: torch.Tensor) -> None:
    """``target[..., :n] = v[..., index]`` and zeros in ``target``'s remaining (padding) columns."""
    n = index.numel()
    if target.shape[-1] == n:
        torch.index_select(v, v.ndim - 1, index, out=target)
    else:
        target[..., :n].copy_(v.index_select(v.ndim - 1, index))
        target[..., n:].zero_()


def fold(v: torch.Tensor, start: int, out: torch.Tensor, signs: torch.Tensor | None = None) -> None:
    """``out[:, (start + p) % dim] += t[p // dim] v[:, p]`` for ``v`` ``(M, W)``: a reshape-and-sum, then one rotation.

    ``signs``: ``t``, one per ``dim``-long piece of ``v`` (``ceil(W / dim)``); None: all 1.

    >>> out = torch.zeros(1, 4)
    >>> fold(torch.arange(6.0)[None], 3, out); out.tolist()   # positions 3,0,1,2,3,0
    [[6.0, 2.0, 3.0, 4.0]]
    >>> out = torch.zeros(1, 4)
    >>> fold(torch.arange(6.0)[None], 0, out, torch.tensor([1.0, -1.0])); out.tolist()   # 0-4, 1-5, 2, 3
    [[-4.0, -4.0, 2.0, 3.0]]
    """
    m, w = v.shape
    dim = out.shape[-1]
    full, rest = divmod(w, dim)
    if not full:
        _add_cyclic(out, v if signs is None else v * signs[0], start)
        return
    pieces = v[:, : full * dim].reshape(m, full, dim)
    if signs is None:
        acc = pieces.sum(1) if full > 1 else v[:, :dim].clone()
    else:
        acc = torch.matmul(signs[:full].to(v.dtype), pieces)  # (m, dim): the signed sum of the pieces
    if rest:
        acc[:, :rest] += v[:, full * dim :] if signs is None else signs[full] * v[:, full * dim :]
    _add_cyclic(out, acc, start)


def _add_cyclic(out: torch.Tensor, v: torch.Tensor, start: int) -> None:
    """``out[:, (start + p) % dim] += v[:, p]`` for ``v`` no longer than ``dim`` (two contiguous pieces)."""
    dim, n = out.shape[-1], v.shape[-1]
    first = min(n, dim - start)
    out[:, start : start + first] += v[:, :first]
    if first < n:
        out[:, : n - first] += v[:, first:]


def layout(params: Sequence[tuple[int, Sequence[int]]], dim: int, seed: int) -> list[CountSketchBlock]:
    """The count-sketch blocks of ``params`` (``(leaf, shape)`` in the documented order) for ``dim`` buckets.

    Exact layout (consecutive windows from one random rotation) when the padded sizes fit in
    ``dim``; otherwise each parameter at an independent uniform offset.

    >>> [(b.base - layout([(0, (2, 3)), (1, (4,))], 16, 0)[0].base) % 16 for b in layout([(0, (2, 3)), (1, (4,))], 16, 0)]
    [0, 6]
    """
    views = [(leaf, *matrix_view(shape)) for leaf, shape in params]
    strides = [row_stride(r, c, dim) for _, r, c in views]
    total = sum(r * s for (_, r, _), s in zip(views, strides))
    exact = total <= dim
    rotation = int(torch.randint(0, dim, (1,), generator=seeds.generator(seed, "countsketch", "rotation")))
    blocks, offset = [], 0
    for (leaf, r, c), s in zip(views, strides):
        if exact:
            base = (rotation + offset) % dim
            offset += r * s
        else:
            base = int(torch.randint(0, dim, (1,), generator=seeds.generator(seed, "countsketch", "base", leaf)))
        blocks.append(CountSketchBlock(leaf, r, c, s, base, dim, seed))
    return blocks


def is_exact(params: Sequence[tuple[int, Sequence[int]]], dim: int) -> bool:
    """Whether the count sketch of ``params`` with ``dim`` buckets is exact (an orthogonal ``Π``).

    >>> is_exact([(0, (3, 5)), (1, (3,))], 18), is_exact([(0, (3, 5)), (1, (3,))], 17)
    (True, False)
    """
    return sum(matrix_view(s)[0] * row_stride(*matrix_view(s), dim) for _, s in params) <= dim
