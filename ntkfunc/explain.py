"""``explain``: the route implementation 3 (or ``"auto"``) takes per parameter, and what it costs.

The routes are the engine's own decisions (:mod:`ntkfunc._engines.structured.routes`, read by
the kernel as it runs), for ``K(x, x)``: per parameter, ``"gram"`` (one Gram-style contraction
of both samples' factors), ``"formed"`` (``∂f/∂θ`` formed from the rule, then ``J₁ J₂ᵀ``) or
``"reverse-mode"`` (``∂f/∂θ`` from reverse mode, then ``J₁ J₂ᵀ``, as implementation 1: every
parameter without a rule, and the ruled ones whose rule does not pay for probing their
primitive, with the reason). The FLOP counts are opt_einsum's estimates of each parameter's
kernel contraction by its route; the ``impl-1 FLOPs`` column is only implementation 1's
contraction ``J₁ J₂ᵀ`` (its Jacobians come out of the reverse pass, not counted). The
reverse passes that give cotangents / Jacobians are not counted in either. So the table
shows where the contraction time goes, which route each parameter takes and why.
"""

from __future__ import annotations

import dataclasses

from ntkfunc._core.checks import as_axes_tuple
from ntkfunc._core.ops import transform_friendly_attention
from ntkfunc._core.problem import Problem, make_problem
from ntkfunc._core.pytree import display_name as pretty
from ntkfunc._core.types import ApplyFn, Axes, PyTree, VMapAxes
from ntkfunc._engines import Implementation, get_engine
from ntkfunc._engines.structured import capture, plan, routes
from ntkfunc._engines.structured import kernel as structured


@dataclasses.dataclass(frozen=True)
class ParamReport:
    """One parameter: its rule (or none) and the route the kernel takes for it.

    Attributes:
      name: the parameter's path in ``params``. shape: its shape.
      method: ``"rule"`` (a rule covers it) or ``"fallback"`` (no rule: Jacobian contraction).
      rule: the rule and role (``"linear:weight"``), joined by ``+`` for a tied parameter
        (``"embedding:weight+linear:weight"``), or None for a fallback.
      detail: the primitive that consumes it (rule), or why it falls back.
      flops: estimated FLOPs of its kernel contraction by the route taken.
      jacobian_flops: the same contraction done from Jacobians (implementation 1).
      via: the views it is consumed through (``"TensorBase.expand"``), ``""`` if none.
      uses: how many primitives (rule roles) consume it; more than one: tied.
      route: the route the kernel takes: ``"gram"``, ``"formed"`` or ``"reverse-mode"`` (every
        fallback, and ruled parameters whose rule does not pay); routes that differ between
        output leaves are joined by ``+``.
      reason: why a ruled parameter takes ``"reverse-mode"`` (``""`` otherwise).
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
    route: str = routes.REVERSE_MODE
    reason: str = ""

    @property
    def label(self) -> str:
        """The table's "rule / reason" entry."""
        if self.rule is None:
            return self.detail
        return self.rule + (f" (via {self.via})" if self.via else "")


