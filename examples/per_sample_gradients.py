"""Per-sample gradients of a loss with ``ntkfunc.jacobian_fn``: their norms before and after training.

The per-sample gradients ``∇θ ℓ(x_n, y_n)`` are the Jacobian of the per-sample loss
``ℓ(params, (x, y)) -> (N,)``, so ``jacobian_fn(loss)((x, y), params)`` returns them shaped
like ``params`` (``(N, *θ.shape)`` per parameter; ``flat=True`` gives ``(N, P)``). A small CNN
(digits, 10 classes) is trained by full-batch Adam; at initialisation and after training this
script computes every training sample's gradient, checks it against ``torch.func.vmap(grad)``
and against the batch gradient (their mean), times both, and plots

- the distribution of per-sample gradient norms at initialisation and after training: training
  shrinks most of them by orders of magnitude, while misclassified samples keep large ones;
- loss against gradient norm per sample after training (misclassified samples marked);
- the effect of clipping each sample's gradient to norm ``C`` (as DP-SGD does) on the update:
  the cosine between the clipped mean and the true mean gradient, for several ``C``: after
  training a few samples carry most of the mean gradient, and clipping turns the update away from it.

    python examples/per_sample_gradients.py            # ~10 s on one CPU core
    python examples/per_sample_gradients.py --quick    # seconds
"""

from __future__ import annotations

import argparse
import time

import _common as C
import numpy as np
import torch
from torch import nn

import ntkfunc
from ntkfunc.testing import max_rel_err


def parse_args(argv=None) -> argparse.Namespace:
    p = C.parser(__doc__.split("\n\n")[0])  # --out, --quick, --device, --seed, --threads
    p.add_argument("--n-train", type=int, default=None, help="training images (default 600; 100 with --quick)")
    p.add_argument("--steps", type=int, default=None, help="full-batch Adam steps (default 40; 20 with --quick)")
    return p.parse_args(argv)


def cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(32 * 4 * 4, 10))


def norms(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each sample's gradient norm over all parameters: ``(N,)``."""
    return torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in grads.values()))


def main(argv=None) -> None:
    args = parse_args(argv)
    device = C.setup(args)
    n_train = C.optional(args.n_train, 100, 600, args)
    steps = C.optional(args.steps, 20, 40, args)
    x, y, _, _ = C.digits(n_train, 10, flat=False, seed=args.seed, device=device)
    model = cnn().to(device).eval()
    f, params = ntkfunc.from_module(model)

    def loss(p, batch):  # per-sample losses, (N,): their Jacobian is the per-sample gradients
        images, labels = batch
        return nn.functional.cross_entropy(f(p, images), labels, reduction="none")

    per_sample = ntkfunc.jacobian_fn(loss)
    single = torch.func.grad(lambda p, xi, yi: loss(p, (xi[None], yi[None]))[0])
    reference = torch.func.vmap(single, in_dims=(None, 0, 0))

    def gradients(p: dict[str, torch.Tensor]) -> dict[str, object]:
        per_sample((x, y), p), reference(p, x, y)  # first calls (probes, decisions): out of the timings
        t0 = time.perf_counter()
        grads = per_sample((x, y), p)
        t_ours = time.perf_counter() - t0
        t0 = time.perf_counter()
        ref = reference(p, x, y)
        t_ref = time.perf_counter() - t0
        diff = max_rel_err([grads[k] for k in grads], [ref[k] for k in grads])  # a NaN counts as inf
        batch = torch.func.grad(lambda q: loss(q, (x, y)).mean())(p)
        mean_diff = max_rel_err([grads[k].mean(0) for k in grads], [batch[k] for k in grads])
        return {"grads": grads, "t_ours": t_ours, "t_ref": t_ref, "diff": diff, "mean_diff": mean_diff,
                "losses": loss(p, (x, y)).detach(), "correct": (f(p, x).argmax(-1) == y)}

    before = gradients(params)
    trained = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    opt = torch.optim.Adam(trained.values(), lr=3e-3)
    for _ in range(steps):
        opt.zero_grad()
        loss(trained, (x, y)).mean().backward()
        opt.step()
    trained = {k: v.detach() for k, v in trained.items()}
    after = gradients(trained)

    rows = []
    for name, r in (("initialisation", before), (f"after {steps} steps", after)):
        nrm = norms(r["grads"])
        rows.append([name, float(r["correct"].double().mean()), float(nrm.median()), float(nrm.max()), r["t_ours"], r["t_ref"],
                     r["diff"], r["mean_diff"]])
    print(f"per-sample gradients of a {sum(p.numel() for p in params.values()):,}-parameter CNN on {n_train} digits")
    print(C.table(["when", "train acc", "median |g_n|", "max |g_n|", "jacobian_fn s", "vmap(grad) s", "vs vmap(grad)", "mean vs batch"],
                  rows))

    g_after = torch.cat([g.flatten(1) for g in after["grads"].values()], 1)
    true_mean = g_after.mean(0)
    clips = np.quantile(norms(after["grads"]).numpy(), [0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
    cosines = []
    for c in clips:
        scale = torch.clamp(c / g_after.norm(dim=1, keepdim=True), max=1.0)
        clipped = (g_after * scale).mean(0)
        cosines.append(float(torch.nn.functional.cosine_similarity(clipped, true_mean, dim=0)))
    print(C.table(["clip C (quantile of |g_n|)", "cos(clipped mean, mean)"],
                  [[f"{c:.3g} ({q:.0%})", cs] for c, q, cs in zip(clips, [0.1, 0.25, 0.5, 0.75, 0.9, 1.0], cosines)]))

    fig, ax = C.figure(3, size=(4.2, 3.3))
    n0, n1 = norms(before["grads"]).log10().numpy(), norms(after["grads"]).log10().numpy()
    bins = np.linspace(min(n0.min(), n1.min()), max(n0.max(), n1.max()), 30)
    ax[0].hist(n0, bins=bins, alpha=0.6, label="initialisation")
    ax[0].hist(n1, bins=bins, alpha=0.6, label=f"after {steps} steps")
    ax[0].set(xlabel="log10 |∇θ ℓ(x_n)|", ylabel="samples", title="per-sample gradient norms")
    ax[0].legend(fontsize=8)
    ok = after["correct"].numpy()
    ls = after["losses"].numpy()
    ax[1].scatter(ls[ok], 10 ** n1[ok], s=8, label="classified right")
    ax[1].scatter(ls[~ok], 10 ** n1[~ok], s=14, marker="x", color="C3", label="misclassified")
    ax[1].set(xscale="log", yscale="log", xlabel="per-sample loss", ylabel="|∇θ ℓ(x_n)|", title="after training")
    ax[1].legend(fontsize=8)
    ax[2].plot(np.arange(len(clips)), cosines, "o-")
    ax[2].set_xticks(np.arange(len(clips)), ["10%", "25%", "50%", "75%", "90%", "max"])
    ax[2].set(xlabel="clip norm C (quantile of |g_n|)", ylabel="cosine to the mean gradient", title="per-sample clipping")
    C.save(fig, args.out, "per_sample_gradients.png")


if __name__ == "__main__":
    main()
