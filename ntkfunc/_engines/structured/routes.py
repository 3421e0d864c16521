"""The one route decision: for each parameter and problem, which route, at what price, and why.

A ruled parameter's kernel term ``Σ (∂f₁/∂θ)(∂f₂/∂θ)ᵀ`` has three exact routes:

- :data:`GRAM` (``"gram"``): one contraction of both sides' factors (cotangents and the rule's
  operands, :func:`~ntkfunc._engines.structured.plan.gram_equation`), e.g.
  ``Σ (c₁c₂ᵀ) ⊙ (x₁x₂ᵀ)`` for a linear layer;
- :data:`FORMED` (``"formed"``): each side's ``∂f/∂θ`` formed from the rule, then ``J₁ J₂ᵀ``;
- :data:`REVERSE_MODE` (``"reverse-mode"``): ``∂f/∂θ`` from reverse mode in the cotangent pass,
  then ``J₁ J₂ᵀ`` (implementation 1's route, and the only one of a parameter without a rule).

Every caller reads its decision from here, priced by :mod:`~ntkfunc._engines.structured.plan`
(what opt_einsum's ``contract_path`` and its ``PathInfo`` are to ``contract``):

- :func:`unprobed`: under :data:`AUTO`, before any capture, implementation 1 outright when its
  whole kernel costs less than probing (nothing is captured or calibrated);
- :func:`decide`: once per input signature and sizes, which ruled parameters take
  :data:`REVERSE_MODE` and which are probed (:data:`PROBED`), as a :class:`RoutePlan`, under
  a policy: :data:`STRUCTURED` (implementation 3) or :data:`AUTO` (``"auto"``, which adds
  :data:`MIN_SAVING`);
- :func:`on_tile`: for a probed parameter, :data:`GRAM` or :data:`FORMED` on one tile of the
  kernel (side Jacobians already formed for the tile's row are free);
- :func:`for_rows`: :data:`GRAM` or :data:`FORMED` rows for ``kernel_matrix``'s per-sample rows
  (Gram route only where its factors also take less memory than the row), in seconds at the
  measured :class:`Rates` where a caller has them, the Gram route's seconds measured on a probe
  tile where the two prices are close (:data:`CLOSE`);
- :func:`contract`: which contraction path a Gram equation runs along (opt_einsum's optimal path,
  the two GEMMs of :data:`~ntkfunc._engines.structured.plan.PAIRED`, or for a convolution's kernel
  :data:`~ntkfunc._engines.structured.plan.INPUT_GRAM`), measured on its first
  run per shape where a caller keeps a table of seconds, else the cheaper priced.

``explain`` reports these same decisions, so it shows the route that runs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Hashable, Mapping

import torch

from ntkfunc._core.buffers import clock
from ntkfunc._engines.structured import contraction, plan
from ntkfunc._engines.structured.capture import Capture

GRAM = "gram"
FORMED = "formed"
REVERSE_MODE = "reverse-mode"
PROBED = "probed"
"""In a :class:`RoutePlan`: the parameter's primitive is probed and each tile takes :data:`GRAM` or :data:`FORMED` (:func:`on_tile`)."""

STRUCTURED = "structured"
"""Implementation 3's policy: probe a group of primitives only when its rules save more than its
cotangents cost, and nothing when all rules together save less than :data:`PROBE_FLOPS`."""

AUTO = "auto"
"""``"auto"``'s policy: :data:`STRUCTURED`, and nothing probed either when the rules save less
than :data:`MIN_SAVING` of Jacobian contraction's cost."""

POLICIES = (STRUCTURED, AUTO)

PROBE_FLOPS = 2e8
"""What probing ``f`` at all costs per call, in :class:`~ntkfunc._engines.structured.plan.Price`'s
cost units (FLOPs): the capture mode sees every torch call of the cotangent pass and returns each
probed primitive's operands (measured: 1-2 ms on the bench_vs_nt models, one thread). Rules that
save less than this do not pay for it."""

