"""Implementation 3: structured derivatives (Novak et al. 2022), with per-primitive rules.

``Θ = Σ_θ Σ_{k: y_k consumes θ} (∂f₁/∂y_k)(∂y_k/∂θ)(∂y_k/∂θ)ᵀ(∂f₂/∂y_k)ᵀ``. For each tile of
samples:

1. :mod:`~ntkfunc._engines.structured.capture` finds the primitives that consume parameters (once per call).
2. One ``vmap(jacrev(h))`` per block of samples, with respect to zero probes added to
   the primitives' outputs (and to the fallback parameters, if any), gives the
   cotangents ``c_k = ∂f/∂y_k`` for every output component (O VJPs per sample, never
   P) and, as auxiliary outputs, the operands each rule needs.
3. Each covered parameter's rule (:mod:`ntkfunc.rules`) describes ``∂y/∂θ`` as an
   einsum; its kernel contribution is a single ``opt_einsum`` contraction of
   ``c₁``, the x1 operands, ``c₂`` and the x2 operands, with the output-axis letters of
   :class:`~ntkfunc._core.layout.Layout` (traced axes summed, diagonal axes shared), so
   opt_einsum contracts traced axes early; :mod:`~ntkfunc._engines.structured.plan` prices
   the Gram route (``(c₁c₂ᵀ) ⊙ (x₁x₂ᵀ)``) against forming ``∂f/∂θ`` and
   :func:`~ntkfunc._engines.structured.routes.on_tile` takes the cheaper (:func:`param_block`).
4. A tied parameter (used by several primitives, e.g. an embedding and the LM head)
   gets every pair of its uses, cross terms included, by the same two routes.
5. Fallback parameters (no rule, a view that does not compose, uses that do not pair, ...)
   are contracted from their Jacobians exactly as in implementation 1. So are the ruled
   parameters that the planner sends to reverse mode (:func:`route_plan`, priced once per
   input signature from one sample, :func:`~ntkfunc._engines.structured.routes.decide`):
   forming ``∂f/∂θ`` from the rule would repeat what reverse mode computes in the same
   cotangent pass (a linear layer's weight gradient), so that pass returns it (a Transformer
   block's projection and MLP weights on 64 tokens).

Memory: sample blocks are sized so that the cotangents (``b x O x Σ numel(y_k)``), the
operands and the fallback Jacobians fit the budget, and tiled with :func:`~ntkfunc._core.tiles.tiles`.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.func import jacrev, vmap

from ntkfunc import rules
from ntkfunc._core.memory import SAFETY, backward_transient, itemsize, outputs_per_sample
from ntkfunc._core.problem import Problem
from ntkfunc._core.tiles import Accumulator, tiles
from ntkfunc._engines import jacobian
from ntkfunc._engines.structured import capture as capture_mod
from ntkfunc._engines.structured import contraction, plan, routes, views
from ntkfunc._engines.structured.capture import Capture

Key = tuple[int, str, int]  # (event, role, output leaf)


@dataclasses.dataclass
class Side:
    """What one block of samples contributes: cotangents, operands, fallback Jacobians.

    ``structures``, ``forms`` and ``jacobians`` are filled on demand and kept for the other
    tiles of the block's row: each rule structure, Jacobian equation and rule-formed
    ``∂f/∂θ`` is built once per block.
    """

    cot: list[list[torch.Tensor]]  # [out leaf][event]: (b, *out_sample, *y)
    operands: list[list[torch.Tensor | None]]  # [event]: batch-first operands
    fb_jac: list[list[torch.Tensor]]  # [out leaf][fallback param]: (b, *out_sample, *param)
    cap: Capture
    structures: dict[tuple[int, str], rules.Structure] = dataclasses.field(default_factory=dict)
    forms: dict[Key, plan.Equation] = dataclasses.field(default_factory=dict)
    jacobians: dict[Key, torch.Tensor] = dataclasses.field(default_factory=dict)


def captured(problem: Problem, which: int = 1, moved: dict[int, str] | None = None) -> Capture:
    """The capture of ``f`` on x1's (``which=1``) or x2's first sample, ``moved`` parameters sent to the fallback.

    Kept in the kernel function's cache per input signature (and rules on or off): the
    primitives ``f`` calls, their settings and shapes depend on the signature only. A capture
    whose rules read tensor values into their settings (``Capture.static`` false) is redone.
    """
    found = problem.remember("capture", lambda: capture_mod.discover(problem, which), which, rules.enabled(),
                             keep=lambda cap: cap.static)
    return capture_mod.restrict(found, moved or {})


def side(problem: Problem, cap: Capture, which: int, start: int, stop: int) -> Side:
    """Cotangents at every event's output and the rules' operands for samples ``start:stop``."""
    leaves = problem.params.diff_leaves
    fb_idx = sorted(cap.fallback)
    fb = [leaves[k] for k in fb_idx]
    deltas = [torch.zeros(e.y_shape, dtype=e.y_dtype, device=problem.device) for e in cap.events]
    x = problem.x_block(which, start, stop)
    fn = problem.sample_fn(fb_idx) if problem.vmapped else problem.batch_fn(fb_idx)
    slots: list = []
    h = capture_mod.probed(problem, cap, fn, slots)
    argnums = tuple(i for i, a in ((0, deltas), (1, fb)) if a)
    jac = jacrev(h, argnums=argnums, has_aux=True)
    if problem.vmapped:
        grads, aux = vmap(jac, in_dims=(None, None, problem.x_axes))(deltas, fb, x)
    else:
        grads, aux = jac(deltas, fb, x)
        aux = torch.utils._pytree.tree_map(lambda t: t.unsqueeze(0), aux)
    cot, fb_jac = [], []
    for g in grads:  # per output leaf: a tuple over argnums
        parts = dict(zip(argnums, g))
        cot.append(list(parts.get(0, [])))
        fb_jac.append(list(parts.get(1, [])))
    return Side(cot, capture_mod.unpack(aux, slots[-1]), fb_jac, cap)


def event_structure(problem: Problem, sd: Side, e: int, role: str) -> rules.Structure:
    """The rule's (checked) structure of event ``e``'s role ``role`` on this side's samples.

    Composed with the view the event consumes the parameter through, if any, and in the
    canonical form that the uses of a tied parameter share (:mod:`views`).
    """
    key = (e, role)
    if key not in sd.structures:
        ev = sd.cap.events[e]
        k = ev.roles[role]
        theta = problem.params.diff_leaves[k]
        sd.structures[key] = views.use_structure(
            ev.rule, role, sd.operands[e], ev.meta, ev.y_shape, ev.views.get(role), k in sd.cap.tied, tuple(theta.shape)
        )
    return sd.structures[key]


def side_form(problem: Problem, sd: Side, e: int, role: str, leaf: int) -> plan.Equation:
    """The equation forming this side's ``∂f/∂θ`` for one event, role and output leaf (built once)."""
    key = (e, role, leaf)
    if key not in sd.forms:
        st = event_structure(problem, sd, e, role)
        sd.forms[key] = plan.jacobian_equation(problem.layouts[leaf], problem.vmapped, st, sd.cot[leaf][e])
    return sd.forms[key]


