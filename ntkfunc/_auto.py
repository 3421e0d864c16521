"""``implementation="auto"``: the cheaper exact path for each parameter.

For every parameter that a structured rule covers, two exact ways to get its kernel
term exist:

- the rule's Gram contraction (``Σ (c₁c₂ᵀ) ⊙ (x₁x₂ᵀ)`` for a linear layer): cost
  ``G · N1 · N2``, independent of the parameter count;
- Jacobian contraction: the parameter's per-sample Jacobian by reverse mode (in the
  same backward pass that produces the cotangents), then ``J₁ J₂ᵀ``: cost
  ``F · (N1 + N2) + C · N1 · N2``, where ``C`` grows with the parameter count.

``G``, ``F`` and ``C`` are opt_einsum's FLOP counts for one sample, read off one
sample's cotangents and captured operands. Each parameter takes the cheaper way.
When no parameter takes a Gram contraction, the capture is skipped altogether and the
kernel is implementation 1's. Parameters without a rule always use Jacobian contraction.
Either way the kernel is exact; only the cost changes.
"""

from __future__ import annotations

from ntkfunc import _capture, _jacobian, _structured
from ntkfunc._problem import Problem


_MIN_SAVING = 0.25  # the rules must save this fraction of Jacobian contraction's FLOPs to pay for the capture


def jacobian_is_cheaper(problem: Problem, cap: _capture.Capture) -> dict[int, str]:
    """Covered parameter index -> reason, for those that should use Jacobian contraction.

    A parameter goes to Jacobian contraction when that costs fewer FLOPs than its rule.
    If the rules of the remaining parameters together save less than a quarter of
    Jacobian contraction's FLOPs, all of them go: the capture and the per-rule dispatch
    would cost more than they save (a Transformer block, whose rules win only on biases).
    """
    if not problem.vmapped or not cap.covered:
        return {}  # one whole-batch block: no per-sample calibration possible
    one = _structured.side(problem, cap, 1, 0, 1)
    n1, n2 = problem.n1, problem.n2
    n_jac = n1 + (0 if problem.symmetric else n2)
    moved: dict[int, str] = {}
    saving = all_jacobian = 0.0
    for k, (e, role) in cap.covered.items():
        st = _structured._event_structure(one, e, role)
        gram = form = pair = 0
        for leaf, lay in enumerate(problem.layouts):
            c = one.cot[leaf][e]
            eq, tensors = _structured.equation(lay, True, st, st, c, c)
            gram += _structured._cost(*_structured._presum_shapes(eq, tensors))
            jeq, jt = _structured.jacobian_equation(lay, True, st, c)
            form += _structured._cost(*_structured._presum_shapes(jeq, jt))
            j_shape = _structured._out_shape(jeq, jt)
            lhs1, lhs2, out = lay.operand_subscripts(len(st.theta))
            pair += _structured._cost(f"{lhs1},{lhs2}->{out}", (j_shape, j_shape))
        gram_total, jac_total = gram * n1 * n2, form * n_jac + pair * n1 * n2
        all_jacobian += jac_total
        if jac_total < gram_total:
            moved[k] = f"auto: Jacobian contraction ({jac_total:.2e} FLOPs) is cheaper than the rule ({gram_total:.2e})"
        else:
            saving += jac_total - gram_total
    if saving < _MIN_SAVING * all_jacobian:
        reason = f"auto: the rules would save {saving:.2e} of {all_jacobian:.2e} FLOPs, not worth the capture"
        moved = {k: moved.get(k, reason) for k in cap.covered}
    return moved


def kernel(problem: Problem, budget: int, per_param: bool = False) -> list:
    """The kernel per output leaf (or per leaf, per parameter), each parameter by its cheaper path.

    The choice is remembered in the kernel function's cache for the input signature and
    sizes, so repeated calls (a kernel per training step) pay the calibration once.
    """
    key = None if problem.signature is None else ("auto", problem.signature, problem.n1, problem.n2)
    if key is not None and problem.cache is not None and key in problem.cache:
        moved, outright = problem.cache[key]
    else:
        cap = _capture.discover(problem)
        moved = jacobian_is_cheaper(problem, cap)
        outright = len(moved) == len(cap.covered)
        if key is not None and problem.cache is not None:
            problem.cache[key] = (moved, outright)
    if outright:
        return _jacobian.kernel(problem, budget, per_param)
    return _structured.kernel(problem, budget, per_param, moved=moved)