MIN_SAVING = 0.25
"""``"auto"``: the rules must save this fraction of Jacobian contraction's cost to pay for the capture."""


@dataclasses.dataclass(frozen=True)
class Calibration:
    """What each route costs for the whole kernel, priced from one sample.

    Attributes:
      costs: ruled parameter index -> its :class:`~ntkfunc._engines.structured.plan.RouteCost`
        for the whole ``N1 x N2`` kernel. Empty when not calibrated (one whole-batch block).
      cotangents: event -> what probing it costs: its cotangents for every output component
        and sample, written by the cotangent pass (paid once for all its roles).
    """

    costs: dict[int, plan.RouteCost]
    cotangents: dict[int, contraction.Price]


@dataclasses.dataclass(frozen=True)
class Route:
    """One parameter's route, what it costs and why.

    Attributes:
      route: :data:`GRAM`, :data:`FORMED`, :data:`REVERSE_MODE` or (in a :class:`RoutePlan`) :data:`PROBED`.
      cost: both routes' prices: for the whole kernel in a plan, for one tile from
        :func:`on_tile`; None where not priced (no rule, or not calibrated).
      why: the reason, where it is more than the comparison of ``cost``.
      ruled: the parameter has a rule (False: no rule, reverse mode is its only route).
    """

    route: str
    cost: plan.RouteCost | None = None
    why: str = ""
    ruled: bool = True

    @property
    def price(self) -> contraction.Price | None:
        """The price of the route taken (:data:`PROBED`: the cheaper one; :data:`REVERSE_MODE`: the Jacobian route's)."""
        if self.cost is None:
            return None
        if self.route == GRAM or (self.route == PROBED and self.cost.use_gram):
            return self.cost.gram
        return self.cost.jacobian

    @property
    def reason(self) -> str:
        """Why this route."""
        if self.why or self.cost is None:
            return self.why
        g, j = self.cost.gram, self.cost.jacobian
        return (f"Gram route {g.flops:.2e} FLOPs, {g.traffic:.2e} elements written; Jacobian route {j.flops:.2e} FLOPs, "
                f"{j.traffic:.2e} elements written")


@dataclasses.dataclass(frozen=True)
class RoutePlan:
    """Per parameter, the route an engine takes for one problem (decided by :func:`decide`).

    Attributes:
      policy: :data:`STRUCTURED` or :data:`AUTO` (``"forced"`` inside ``rules.forced()``).
      routes: every differentiated parameter that the capture saw -> its :class:`Route`: ruled
        parameters :data:`PROBED` or :data:`REVERSE_MODE`, the others :data:`REVERSE_MODE`.
      saving: what the probed rules save in all, in cost units (``inf``: not calibrated).
    """

    policy: str
    routes: Mapping[int, Route]
    saving: float = math.inf

    @property
    def moved(self) -> dict[int, str]:
        """Ruled parameter index -> why it takes :data:`REVERSE_MODE` (sent to the capture's fallback)."""
        return {k: r.reason for k, r in self.routes.items() if r.ruled and r.route == REVERSE_MODE}

    @property
    def outright(self) -> bool:
        """No parameter is probed: implementation 1's path, without the capture."""
        return not any(r.route == PROBED for r in self.routes.values())


def probe_groups(cap: Capture) -> list[tuple[set[int], list[int]]]:
    """The ruled parameters in groups that share probed primitives: ``(events, parameter indices)``.

    A primitive's cotangents serve all its roles, and a tied parameter's all its uses, so a
    group's primitives are probed, or not, together.
    """
    groups: list[tuple[set[int], list[int]]] = []
    for k in cap.ruled:
        events = {e for e, _ in cap.tied[k]} if k in cap.tied else {cap.covered[k][0]}
        joined = [g for g in groups if g[0] & events]
        for g in joined:
            groups.remove(g)
        groups.append((events.union(*(g[0] for g in joined)), sorted([k, *(j for g in joined for j in g[1])])))
    return groups