def side_jacobian(problem: Problem, sd: Side, e: int, role: str, leaf: int, memory_limit: int | None) -> torch.Tensor:
    """This side's rule-formed ``∂f/∂θ`` (formed once, kept for the row)."""
    key = (e, role, leaf)
    if key not in sd.jacobians:
        # contiguous: the einsum leaves the parameter axes transposed, which makes J₁ J₂ᵀ several times slower
        sd.jacobians[key] = side_form(problem, sd, e, role, leaf).form(memory_limit)
    return sd.jacobians[key]


def block_prices(problem: Problem, leaf: int, e: int, role: str, s1: Side, s2: Side) -> tuple[plan.Prices, plan.Equation]:
    """The prices of one covered parameter's block for two sides, and its Gram equation."""
    lay = problem.layouts[leaf]
    st1, st2 = event_structure(problem, s1, e, role), event_structure(problem, s2, e, role)
    c1, c2 = s1.cot[leaf][e], s2.cot[leaf][e]
    gram = plan.gram_equation(lay, problem.vmapped, st1, st2, c1, c2)
    if st1.theta != st2.theta:
        return plan.prices(lay, problem.vmapped, st1, st2, c1, c2, gram), gram
    forms = (side_form(problem, s1, e, role, leaf), side_form(problem, s2, e, role, leaf))
    return plan.prices(lay, problem.vmapped, st1, st2, c1, c2, gram, forms), gram


