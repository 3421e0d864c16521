"""``implementation="auto"``: the cheaper exact path for each parameter.

For every parameter that a structured rule covers, two exact ways to get its kernel
term exist:

- the rule's Gram contraction (``Σ (c₁c₂ᵀ) ⊙ (x₁x₂ᵀ)`` for a linear layer): cost
  ``G · N1 · N2``, independent of the parameter count;
- Jacobian contraction: the parameter's per-sample Jacobian by reverse mode (in the
  same backward pass that produces the cotangents), then ``J₁ J₂ᵀ``: cost
  ``F · (N1 + N2) + C · N1 · N2``, where ``C`` grows with the parameter count.

``G``, ``F`` and ``C`` are the structured engine's prices for one sample
(:func:`ntkfunc._engines.structured.plan.prices`), scaled to the whole kernel; the same
:class:`~ntkfunc._engines.structured.plan.RouteCost` decides. When no parameter takes a
Gram contraction, the capture is skipped altogether and the kernel is implementation 1's.
Parameters without a rule always use Jacobian contraction. Either way the kernel is
exact; only the cost changes.
"""

from __future__ import annotations

from ntkfunc import rules
from ntkfunc._core.cache import RouteChoice
from ntkfunc._core.problem import Problem
from ntkfunc._engines import jacobian
from ntkfunc._engines.structured import capture, plan
from ntkfunc._engines.structured import kernel as structured

MIN_SAVING = 0.25
"""The rules must save this fraction of Jacobian contraction's FLOPs to pay for the capture."""


def jacobian_is_cheaper(problem: Problem, cap: capture.Capture) -> dict[int, str]:
    """Covered parameter index -> reason, for those that should use Jacobian contraction.

    A parameter goes to Jacobian contraction when that costs fewer FLOPs than its rule.
    If the rules of the remaining parameters together save less than :data:`MIN_SAVING`
    of Jacobian contraction's FLOPs, all of them go: the capture and the per-rule dispatch
    would cost more than they save (a Transformer block, whose rules win only on biases).
    """
    if not problem.vmapped or not cap.ruled:
        return {}  # one whole-batch block: no per-sample calibration possible
    one = structured.side(problem, cap, 1, 0, 1)
    n_jacobians = problem.n1 + (0 if problem.symmetric else problem.n2)
    moved: dict[int, str] = {}
    saving = all_jacobian = 0.0
    for k in cap.ruled:
        per_sample = sum(
            (_prices(problem, cap, k, leaf, one) for leaf in range(len(problem.layouts))),
            plan.Prices(0, 0, 0, 0),
        )
        cost = per_sample.scaled(problem.n1, problem.n2, n_jacobians)
        all_jacobian += cost.jacobian
        if cost.use_gram:
            saving += cost.jacobian - cost.gram
        else:
            moved[k] = f"auto: Jacobian contraction ({cost.jacobian:.2e} FLOPs) is cheaper than the rule ({cost.gram:.2e})"
    if saving < MIN_SAVING * all_jacobian:
        reason = f"auto: the rules would save {saving:.2e} of {all_jacobian:.2e} FLOPs, not worth the capture"
        moved = {k: moved.get(k, reason) for k in cap.ruled}
    return moved


def _prices(problem: Problem, cap: capture.Capture, k: int, leaf: int, one: structured.Side) -> plan.Prices:
    """One sample's prices of parameter ``k``'s block for output leaf ``leaf`` (a covered or a tied parameter)."""
    if k in cap.tied:
        return structured.tied_prices(problem, leaf, cap.tied[k], one, one)[0]
    e, role = cap.covered[k]
    return structured.block_prices(problem, leaf, e, role, one, one)[0]


def choose(problem: Problem) -> RouteChoice:
    """auto's routes for this problem, remembered in the kernel function's cache per signature and sizes."""
    key = None if problem.signature is None else (problem.signature, problem.n1, problem.n2, rules.enabled())
    if key is not None and problem.cache is not None and key in problem.cache.routes:
        return problem.cache.routes[key]
    cap = capture.discover(problem)
    moved = jacobian_is_cheaper(problem, cap)
    choice = RouteChoice(moved, outright=len(moved) == len(cap.ruled))
    if key is not None and problem.cache is not None:
        problem.cache.routes[key] = choice
    return choice


def kernel(problem: Problem, budget: int, per_param: bool = False) -> list:
    """The kernel per output leaf (or per leaf, per parameter), each parameter by its cheaper path.

    The choice is remembered in the kernel function's cache for the input signature and
    sizes, so repeated calls (a kernel per training step) pay the calibration once.
    """
    choice = choose(problem)
    if choice.outright:
        return jacobian.kernel(problem, budget, per_param)
    return structured.kernel(problem, budget, per_param, moved=dict(choice.moved))