def _unruled(cap: Capture) -> dict[int, Route]:
    return {k: Route(REVERSE_MODE, None, why, ruled=False) for k, why in cap.fallback.items()}


def forced(cap: Capture) -> RoutePlan:
    """Inside ``ntkfunc.rules.forced()``: every ruled parameter probed."""
    return RoutePlan("forced", {**_unruled(cap), **{k: Route(PROBED, None, "rules forced") for k in cap.ruled}})


def unprobed(cap: Capture | None, implementation1: contraction.Price | None) -> RoutePlan | None:
    """``"auto"`` before any capture: implementation 1 outright when its work on the parameters costs less than probing.

    The rules can save at most what implementation 1 spends on the parameters (``implementation1``,
    an upper estimate from one forward pass: :func:`~ntkfunc._engines.structured.kernel.implementation1_price`);
    when that is less than :data:`PROBE_FLOPS` no probe can pay, and neither the capture nor the
    calibration runs (small models on few samples: the test zoo). The plan probes nothing; given
    ``cap`` (``explain``), it says so for every ruled parameter. None: decide from the capture
    (:func:`decide`), also when there is no estimate (``f`` failed to run for it).

    >>> unprobed(None, contraction.Price(1e6, 1e3)).outright, unprobed(None, contraction.Price(1e9)) is None
    (True, True)
    """
    if implementation1 is None or implementation1.cost >= PROBE_FLOPS:
        return None
    why = (f"auto: implementation 1's work on the parameters (about {implementation1.cost:.2e}) costs less than "
           f"probing ({PROBE_FLOPS:.0e}): no capture")
    chosen = {} if cap is None else {**_unruled(cap), **{k: Route(REVERSE_MODE, None, why) for k in cap.ruled}}
    return RoutePlan(AUTO, chosen, 0.0)


def decide(cal: Calibration, cap: Capture, policy: str = STRUCTURED) -> RoutePlan:
    """The :class:`RoutePlan` of a problem: which ruled parameters take :data:`REVERSE_MODE`, and why.

    Per group of primitives (:func:`probe_groups`): probing them (their cotangents, then each
    parameter's cheaper route) or not (every parameter's Jacobian from reverse mode), whichever
    is cheaper. A parameter whose Jacobian route is cheaper takes its Jacobian from reverse
    mode too: forming it from the rule would repeat what the cotangent pass computes anyway (a
    linear layer's ``Σ_t c_t x_tᵀ`` is its weight gradient). So a bias whose weight is better
    contracted as a Jacobian does not keep a probe whose cotangents (all positions, all
    outputs) cost more than its whole kernel term. When all rules together save less than
    probing costs (:data:`PROBE_FLOPS`), every parameter is moved and the kernel is Jacobian
    contraction without the capture. :data:`AUTO` also moves every parameter when the rules
    save less than :data:`MIN_SAVING` of Jacobian contraction's cost (a Transformer block,
    whose rules win only on biases). Not calibrated (one whole-batch block): every rule is kept.
    """
    if policy not in POLICIES:
        raise ValueError(f"routes.decide(policy={policy!r}): expected one of {list(POLICIES)}")
    moved: dict[int, str] = {}
    saving = 0.0
    for events, ks in probe_groups(cap):
        if any(k not in cal.costs for k in ks):
            saving = math.inf  # not calibrated (one whole-batch block): keep the rules
            continue
        drop = sum((cal.costs[k].jacobian for k in ks), contraction.FREE)
        keep = sum((cal.costs[k].gram if cal.costs[k].use_gram else cal.costs[k].jacobian for k in ks),
                   sum((cal.cotangents[e] for e in events), contraction.FREE))
        saving += max(drop.cost - keep.cost, 0.0)
        for k in ks:
            c = cal.costs[k]
            if drop.cost < keep.cost:
                moved[k] = (f"Jacobian contraction: probing its primitive ({keep.cost:.2e} with its cotangents) costs more "
                            f"than reverse-mode Jacobians for all its roles ({drop.cost:.2e})")
            elif not c.use_gram:
                moved[k] = (f"Jacobian contraction ({c.jacobian.flops:.2e} FLOPs) is cheaper than the rule's Gram route "
                            f"({c.gram.flops:.2e} FLOPs, {c.gram.traffic:.2e} elements written)")
    if saving < PROBE_FLOPS:  # the rules save less than the capture costs: Jacobian contraction throughout
        why = f"Jacobian contraction: the rules would save {saving:.2e} in all, less than probing costs ({PROBE_FLOPS:.0e})"
        moved = {k: moved.get(k, why) for k in cap.ruled}
    if policy == AUTO:
        moved = {k: "auto: " + why for k, why in moved.items()}
        if cal.costs:
            all_jacobian = sum(c.jacobian.cost for c in cal.costs.values())
            probed = {e for events, ks in probe_groups(cap) if any(k not in moved for k in ks) for e in events}
            saving = sum(c.jacobian.cost - c.gram.cost for k, c in cal.costs.items() if k not in moved)
            saving -= sum(cal.cotangents[e].cost for e in probed)
            if saving < MIN_SAVING * all_jacobian:
                why = f"auto: the rules would save {saving:.2e} of {all_jacobian:.2e} (FLOPs and traffic), not worth the capture"
                moved = {k: moved.get(k, why) for k in cap.ruled}
    chosen = {k: Route(REVERSE_MODE, cal.costs.get(k), moved[k]) if k in moved else Route(PROBED, cal.costs.get(k))
              for k in cap.ruled}
    return RoutePlan(policy, {**_unruled(cap), **chosen}, saving)


