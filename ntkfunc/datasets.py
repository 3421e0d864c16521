"""Small datasets shipped with ntkfunc, so demos and tests need no download.

``digits``: the 1,797 8x8 grey-level images of handwritten digits (0-9) of the UCI
"Optical Recognition of Handwritten Digits" data set (Alpaydin & Kaynak, CC BY 4.0),
as distributed with scikit-learn (``sklearn.datasets.load_digits``).
"""

from __future__ import annotations

from importlib import resources

import numpy as np
import torch


def load_digits(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, labels)``: images ``(1797, 1, 8, 8)`` scaled to [0, 1], labels ``(1797,)`` int64.

    >>> x, y = load_digits()
    >>> tuple(x.shape), tuple(y.shape), int(y.max())
    ((1797, 1, 8, 8), (1797,), 9)
    """
    with resources.files("ntkfunc.data").joinpath("digits.npz").open("rb") as fh:
        data = np.load(fh)
        images, labels = data["images"], data["labels"]
    x = torch.from_numpy(images.astype(np.float32) / 16.0).unsqueeze(1).to(dtype)
    return x, torch.from_numpy(labels.astype(np.int64))
