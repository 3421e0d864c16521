"""How good is a sketched eNTK? Error and kernel-regression accuracy against the sketch dimension k.

A CNN (two 3x3 convolutions and two linear layers, 71,754 parameters, 10 outputs) at
initialisation on the 10-class digits. The exact eNTK (``ntkfunc.kernel_matrix`` in
float64, averaged over the 10 outputs) of the training and test images against the
training images is the reference; for each ``k`` and a few seeds the sketched kernel is
formed from the features ``J(x) Π`` of ``ntkfunc.features_fn`` (float32, ``kind="auto"``:
TensorSketch for the wide layers, the count sketch elsewhere). Plotted against ``k``:

- the relative Frobenius error ``‖K̂ - K‖_F / ‖K‖_F`` on the training kernel, next to a
  ``1/sqrt(k)`` line and the error estimate read off the features alone
  (``Sketch.error_estimate``: the Gaussian sketch's variance, by re-sketching the features;
  no exact kernel);
- the relative errors of the top-10 eigenvalues of the training kernel (largest, median,
  worst of the ten);
- the test accuracy of kernel regression (``predict.gradient_descent_mse``, ``t = ∞``) with the
  sketched kernel, against the exact kernel's.

The sketch is unbiased and its error falls like ``1/sqrt(k)`` (about 0.7% at k = 8,192 here);
kernel regression is far less sensitive than the kernel's entries (its accuracy is within
half a point of the exact kernel's from k = 256 on), and the largest eigenvalue is about as
accurate as the kernel in Frobenius norm, the tenth a few times less. The estimate follows
the measured error within 2x (below it at large k: TensorSketch's error in the last layers
is shared by the 10 traced outputs; see ``Sketch.error_estimate``).

Run: ``python examples/sketch_accuracy.py`` (about a minute on 2 CPU cores; ``--quick``: seconds).
"""

from __future__ import annotations

import math

import _common as C
import torch
from torch import nn

import ntkfunc
from ntkfunc import predict