def on_tile(prices: plan.Prices, formed1: bool, formed2: bool) -> Route:
    """A probed parameter's route on one tile: :data:`GRAM` or :data:`FORMED`, whichever costs less.

    ``formed1``/``formed2``: each side's ``∂f/∂θ`` is already formed (kept for its row), so
    forming it again costs nothing.
    """
    cost = prices.at_tile(formed1, formed2)
    return Route(GRAM if cost.use_gram else FORMED, cost)


def for_rows(prices: plan.Prices, n1: int, n2: int, kept_bytes: int, row_bytes: int, rates: Rates | None = None,
             gram: plan.Equation | None = None, memory_limit: int | None = None, passes: float = 0.0) -> Route:
    """A covered parameter's route in per-sample rows for an ``n1 x n2`` kernel: :data:`GRAM` or :data:`FORMED`.

    :data:`GRAM` (its factors kept, no slot in the rows) when that is cheaper for the whole
    kernel and its factors take less memory than its row (``kept_bytes < row_bytes``).
    Cheaper: by :class:`~ntkfunc._engines.structured.plan.Price` cost; given ``rates``, in
    seconds (:meth:`Rates.seconds`), the rows' side charged ``passes`` seconds for the gradient
    passes its bytes add (:func:`rows_plan`), and where the two are within a factor :data:`CLOSE`
    and ``gram`` (the one-sample Gram equation) is given, the Gram route's seconds per sample pair
    measured on a probe tile (:meth:`Rates.gram_seconds`).
    """
    cost = prices.scaled(n1, n2, n1 + n2)
    why = ""
    if rates is not None:
        gram_s, rows_s = rates.seconds(cost.gram), rates.seconds(cost.jacobian) + passes
        how = "priced"
        if gram is not None and 1 / CLOSE < gram_s / rows_s < CLOSE:
            gram_s, how = rates.gram_seconds(gram, memory_limit) * n1 * n2, "measured"
        why = f"Gram route {gram_s:.3g} s ({how}), rows {rows_s:.3g} s at the measured rates"
        if passes:
            why += f" (of which {passes:.3g} s for the gradient passes its row bytes add)"
        if gram_s >= rows_s:
            return Route(FORMED, cost, why)
    elif not cost.use_gram:
        return Route(FORMED, cost)
    if kept_bytes >= row_bytes:
        return Route(FORMED, cost, f"rows: its factors ({kept_bytes} bytes) take no less memory than its row ({row_bytes} bytes)")
    return Route(GRAM, cost, why)


