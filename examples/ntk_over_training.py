"""The NTK over training (torchNTK report, section 5.2), on the digits 6 vs 9.

An MLP with one output (+1 for a 9, -1 for a 6) is trained by full-batch gradient descent
on the MSE. Every few steps the eNTK of the training set and its per-layer components
(``ntk_fn(..., per_param=True)`` grouped by layer with ``ntkfunc.group_kernels``) are
recorded. Figures:

- ``ntk_over_training_heatmaps.png``: the NTK at initialisation and after training, samples
  sorted by class. As in the report's Fig. 1, the kernel learns to separate the classes:
  relative to the mean diagonal, same-class entries grow and cross-class entries turn more
  negative (both printed).
- ``ntk_over_training_curves.png``: per-layer components (Frobenius norm) over steps; the
  relative distance ``|Θ_t - Θ₀|_F / |Θ₀|_F``; the kernel-target alignment
  ``yᵀΘy / (|Θ|_F |y|²)`` (Cristianini et al.; it rises as the kernel aligns with the task);
  training loss.

It also prints the accuracy of the report's quick kernel machine ``sgn(Σ_k Y_k Θ(x, X_k))``
on held-out digits with the initial and final kernels (the report's table 5).

Run: ``python examples/ntk_over_training.py`` (about a minute on 2 CPU cores).
"""

from __future__ import annotations

import _common as C
import torch
from torch import nn

import ntkfunc


def alignment(k: torch.Tensor, y: torch.Tensor) -> float:
    """Kernel-target alignment ``yᵀ K y / (|K|_F |y|²)`` in [0, 1] for a PSD ``K``."""
    return float(y @ k @ y / (k.norm() * (y @ y)))


def block_means(k: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Mean same-class and mean cross-class entry of ``k`` (off the diagonal), over its mean diagonal."""
    same = (y[:, None] == y[None, :]) & ~torch.eye(len(y), dtype=torch.bool, device=y.device)
    cross = y[:, None] != y[None, :]
    scale = torch.diagonal(k).mean()
    return float(k[same].mean() / scale), float(k[cross].mean() / scale)


def main() -> None:
    parser = C.parser(__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="gradient descent steps (default 500; --quick 20)")
    parser.add_argument("--width", type=int, default=None, help="hidden width (default 256; --quick 32)")
    args = parser.parse_args()
    device = C.setup(args)
    steps = C.optional(args.steps, 20, 500, args)
    width = C.optional(args.width, 32, 256, args)
    n_train, n_test = (40, 40) if args.quick else (200, 150)
    every = max(1, steps // 25)

    x_tr, y_tr, x_te, y_te = C.digits(n_train, n_test, classes=(6, 9), seed=args.seed, device=device)
    s_tr, _s_te = 2.0 * y_tr.float() - 1.0, 2.0 * y_te.float() - 1.0  # -1 for a 6, +1 for a 9; sorted by class
    torch.manual_seed(args.seed)
    model = nn.Sequential(nn.Linear(64, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 1)).to(device)
    f, params = ntkfunc.from_module(model)
    layers = {"0": "layer 1", "2": "layer 2", "4": "layer 3 (readout)"}
    per_param = ntkfunc.ntk_fn(f, per_param=True)
    kernel = ntkfunc.ntk_fn(f)

    p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    # a fifth of the largest stable rate at initialisation: the kernel grows about twofold in
    # training, and near the stability edge the loss spikes (catapults) instead of decreasing
    lr = 0.2 * ntkfunc.predict.max_learning_rate(kernel(x_tr, None, params), n_train)
    opt = torch.optim.SGD(p.values(), lr=lr)
    print(f"MLP 64-{width}-{width}-1 (tanh), {n_train} training digits (6 vs 9), lr = {lr:.3g}, {steps} steps")
    record: dict[str, list] = {"step": [], "loss": [], "distance": [], "alignment": [], **{v: [] for v in layers.values()}}
    k0 = None
    with C.Timer("training with kernels"):
        for step in range(steps + 1):
            if step % every == 0 or step == steps:
                detached = {k: v.detach() for k, v in p.items()}
                parts = ntkfunc.group_kernels(per_param(x_tr, None, detached))
                k = sum(parts.values())
                k0 = k if k0 is None else k0
                record["step"].append(step)
                record["distance"].append(float((k - k0).norm() / k0.norm()))
                record["alignment"].append(alignment(k, s_tr))
                for name, label in layers.items():
                    record[label].append(float(parts[name].norm()))
            out = f(p, x_tr).squeeze(-1)
            loss = 0.5 * ((out - s_tr) ** 2).mean()
            if step % every == 0 or step == steps:
                record["loss"].append(float(loss.detach()))
            if step < steps:
                opt.zero_grad()
                loss.backward()
                opt.step()
    k_final = k
    final = {k: v.detach() for k, v in p.items()}

    print(C.table(["step", "loss", "|Θt-Θ0|/|Θ0|", "alignment", *layers.values()],
                  [[record[c][i] for c in ["step", "loss", "distance", "alignment", *layers.values()]]
                   for i in range(len(record["step"]))]))

    print(C.table(["NTK at", "same-class mean / mean diag", "cross-class mean / mean diag"],
                  [["initialisation", *block_means(k0, y_tr)], ["end of training", *block_means(k_final, y_tr)]]))
    # the report's kernel machine sgn(sum_k Y_k K(x, X_k)) on held-out digits (its table 5)
    rows = []
    for name, prm in (("initialisation", params), ("end of training", final)):
        k_te = kernel(x_te, x_tr, prm)
        rows.append([name, C.accuracy(k_te @ s_tr, y_te), C.accuracy(f(prm, x_te), y_te)])
    print(C.table(["kernel at", "kernel machine test acc", "network test acc"], rows))

    fig, axes = C.figure(2, size=(3.6, 3.3))
    for ax, (title, k) in zip(axes, (("NTK at initialisation", k0), (f"NTK after {steps} steps", k_final))):
        im = ax.imshow(k.cpu(), cmap="viridis")
        half = int((y_tr == 0).sum())
        ax.axhline(half - 0.5, color="w", lw=0.6)
        ax.axvline(half - 0.5, color="w", lw=0.6)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("sample (6s, then 9s)", fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.046)
    C.save(fig, args.out, "ntk_over_training_heatmaps.png", dpi=60)

    fig, axes = C.figure(4, size=(3.0, 2.8))
    for label in layers.values():
        axes[0].plot(record["step"], record[label], label=label)
    axes[0].set_title("per-layer NTK |Θ_l|_F", fontsize=9)
    axes[0].legend(fontsize=7)
    axes[1].plot(record["step"], record["distance"])
    axes[1].set_title("|Θ_t − Θ₀|_F / |Θ₀|_F", fontsize=9)
    axes[2].plot(record["step"], record["alignment"])
    axes[2].set_title("kernel-target alignment", fontsize=9)
    axes[3].semilogy(record["step"], record["loss"])
    axes[3].set_title("training loss", fontsize=9)
    for ax in axes:
        ax.set_xlabel("step", fontsize=8)
    C.save(fig, args.out, "ntk_over_training_curves.png")


if __name__ == "__main__":
    main()