def cnn() -> nn.Module:
    """8x8 -> 16 channels -> 32 channels at 4x4 -> 128 -> 10: 71,754 parameters."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 128), nn.ReLU(), nn.Linear(128, 10),
    )


def regression_accuracy(k_tr: torch.Tensor, k_te: torch.Tensor, y_tr: torch.Tensor, y_te: torch.Tensor) -> float:
    """Test accuracy of kernel regression to convergence (``t = ∞``) with one-hot targets."""
    t = C.one_hot(y_tr, 10, torch.float64)
    zeros_te = torch.zeros(len(y_te), 10, dtype=torch.float64)
    fx_te = predict.gradient_descent_mse(k_tr, t, diag_reg=1e-4)(None, None, zeros_te, k_te)
    return C.accuracy(fx_te, y_te)


def top_eigenvalues(k: torch.Tensor, n: int) -> torch.Tensor:
    return torch.linalg.eigvalsh(k.double()).flip(0)[:n]


def main() -> None:
    parser = C.parser(__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=None, help="training images (default 600; --quick 60)")
    parser.add_argument("--seeds", type=int, default=None, help="sketches per k (default 4; --quick 2)")
    parser.add_argument("--kind", default="auto", help="Sketch kind (default auto)")
    args = parser.parse_args()
    device = C.setup(args)
    n_train = C.optional(args.n_train, 60, 600, args)
    n_test = 40 if args.quick else 300
    seeds = C.optional(args.seeds, 2, 4, args)
    dims = [64, 256, 1024] if args.quick else [128, 256, 512, 1024, 2048, 4096, 8192]
    n_eig = 10

    x_tr, y_tr, x_te, y_te = C.digits(n_train, n_test, seed=args.seed, flat=False, device=device)
    x_all = torch.cat([x_tr, x_te])
    torch.manual_seed(args.seed)
    model = cnn().to(device)
    f, params = ntkfunc.from_module(model)
    print(f"CNN: {sum(v.numel() for v in params.values()):,} parameters, {n_train} training + {n_test} test images")

    params64 = {k: v.double() for k, v in params.items()}
    with C.Timer("exact kernel (float64)"):
        exact = ntkfunc.kernel_matrix(f, params64, x_all.double(), x_tr.double(), progress=False).cpu()
    k_tr, k_te = exact[:n_train], exact[n_train:]
    eig = top_eigenvalues(k_tr, n_eig)
    acc_exact = regression_accuracy(k_tr, k_te, y_tr.cpu(), y_te.cpu())
    print(f"exact kernel: test accuracy {acc_exact:.4f}, top eigenvalue {float(eig[0]):.4g}")
    print(ntkfunc.Sketch(dims[-1], kind=args.kind).explain(f, params, x_tr[:2]))

    rows = []
    with C.Timer("sketches"):
        for dim in dims:
            for seed in range(seeds):
                sketch = ntkfunc.Sketch(dim, seed=seed, kind=args.kind)
                feats = ntkfunc.features_fn(f, sketch)(x_all, params).double().cpu()  # (N, 10, dim)
                kh = torch.einsum("aod,bod->ab", feats, feats[:n_train]) / feats.shape[1]  # traced: mean over outputs
                kh_tr, kh_te = kh[:n_train], kh[n_train:]
                eh = top_eigenvalues(kh_tr, n_eig)
                rel = ((eh - eig).abs() / eig).tolist()
                rows.append({
                    "k": dim, "seed": seed,
                    "frobenius": float((kh_tr - k_tr).norm() / k_tr.norm()),
                    "estimate": sketch.error_estimate(feats[:n_train]).relative,
                    "eig_first": rel[0], "eig_median": sorted(rel)[len(rel) // 2], "eig_worst": max(rel),
                    "accuracy": regression_accuracy(kh_tr, kh_te, y_tr.cpu(), y_te.cpu()),
                })

    def mean(key: str, dim: int) -> float:
        vals = [r[key] for r in rows if r["k"] == dim]
        return sum(vals) / len(vals)

    keys = ["frobenius", "estimate", "eig_first", "eig_median", "eig_worst", "accuracy"]
    print(f"means over {seeds} seeds (exact kernel's test accuracy {acc_exact:.4f}):")
    print(C.table(["k", *keys], [[d, *(mean(key, d) for key in keys)] for d in dims]))

    fig, ax = C.figure(3, 1, size=(4.2, 3.4))
    mk = {key: [mean(key, d) for d in dims] for key in keys}
    ax[0].loglog(dims, mk["frobenius"], "o-", label="measured (vs exact)")
    ax[0].loglog(dims, mk["estimate"], "x--", label="estimate (re-sketched features)")
    c = mk["frobenius"][0] * math.sqrt(dims[0])
    ax[0].loglog(dims, [c / math.sqrt(d) for d in dims], ":", color="gray", label="1/sqrt(k)")
    ax[0].set(xlabel="sketch dimension k", ylabel="‖K̂ − K‖_F / ‖K‖_F", title="kernel error")
    ax[0].legend(fontsize=8)
    for key, label in (("eig_first", "λ₁"), ("eig_median", f"median of top {n_eig}"), ("eig_worst", f"worst of top {n_eig}")):
        ax[1].loglog(dims, mk[key], "o-", label=label)
    ax[1].set(xlabel="sketch dimension k", ylabel="|λ̂ᵢ − λᵢ| / λᵢ", title=f"top-{n_eig} eigenvalues")
    ax[1].legend(fontsize=8)
    for seed in range(seeds):
        ax[2].semilogx(dims, [r["accuracy"] for r in rows if r["seed"] == seed], ".", color="C0", alpha=0.5)
    ax[2].semilogx(dims, mk["accuracy"], "o-", color="C0", label=f"sketched (mean of {seeds})")
    ax[2].axhline(acc_exact, color="k", ls="--", label="exact kernel")
    ax[2].set(xlabel="sketch dimension k", ylabel="test accuracy", title="kernel regression (digits)")
    ax[2].legend(fontsize=8)
    fig.suptitle(f"sketched eNTK of a CNN ({n_train} digits, kind={args.kind!r})")
    C.save(fig, args.out, "sketch_accuracy.png")


if __name__ == "__main__":
    main()
