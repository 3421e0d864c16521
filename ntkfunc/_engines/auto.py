"""``implementation="auto"``: the cheaper exact path for each parameter.

For every parameter that a structured rule covers, two exact ways to get its kernel
term exist:

- the rule's Gram contraction (``Σ (c₁c₂ᵀ) ⊙ (x₁x₂ᵀ)`` for a linear layer): cost
  ``G · N1 · N2``, independent of the parameter count;
- Jacobian contraction: the parameter's per-sample Jacobian by reverse mode (in the
  same backward pass that produces the cotangents), then ``J₁ J₂ᵀ``: cost
  ``F · (N1 + N2) + C · N1 · N2``, where ``C`` grows with the parameter count.

``G``, ``F`` and ``C`` are the structured engine's prices for one sample
(:func:`ntkfunc._engines.structured.plan.prices`: FLOPs plus what non-BLAS steps write),
scaled to the whole kernel, and the route planner decides
(:func:`ntkfunc._engines.structured.routes.decide` with its ``"auto"`` policy: implementation
3's decision, and when the rules of the remaining parameters together save less than
:data:`~ntkfunc._engines.structured.routes.MIN_SAVING` of Jacobian contraction's cost, every
parameter takes Jacobian contraction). When no parameter takes a Gram contraction, the
capture is skipped altogether and the kernel is implementation 1's. Parameters without a
rule always use Jacobian contraction. Either way the kernel is exact; only the cost changes.
"""

from __future__ import annotations

from ntkfunc._core.problem import Problem
from ntkfunc._engines import jacobian
from ntkfunc._engines.structured import kernel as structured
from ntkfunc._engines.structured import routes


def choose(problem: Problem) -> routes.RoutePlan:
    """auto's routes for this problem, remembered in the kernel function's cache per signature and sizes."""
    return structured.route_plan(problem, routes.AUTO)


def kernel(problem: Problem, budget: int, per_param: bool = False) -> list:
    """The kernel per output leaf (or per leaf, per parameter), each parameter by its cheaper path.

    The choice is remembered in the kernel function's cache for the input signature and
    sizes, so repeated calls (a kernel per training step) pay the calibration once.
    """
    choice = choose(problem)
    if choice.outright:
        return jacobian.kernel(problem, budget, per_param)
    return structured.kernel(problem, budget, per_param, moved=choice.moved)
