"""TRAK-style data attribution from projected per-sample gradients written by ``ntkfunc.feature_matrix``.

TRAK (Park et al., 2023) scores how much each training example supports a prediction from
random projections of per-sample gradients: with ``φ(z) = Πᵀ ∇θ m(z)`` the projected gradient
of the margin ``m(z) = logit_y - log Σ_{c≠y} exp(logit_c)`` and ``Φ`` the training features,

    τ(z_test, z_train) = φ(z_test) (ΦᵀΦ)⁻¹ φ(z_train)ᵀ (1 - p_y(z_train)).

A small CNN is trained on the 10-class digits; then ``ntkfunc.feature_matrix`` writes the
projected gradients ``J(x) Π`` of all 10 logits of the training and test images to
``<out>/features/`` (resumable, checksummed ``.npy``: run the script again and nothing is
recomputed). The margin's features are a linear combination of the logits' (the projection
is linear): ``φ = F[y] - Σ_{c≠y} softmax_c F[c]``. The same files give the sketched eNTK with no
gradient computed again (``kernel_matrix(..., sketch=, features=)``), checked against the features.

Scores are compared by a counterfactual: for a few test images, the ``r`` highest-scoring training
images are removed and the CNN is retrained from the same initialisation; the drop of the test
image's margin is compared with removing ``r`` random training images. Both TRAK's scores and the
plain gradient similarity ``φ(z_test) φ(z_train)ᵀ`` (no ``(ΦᵀΦ)⁻¹``, no ``1 - p`` weights) pick
training images whose removal lowers the margin, where random removal does not; in this one-model,
small-data setting the plain similarity's picks lower it more (TRAK's preconditioned scores are
built for ensembles of models and many training examples). At the default size (600 training
images, k = 256, top-30 removed, 6 test images) the mean margin drops were 3.6 (TRAK), 10.7
(gradient similarity) and 0.2 (random). Figures: the test images with their top-scoring training
images by each score (``trak_top_examples.png``) and the margin drops (``trak_counterfactual.png``).

    python examples/trak_scores.py            # ~30 s on one CPU core
    python examples/trak_scores.py --quick    # seconds
"""

from __future__ import annotations

import argparse

import _common as C
import torch
from torch import nn

import ntkfunc


def parse_args(argv=None) -> argparse.Namespace:
    p = C.parser(__doc__.split("\n\n")[0])  # --out, --quick, --device, --seed, --threads
    p.add_argument("--n-train", type=int, default=None, help="training images (default 600; 150 with --quick)")
    p.add_argument("--dim", type=int, default=None, help="projection dimension k (default 256; 128 with --quick)")
    p.add_argument("--steps", type=int, default=None, help="full-batch Adam steps (default 60; 30 with --quick)")
    return p.parse_args(argv)


def cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(16 * 4 * 4, 10))


