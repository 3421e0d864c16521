"""Wide networks evolve as linear models (Lee et al. 2019), on the digits.

At several widths, a one-hidden-layer MLP in the NTK parameterisation (``torch.nn``, see
``_common.NTKLinear``) and its linearisation ``ntkfunc.linearize(f, params0)`` are trained
from the same initialisation by the same full-batch gradient descent on the MSE
``|f - y|² / (2 y.numel())``. Figures (``linearized_training.png``):

- train and test loss over steps of the network (solid) and of its linearisation (dashed),
  per width, with the closed-form prediction ``predict.gradient_descent_mse`` (gradient flow
  of the linearised widest network, computed from its eNTK, dotted black);
- ``|f(x) - f_lin(x)| / |f(x)|`` on the test set after training against width, on a log-log
  plot with a ``1/sqrt(width)`` reference line: the gap closes as the width grows.

Run: ``python examples/linearized_training.py`` (about a minute on 2 CPU cores).
"""

from __future__ import annotations

import _common as C
import numpy as np
import torch

import ntkfunc
from ntkfunc import predict


def mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``|out - y|² / (2 y.numel())``: the loss ``predict.gradient_descent_mse`` describes."""
    return 0.5 * ((out - y) ** 2).mean()


def train(f, params0: dict, data: tuple, lr: float, steps: int, every: int) -> tuple[dict, list, list]:
    """Full-batch GD; returns final params and train / test losses every ``every`` steps."""
    x_tr, t_tr, x_te, t_te = data
    p = {k: v.clone().requires_grad_(True) for k, v in params0.items()}
    opt = torch.optim.SGD(p.values(), lr=lr)
    train_loss, test_loss = [], []
    for step in range(steps + 1):
        loss = mse(f(p, x_tr), t_tr)
        if step % every == 0:
            train_loss.append(float(loss.detach()))
            with torch.no_grad():
                test_loss.append(float(mse(f(p, x_te), t_te)))
        if step < steps:
            opt.zero_grad()
            loss.backward()
            opt.step()
    return {k: v.detach() for k, v in p.items()}, train_loss, test_loss


def main() -> None:
    parser = C.parser(__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="gradient descent steps (default 200; --quick 10)")
    parser.add_argument("--widths", type=int, nargs="+", default=None,
                        help="hidden widths (default 64 256 1024 4096; --quick 16 64)")
    args = parser.parse_args()
    device = C.setup(args)
    steps = C.optional(args.steps, 10, 200, args)
    widths = args.widths or ([16, 64] if args.quick else [64, 256, 1024, 4096])
    n_train, n_test = (40, 40) if args.quick else (128, 128)
    every = max(1, steps // 50)

    x_tr, y_tr, x_te, y_te = C.digits(n_train, n_test, seed=args.seed, device=device)
    data = (x_tr, C.one_hot(y_tr, 10), x_te, C.one_hot(y_te, 10))
    ts = list(range(0, steps + 1, every))

    models = {}
    for w in widths:
        torch.manual_seed(args.seed + w)
        models[w] = ntkfunc.from_module(C.mlp([64, w, 10]).to(device))

    # one learning rate for all widths: half the smallest stable one (from each eNTK at init)
    max_lr = {}
    with C.Timer("eNTKs at initialisation"):
        for w in widths:
            f, p0 = models[w]
            k_tt = ntkfunc.ntk_fn(f)(x_tr, None, p0).double()
            max_lr[w] = predict.max_learning_rate(k_tt, data[1].numel())
        k_st = ntkfunc.ntk_fn(f)(x_te, x_tr, p0).double()  # closed form: the widest network
    lr = 0.5 * min(max_lr.values())
    print("largest stable learning rate per width:", {w: round(v, 3) for w, v in max_lr.items()})
    print(f"{n_train} training / {n_test} test digits, MLP 64-w-10 (ReLU, NTK parameterisation), "
          f"lr = {lr:.3g}, {steps} steps")
    gd = predict.gradient_descent_mse(k_tt, data[1].double(), learning_rate=lr)
    with torch.no_grad():
        f_tr, f_te = gd(torch.tensor(ts, dtype=torch.float64), f(p0, x_tr).double(), f(p0, x_te).double(), k_st)
    closed_train = [float(mse(o, data[1].double())) for o in f_tr]
    closed_test = [float(mse(o, data[3].double())) for o in f_te]

    curves, gaps = {}, {}
    for w in widths:
        f, p0 = models[w]
        f_lin = ntkfunc.linearize(f, p0)
        with C.Timer(f"width {w}: train network and linearisation"):
            p_net, net_tr, net_te = train(f, p0, data, lr, steps, every)
            p_lin, lin_tr, lin_te = train(f_lin, p0, data, lr, steps, every)
        with torch.no_grad():
            out, out_lin = f(p_net, x_te), f_lin(p_lin, x_te)
        gaps[w] = float((out - out_lin).norm() / out.norm())
        curves[w] = (net_tr, net_te, lin_tr, lin_te)

    rows = [[w, curves[w][0][-1], curves[w][2][-1], curves[w][1][-1], curves[w][3][-1], gaps[w]] for w in widths]
    rows.append(["closed form", "", closed_train[-1], "", closed_test[-1], ""])
    print(C.table(["width", "train loss net", "train loss lin", "test loss net", "test loss lin", "|f-f_lin|/|f| test"], rows))
    slope = np.polyfit(np.log(widths), np.log([gaps[w] for w in widths]), 1)[0] if len(widths) > 1 else float("nan")
    print(f"log-log slope of |f - f_lin| / |f| against width: {slope:.2f} (1/sqrt(width): -0.5)")

    fig, axes = C.figure(3, size=(3.5, 3.0))
    colours = C.plt.cm.viridis(np.linspace(0, 0.85, len(widths)))
    for ax, col, closed, title in ((axes[0], 0, closed_train, "train loss"), (axes[1], 1, closed_test, "test loss")):
        for w, c in zip(widths, colours):
            ax.plot(ts, curves[w][col], color=c, label=f"width {w}")
            ax.plot(ts, curves[w][col + 2], color=c, ls="--")
        ax.plot(ts, closed, "k:", label=f"closed form (eNTK, width {widths[-1]})")
        ax.set_yscale("log")
        ax.set_xlabel("step", fontsize=8)
        ax.set_title(f"{title}: net (solid), linearised (dashed)", fontsize=8)
    axes[0].legend(fontsize=6)
    ws = np.array(widths, dtype=float)
    axes[2].loglog(ws, [gaps[w] for w in widths], "o-", label="measured")
    axes[2].loglog(ws, gaps[widths[0]] * np.sqrt(ws[0] / ws), "k--", label="∝ 1/√width")
    axes[2].set_xlabel("width", fontsize=8)
    axes[2].set_title("|f − f_lin| / |f| on test, end of training", fontsize=8)
    axes[2].legend(fontsize=7)
    C.save(fig, args.out, "linearized_training.png")


if __name__ == "__main__":
    main()
