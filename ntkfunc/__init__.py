"""ntkfunc: empirical neural tangent kernels of PyTorch models, as functional transforms."""

from ntkfunc import datasets, linalg, models, predict, rules, testing
from ntkfunc._dataset.feature_writer import Features, feature_matrix
from ntkfunc._dataset.kernel_file import load_kernel, verify_kernel
from ntkfunc._dataset.pipeline import kernel_matrix
from ntkfunc._engines import Implementation
from ntkfunc._version import __version__ as __version__
from ntkfunc.empirical_kernel import kernel_fn
from ntkfunc.explain import Explanation, explain
from ntkfunc.grouping import group_kernels
from ntkfunc.module import from_module
from ntkfunc.monte_carlo import monte_carlo_kernel_fn
from ntkfunc.nngp import nngp_fn
from ntkfunc.ntk import ntk_fn
from ntkfunc.ntk_vp import ntk_vp_fn
from ntkfunc.per_sample import jacobian_fn
from ntkfunc.pntk import pntk_fn
from ntkfunc.sketch import Sketch, features_fn, sketched_ntk_fn
from ntkfunc.taylor import linearize, taylor_expand

__all__ = [
    "Explanation",
    "Features",
    "Implementation",
    "Sketch",
    "datasets",
    "explain",
    "feature_matrix",
    "features_fn",
    "from_module",
    "group_kernels",
    "jacobian_fn",
    "kernel_fn",
    "kernel_matrix",
    "linalg",
    "linearize",
    "load_kernel",
    "models",
    "monte_carlo_kernel_fn",
    "nngp_fn",
    "ntk_fn",
    "ntk_vp_fn",
    "pntk_fn",
    "predict",
    "rules",
    "sketched_ntk_fn",
    "taylor_expand",
    "testing",
    "verify_kernel",
]