def margin_features(feats: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``(N, k)`` projected gradients of the margin ``logit_y - logsumexp_{c≠y} logit_c`` from the logits' ``(N, 10, k)``."""
    others = logits.masked_fill(nn.functional.one_hot(y, logits.shape[1]).bool(), float("-inf"))
    weights = -torch.softmax(others, dim=1)  # d margin / d logit_c for c != y
    weights[torch.arange(len(y), device=y.device), y] = 1.0
    return torch.einsum("nc,nck->nk", weights.to(feats.dtype), feats)


def train(x: torch.Tensor, y: torch.Tensor, steps: int, seed: int) -> nn.Module:
    """The CNN trained by full-batch Adam from the initialisation of ``seed``."""
    torch.manual_seed(seed)
    model = cnn().to(x.device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def margins(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``logit_y - logsumexp_{c≠y} logit_c`` per sample."""
    others = logits.masked_fill(nn.functional.one_hot(y, logits.shape[1]).bool(), float("-inf"))
    return logits[torch.arange(len(y), device=y.device), y] - torch.logsumexp(others, dim=1)


def main(argv=None) -> None:
    args = parse_args(argv)
    device = C.setup(args)
    n_train, dim, steps = C.optional(args.n_train, 150, 600, args), C.optional(args.dim, 128, 256, args), C.optional(args.steps, 30, 60, args)
    n_test = 20 if args.quick else 100
    x_tr, y_tr, x_te, y_te = C.digits(n_train, n_test, flat=False, seed=args.seed, device=device)
    model = train(x_tr, y_tr, steps, args.seed)
    f, params = ntkfunc.from_module(model)
    with torch.no_grad():
        logits_tr, logits_te = model(x_tr), model(x_te)
    print(f"CNN: {sum(v.numel() for v in params.values()):,} parameters; {n_train} training images, {n_test} test images; "
          f"test accuracy {C.accuracy(logits_te, y_te):.2f}")

    # the projected gradients of every logit, written to resumable .npy files (a second run reuses them)
    sketch = ntkfunc.Sketch(dim, seed=args.seed)
    folder = args.out / "features"
    with C.Timer("feature_matrix (train and test)"):
        f_tr = ntkfunc.feature_matrix(f, params, x_tr, sketch, out=folder, progress=False)
        f_te = ntkfunc.feature_matrix(f, params, x_te, sketch, out=folder, progress=False)
    print(f"  {tuple(f_tr.tensor.shape)} and {tuple(f_te.tensor.shape)} features ({f_tr.plan['resolved']}) in {folder}")

    # the same files give the sketched eNTK without computing a gradient again
    with C.Timer("kernel_matrix from the features files"):
        k = ntkfunc.kernel_matrix(f, params, x_te, x_tr, sketch=sketch, features=folder, progress=False)
    gap = float((k - f_te.kernel(f_tr)).abs().max() / k.abs().max())
    print(f"  sketched eNTK (test x train) {tuple(k.shape)}: equals the features' F_te F_trᵀ / 10 to {gap:.1e}")
    assert gap < 1e-4, gap

    # TRAK: margin features, the (ΦᵀΦ)⁻¹ preconditioning, the (1 - p_y) weights of the training examples
    phi_tr = margin_features(f_tr.tensor, logits_tr, y_tr).double()
    phi_te = margin_features(f_te.tensor, logits_te, y_te).double()
    gram = phi_tr.T @ phi_tr
    gram += 1e-3 * gram.diagonal().mean() * torch.eye(dim, dtype=gram.dtype, device=gram.device)  # a small ridge: ΦᵀΦ is ill-conditioned
    q = 1.0 - torch.softmax(logits_tr.double(), 1)[torch.arange(n_train, device=device), y_tr]
    trak = phi_te @ torch.linalg.solve(gram, phi_tr.T) * q
    plain = phi_te @ phi_tr.T  # gradient similarity without the preconditioning

    # the counterfactual: remove each score's top-r training images for a test image, retrain, measure its margin
    tested, removed = (2, 10) if args.quick else (6, 30)
    gen = torch.Generator().manual_seed(args.seed)
    picks = {"TRAK": trak, "gradient similarity": plain, "random": torch.rand(n_test, n_train, generator=gen, dtype=torch.float64).to(device)}
    base = margins(logits_te, y_te)
    drops: dict[str, list[float]] = {name: [] for name in picks}
    with C.Timer(f"{len(picks) * tested} retrainings"):
        for i in range(0, n_test, n_test // tested)[:tested]:
            for name, scores in picks.items():
                keep = torch.ones(n_train, dtype=torch.bool, device=device)
                keep[scores[i].topk(removed).indices] = False
                again = train(x_tr[keep], y_tr[keep], steps, args.seed)
                with torch.no_grad():
                    drops[name].append(float(base[i] - margins(again(x_te[i : i + 1]), y_te[i : i + 1])[0]))
    print(f"margin drop of a test image when its top-{removed} training images are removed and the CNN retrained:")
    print(C.table(["scores", "mean drop", "per test image"],
                  [(name, sum(d) / len(d), " ".join(f"{v:.2f}" for v in d)) for name, d in drops.items()]))

    fig, (ax,) = C.figure(size=(5.0, 3.6))
    for j, d in enumerate(drops.values()):
        ax.bar(j, sum(d) / len(d), color=f"C{j}", alpha=0.6)
        ax.plot([j] * len(d), d, "k.")
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xticks(range(len(drops)), list(drops), fontsize=8)
    ax.set_ylabel(f"test margin drop, top-{removed} removed")
    ax.set_title(f"scores from feature_matrix (k={dim})")
    C.save(fig, args.out, "trak_counterfactual.png")

    shown, top = min(3, n_test), 5
    fig, axes = C.figure(ncols=top + 1, nrows=2 * shown, size=(1.3, 1.4))
    for r in range(shown):
        i = r * (n_test // shown)
        for h, (name, scores) in enumerate((("TRAK", trak), ("similarity", plain))):
            best = scores[i].topk(top).indices
            images = [(x_te[i], f"test: {int(y_te[i])} | {name}")]
            images += [(x_tr[j], f"{int(y_tr[j])} ({float(scores[i, j]):.2g})") for j in best]
            for c, (img, title) in enumerate(images):
                a = axes[(2 * r + h) * (top + 1) + c]
                a.imshow(img[0].cpu(), cmap="gray_r")
                a.set_title(title, fontsize=7)
                a.set_xticks([])
                a.set_yticks([])
    C.save(fig, args.out, "trak_top_examples.png")


if __name__ == "__main__":
    main()