def route(problem: Problem, leaf: int, e: int, role: str, s1: Side, s2: Side) -> tuple[routes.Route, plan.Equation]:
    """This tile's route (:func:`~ntkfunc._engines.structured.routes.on_tile`: side Jacobians already formed are free) and the Gram equation."""
    p, gram = block_prices(problem, leaf, e, role, s1, s2)
    key = (e, role, leaf)
    return routes.on_tile(p, formed1=key in s1.jacobians, formed2=s1 is s2 or key in s2.jacobians), gram


# --- tied parameters: every pair of uses ------------------------------------------------


def tied_prices(problem: Problem, leaf: int, uses: list[tuple[int, str]], s1: Side, s2: Side) -> tuple[plan.Prices, list[plan.Equation]]:
    """The prices of a tied parameter's block, and the Gram equation of every pair of uses (x1 use, x2 use).

    Gram route: one equation per pair, the x2 use's θ letters renamed onto the x1 use's.
    Jacobian route: each side's ``∂f/∂θ`` is the sum of its uses' rule-formed Jacobians.
    """
    lay = problem.layouts[leaf]
    st1 = [event_structure(problem, s1, e, r) for e, r in uses]
    st2 = [event_structure(problem, s2, e, r) for e, r in uses]
    grams = [
        plan.gram_equation(lay, problem.vmapped, a, views.relabel(b, a.theta), s1.cot[leaf][e1], s2.cot[leaf][e2])
        for (e1, _), a in zip(uses, st1) for (e2, _), b in zip(uses, st2)
    ]
    extra = len(uses) - 1  # contraction calls beyond a parameter used once: uses² Gram equations, uses formations a side
    gram = sum((g.price for g in grams), contraction.Price(0.0, calls=len(grams) - 1))
    if len({views.theta_sizes(st) for st in st1 + st2}) > 1:
        return plan.Prices(gram, contraction.NONE, contraction.NONE, contraction.NONE), grams
    forms1 = [side_form(problem, s1, e, r, leaf) for e, r in uses]
    forms2 = [side_form(problem, s2, e, r, leaf) for e, r in uses]
    pair = contraction.price(plan.pair_equation(lay, len(st1[0].theta)), (forms1[0].out_shape, forms2[0].out_shape))
    form1 = sum((f.price for f in forms1), contraction.Price(0.0, calls=extra))
    form2 = sum((f.price for f in forms2), contraction.Price(0.0, calls=extra))
    return plan.Prices(gram, form1, form2, pair), grams


def tied_route(problem: Problem, leaf: int, uses: list[tuple[int, str]], s1: Side, s2: Side) -> tuple[routes.Route, list[plan.Equation]]:
    """This tile's route (side Jacobians already formed are free) and the pairs' Gram equations."""
    p, grams = tied_prices(problem, leaf, uses, s1, s2)
    formed1 = all((e, r, leaf) in s1.jacobians for e, r in uses)
    formed2 = s1 is s2 or all((e, r, leaf) in s2.jacobians for e, r in uses)
    return routes.on_tile(p, formed1, formed2), grams


# --- one parameter's block by its route ---------------------------------------------------


def param_block(problem: Problem, k: int, leaf: int, s1: Side, s2: Side, memory_limit: int | None,
                sharing: contraction.Sharing | None = None) -> torch.Tensor:
    """Ruled parameter ``k``'s kernel block for one tile (not divided by the trace size), by this tile's route.

    A tied parameter gets every pair of its uses, cross terms included. ``sharing``: the
    :class:`~ntkfunc._engines.structured.plan.Sharing` of the event's other roles.
    """
    cap = s1.cap
    if k in cap.tied:
        uses = cap.tied[k]
        r, grams = tied_route(problem, leaf, uses, s1, s2)
    else:
        uses = [cap.covered[k]]
        r, gram = route(problem, leaf, *uses[0], s1, s2)
        grams = [gram]
    if r.route == routes.GRAM:
        scales1 = [event_structure(problem, s1, e, role).scale for e, role in uses]
        scales2 = [event_structure(problem, s2, e, role).scale for e, role in uses]
        return gram_block(k, grams, [a * b for a in scales1 for b in scales2], memory_limit, sharing)
    return formed_block(problem, k, leaf, uses, s1, s2, memory_limit)


def gram_block(k: int, grams: list[plan.Equation], scales: list[complex | float], memory_limit: int | None,
               sharing: contraction.Sharing | None = None) -> torch.Tensor:
    """Parameter ``k``'s block by the Gram route: its equations (one per pair of uses), each times its scale, summed."""
    parts = []
    for g, scale in zip(grams, scales):
        part = routes.contract(g, memory_limit, None, sharing)
        parts.append(part if scale == 1.0 else part * scale)
    return sum(parts[1:], parts[0])