@dataclasses.dataclass(frozen=True)
class RowCandidate:
    """A covered parameter's pieces for :func:`rows_plan`: its one-sample ``prices`` and Gram equation, the bytes of its
    factors (``kept``) and of its row (``row``), per sample."""

    prices: plan.Prices
    gram: plan.Equation
    kept: int
    row: int


def rows_plan(candidates: Mapping[int, RowCandidate], n1: int, n2: int, room: float, rates: Rates | None,
              memory_limit: int | None, pass_seconds: float = 0.0, fixed: int = 0) -> dict[int, Route]:
    """Every covered parameter's route in per-sample rows for an ``n1 x n2`` kernel (:func:`for_rows`).

    ``room``: bytes for a panel's rows; ``fixed``: row bytes per sample of the parameters that are no candidates;
    ``pass_seconds``: one sample's gradient pass. First by price (at the measured ``rates``). Then, where the x1
    rows would not fit in one panel, a row's bytes add gradient passes (``n1 n2 row / (2 room)`` of them, the
    derivative of a symmetric kernel's ``n1 (m + 1) / 2`` passes over ``m = n1 width / room`` panels), charged to
    its rows route; where they would, the routes priced within :data:`CLOSE` are decided by the Gram route's
    measured seconds (:meth:`Rates.gram_seconds`).
    """
    priced = {k: for_rows(c.prices, n1, n2, c.kept, c.row, rates) for k, c in candidates.items()}
    if rates is None:
        return priced
    width = fixed + sum(c.row for k, c in candidates.items() if priced[k].route == FORMED)
    chosen = dict(priced)
    for k, c in sorted(candidates.items(), key=lambda kc: -kc[1].row):
        has_row = chosen[k].route == FORMED
        without = width - (c.row if has_row else 0)
        passes = 0.0
        if n1 * (without + c.row) > room:
            passes = n1 * n2 * c.row / (2 * room) * pass_seconds
        chosen[k] = for_rows(c.prices, n1, n2, c.kept, c.row, rates, c.gram if not passes else None, memory_limit, passes)
        width = without + (c.row if chosen[k].route == FORMED else 0)
    return chosen


CLOSE = 2.0
""":func:`for_rows`: where the priced seconds of the two routes are within this factor, the Gram route is measured."""

PROBE_SAMPLES = 64
"""Samples a side of the probe tile on which :meth:`Rates.gram_seconds` times a Gram equation."""


