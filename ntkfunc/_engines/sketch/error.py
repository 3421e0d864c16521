"""A sketched kernel's error from its own features: the Gaussian sketch's variance, by re-sketching the features.

For a Gaussian ``Π`` (i.i.d. ``N(0, 1/dim)``) and gradients ``u, v, u', v'``,
``Cov(<Πᵀu, Πᵀv>, <Πᵀu', Πᵀv'>) = (<u, u'><v, v'> + <u, v'><v, u'>) / dim``: the variance of
every kernel entry (traced and diagonal axes included) is a function of inner products of the
gradients, which the features preserve. Sketching the features again with independent
Gaussian ``R1``, ``R2`` (``dim x m``, ``m = min(dim, width)``) and the same layout gives two
kernels whose difference has ``E‖K̂_R1 - K̂_R2‖² = 2 Σ Var_m``; scaled by ``m / dim`` it is
the sum of the variances at ``dim``, i.e. ``E‖K̂ - K‖²`` of a Gaussian sketch of the
gradients. For the Gaussian kind this is the expected error (up to the ``O(1/dim)`` bias of
the plugged-in inner products); the count sketch's variance is the Gaussian's minus
``2 Σ_i u_i² v_i²`` when ``dim`` holds every parameter's row (the estimate is conservative).
TensorSketch's errors are the same in every traced output for a layer whose rows are wider
than ``dim`` (its columns collide alike in every row), which the Gaussian's are not: there the
actual error can exceed the estimate by up to ``sqrt(O)`` (see :meth:`ntkfunc.Sketch.error_estimate`;
``"auto"`` takes the count sketch for such layers).

(Splitting the features into two halves is not an estimate for the hashed kinds: a
coordinate lands in one half, which adds ``Σ_i u_i² v_i²`` to the halves' difference, and
a last-layer bias, whose gradient is 1 for every sample, makes that term a fixed fraction
of the kernel whatever ``dim``.)

>>> import torch
>>> from ntkfunc._core.layout import Layout
>>> f = torch.randn(6, 1, 8, dtype=torch.float64)
>>> e = resketch(f, f, Layout.make(2, 0, (-1,), ()), 8, seed=0)
>>> e.relative > 0, e.samples
(True, 6)
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ntkfunc._core.layout import Layout

WIDTH = 256
"""Columns of each re-sketch (``m``); the estimate's own relative spread is about ``1 / sqrt(m · entries)``."""


@dataclasses.dataclass(frozen=True)
class SketchError:
    """An estimate of a sketched kernel's error: ``relative`` ≈ ``‖K̂ - K‖_F / ‖K̂‖_F``, ``rms`` per entry, from ``samples`` rows."""

    relative: float
    rms: float
    samples: int

    def record(self) -> dict:
        return {"relative_frobenius": self.relative, "rms_entry": self.rms, "samples": self.samples, "method": "resketch"}


def spread(n: int, k: int) -> list[int]:
    """At most ``k`` evenly spaced indices of ``range(n)``.

    >>> spread(5, 3), spread(2, 3)
    ([0, 2, 4], [0, 1])
    """
    if n <= k:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def resketch(a1: torch.Tensor, a2: torch.Tensor, layout: Layout, dim: int, seed: int, width: int = WIDTH) -> SketchError:
    """The estimate for features ``a1``, ``a2`` ``(n, *out, dim)`` under ``layout`` (not divided by traced sizes: a ratio).

    ``R1``, ``R2`` are drawn on the CPU from ``seed`` (the same estimate on every device).
    """
    m = min(dim, width)
    gen = torch.Generator().manual_seed(seed)
    r = (torch.randn(2, dim, m, generator=gen, dtype=torch.float64) / math.sqrt(m)).to(a1.device, a1.dtype)
    same = a2 is a1

    def kernel(t: torch.Tensor) -> torch.Tensor:
        p1 = (a1 @ t).to(torch.float64)
        return layout.contract(p1, p1 if same else (a2 @ t).to(torch.float64), 1)

    sq = float((kernel(r[0]) - kernel(r[1])).pow(2).sum()) / 2 * m / dim
    full = layout.contract(a1, a2, 1).to(torch.float64)
    norm = float(full.norm())
    diff = math.sqrt(sq)
    return SketchError(diff / norm if norm else math.inf, diff / math.sqrt(max(full.numel(), 1)), int(a1.shape[0]))
