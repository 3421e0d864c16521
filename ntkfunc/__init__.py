"""ntkfunc: empirical neural tangent kernels of PyTorch models, as functional transforms."""

from ntkfunc import linalg, predict
from ntkfunc._explain import Explanation, explain
from ntkfunc._typing import Implementation
from ntkfunc.api import ntk_fn
from ntkfunc.blocked import kernel_matrix
from ntkfunc.grouping import group_kernels
from ntkfunc.kernel import kernel_fn
from ntkfunc.module import from_module
from ntkfunc.monte_carlo import monte_carlo_kernel_fn
from ntkfunc.nngp import nngp_fn
from ntkfunc.ntk_vp import ntk_vp_fn
from ntkfunc.pntk import pntk_fn
from ntkfunc.taylor import linearize, taylor_expand

__version__ = "0.1.0"

__all__ = [
    "Explanation",
    "Implementation",
    "explain",
    "from_module",
    "group_kernels",
    "kernel_fn",
    "kernel_matrix",
    "linalg",
    "linearize",
    "monte_carlo_kernel_fn",
    "nngp_fn",
    "ntk_fn",
    "ntk_vp_fn",
    "pntk_fn",
    "predict",
    "taylor_expand",
]
