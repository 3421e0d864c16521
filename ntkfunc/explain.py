"""``explain``: which rule (or fallback) implementation 3 uses per parameter, and what it costs.

The FLOP counts are opt_einsum's estimates for the given inputs (``x`` against
itself). For a ruled parameter: the route implementation 3 takes, either one
Gram-style contraction or forming ``∂f/∂θ`` from the rule plus ``J₁ J₂ᵀ``. The
``impl-1 FLOPs`` column is only implementation 1's contraction ``J₁ J₂ᵀ`` (its
Jacobians come out of the reverse pass, not counted). The reverse passes that give
cotangents / Jacobians are not counted in either. So the table shows where the
contraction time goes and which parameters fall back to Jacobians, and why.
"""

from __future__ import annotations

import dataclasses

from ntkfunc._core.checks import as_axes_tuple
from ntkfunc._core.ops import transform_friendly_attention
from ntkfunc._core.problem import make_problem
from ntkfunc._core.pytree import display_name as pretty
from ntkfunc._core.types import ApplyFn, Axes, PyTree, VMapAxes
from ntkfunc._engines.structured import capture, plan
from ntkfunc._engines.structured import kernel as structured


@dataclasses.dataclass(frozen=True)
class ParamReport:
    """One parameter: how implementation 3 handles it.

    Attributes:
      name: the parameter's path in ``params``. shape: its shape.
      method: ``"rule"`` or ``"fallback"`` (Jacobian contraction).
      rule: the rule and role (``"linear:weight"``), joined by ``+`` for a tied parameter
        (``"embedding:weight+linear:weight"``), or None for a fallback.
      detail: the primitive that consumes it (rule), or why it falls back.
      flops: estimated FLOPs of its kernel contraction with the method used.
      jacobian_flops: the same contraction done from Jacobians (implementation 1).
      via: the views it is consumed through (``"TensorBase.expand"``), ``""`` if none.
      uses: how many primitives (rule roles) consume it; more than one: tied.
    """

    name: str
    shape: tuple[int, ...]
    method: str
    rule: str | None
    detail: str
    flops: int
    jacobian_flops: int
    via: str = ""
    uses: int = 1

    @property
    def label(self) -> str:
        """The table's "rule / reason" entry."""
        if self.rule is None:
            return self.detail
        return self.rule + (f" (via {self.via})" if self.via else "")


@dataclasses.dataclass(frozen=True)
class Explanation:
    """Per-parameter report of :func:`explain`; ``str()`` gives a table."""

    params: list[ParamReport]
    n: int

    @property
    def fallbacks(self) -> list[ParamReport]:
        return [p for p in self.params if p.method == "fallback"]

    @property
    def flops(self) -> int:
        return sum(p.flops for p in self.params)

    @property
    def jacobian_flops(self) -> int:
        return sum(p.jacobian_flops for p in self.params)

    def __str__(self) -> str:
        head = ("parameter", "shape", "method", "rule / reason", "FLOPs", "impl-1 FLOPs")
        rows = [
            (p.name, "x".join(map(str, p.shape)) or "()", p.method, p.label, _fmt(p.flops), _fmt(p.jacobian_flops))
            for p in self.params
        ]
        rows.append(("total", "", f"{len(self.fallbacks)} fallback", f"N={self.n}", _fmt(self.flops), _fmt(self.jacobian_flops)))
        widths = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]
        lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head] + rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)


def _fmt(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def explain(
    f: ApplyFn,
    params: PyTree,
    x: PyTree,
    *,
    trace_axes: Axes = (-1,),
    diagonal_axes: Axes = (),
    vmap_axes: VMapAxes = 0,
) -> Explanation:
    """Per parameter: the rule or fallback implementation 3 uses and estimated contraction FLOPs.

    Runs ``f`` on ``x`` (a small batch is enough; costs are for ``K(x, x)``) with the same
    arguments as ``ntk_fn``.

    Example:
      >>> import torch, ntkfunc
      >>> model = torch.nn.Sequential(torch.nn.Linear(4, 64), torch.nn.Tanh(), torch.nn.Linear(64, 3))
      >>> f, params = ntkfunc.from_module(model)
      >>> report = ntkfunc.explain(f, params, torch.randn(8, 4), trace_axes=())
      >>> [(p.name, p.rule) for p in report.params][:2]
      [('0.weight', 'linear:weight'), ('0.bias', 'linear:bias')]
      >>> report.flops < report.jacobian_flops
      True
    """
    with transform_friendly_attention():
        problem = make_problem(
            f, x, None, params, vmap_axes, as_axes_tuple(trace_axes), as_axes_tuple(diagonal_axes), api="explain"
        )
        cap = capture.discover(problem)
        sd = structured.side(problem, cap, 1, 0, problem.n1)
    n = problem.n1 if problem.vmapped else None
    reports = []
    for k, (name, leaf) in enumerate(zip(map(pretty, problem.params.diff_names), problem.params.diff_leaves)):
        jac = sum(
            plan.jacobian_contraction_flops(lay, n, shape, tuple(leaf.shape))
            for lay, shape in zip(problem.layouts, problem.sample_out_shapes(1))
        )
        if k in cap.covered or k in cap.tied:
            uses = cap.tied.get(k) or [cap.covered[k]]
            if k in cap.covered:
                e, role = cap.covered[k]
                costs = [structured.route(problem, i, e, role, sd, sd)[0] for i in range(len(problem.layouts))]
            else:
                costs = [structured.tied_route(problem, i, uses, sd, sd)[0] for i in range(len(problem.layouts))]
            evs = [(cap.events[e], role) for e, role in uses]
            rule = "+".join(f"{ev.rule.name}:{role}" for ev, role in evs)
            detail = ", ".join(capture.op_name(ev.func) for ev, _ in evs)
            via = ", ".join(sorted({ev.views[role].describe() for ev, role in evs if role in ev.views}))
            reports.append(ParamReport(name, tuple(leaf.shape), "rule", rule, detail, sum(int(c.flops) for c in costs), jac, via, len(uses)))
        else:
            reports.append(ParamReport(name, tuple(leaf.shape), "fallback", None, cap.fallback[k], jac, jac))
    return Explanation(reports, problem.n1)