class Rates:
    """The measured rates that routes are priced at: the calibration object (one per row source; no global state).

    ``gemm``: FLOP/s of the row products (a ``(128 x 8192) @ (8192 x 128)`` product); ``element``: seconds
    per element a non-GEMM step writes (a permuted copy); ``call``: seconds of one small contraction call;
    ``table``: measured seconds by key, each key a job and each entry a way of doing it (the format of
    :attr:`~ntkfunc._core.buffers.Buffers.seconds`, which a row source may share): :func:`contract`'s
    paths, :meth:`gram_seconds`' probes. :meth:`measure` times the three rates once (about 50 ms).

    >>> r = Rates(gemm=1e11, element=3e-9, call=1e-4)
    >>> round(r.seconds(contraction.Price(2e11, 1e6, 1)), 6)   # 2 s of FLOPs, 3 ms of writes, one call
    2.0031
    """

    def __init__(self, gemm: float, element: float, call: float, table: dict[Hashable, dict[str, float]] | None = None) -> None:
        self.gemm, self.element, self.call = gemm, element, call
        self.table: dict[Hashable, dict[str, float]] = {} if table is None else table

    def seconds(self, price: contraction.Price) -> float:
        """``price`` in seconds at these rates."""
        return price.flops / self.gemm + price.traffic * self.element + price.calls * self.call

    @classmethod
    def measure(cls, device: torch.device, dtype: torch.dtype, table: dict[Hashable, dict[str, float]] | None = None) -> Rates:
        """Each rate from its best of three timings on ``device`` (CPU time on the CPU, synchronized wall time on a GPU)."""
        a = torch.randn(128, 8192, dtype=dtype, device=device)
        b = torch.randn(1 << 20, dtype=dtype, device=device).view(64, 128, 128)
        s = torch.randn(4, 8, dtype=dtype, device=device)
        gemm = 2.0 * 128 * 128 * 8192 / _best(device, lambda: a @ a.T)
        element = _best(device, lambda: b.permute(2, 0, 1).contiguous()) / b.numel()
        call = _best(device, lambda: contraction.contract("ab,cb->ac", (s, s), None))
        return cls(gemm, element, call, table)

    def gram_seconds(self, gram: plan.Equation, memory_limit: int | None) -> float:
        """Seconds per sample pair of ``gram`` (a Gram equation) on a probe tile of :data:`PROBE_SAMPLES` x
        :data:`PROBE_SAMPLES` random samples of its shapes, along its fastest path (:func:`contract`); once per shapes."""
        if not gram.side:  # factors that do not pair side by side: no probe, priced at the rates
            return self.seconds(gram.price)
        probe = plan.probe_equation(gram, PROBE_SAMPLES)
        key = ("gram probe", probe.eq, probe.shapes)
        if key not in self.table:
            device = probe.tensors[0].device
            contract(probe, memory_limit, self.table)  # warm-up; measures the paths
            self.table[key] = {"seconds": _best(device, lambda: contract(probe, memory_limit, self.table), 1) / PROBE_SAMPLES ** 2}
        return self.table[key]["seconds"]


def _best(device: torch.device, fn: object, repeats: int = 3) -> float:
    """Best of ``repeats`` timings of ``fn()`` after a warm-up."""
    assert callable(fn)
    fn()
    best = math.inf
    for _ in range(repeats):
        t0 = clock(device)
        fn()
        best = min(best, clock(device) - t0)
    return max(best, 1e-9)


def contract(eq: plan.Equation, memory_limit: int | None, table: dict[Hashable, dict[str, float]] | None = None,
             sharing: contraction.Sharing | None = None) -> torch.Tensor:
    """``eq`` contracted along its fastest path: the one decision of which path a contraction runs along.

    The candidates are its :attr:`~ntkfunc._engines.structured.plan.Equation.paths` whose intermediates fit
    ``memory_limit``. Without ``table``, or with one candidate, the cheapest priced. With ``table`` (measured
    seconds by key and way: a row source's :attr:`~ntkfunc._core.buffers.Buffers.seconds`), the first call
    for these shapes runs each candidate once, timed (CPU time on the CPU, synchronized wall time on a GPU),
    and returns the last result; every later call runs the fastest measured.

    >>> import torch
    >>> eq = plan.Equation("at,bt->ab", (torch.ones(2, 3), torch.ones(4, 3)))
    >>> table = {}
    >>> contract(eq, None, table).shape, list(table[("contract", eq.eq, eq.shapes)])
    (torch.Size([2, 4]), ['optimal'])
    """
    fits = [q for q in eq.paths if q.name == contraction.OPTIMAL or memory_limit is None or q.largest <= memory_limit]
    if table is None or len(fits) == 1:
        if table is not None:
            table.setdefault(("contract", eq.eq, eq.shapes), {fits[0].name: 0.0})
        return eq.run(memory_limit, sharing, min(fits, key=lambda q: q.price.cost))
    key = ("contract", eq.eq, eq.shapes)
    measured = table.get(key)
    if measured is None or any(q.name not in measured for q in fits):
        measured = table.setdefault(key, {})
        device = eq.tensors[0].device
        out: torch.Tensor | None = None
        for q in fits:
            t0 = clock(device)
            out = eq.run(memory_limit, sharing, q)
            measured[q.name] = clock(device) - t0
        assert out is not None
        return out
    best = min(fits, key=lambda q: measured[q.name])
    return eq.run(memory_limit, sharing, best)
