"""Top eigenvalues of the eNTK by Lanczos on NTK-vector products, vs dense ``eigvalsh``.

An MLP (64 -> 128 -> 128 -> 10, tanh, float64) on ``N`` handwritten digits. For each
``N`` the top ``k`` eigenvalues of the full eNTK ``Θ`` (an ``N O x N O`` matrix,
``O = 10``) are computed

- by ``ntkfunc.linalg.top_eigenvalues``: Lanczos with full reorthogonalisation on
  ``ntk_vp_fn`` products, never forming ``Θ`` (memory ``O(N O k)``);
- densely, where ``Θ`` fits (``N <= --dense-max``): ``ntk_fn(f, trace_axes=())``, then
  ``torch.linalg.eigvalsh``.

Prints the eigenvalues, their agreement and both timings, and plots the spectrum and
time vs ``N``.

    python examples/spectrum.py            # ~1-2 min on 2 CPU cores
    python examples/spectrum.py --quick    # seconds
"""

from __future__ import annotations

import argparse
import os
import time

import matplotlib

matplotlib.use("Agg")
import _common as C  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import ntkfunc  # noqa: E402
from ntkfunc.datasets import load_digits  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = C.parser(__doc__.split("\n\n")[0])  # --out, --quick, --device, --seed, --threads
    p.add_argument("--k", type=int, default=None, help="number of top eigenvalues (default 20; 5 with --quick)")
    p.add_argument("--dense-max", type=int, default=None, help="largest N computed densely too (default 200; 40 with --quick)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    k = args.k or (5 if args.quick else 20)
    dense_max = args.dense_max or (40 if args.quick else 200)
    sizes = [20, 40, 80] if args.quick else [50, 100, 200, 400, 1000, 1797]  # 1797: all the digits
    torch.manual_seed(args.seed)
    width = 32 if args.quick else 128
    model = torch.nn.Sequential(
        torch.nn.Linear(64, width), torch.nn.Tanh(), torch.nn.Linear(width, width), torch.nn.Tanh(), torch.nn.Linear(width, 10)
    ).to(device=args.device, dtype=torch.float64)
    f, params = ntkfunc.from_module(model)
    images, _ = load_digits(torch.float64)
    order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(args.seed))
    data = images[order].reshape(images.shape[0], -1).to(args.device)

    _warm_up(f, params, data[:4])  # first calls of autograd / forward AD are slow: keep them out of the timings
    print(f"top-{k} eigenvalues of the eNTK (N O x N O, O = 10) of an MLP 64-{width}-{width}-10")
    print(f"{'N':>6} {'NO':>6} {'t_lanczos_s':>12} {'matvecs':>8} {'t_dense_s':>10} {'max_rel_diff':>13}")
    t_lanczos, t_dense, spectra = [], [], {}
    for n in sizes:
        x = data[:n]
        t0 = time.perf_counter()
        op = ntkfunc.ntk_vp_fn(f, x, None, params)
        res = ntkfunc.linalg.lanczos(op.matvec, n * 10, k, dtype=torch.float64, device=args.device, seed=args.seed)
        t_lanczos.append(time.perf_counter() - t0)
        dense_s, diff = float("nan"), float("nan")
        if n <= dense_max:
            t0 = time.perf_counter()
            theta = ntkfunc.ntk_fn(f, trace_axes=())(x, None, params)
            exact = torch.linalg.eigvalsh(theta.permute(0, 2, 1, 3).reshape(n * 10, n * 10)).flip(0)[:k]
            dense_s = time.perf_counter() - t0
            diff = ((res.eigenvalues - exact).abs() / exact.abs()).max().item()
            spectra[n] = (res.eigenvalues.cpu(), exact.cpu())
        t_dense.append(dense_s)
        print(f"{n:>6} {n * 10:>6} {t_lanczos[-1]:>12.3f} {res.iterations:>8} {dense_s:>10.3f} {diff:>13.2e}")
    n_show = max(spectra)
    lanczos_vals, exact_vals = spectra[n_show]
    print(f"N = {n_show}: top eigenvalues (Lanczos): {[round(v, 4) for v in lanczos_vals.tolist()[:8]]} ...")
    print(f"N = {n_show}: top eigenvalues (dense):   {[round(v, 4) for v in exact_vals.tolist()[:8]]} ...")

    os.makedirs(args.out, exist_ok=True)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    idx = range(1, k + 1)
    ax1.semilogy(idx, exact_vals, "o", mfc="none", ms=8, label="dense eigvalsh")
    ax1.semilogy(idx, lanczos_vals, "x", label="Lanczos on NTK-vector products")
    ax1.set_xlabel("index")
    ax1.set_ylabel("eigenvalue")
    ax1.set_title(f"top-{k} eNTK eigenvalues, N = {n_show}")
    ax1.legend(fontsize=8)
    dense_n = [n for n, t in zip(sizes, t_dense) if t == t]
    ax2.loglog(sizes, t_lanczos, "o-", label="Lanczos (ntk_vp_fn)")
    ax2.loglog(dense_n, [t for t in t_dense if t == t], "s-", label="dense ntk_fn + eigvalsh")
    ax2.set_xlabel("N (samples)")
    ax2.set_ylabel("seconds")
    ax2.set_title("time vs N")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(args.out, "spectrum.png")
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def _warm_up(f, params, x) -> None:
    ntkfunc.linalg.top_eigenvalues(f, x, params, k=1)
    ntkfunc.ntk_fn(f, trace_axes=())(x, None, params)


if __name__ == "__main__":
    main()