def formed_block(problem: Problem, k: int, leaf: int, uses: list[tuple[int, str]], s1: Side, s2: Side,
                 memory_limit: int | None) -> torch.Tensor:
    """Parameter ``k``'s block by the formed route: each side's ``∂f/∂θ`` from the rule (kept for its row), then ``J₁ J₂ᵀ``.

    A tied parameter's ``∂f/∂θ`` is the sum of its uses'.
    """
    lay = problem.layouts[leaf]
    if len(uses) == 1:
        e, role = uses[0]
        j1 = side_jacobian(problem, s1, e, role, leaf, memory_limit)
        j2 = side_jacobian(problem, s2, e, role, leaf, memory_limit)
        n_theta = j1.ndim - len(lay.operand_subscripts(0)[0])
        part = lay.contract_self(j1, n_theta) if j1 is j2 else lay.contract(j1, j2, n_theta)
        scale = event_structure(problem, s1, e, role).scale * event_structure(problem, s2, e, role).scale
        return part if scale == 1.0 else part * scale

    def summed(sd: Side) -> torch.Tensor:
        js = [side_jacobian(problem, sd, e, r, leaf, memory_limit) for e, r in uses]
        scales = [event_structure(problem, sd, e, r).scale for e, r in uses]
        js = [j if c == 1.0 else j * c for j, c in zip(js, scales)]
        return sum(js[1:], js[0])

    j1, j2 = summed(s1), summed(s2)
    return lay.contract(j1, j2, j1.ndim - len(lay.operand_subscripts(0)[0]))


def reverse_mode_block(problem: Problem, k: int, leaf: int, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Parameter ``k``'s block from its reverse-mode Jacobians ``a``, ``b`` (implementation 1's contraction)."""
    return jacobian.summed_block(problem, leaf, [k], [a], [b])


def tile_kernel(problem: Problem, cap: Capture, s1: Side, s2: Side, memory_limit: int | None,
                together: bool = False) -> list[list[torch.Tensor | None]]:
    """Per output leaf, per differentiated parameter: its kernel block for one tile.

    Not divided by the trace size; ``None`` for a parameter the output does not use. With ``together`` (the
    caller sums the blocks), the reverse-mode fallback parameters' blocks are contracted into one accumulation
    (:func:`~ntkfunc._engines.jacobian.summed_block`, as implementation 1 sums its own), held at the first
    fallback parameter's place and ``None`` at the others'.
    """
    leaves = problem.params.diff_leaves
    fb_idx = sorted(cap.fallback)
    by_event: dict[int, list[tuple[int, str]]] = {}
    for k, (e, role) in sorted(cap.covered.items()):
        by_event.setdefault(e, []).append((k, role))
    blocks = []
    for leaf in range(len(problem.layouts)):
        parts: list[torch.Tensor | None] = [None] * len(leaves)
        for roles in by_event.values():
            if len(roles) == 1:
                parts[roles[0][0]] = param_block(problem, roles[0][0], leaf, s1, s2, memory_limit)
                continue
            with contraction.Sharing() as sharing:  # the roles of one primitive share their cotangent factors
                for k, _ in roles:
                    parts[k] = param_block(problem, k, leaf, s1, s2, memory_limit, sharing)
        for k in sorted(cap.tied):
            parts[k] = param_block(problem, k, leaf, s1, s2, memory_limit)
        if together and len(fb_idx) > 1:
            parts[fb_idx[0]] = jacobian.summed_block(problem, leaf, fb_idx, s1.fb_jac[leaf], s2.fb_jac[leaf])
        else:
            for j, k in enumerate(fb_idx):
                parts[k] = reverse_mode_block(problem, k, leaf, s1.fb_jac[leaf][j], s2.fb_jac[leaf][j])
        assert any(p is not None for p in parts)
        blocks.append(parts)
    return blocks


def calibrate(problem: Problem, cap: Capture) -> routes.Calibration:
    """The planner's :class:`~ntkfunc._engines.structured.routes.Calibration`: one sample's cotangents (one small pass), prices scaled to ``N1 x N2``.

    Jacobians are formed once per sample. Empty when not vmapped (one whole-batch block).
    """
    if not problem.vmapped or not cap.ruled:
        return routes.Calibration({}, {})
    one = side(problem, cap, 1, 0, 1)
    n_jacobians = problem.n1 + (0 if problem.symmetric else problem.n2)
    costs = {}
    for k in cap.ruled:
        per_sample = sum((one_sample_prices(problem, cap, k, leaf, one) for leaf in range(len(problem.layouts))), plan.ZERO)
        costs[k] = per_sample.scaled(problem.n1, problem.n2, n_jacobians)
    o = outputs_per_sample(problem)
    cotangents = {e: contraction.Price(0.0, float(n_jacobians * o * math.prod(ev.y_shape))) for e, ev in enumerate(cap.events)}
    return routes.Calibration(costs, cotangents)


def one_sample_prices(problem: Problem, cap: Capture, k: int, leaf: int, one: Side) -> plan.Prices:
    """The prices of ruled parameter ``k``'s block (covered or tied) for output leaf ``leaf``, ``one`` against itself."""
    if k in cap.tied:
        return tied_prices(problem, leaf, cap.tied[k], one, one)[0]
    e, role = cap.covered[k]
    return block_prices(problem, leaf, e, role, one, one)[0]


