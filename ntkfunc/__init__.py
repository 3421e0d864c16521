"""ntkfunc: empirical neural tangent kernels of PyTorch models, as functional transforms."""

from ntkfunc._explain import Explanation, explain
from ntkfunc._typing import Implementation
from ntkfunc.api import ntk_fn
from ntkfunc.module import from_module

__version__ = "0.1.0"

__all__ = ["Explanation", "Implementation", "explain", "from_module", "ntk_fn"]