@dataclasses.dataclass(frozen=True)
class Explanation:
    """Per-parameter report of :func:`explain`; ``str()`` gives a table.

    ``implementation``: the engine explained (``"3"`` or ``"auto"``).
    """

    params: list[ParamReport]
    n: int
    implementation: str = "3"

    @property
    def fallbacks(self) -> list[ParamReport]:
        """Parameters without a rule."""
        return [p for p in self.params if p.method == "fallback"]

    @property
    def reverse_mode(self) -> list[ParamReport]:
        """Ruled parameters that the engine takes from reverse mode instead of their rule."""
        return [p for p in self.params if p.method == "rule" and p.route == routes.REVERSE_MODE]

    @property
    def flops(self) -> int:
        return sum(p.flops for p in self.params)

    @property
    def jacobian_flops(self) -> int:
        return sum(p.jacobian_flops for p in self.params)

    def __str__(self) -> str:
        head = ("parameter", "shape", "method", "route", "rule / reason", "FLOPs", "impl-1 FLOPs")
        rows = [
            (p.name, "x".join(map(str, p.shape)) or "()", p.method, p.route, p.label, _fmt(p.flops), _fmt(p.jacobian_flops))
            for p in self.params
        ]
        rows.append(("total", "", f"{len(self.fallbacks)} fallback", "", f"N={self.n}, implementation {self.implementation}",
                     _fmt(self.flops), _fmt(self.jacobian_flops)))
        widths = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]
        lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head] + rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        why: dict[str, list[str]] = {}
        for p in self.reverse_mode:
            why.setdefault(p.reason, []).append(p.name)
        lines += [f"reverse-mode ({', '.join(names)}): {reason}" for reason, names in why.items()]
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
    implementation: int | str | Implementation = Implementation.STRUCTURED_DERIVATIVES,
) -> Explanation:
    """Per parameter: its rule or fallback, the route the kernel takes and estimated contraction FLOPs.

    Runs ``f`` on ``x`` with the same arguments as ``ntk_fn``; the routes and costs are those
    of ``K(x, x)`` computed as one block, as the kernel does for inputs that fit its memory
    budget (a small batch is enough: the routes depend on N). ``implementation``: 3 (structured
    derivatives, the default here: the report is about the rules) or ``"auto"`` (``ntk_fn``'s
    default), which may route differently (it also takes every parameter from reverse mode when
    the rules save too little, and then does not probe ``f`` at all).

    Example (the rules of this small MLP do not pay for probing its layers on 8 inputs, so
    implementation 3 takes every parameter from reverse mode, as implementation 1 would):
      >>> import torch, ntkfunc
      >>> model = torch.nn.Sequential(torch.nn.Linear(4, 64), torch.nn.Tanh(), torch.nn.Linear(64, 3))
      >>> f, params = ntkfunc.from_module(model)
      >>> report = ntkfunc.explain(f, params, torch.randn(8, 4), trace_axes=())
      >>> [(p.name, p.rule, p.route) for p in report.params][:2]
      [('0.weight', 'linear:weight', 'reverse-mode'), ('0.bias', 'linear:bias', 'reverse-mode')]
      >>> report.flops == report.jacobian_flops
      True
      >>> with ntkfunc.rules.forced():  # every rule used: the Gram route where it is cheaper
      ...     forced = ntkfunc.explain(f, params, torch.randn(8, 4), trace_axes=())
      >>> [p.route for p in forced.params], forced.flops < forced.jacobian_flops
      (['gram', 'gram', 'gram', 'gram'], True)
    """
    engine = get_engine(implementation, api="explain")
    if not engine.captures:
        raise ValueError(f"explain: implementation={implementation!r} has no per-parameter routes to explain "
                         f"(every parameter by its engine's one method); expected 3 or 'auto'")
    policy = routes.AUTO if engine.implementation == Implementation.AUTO else routes.STRUCTURED
    with transform_friendly_attention():
        problem = make_problem(
            f, x, None, params, vmap_axes, as_axes_tuple(trace_axes), as_axes_tuple(diagonal_axes), api="explain"
        )
        found = capture.discover(problem)
        chosen = structured.route_plan(problem, policy, found)
        cap = capture.restrict(found, chosen.moved)  # what the kernel probes
        sd = structured.side(problem, cap, 1, 0, problem.n1) if cap.events else None  # none: implementation 1's path
    n = problem.n1 if problem.vmapped else None
    reports = []
    for k, (name, leaf) in enumerate(zip(map(pretty, problem.params.diff_names), problem.params.diff_leaves)):
        jac = sum(
            plan.jacobian_contraction_flops(lay, n, shape, tuple(leaf.shape))
            for lay, shape in zip(problem.layouts, problem.sample_out_shapes(1))
        )
        if k not in found.ruled:
            reports.append(ParamReport(name, tuple(leaf.shape), "fallback", None, found.fallback[k], jac, jac))
            continue
        uses = found.tied.get(k) or [found.covered[k]]
        evs = [(found.events[e], role) for e, role in uses]
        rule = "+".join(f"{ev.rule.name}:{role}" for ev, role in evs)
        detail = ", ".join(capture.op_name(ev.func) for ev, _ in evs)
        via = ", ".join(sorted({ev.views[role].describe() for ev, role in evs if role in ev.views}))
        if sd is None or k in cap.fallback:
            reason = chosen.moved.get(k, "")
            reports.append(ParamReport(name, tuple(leaf.shape), "rule", rule, detail, jac, jac, via, len(uses), routes.REVERSE_MODE, reason))
            continue
        taken = [_tile_route(problem, cap, k, i, sd) for i in range(len(problem.layouts))]
        route = "+".join(dict.fromkeys(r.route for r in taken))
        flops = sum(int(r.price.flops) for r in taken if r.price is not None)
        reports.append(ParamReport(name, tuple(leaf.shape), "rule", rule, detail, flops, jac, via, len(uses), route))
    return Explanation(reports, problem.n1, "auto" if policy == routes.AUTO else "3")


def _tile_route(problem: Problem, cap: capture.Capture, k: int, leaf: int, sd: structured.Side) -> routes.Route:
    """Probed parameter ``k``'s route for output leaf ``leaf`` on the tile ``K(x, x)`` (as the kernel decides it)."""
    if k in cap.tied:
        return structured.tied_route(problem, leaf, cap.tied[k], sd, sd)[0]
    e, role = cap.covered[k]
    return structured.route(problem, leaf, e, role, sd, sd)[0]
