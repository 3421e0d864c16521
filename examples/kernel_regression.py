"""Trained network vs eNTK kernel regression vs the linearised network, on the digits.

An MLP and a small CNN (``torch.nn``, standard PyTorch initialisation) are trained on the
10-class digits by full-batch gradient descent on the MSE ``|f - y|² / (2 y.numel())``.
Test accuracy is compared for

- the trained network;
- eNTK kernel regression with the kernel at initialisation, Θ₀, and with the kernel of the
  trained network, Θ_T (``predict.gradient_descent_mse(...)(t=None)``, i.e. gradient flow
  to convergence of a kernel machine started at zero);
- the linearised network ``ntkfunc.linearize(f, params0)`` trained by the same gradient
  descent (``examples/linearized_training.py`` compares it with its closed form).

The known result (Fort et al. 2020, "Deep learning versus kernel learning"; Long 2021,
"Properties of the after kernel"): the kernel of the trained network, Θ_T, classifies at
least as well as the network and as Θ₀; the linearised network, trained for the same
number of steps, lags the network (most visibly for the CNN). On the easy digits all
kernel machines are close (about 0.96 at the default size).

Run: ``python examples/kernel_regression.py`` (about a minute on 2 CPU cores).
"""

from __future__ import annotations

import _common as C
import torch
from torch import nn

import ntkfunc
from ntkfunc import predict


def cnn() -> nn.Module:
    """Two strided 3x3 convolutions (8x8 -> 4x4 -> 2x2) and a linear head."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, stride=2), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 2 * 2, 10),
    )


def train(f, params: dict, x: torch.Tensor, y: torch.Tensor, lr: float, steps: int) -> dict:
    """Full-batch gradient descent on ``|f(params, x) - y|² / (2 y.numel())``; returns the params."""
    p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    opt = torch.optim.SGD(p.values(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = 0.5 * ((f(p, x) - y) ** 2).mean()
        loss.backward()
        opt.step()
    return {k: v.detach() for k, v in p.items()}


def run_model(name: str, model: nn.Module, data: tuple, steps: int) -> dict:
    """Everything for one architecture; returns ``{method: test accuracy}`` and prints it."""
    x_tr, y_tr, x_te, y_te = data
    t_tr = C.one_hot(y_tr, 10)
    f, p0 = ntkfunc.from_module(model)
    kernel = ntkfunc.ntk_fn(f)  # (N1, N2): the NTK averaged over the 10 outputs

    def kernels(params: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return kernel(x_tr, None, params).double(), kernel(x_te, x_tr, params).double()

    with C.Timer(f"{name}: kernel at init"):
        k0, k0_te = kernels(p0)
    lr = 0.5 * predict.max_learning_rate(k0, t_tr.numel())
    print(f"{name}: {sum(v.numel() for v in p0.values())} parameters, lr = {lr:.3g}, {steps} steps")
    with C.Timer(f"{name}: train network"):
        p_t = train(f, p0, x_tr, t_tr, lr, steps)
    with C.Timer(f"{name}: kernel after training"):
        k_t, k_t_te = kernels(p_t)
    f_lin = ntkfunc.linearize(f, p0)
    with C.Timer(f"{name}: train linearised network"):
        p_lin = train(f_lin, p0, x_tr, t_tr, lr, steps)

    zeros_tr = torch.zeros_like(t_tr, dtype=torch.float64)
    zeros_te = torch.zeros(len(x_te), 10, dtype=torch.float64, device=t_tr.device)
    t64 = t_tr.double()
    acc = {
        "network": C.accuracy(f(p_t, x_te), y_te),
        "kernel regression Θ₀": C.accuracy(
            predict.gradient_descent_mse(k0, t64, diag_reg=1e-4)(None, zeros_tr, zeros_te, k0_te)[1], y_te),
        "kernel regression Θ_T": C.accuracy(
            predict.gradient_descent_mse(k_t, t64, diag_reg=1e-4)(None, zeros_tr, zeros_te, k_t_te)[1], y_te),
        "linearised network": C.accuracy(f_lin(p_lin, x_te), y_te),
    }
    return acc


def main() -> None:
    parser = C.parser(__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=None, help="training images (default 400; --quick 60)")
    parser.add_argument("--steps", type=int, default=None, help="gradient descent steps (default 200; --quick 20)")
    args = parser.parse_args()
    device = C.setup(args)
    n_train = C.optional(args.n_train, 60, 400, args)
    steps = C.optional(args.steps, 20, 200, args)
    n_test = 100 if args.quick else 300
    width = 32 if args.quick else 128

    flat = C.digits(n_train, n_test, seed=args.seed, device=device)
    img = C.digits(n_train, n_test, seed=args.seed, flat=False, device=device)
    torch.manual_seed(args.seed)
    results = {
        f"MLP 64-{width}-{width}-10": run_model("MLP", nn.Sequential(
            nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10)).to(device), flat, steps),
        "CNN": run_model("CNN", cnn().to(device), img, steps),
    }

    methods = list(next(iter(results.values())))
    print(f"\ntest accuracy ({n_train} training / {n_test} test digits, {steps} steps of full-batch GD)")
    print(C.table(["method", *results], [[m, *(results[k][m] for k in results)] for m in methods]))

    fig, (ax,) = C.figure(size=(7.5, 3.4))
    w = 0.8 / len(methods)
    for i, m in enumerate(methods):
        xs = [j + (i - (len(methods) - 1) / 2) * w for j in range(len(results))]
        bars = ax.bar(xs, [results[k][m] for k in results], w, label=m)
        ax.bar_label(bars, fmt="%.2f", fontsize=6)
    ax.set_xticks(range(len(results)), list(results))
    lo = min(min(r.values()) for r in results.values())
    ax.set_ylim(max(0.0, lo - 0.1), 1.0)
    ax.set_ylabel("test accuracy")
    ax.set_title(f"digits, {n_train} train / {n_test} test: network vs eNTK regression", fontsize=9)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)
    C.save(fig, args.out, "kernel_regression.png")


if __name__ == "__main__":
    main()
