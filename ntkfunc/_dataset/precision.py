"""``kernel_matrix(precision=...)``: the float32 precision of the Gram products.

- ``"highest"`` (default): IEEE float32 products (``torch.backends.cuda.matmul`` and oneDNN's
  ``mkldnn.matmul`` held at ``"ieee"`` while the kernel is computed, whatever the process set).
- ``"tf32"``: CUDA matrix products in TF32 (10-bit mantissa inputs, float32 accumulation). CPUs
  have no TF32 units: there it is ``"highest"``.
- ``"bf16"``: bfloat16 inputs (8-bit mantissa) with float32 accumulation and output. On CUDA the
  per-sample gradient panels are *stored* in bfloat16 (half the memory, twice the samples per
  panel) and multiplied with ``torch.mm(..., out_dtype=torch.float32)``; on CPU oneDNN's
  ``fp32_precision="bf16"`` (AMX / AVX512-BF16 where present) converts float32 panels on the fly.

The setting holds for every float32 matrix product of the run (the per-sample gradients'
``bmm`` and linear layers included; cuDNN convolutions keep ``torch.backends.cudnn``'s own
setting) and is restored afterwards. Non-float32 kernels (float64, bfloat16 models) are
computed in their own dtype whatever ``precision`` says. Measured errors against float64 are
in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import torch

from ntkfunc._core.layout import Layout

Precision = Literal["highest", "tf32", "bf16"]
PRECISIONS: tuple[str, ...] = ("highest", "tf32", "bf16")


def check_precision(precision: object, api: str = "kernel_matrix") -> str:
    """``precision`` if valid, else a ValueError naming what was given and the choices.

    >>> check_precision("tf32")
    'tf32'
    """
    if precision not in PRECISIONS:
        raise ValueError(f"{api}(precision={precision!r}): expected one of {', '.join(repr(p) for p in PRECISIONS)}")
    return str(precision)


def _generic_ieee() -> bool:
    """Whether backends left at ``"none"`` compute float32 products in IEEE float32 (the process-wide default)."""
    return getattr(torch.backends, "fp32_precision", "none") in ("none", "ieee")


def _cuda_tf32(on: bool) -> Callable[[], None] | None:
    """Set cuBLAS's TF32 for float32 products (new API, else the legacy flag); the undo, or None if unchanged."""
    m = torch.backends.cuda.matmul
    try:
        old = m.fp32_precision
    except AttributeError:
        old = None
    if old is not None:  # the new API only (torch refuses some mixes of the two)
        target = "tf32" if on else "ieee"
        if old == target or (target == "ieee" and old == "none" and _generic_ieee()):
            return None
        m.fp32_precision = target
        return lambda: setattr(m, "fp32_precision", old)
    else:  # torch < 2.9: the legacy flag
        legacy = m.allow_tf32
        if legacy == on:
            return None
        m.allow_tf32 = on
        return lambda: setattr(m, "allow_tf32", legacy)


def _cpu_bf16(on: bool) -> Callable[[], None] | None:
    """Set oneDNN's float32 matmul precision to bf16 (or IEEE); the undo, or None if unchanged."""
    m = getattr(torch.backends.mkldnn, "matmul", None)
    old = getattr(m, "fp32_precision", None)
    if m is None or old is None:
        return None
    target = "bf16" if on else "ieee"
    if old == target or (target == "ieee" and old == "none" and _generic_ieee()):
        return None
    m.fp32_precision = target
    return lambda: setattr(m, "fp32_precision", old)


@contextlib.contextmanager
def matmul_precision(precision: str, devices: Sequence[torch.device]) -> Iterator[None]:
    """Hold the float32 matmul precision of cuBLAS and oneDNN for the block; restored on exit.

    Set once per run (not per product), so that worker threads of several devices never
    race on torch's process-wide flags.
    """
    undo: list[Callable[[], None]] = []
    try:
        if any(d.type == "cuda" for d in devices):
            u = _cuda_tf32(precision == "tf32")
            if u is not None:
                undo.append(u)
        u = _cpu_bf16(precision == "bf16")
        if u is not None:
            undo.append(u)
        yield
    finally:
        for u in reversed(undo):
            u()


def storage_dtype(precision: str, dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype panels are stored in: bfloat16 for ``"bf16"`` float32 kernels on CUDA (when
    ``torch.mm(..., out_dtype=)`` works there), else the kernel's dtype.

    >>> storage_dtype("bf16", torch.float32, torch.device("cpu"))
    torch.float32
    """
    if precision == "bf16" and dtype == torch.float32 and device.type == "cuda" and _mixed_mm_works(device):
        return torch.bfloat16
    return dtype


def _mixed_mm_works(device: torch.device) -> bool:
    a = torch.ones(2, 2, dtype=torch.bfloat16, device=device)
    try:
        return torch.bmm(a[None], a[None], out_dtype=torch.float32).dtype == torch.float32
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def product(layout: Layout, a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``layout.contract(a, b, 1)`` of rows ``(b1, *out, P)`` and ``(b2, *out, P)``, in ``dtype``.

    Rows in ``dtype`` go through ``torch.einsum``; bfloat16 rows of a float32 kernel through
    :func:`batched_product` with float32 accumulation and output.
    """
    if a.dtype == dtype:
        return layout.contract(a, b, 1)
    return batched_product(layout, a, b, lambda x, y: torch.bmm(x, y, out_dtype=dtype))


def batched_product(layout: Layout, a: torch.Tensor, b: torch.Tensor, bmm: Callable[..., torch.Tensor]) -> torch.Tensor:
    """``layout.contract(a, b, 1)`` as one ``bmm(x, y)``: diagonal axes batched, traced axes and
    parameters summed, the rest paired; ``bmm`` is any batched matrix product.

    >>> lay = Layout.make(3, 0, (1,), (2,))
    >>> a, b = torch.randn(4, 5, 3, 7), torch.randn(2, 5, 3, 7)
    >>> bool(torch.allclose(batched_product(lay, a, b, torch.bmm), lay.contract(a, b, 1), atol=1e-5))
    True
    """
    x, y, finish = layout.matrices(a, b, 1)
    return finish(bmm(x, y.transpose(1, 2)))
