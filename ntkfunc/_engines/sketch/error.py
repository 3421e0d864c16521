"""A sketched kernel's error from its own features: the two halves of ``dim`` as two independent sketches.

``K̂ = (h K̂_a + (dim - h) K̂_b) / dim`` where ``K̂_a``, ``K̂_b`` are the kernels of the first
``h = dim // 2`` and the last ``dim - h`` features, each rescaled to be unbiased. For
independent halves of equal variance, ``E‖K̂ - K‖² = E‖K̂_a - K̂_b‖² / 4``: the estimate is
``‖K̂_a - K̂_b‖_F / 2``. Exact in expectation for the Gaussian sketch (independent columns);
for the hashed sketches a coordinate lands in exactly one half, which adds ``Σ_i a_i² b_i²``
to the estimate's expectation: conservative, negligible when ``P >> dim``.

>>> import torch
>>> from ntkfunc._core.layout import Layout
>>> f = torch.randn(6, 1, 8, dtype=torch.float64)
>>> e = halves(f, f, Layout.make(2, 0, (-1,), ()), 8)
>>> e.relative > 0, e.samples
(True, 6)
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ntkfunc._core.layout import Layout


@dataclasses.dataclass(frozen=True)
class SketchError:
    """An estimate of a sketched kernel's error: ``relative`` ≈ ``‖K̂ - K‖_F / ‖K̂‖_F``, ``rms`` per entry, from ``samples`` rows."""

    relative: float
    rms: float
    samples: int

    def record(self) -> dict:
        return {"relative_frobenius": self.relative, "rms_entry": self.rms, "samples": self.samples, "method": "halves"}


def spread(n: int, k: int) -> list[int]:
    """At most ``k`` evenly spaced indices of ``range(n)``.

    >>> spread(5, 3), spread(2, 3)
    ([0, 2, 4], [0, 1])
    """
    if n <= k:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def halves(a1: torch.Tensor, a2: torch.Tensor, layout: Layout, dim: int) -> SketchError:
    """The estimate for features ``a1``, ``a2`` ``(n, *out, dim)`` under ``layout`` (not divided by traced sizes: a ratio)."""
    a1, a2 = a1.to(torch.float64), a2.to(torch.float64)
    h = dim // 2
    ka = layout.contract(a1[..., :h], a2[..., :h], 1) * (dim / h)
    kb = layout.contract(a1[..., h:], a2[..., h:], 1) * (dim / (dim - h))
    full = (ka * h + kb * (dim - h)) / dim
    trace = layout.trace_size(tuple(a1.shape[:-1]))  # features are batch first: axes as the output's
    diff = float((ka - kb).norm()) / 2 / trace
    norm = float(full.norm()) / trace
    return SketchError(diff / norm if norm else math.inf, diff / math.sqrt(max(full.numel(), 1)), int(a1.shape[0]))
