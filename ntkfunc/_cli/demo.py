"""The embedded default job: the eNTK of a small CNN on the shipped digits, every implementation.

``python -m ntkfunc`` (or ``ntkfunc demo``) runs it: it computes the full (O x O)
kernel of a small CNN on 64 digits with each implementation, checks that they agree,
prints their times, and saves the kernel (``.npy``) and a heatmap (``.png``, when
matplotlib is installed) to ``--out``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ntkfunc._engines import Implementation, engines
from ntkfunc.datasets import load_digits
from ntkfunc.models import small_cnn
from ntkfunc.module import from_module
from ntkfunc.ntk import ntk_fn


def run(n: int = 64, out: Path | None = None, seed: int = 0) -> dict:
    """Compute the kernel with every implementation; returns seconds per implementation."""
    torch.manual_seed(seed)
    x, y = load_digits()
    x = x[:n]
    f, params = from_module(small_cnn().eval())
    n_params = sum(p.numel() for p in params.values())
    print(f"eNTK of a small CNN ({n_params:,} parameters) on {n} shipped 8x8 digits, full kernel (N, N, 10, 10)")
    kernels, seconds = {}, {}
    numbers = [int(e.implementation) for e in engines()]
    names: list = [k for k in numbers if k != Implementation.AUTO] + (["auto"] if Implementation.AUTO in numbers else [])
    for impl in names:
        kernel = ntk_fn(f, trace_axes=(), implementation=impl)
        kernel(x[:2], None, params)  # warm-up
        start = time.perf_counter()
        kernels[impl] = kernel(x, None, params)
        seconds[impl] = time.perf_counter() - start
    ref = kernels[names[0]]
    for impl, k in kernels.items():
        err = ((k - ref).abs().max() / ref.abs().max()).item()
        print(f"  implementation {impl!s:>4}: {seconds[impl] * 1e3:8.1f} ms   max rel. difference to implementation {names[0]}: {err:.1e}")
    agree = all(torch.allclose(k, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item()) for k in kernels.values())
    print(f"  implementations agree: {agree}")
    traced = ref.diagonal(dim1=2, dim2=3).mean(-1)
    same = (y[:n, None] == y[None, :n]).float()
    alignment = (traced * same).sum() / (traced.norm() * same.norm())
    print(f"  kernel-label alignment of the traced kernel: {alignment.item():.3f}")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        np.save(out / "demo_ntk.npy", ref.numpy())
        print(f"  saved {out / 'demo_ntk.npy'}")
        _heatmap(traced, y[:n], out / "demo_ntk.png")
    if not agree:
        raise SystemExit("implementations disagree")
    return seconds


def _heatmap(k: torch.Tensor, labels: torch.Tensor, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("  (matplotlib not installed: no heatmap)")
        return
    order = torch.argsort(labels, stable=True)
    fig, ax = plt.subplots(figsize=(4.5, 4))
    im = ax.imshow(k[order][:, order].numpy(), cmap="viridis")
    ax.set_title("traced eNTK, samples sorted by digit")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"  saved {path}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ntkfunc demo", description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=64, help="number of digits (default 64)")
    parser.add_argument("--out", type=Path, default=Path("out"), help="folder for demo_ntk.npy/.png (default ./out)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    run(args.n, args.out, args.seed)
    return 0
