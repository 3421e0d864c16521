"""Shared plumbing of the examples: command line, digits data, small torch.nn models, figures.

Every example is a standalone script; this module holds only what they all repeat:

- :func:`parser`: the conventions ``--out DIR`` (default ``examples/out/``), ``--quick``,
  ``--device``, ``--seed`` (and ``--threads``);
- :func:`setup`: seeds torch and numpy, sets the number of threads, makes the output folder;
- :func:`digits`: a class-balanced train/test split of the 1,797 8x8 digits
  (``ntkfunc.datasets.load_digits``, the copy scikit-learn ships; no download);
- :class:`NTKLinear` / :func:`mlp`: a ``torch.nn`` MLP in the NTK parameterisation;
- :func:`figure` / :func:`save`: matplotlib with the Agg backend, PNGs at a small dpi.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

# the examples run from a checkout without installing ntkfunc
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ntkfunc.datasets import load_digits  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "out"


def parser(description: str) -> argparse.ArgumentParser:
    """The command line every example shares: ``--out``, ``--quick``, ``--device``, ``--seed``."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the PNG figures (default: examples/out/)")
    p.add_argument("--quick", action="store_true", help="a tiny size that runs in seconds (for tests)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default: 1; on a busy machine more threads spin-wait and run slower)")
    return p


def setup(args: argparse.Namespace) -> torch.device:
    """Seed torch and numpy, set ``--threads``, make ``args.out``; returns the device."""
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    if args.threads < 1:
        raise SystemExit(f"--threads {args.threads}: expected a positive number of threads")
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available here; expected --device cpu")
    return device


def digits(
    n_train: int,
    n_test: int,
    classes: Sequence[int] = tuple(range(10)),
    seed: int = 0,
    flat: bool = True,
    device: torch.device = torch.device("cpu"),  # noqa: B008 - an immutable value
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_test, y_test)``: a class-balanced split of the digits of ``classes``.

    Images are standardised with the training mean / std per pixel; ``flat`` gives ``(N, 64)``,
    otherwise ``(N, 1, 8, 8)``. Labels are class indices into ``classes``, ``(N,)`` int64.
    Samples are sorted by class (then random within a class).
    """
    x, y = load_digits(dtype)
    g = torch.Generator().manual_seed(seed)
    k = len(classes)
    tr, te = [], []
    for i, c in enumerate(classes):
        a, b = n_train // k + (i < n_train % k), n_test // k + (i < n_test % k)
        idx = torch.nonzero(y == c).squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        if len(idx) < a + b:
            raise ValueError(
                f"digits(n_train={n_train}, n_test={n_test}): class {c} has {len(idx)} images; expected at least {a + b}"
            )
        tr.append(idx[:a])
        te.append(idx[a:a + b])
    tr_idx, te_idx = torch.cat(tr), torch.cat(te)
    label = {c: i for i, c in enumerate(classes)}
    x_tr, x_te = x[tr_idx], x[te_idx]
    mean, std = x_tr.mean(0, keepdim=True), x_tr.std(0, keepdim=True) + 0.1
    x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
    if flat:
        x_tr, x_te = x_tr.flatten(1), x_te.flatten(1)
    y_tr = torch.tensor([label[int(c)] for c in y[tr_idx]])
    y_te = torch.tensor([label[int(c)] for c in y[te_idx]])
    return x_tr.to(device), y_tr.to(device), x_te.to(device), y_te.to(device)


def one_hot(y: torch.Tensor, n_classes: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Centred one-hot targets ``(N, n_classes)``: ``1 - 1/C`` for the class, ``-1/C`` elsewhere."""
    return torch.nn.functional.one_hot(y, n_classes).to(dtype) - 1.0 / n_classes


def accuracy(outputs: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of rows whose largest output (or sign, for one output) is the label."""
    if outputs.ndim == 1 or outputs.shape[-1] == 1:
        pred = (outputs.reshape(-1) > 0).long()
    else:
        pred = outputs.argmax(-1)
    return float((pred == y).double().mean())


class NTKLinear(nn.Module):
    """``y = (W x) / sqrt(fan_in) + b`` with ``W, b ~ N(0, 1)``: the NTK parameterisation.

    Its NTK converges as the width grows (the standard parameterisation's grows with it),
    so one learning rate fits all widths.
    """

    def __init__(self, fan_in: int, fan_out: int, bias_std: float = 0.1) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(fan_out, fan_in))
        self.bias = nn.Parameter(torch.randn(fan_out))
        self.scale, self.bias_std = 1.0 / math.sqrt(fan_in), bias_std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight * self.scale, self.bias * self.bias_std)


def mlp(sizes: Sequence[int], act: type = nn.ReLU, ntk_param: bool = True) -> nn.Sequential:
    """``Linear -> act -> ... -> Linear`` through ``sizes`` (``[in, hidden..., out]``)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(NTKLinear(a, b) if ntk_param else nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def figure(ncols: int = 1, nrows: int = 1, size: tuple[float, float] = (4.0, 3.2)):
    """``(fig, axes)`` of ``nrows x ncols`` panels, each ``size`` inches; axes always a flat array."""
    fig, axes = plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False)
    return fig, axes.ravel()


def save(fig, out: Path, name: str, dpi: int = 80, tight: bool = True) -> Path:
    """Write ``fig`` to ``out/name`` (PNG), close it, print the path; returns the path."""
    path = Path(out) / name
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    print(f"wrote {path}")
    return path


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table (floats to 4 digits) for printing the numbers a figure shows."""
    cells = [[f"{c:.4g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


class Timer:
    """``with Timer("name"):`` prints the seconds a block took."""

    def __init__(self, name: str, quiet: bool = False) -> None:
        self.name, self.quiet, self.seconds = name, quiet, 0.0

    def __enter__(self) -> Timer:
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.t0
        if not self.quiet:
            print(f"[{self.name}: {self.seconds:.1f} s]")


def optional(value: int | None, quick: int, full: int, args: argparse.Namespace) -> int:
    """``value`` if given, else ``quick`` under ``--quick`` and ``full`` otherwise."""
    if value is not None:
        return value
    return quick if args.quick else full
