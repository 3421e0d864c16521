"""ntkfunc: empirical neural tangent kernels of PyTorch models, as functional transforms."""

from ntkfunc._typing import Implementation
from ntkfunc.api import ntk_fn
from ntkfunc.blocked import kernel_matrix
from ntkfunc.module import from_module

__version__ = "0.1.0"

__all__ = ["Implementation", "from_module", "kernel_matrix", "ntk_fn"]
