"""How well the sum-of-logits pNTK approximates the full eNTK at initialisation, vs width.

For a one-hidden-layer ReLU MLP (64 -> width -> 10) on handwritten digits, in the NTK
parameterisation (weights N(0, 1), layer outputs scaled by 1/sqrt(fan_in), as in the
paper) and in PyTorch's standard one (``nn.Linear`` defaults), computes at initialisation

- the full eNTK ``Θ`` (``ntk_fn(f, trace_axes=())``, ``(N, N, O, O)``),
- the pNTK (``pntk_fn(f)``, ``(N, N)``, one VJP per sample instead of ``O``),

and prints / plots, against the width, the relative Frobenius error
``‖Θ - pNTK ⊗ I_O‖_F / ‖Θ‖_F`` and the relative error of the top eigenvalue
(``λ_max(pNTK ⊗ I_O) = λ_max(pNTK)``), averaged over ``--seeds`` initialisations, with
a ``1/sqrt(width)`` line: the rate proved by Mohamadi, Bae & Sutherland (2023) for the
NTK parameterisation. In the standard parameterisation the last layer's exactly
block-diagonal contribution ``h(x1)·h(x2) δ_oo'`` grows with the width and dominates
``Θ``, so the error falls faster still.

    python examples/pntk_vs_width.py            # widths 64..4096, ~1-2 min on 2 CPU cores
    python examples/pntk_vs_width.py --quick    # seconds
"""

from __future__ import annotations

import argparse
import math
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
    p.add_argument("--n", type=int, default=None, help="number of digits (default 48; 12 with --quick)")
    p.add_argument("--seeds", type=int, default=None, help="initialisations averaged per width (default 2; 1 with --quick)")
    return p.parse_args(argv)


class NTKLinear(torch.nn.Module):
    """``y = x Wᵀ / sqrt(fan_in) + b`` with ``W, b ~ N(0, 1)``: the NTK parameterisation."""

    def __init__(self, fan_in: int, fan_out: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(fan_out, fan_in))
        self.bias = torch.nn.Parameter(torch.randn(fan_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T / self.weight.shape[1] ** 0.5 + self.bias


def errors_at_width(width: int, x: torch.Tensor, seed: int, ntk_param: bool) -> tuple[float, float, float, float]:
    """(Frobenius error, top-eigenvalue error, seconds for Θ, seconds for the pNTK)."""
    torch.manual_seed(seed)
    linear = NTKLinear if ntk_param else torch.nn.Linear
    model = torch.nn.Sequential(linear(x.shape[1], width), torch.nn.ReLU(), linear(width, 10))
    model = model.to(device=x.device, dtype=x.dtype)
    f, params = ntkfunc.from_module(model)
    t0 = time.perf_counter()
    full = ntkfunc.ntk_fn(f, trace_axes=())(x, None, params)  # (N, N, O, O)
    t1 = time.perf_counter()
    pntk = ntkfunc.pntk_fn(f)(x, None, params)  # (N, N)
    t2 = time.perf_counter()
    n, o = full.shape[0], full.shape[2]
    approx = torch.einsum("ij,ab->ijab", pntk, torch.eye(o, dtype=x.dtype, device=x.device))
    frob = ((full - approx).norm() / full.norm()).item()
    lam_full = torch.linalg.eigvalsh(full.permute(0, 2, 1, 3).reshape(n * o, n * o))[-1]
    lam_p = torch.linalg.eigvalsh(pntk)[-1]
    return frob, (abs(lam_full - lam_p) / lam_full).item(), t1 - t0, t2 - t1


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    n = args.n or (12 if args.quick else 48)
    seeds = args.seeds or (1 if args.quick else 2)
    widths = [32, 64, 128] if args.quick else [64, 128, 256, 512, 1024, 2048, 4096]
    images, _ = load_digits(torch.float32)
    gen = torch.Generator().manual_seed(args.seed)
    x = images[torch.randperm(images.shape[0], generator=gen)[:n]].reshape(n, -1).to(args.device)

    errors_at_width(8, x[:2], args.seed, True)  # first autograd calls are slow: keep them out of the timings
    print(f"pNTK vs eNTK at initialisation: MLP 64 -> width -> 10 (ReLU), N = {n} digits, {seeds} seed(s)")
    results = {}
    for name, ntk_param in (("NTK", True), ("standard", False)):
        print(f"{name} parameterisation")
        print(f"{'width':>6} {'frob_err':>10} {'top_eig_err':>12} {'t_entk_s':>9} {'t_pntk_s':>9}")
        frob, eig = [], []
        for w in widths:
            rows = [errors_at_width(w, x, args.seed + s, ntk_param) for s in range(seeds)]
            fe, ee = sum(r[0] for r in rows) / seeds, sum(r[1] for r in rows) / seeds
            te, tp = sum(r[2] for r in rows) / seeds, sum(r[3] for r in rows) / seeds
            frob.append(fe)
            eig.append(ee)
            print(f"{w:>6} {fe:>10.4f} {ee:>12.4f} {te:>9.3f} {tp:>9.3f}")
        slope = _loglog_slope(widths, frob)
        print(f"fitted slope of log(frob_err) vs log(width): {slope:.2f} (theory for the NTK parameterisation: -0.5)")
        results[name] = (frob, eig)

    os.makedirs(args.out, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for (name, (frob, eig)), colour in zip(results.items(), ("C0", "C1")):
        ax.loglog(widths, frob, "o-", color=colour, label=f"{name}: Frobenius")
        ax.loglog(widths, eig, "s:", color=colour, label=f"{name}: top eigenvalue")
    frob = results["NTK"][0]
    ax.loglog(widths, [frob[0] * math.sqrt(widths[0] / w) for w in widths], "k--", label=r"$\propto 1/\sqrt{\mathrm{width}}$")
    ax.set_xlabel("width")
    ax.set_ylabel(r"relative error of pNTK $\otimes I$")
    ax.set_title(f"pNTK vs eNTK at initialisation (N={n}, O=10)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(args.out, "pntk_vs_width.png")
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def _loglog_slope(xs, ys) -> float:
    lx = [math.log(v) for v in xs]
    ly = [math.log(max(v, 1e-300)) for v in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


if __name__ == "__main__":
    main()
