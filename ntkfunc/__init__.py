"""ntkfunc: empirical neural tangent kernels of PyTorch models, as functional transforms."""

from ntkfunc._typing import Implementation
from ntkfunc.api import ntk_fn
from ntkfunc.module import from_module
from ntkfunc.nngp import nngp_fn

__version__ = "0.1.0"

__all__ = [
    "Implementation",
    "from_module",
    "nngp_fn",
    "ntk_fn",
]