_CALLS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""``f -> {input signature: contraction.Price of its parameter-consuming calls on one sample}``, kept with the function
object: a fresh kernel function of the same ``f`` (``ntk_fn(f)(x1, x2, params)`` in a training loop) does not
run ``f`` again for :func:`implementation1_price`. Shapes decide the price, never values; an estimate only."""
_CALLS_LOCK = threading.Lock()


def _calls_price(problem: Problem, fn: Callable[..., Any], leaves: Sequence[torch.Tensor], x: Sequence[Any]) -> contraction.Price:
    """:func:`~ntkfunc._engines.structured.plan.parameter_calls_price` of ``f`` on ``x``, remembered per ``f`` and input signature."""
    key = problem.signature
    if key is not None:
        with _CALLS_LOCK:
            try:
                known = _CALLS.get(problem.f, {}).get(key)
            except TypeError:  # f cannot be weakly referenced (or hashed): not remembered
                known = None
        if known is not None:
            return known
    price = plan.parameter_calls_price(fn, leaves, x)
    if key is not None:
        with _CALLS_LOCK:
            try:
                _CALLS.setdefault(problem.f, {})[key] = price
            except TypeError:
                pass
    return price


def implementation1_price(problem: Problem) -> contraction.Price | None:
    """An upper estimate of what the rules could save at most: implementation 1's work on the parameters.

    For every sample (the whole batch when not vmapped) and output entry, a backward pass through each
    call that consumes a parameter (twice its forward FLOPs, which :func:`~ntkfunc._engines.structured.plan.parameter_calls_price`
    counts on x1's first sample, once per ``f`` and input signature, and the elements it returns as traffic), the ``O x P`` Jacobian entries
    written, then ``J₁ J₂ᵀ`` for every pair of samples. What both routes pay alike (the forward pass,
    cotangents through the other ops) is left out. Under an outer transform (``vmap`` over an ensemble of
    parameters, ``grad`` of the kernel) it prices one member of the ensemble. None if ``f`` fails to run so.
    """
    leaves = problem.params.diff_leaves
    if problem.vmapped:
        x = problem.x_block(1, 0, 1)
        x = [a if ax is None else a.squeeze(ax) for a, ax in zip(x, problem.x_axes)]  # type: ignore[arg-type]
        fn, n_jacobians, pairs = problem.sample_fn(), problem.n1 + (0 if problem.symmetric else problem.n2), problem.n1 * problem.n2
    else:
        x, fn, n_jacobians, pairs = problem.x1_leaves, problem.batch_fn(), 1 if problem.symmetric else 2, 1
    try:
        calls = _calls_price(problem, fn, leaves, x)
    except Exception:  # an estimate only: f's own errors surface where the kernel runs it
        return None
    o = outputs_per_sample(problem)
    n_params = sum(t.numel() for t in leaves)
    n = 1 if problem.vmapped else None
    pair_flops = sum(
        plan.jacobian_contraction_flops(lay, n, tuple(map(max, s1, s2)), (n_params,))
        for lay, s1, s2 in zip(problem.layouts, problem.sample_out_shapes(1), problem.sample_out_shapes(2))
    )
    per_sample = contraction.Price(2 * calls.flops, calls.traffic + n_params) * o
    return per_sample * n_jacobians + contraction.Price(pairs * pair_flops)


def route_plan(problem: Problem, policy: str = routes.STRUCTURED, cap: Capture | None = None) -> routes.RoutePlan:
    """The planner's routes for this problem (:func:`~ntkfunc._engines.structured.routes.decide`), once per input signature and sizes.

    ``policy``: :data:`~ntkfunc._engines.structured.routes.STRUCTURED` (implementation 3) or
    :data:`~ntkfunc._engines.structured.routes.AUTO`; ``cap``: the problem's capture, if already
    at hand. Inside :func:`ntkfunc.rules.forced` every rule is used.
    """
    if rules.is_forced():
        return routes.forced(cap or captured(problem))

    def decide() -> routes.RoutePlan:
        if policy == routes.AUTO:  # implementation 1 outright, without the capture, when it costs less than probing
            skip = routes.unprobed(cap, implementation1_price(problem))
            if skip is not None:
                return skip
        found = cap or captured(problem)
        return routes.decide(calibrate(problem, found), found, policy)

    return problem.remember("route_plan", decide, policy, problem.n1, problem.n2, rules.enabled())


def block_size(problem: Problem, cap: Capture, budget: int) -> int:
    """Samples per block so that both blocks' cotangents, operands and fallback Jacobians fit."""
    if not problem.vmapped:
        return 1
    o = outputs_per_sample(problem)
    ys = sum(math.prod(e.y_shape) for e in cap.events)
    kvol = sum(e.rule.window_size(e.meta) * math.prod(e.y_shape) for e in cap.events)
    fb = sum(problem.params.diff_leaves[k].numel() for k in cap.fallback)
    per_sample = itemsize(problem.out_dtype) * (o * (ys + fb) + 2 * kvol)
    n_max = max(problem.n1, problem.n2)
    usable = budget * SAFETY
    n_all = problem.n1 + (0 if problem.symmetric else problem.n2)
    if n_all * per_sample <= 0.1 * usable:
        return n_max
    return max(1, min(n_max, int(usable // (2 * per_sample + problem.remember("backward_transient", lambda: backward_transient(problem))))))


def memory_limit(problem: Problem, budget: int) -> int:
    """opt_einsum's cap on intermediates (elements): a power of two, so that cached paths are reused."""
    return 1 << max(16, int(budget * SAFETY / 4 // itemsize(problem.out_dtype)).bit_length() - 1)


def kernel(problem: Problem, budget: int, per_param: bool = False, moved: dict[int, str] | None = None) -> list:
    """Implementation 3 (see the module docstring): the kernel per output leaf.

    With ``per_param=True``: per output leaf, a list over the differentiated parameters
    (each parameter's term of the same sum, so no extra work). ``moved`` (parameter index
    -> reason) sends covered parameters to the reverse-mode Jacobian fallback; by default
    those that the planner sends there (:func:`route_plan`).
    """
    if moved is None:
        found = captured(problem)
        cap = capture_mod.restrict(found, route_plan(problem, cap=found).moved)
    else:
        cap = captured(problem, 1, moved)
    if not cap.events:  # nothing left to probe: implementation 1's path, without the capture mode
        return jacobian.kernel(problem, budget, per_param)
    cap2 = cap if problem.vmapped or problem.symmetric else captured(problem, 2, moved)
    b = block_size(problem, cap, budget)
    limit = memory_limit(problem, budget)
    n_params = len(problem.params.diff_leaves)
    accs = [Accumulator(problem) for _ in range(n_params if per_param else 1)]
    current: tuple[int, Side] | None = None
    for tile in tiles(problem, b, b):
        if current is None or current[0] != tile.i0:
            current = (tile.i0, side(problem, cap, 1, tile.i0, tile.i1))
        s1 = current[1]
        s2 = s1 if problem.symmetric and tile.on_diagonal else side(problem, cap2, 2, tile.j0, tile.j1)
        for leaf, parts in enumerate(tile_kernel(problem, cap, s1, s2, limit, together=not per_param)):
            present = [p for p in parts if p is not None]
            if per_param:
                for k, part in enumerate(parts):
                    accs[k].add(leaf, tile, torch.zeros_like(present[0]) if part is None else part)
            else:
                accs[0].add(leaf, tile, sum(present[1:], present[0]))
    if per_param:
        results = [acc.result() for acc in accs]
        return [[results[k][leaf] for k in range(n_params)] for leaf in range(len(problem.layouts))]
    return accs[0].result()
