"""ntkfunc: empirical neural tangent kernels of PyTorch models, as functional transforms."""

from ntkfunc import predict
from ntkfunc._typing import Implementation
from ntkfunc.api import ntk_fn
from ntkfunc.kernel import kernel_fn
from ntkfunc.module import from_module
from ntkfunc.nngp import nngp_fn
from ntkfunc.taylor import linearize, taylor_expand

__version__ = "0.1.0"

__all__ = [
    "Implementation",
    "from_module",
    "kernel_fn",
    "linearize",
    "nngp_fn",
    "ntk_fn",
    "predict",
    "taylor_expand",
]
