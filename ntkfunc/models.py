"""Small models shipped with ntkfunc, for the embedded default job, the CLI and examples (no download).

``ntkfunc compute --model ntkfunc.models:small_cnn`` (the default) names them as factories.
"""

from __future__ import annotations

from torch import nn


def small_cnn(classes: int = 10) -> nn.Module:
    """A 2-conv CNN for 8x8 single-channel images (about 10k parameters).

    >>> import torch
    >>> small_cnn()(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    """
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 4 * 4, classes),
    )
