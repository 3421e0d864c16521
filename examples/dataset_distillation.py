"""Dataset distillation with Kernel Inducing Points (Nguyen et al. 2021), on the digits.

A handful of synthetic "support" images ``x_s`` (labels fixed, balanced over the 10
classes) are learned so that eNTK kernel regression from them,
``f(x) = Θ(x, x_s) (Θ(x_s, x_s) + λI)⁻¹ y_s``, classifies the digits. The loss is the MSE of
that prediction on a random batch of real training images; its gradient with respect to
``x_s`` flows through the kernel (``ntkfunc.ntk_fn`` kernels are differentiable in their
inputs). The network is a fixed randomly initialised MLP (NTK parameterisation); the
support images start as random real images. Figure (``dataset_distillation.png``):
test accuracy against the number of support images, learned vs random real images, and
the learned images.

Run: ``python examples/dataset_distillation.py`` (about a minute and a half on 2 CPU cores).
"""

from __future__ import annotations

import _common as C
import torch

import ntkfunc


def krr(kernel, x_s: torch.Tensor, y_s: torch.Tensor, x: torch.Tensor, params: dict, reg: float = 1e-3) -> torch.Tensor:
    """Kernel ridge regression from the support set: ``Θ(x, x_s) (Θ_ss + reg·mean(diag Θ_ss)·I)⁻¹ y_s``."""
    k_ss = kernel(x_s, None, params).double()
    k_xs = kernel(x, x_s, params).double()
    eye = torch.eye(len(x_s), dtype=k_ss.dtype, device=k_ss.device)
    a = k_ss + reg * torch.diagonal(k_ss).mean() * eye
    return k_xs @ torch.linalg.solve(a, y_s.double())


def main() -> None:
    parser = C.parser(__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="Adam steps per support size (default 50; --quick 3)")
    parser.add_argument("--sizes", type=int, nargs="+", default=None,
                        help="numbers of support images (default 10 20 50; --quick 10)")
    args = parser.parse_args()
    device = C.setup(args)
    steps = C.optional(args.steps, 3, 50, args)
    sizes = args.sizes or ([10] if args.quick else [10, 20, 50])
    n_pool, n_test, batch = (200, 100, 50) if args.quick else (1000, 500, 100)

    x_tr, y_tr, x_te, y_te = C.digits(n_pool, n_test, seed=args.seed, device=device)
    t_tr = C.one_hot(y_tr, 10)
    torch.manual_seed(args.seed)
    f, params = ntkfunc.from_module(C.mlp([64, 128, 10]).to(device))
    kernel = ntkfunc.ntk_fn(f)  # (N1, N2), averaged over the 10 outputs
    g = torch.Generator().manual_seed(args.seed)
    print(f"support sizes {sizes}, {steps} Adam steps each, target batches of {batch} from {n_pool} training digits, "
          f"{n_test} test digits; MLP 64-128-10 (ReLU, NTK parameterisation, fixed at initialisation)")

    rows, learned = [], {}
    for n in sizes:
        # balanced labels, images initialised from random real images of those classes
        labels = torch.arange(n) % 10
        start = torch.empty(n, dtype=torch.long)
        for c in range(10):
            pool = torch.nonzero(y_tr.cpu() == c).squeeze(1)
            slots = torch.nonzero(labels == c).squeeze(1)
            start[slots] = pool[torch.randperm(len(pool), generator=g)[:len(slots)]]
        y_s = C.one_hot(labels, 10).to(device)
        x_real = x_tr[start].clone()
        acc_real = C.accuracy(krr(kernel, x_real, y_s, x_te, params), y_te)
        x_s = x_real.clone().requires_grad_(True)
        opt = torch.optim.Adam([x_s], lr=0.05)
        losses = []
        with C.Timer(f"{n} support images: {steps} steps"):
            for _ in range(steps):
                idx = torch.randperm(n_pool, generator=g)[:batch]
                loss = 0.5 * ((krr(kernel, x_s, y_s, x_tr[idx], params) - t_tr[idx].double()) ** 2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
        with torch.no_grad():
            acc_kip = C.accuracy(krr(kernel, x_s.detach(), y_s, x_te, params), y_te)
        learned[n] = (x_s.detach().cpu(), labels)
        rows.append([n, acc_real, acc_kip, losses[0], losses[-1]])

    print(C.table(["support images", "test acc random real", "test acc learned (KIP)", "loss first step", "loss last step"], rows))

    show = sizes[0]
    imgs, labels = learned[show]
    k = min(10, len(labels))
    cols = (k + 1) // 2
    fig = C.plt.figure(figsize=(9.0, 3.2))
    grid = fig.add_gridspec(2, 2 + cols, width_ratios=[1.6, 0.25] + [0.35] * cols, left=0.07, right=0.99, bottom=0.15, top=0.88)
    ax = fig.add_subplot(grid[:, 0])
    ax.plot(sizes, [r[1] for r in rows], "o-", label="random real images")
    ax.plot(sizes, [r[2] for r in rows], "s-", label="learned support (KIP)")
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.set_xlabel("number of support images", fontsize=8)
    ax.set_ylabel("test accuracy (eNTK regression)", fontsize=8)
    ax.legend(fontsize=7)
    for i in range(k):
        sub = fig.add_subplot(grid[i // cols, 2 + i % cols])
        sub.imshow(imgs[i].reshape(8, 8).numpy(), cmap="gray")
        sub.set_title(f"label {int(labels[i])}", fontsize=7)
        sub.axis("off")
    fig.text(0.62, 0.93, f"learned support images (first {k} of {show})", fontsize=8)
    C.save(fig, args.out, "dataset_distillation.png", tight=False)


if __name__ == "__main__":
    main()
