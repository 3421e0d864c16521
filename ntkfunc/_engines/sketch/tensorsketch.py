"""TensorSketch (Pham & Pagh 2013) of a weight gradient, from the layer's cotangents and inputs.

The per-sample gradient of a linear layer or convolution is a sum of outer products,
``G = Σ_s c_s x_sᵀ`` (``c_s``: cotangent of output unit rows at position ``s``, ``x_s``: the
input, or im2col patch, at ``s``). TensorSketch hashes coordinate ``(i, j)`` of ``G`` to bucket
``(h_r(i) + h_c(j)) mod dim`` with sign ``s_r(i) s_c(j)`` (per parameter: ``h_r`` uniform,
``h_c`` without collisions, i.e. distinct buckets for the ``D <= dim`` columns and balanced ones
for wider rows, and Rademacher signs), so that the sketch of an outer product is the circular
convolution of the count sketches of its factors:

    TS(G) = irfft( Σ_s rfft(CS_r(c_s)) ⊙ rfft(CS_c(x_s)) ),

which costs ``(O + 1) S`` FFTs of length ``dim`` per sample and never forms ``G`` (``R D``
numbers): the win for wide layers with few positions (MLPs, attention projections, the deep
stages of a CNN). It is unbiased (``E[Π Πᵀ] = I``) with variance within a small factor of a
count sketch's (Pham & Pagh; Avron, Nguyen & Woodruff 2014). Columns that collided within a
row (a uniform ``h_c``, as until this version) would collide in every row with the same signs:
the rows of a layer share one input ``x``, so every output's gradient would carry the same error
``|c|² ε(x)``, which a trace over the outputs does not average away (twice, and up to
``sqrt(O)`` times, a Gaussian projection's error on a CNN's last layer). Rows wider than ``dim``
cannot avoid it: ``Sketch(kind="auto")`` gives them the count sketch (:mod:`~ntkfunc._engines.sketch.plan`). Parameters are viewed as
matrices as in :func:`~ntkfunc._engines.sketch.countsketch.matrix_view`; a formed gradient
(biases, other rules, implementation 1) takes the same hash with one scatter
(:meth:`TensorSketchBlock.formed`), so both routes give the same features.

>>> import torch
>>> blk = TensorSketchBlock(leaf=0, rows=3, cols=4, dim=16, seed=0)
>>> c, x = torch.randn(2, 1, 3, 5, dtype=torch.float64), torch.randn(2, 5, 4, dtype=torch.float64)
>>> a, b = torch.zeros(2, 1, 16, dtype=torch.float64), torch.zeros(2, 16, dtype=torch.float64)
>>> blk.fft(c, x, a); blk.formed((c[:, 0] @ x).reshape(2, 12), b)
>>> bool(torch.allclose(a[:, 0], b))                # the FFT route equals hashing the formed G
True
"""

from __future__ import annotations

import dataclasses

import torch

from ntkfunc._core.buffers import Buffers
from ntkfunc._engines.sketch import seeds


@dataclasses.dataclass
class TensorSketchBlock:
    """One parameter's TensorSketch: hashes ``h_r`` (rows), ``h_c`` (columns) and their signs, from ``(seed, "tensorsketch", leaf)``."""

    leaf: int
    rows: int
    cols: int
    dim: int
    seed: int
    _tables: dict = dataclasses.field(default_factory=dict, repr=False)

    kind = "tensorsketch"

    @property
    def numel(self) -> int:
        return self.rows * self.cols

    def _cpu(self) -> dict[str, torch.Tensor]:
        if "cpu" not in self._tables:
            gen = seeds.generator(self.seed, "tensorsketch", self.leaf)
            h_r = torch.randint(0, self.dim, (self.rows,), generator=gen)
            h_c = torch.randperm(max(self.cols, self.dim), generator=gen)[: self.cols] % self.dim  # no two columns collide
            h_c = h_c.contiguous()
            self._tables["cpu"] = {"h_r": h_r, "h_c": h_c, "s_r": seeds.signs(self.rows, gen), "s_c": seeds.signs(self.cols, gen)}
        return self._tables["cpu"]

    def tables(self, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        key = (str(device), dtype)
        if key not in self._tables:
            cpu = self._cpu()
            self._tables[key] = {k: v.to(device) if k.startswith("h") else v.to(device=device, dtype=dtype) for k, v in cpu.items()}
        return self._tables[key]

    def _flat(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Bucket and sign of every coordinate in C order (for formed gradients; built once per device)."""
        key = ("flat", str(device), dtype)
        if key not in self._tables:
            t = self.tables(device, dtype)
            bucket = (t["h_r"][:, None] + t["h_c"][None, :]).remainder_(self.dim).reshape(-1)
            sign = (t["s_r"][:, None] * t["s_c"][None, :]).reshape(-1)
            self._tables[key] = (bucket, sign)
        return self._tables[key]

    def formed(self, g: torch.Tensor, out: torch.Tensor, ws: Buffers | None = None) -> None:
        """``out += g Π`` for formed gradients ``g`` ``(M, numel)`` into ``out`` ``(M, dim)`` (one scatter)."""
        bucket, sign = self._flat(g.device, g.dtype)
        out.index_add_(1, bucket, g.reshape(g.shape[0], -1) * sign)

    def fft(self, c: torch.Tensor, x: torch.Tensor, out: torch.Tensor, ws: Buffers | None = None) -> None:
        """``out += vec(c x) Π`` for ``c`` ``(m, O, R, S)``, ``x`` ``(m, S, D)`` into ``out`` ``(m, O, dim)``, by FFTs."""
        ws = ws or Buffers()
        t = self.tables(c.device, c.dtype)
        m, o, r, s = c.shape
        u = ws.get("ts-u", (m, o, s, self.dim), c, zero=True)
        u.index_add_(3, t["h_r"], c.transpose(2, 3) * t["s_r"])  # count sketch of every c_s
        v = ws.get("ts-v", (m, s, self.dim), x, zero=True)
        v.index_add_(2, t["h_c"], x * t["s_c"])  # count sketch of every x_s
        spectrum = (torch.fft.rfft(u) * torch.fft.rfft(v)[:, None]).sum(2)  # an einsum took a slow batched path here
        out += torch.fft.irfft(spectrum, n=self.dim)


def blocks(params: list[tuple[int, tuple[int, ...]]], dim: int, seed: int) -> list[TensorSketchBlock]:
    """The TensorSketch blocks of ``params`` (``(leaf, shape)``), each with independent hashes."""
    from ntkfunc._engines.sketch.countsketch import matrix_view

    return [TensorSketchBlock(leaf, *matrix_view(shape), dim, seed) for leaf, shape in params]
