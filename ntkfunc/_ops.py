"""Context managers that make torch ops behave under nested ``torch.func`` transforms."""

from __future__ import annotations

import contextlib
from typing import Iterator


@contextlib.contextmanager
def transform_friendly_attention() -> Iterator[None]:
    """Route ``scaled_dot_product_attention`` to its math decomposition for this block.

    The fused CPU/CUDA attention kernels have neither batching rules (vmap falls back to
    a slow per-sample loop) nor forward-mode derivatives; the math backend is plain
    matmul + softmax, which every transform supports. Restored on exit.
    """
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3: nothing to select
        yield
        return
    with sdpa_kernel([SDPBackend.MATH]):
        yield
