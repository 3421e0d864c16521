"""The implementations of the kernel ("engines") and the one registry that lists them.

Each engine is one module with ``kernel(problem, budget, per_param=False)``; its record in
:mod:`ntkfunc._engines.registry` declares what it can do. Every public function that takes
``implementation=`` asks :func:`get_engine`, which validates the choice and lists the
valid ones in its error.
"""

from ntkfunc._engines.registry import (
    ENGINES,
    Engine,
    Implementation,
    choices,
    compute,
    engines,
    get_engine,
    refuse_param_vmap,
    refuse_per_param,
    refuse_without_rows,
)

__all__ = [
    "ENGINES", "Engine", "Implementation", "choices", "compute", "engines", "get_engine", "refuse_param_vmap", "refuse_per_param",
    "refuse_without_rows",
]
