"""Rows formed by the structured rules from one batched pass per chunk (implementations 3 and ``"auto"``).

The structured engine's capture gives, from one batched pass (``vmap`` over the block of a
``jacrev`` with respect to zero probes at every parameter-consuming primitive, which batches
like a plain backward because no weight gradient is asked of torch), the cotangents at every
such primitive and its operands; each parameter's rule then forms its per-sample gradient in
its slot of the buffer (:meth:`~ntkfunc.rules.Rule.write_gradient`: convolutions by ``im2col``
and ``bmm`` or by a grouped convolution's weight backward, whichever the rule measured faster for
the layer's shape on the first samples (the table in :attr:`StructuredRows.buffers`), linear layers
by one ``bmm`` (or, applied once per sample, one outer product written in place); other rules decline
and their einsum is copied in). A
parameter consumed through a view (``W.T``, ``cls.expand(n, -1, -1)``) gets its rule's einsum
composed with the view, in the parameter's own order; a tied one (used by several primitives)
the sum of its uses'. Parameters without a rule, and views whose rows cannot be put in the
parameter's order (a slice such as ``pos[:T]``), take their reverse-mode Jacobians from the
same pass. A parameter whose Gram contraction
(:func:`ntkfunc._engines.structured.plan.gram_equation`, e.g. ``Σ (c₁c₂ᵀ) ⊙ (x₁x₂ᵀ)``) is
priced cheaper than its rows gets **no slot**: its block keeps the (small) factors instead and
:meth:`StructuredRows.gram` contracts them per tile.

:func:`per_sample_gradients` is the entry point for callers that want rows of every
parameter (no Gram route).

Example:
  >>> import torch, ntkfunc
  >>> from ntkfunc._core.problem import make_problem
  >>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten(), torch.nn.Linear(8, 3))
  >>> f, params = ntkfunc.from_module(model)
  >>> x = torch.randn(5, 1, 4, 4)
  >>> problem = make_problem(f, x[:1], None, params, 0, (), ())
  >>> rows = per_sample_gradients(problem, [x])                 # (samples, outputs, parameters)
  >>> rows.shape
  torch.Size([5, 3, 47])
  >>> jac = torch.func.vmap(torch.func.jacrev(lambda p, xi: f(p, xi[None])[0]), (None, 0))(params, x)
  >>> expected = torch.cat([jac[k].reshape(5, 3, -1) for k in params], -1)
  >>> bool(torch.allclose(rows, expected, atol=1e-6))
  True
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from ntkfunc._core.buffers import Buffers, clock
from ntkfunc._core.memory import backward_transient, itemsize
from ntkfunc._core.ops import transform_friendly_attention
from ntkfunc._core.problem import Problem
from ntkfunc._engines.rows.jacobian import JacobianRows
from ntkfunc._engines.rows.source import Factors, Flops, RowSource, SampleBytes, Slots, block_size, chunk_size, chunks, out_shape, pair_flops, row_flops
from ntkfunc._engines.structured import capture as capture_mod
from ntkfunc._engines.structured import contraction, plan, routes, views
from ntkfunc._engines.structured import kernel as structured
from ntkfunc.rules import Structure

WARM, RULES, VMAP = "warm-up", "rules", "vmap(jacrev)"
"""The ways :meth:`StructuredRows.compute` forms a chunk (the rules' first chunk is their warm-up)."""

EXPLORE_FLOPS = 1e10
"""Estimated FLOPs of a chunk's rows (:attr:`Flops.row` times its samples: a forward and a backward per output
entry) up to which ``vmap(jacrev)`` is timed against the rules on the first chunk (small models: trying costs
two more passes over a chunk of at most about a tenth of a second of one CPU core; on large models the rules are
several times faster, as measured in RESULTS.md). An estimate, not the first chunk's time: that one includes
the libraries' one-off start-up (the first convolution backward of a process alone takes about a second)."""

EXPLORE_ROUNDS = 2
"""Timed runs of each way on the first chunk where both are tried (alternating; the least time counts: other jobs
on the same cores only ever add time)."""


class StructuredRows:
    """Rows formed by the rules from one batched pass per chunk; Gram-route parameters keep factors.

    ``routes``: ``"price"`` (each covered parameter by the cheaper of its Gram contraction and its
    rows, for an ``n1 x n2`` kernel, and only when its factors take less memory than its row),
    ``"rows"`` (every parameter has a slot) or ``"gram"`` (every covered parameter takes the Gram
    route: for tests).
    """

    def __init__(self, problem: Problem, n1: int = 1, n2: int = 1, budget: int = 1 << 30, routes: str = "price") -> None:
        if not problem.vmapped:
            raise ValueError(f"{problem.api}: per-sample rows need vmap_axes (independent samples)")
        self.problem = problem
        self.out_shape = out_shape(problem)
        self.layout = problem.layouts[0]
        self._one: structured.Side | None = None
        self.cap = structured.captured(problem)  # found once per input signature where the problem has a cache
        self.cap = capture_mod.restrict(self.cap, self._unordered_views())
        self._one = None  # read again with the restricted capture
        self.gram_flops = 0.0  # per sample pair, of the Gram-route parameters
        if routes not in ("price", "rows", "gram"):
            raise ValueError(f"StructuredRows(routes={routes!r}): expected 'price', 'rows' or 'gram'")
        self.limit, self.budget = structured.memory_limit(problem, budget), budget
        self.buffers = Buffers()  # the rules' work buffers (im2col patches, products), reused from chunk to chunk
        self.gram_params = self._gram_params(n1, n2, routes == "gram") if routes != "rows" else {}
        self.slots = Slots.of(problem, [k for k in range(len(problem.params.diff_leaves)) if k not in self.gram_params])
        self.fallback = sorted(self.cap.fallback)
        self._vmap: JacobianRows | None = None  # implementation 1's rows, where measured faster (:meth:`_way`)
        self.rows_wanted = True
        """Whether the caller needs the rows in one buffer; False where ``vmap(jacrev)``'s per-parameter results serve
        (``jacobian_fn``'s pytree on one chunk: :meth:`vmap_pieces`), so that its timing leaves out the copy."""
        self._flops: Flops | None = None
        self.chunk_budget: float | None = None
        """Bytes a chunk's gradient pass may hold, where the caller knows them (``jacobian_fn``: its planned budget); with
        it, ``vmap(jacrev)`` is also tried where it holds more per sample than the rules but a chunk still fits."""

    def _gram_params(self, n1: int, n2: int, every: bool = False) -> dict[int, tuple[int, str]]:
        """Covered parameters that take the Gram route in rows for ``n1 x n2`` samples (:func:`~ntkfunc._engines.structured.routes.for_rows`)."""
        if not self.cap.covered:
            return {}
        one = self._one_sample()
        o = math.prod(self.out_shape)
        candidates = {}
        for k, (e, role) in self.cap.covered.items():
            prices, gram = structured.block_prices(self.problem, 0, e, role, one, one)
            kept = self._factors(self.problem, one, {k: (e, role)}).nbytes()
            row = o * self.problem.params.diff_leaves[k].numel() * itemsize(self.problem.out_dtype)
            candidates[k] = routes.RowCandidate(prices, gram, kept, row)
        if every:
            chosen = dict(self.cap.covered)
        else:
            rates = routes.Rates.measure(self.problem.device, self.problem.out_dtype, self.buffers.seconds)
            fixed = sum(o * t.numel() * itemsize(self.problem.out_dtype) for k, t in enumerate(self.problem.params.diff_leaves)
                        if k not in self.cap.covered)
            pass_seconds = rates.seconds(contraction.Price(row_flops(self.problem, self.out_shape)))
            taken = routes.rows_plan(candidates, n1, n2, self.budget, rates, self.limit, pass_seconds, fixed)
            chosen = {k: ek for k, ek in self.cap.covered.items() if taken[k].route == routes.GRAM}
        for k in chosen:
            self.gram_flops += candidates[k].prices.gram.flops
        return dict(sorted(chosen.items()))

    def sample_bytes(self) -> SampleBytes:
        size = itemsize(self.problem.out_dtype)
        o = math.prod(self.out_shape)
        kept = self._factors(self.problem, self._one_sample()).nbytes() if self.gram_params else 0
        work = self._workspace_elements() * size
        fb = sum(self.problem.params.diff_leaves[k].numel() for k in self.fallback) * o * size
        return SampleBytes(o * self.slots.width * size, kept, backward_transient(self.problem) + work + fb)

    def _unordered_views(self) -> dict[int, str]:
        """Covered parameters consumed through a view whose rows cannot be formed in the parameter's order."""
        moved = {}
        for k, (e, role) in self.cap.covered.items():
            vm = self.cap.events[e].views.get(role)
            if vm is None or vm.trivial:
                continue
            if not vm.covers:
                moved[k] = f"rows: the view ({vm.describe()}) selects part of the parameter"
                continue
            try:
                self._use_structure(self.problem, self._one_sample(), e, role, k)
            except views.ViewError as err:
                moved[k] = f"rows: {err}"
        return moved

    def _use_structure(self, pb: Problem, sd: structured.Side, e: int, role: str, k: int) -> Structure:
        """The structure of ``∂y/∂θ`` of one use with θ's letters in θ's row-major order (as its slot)."""
        ev = self.cap.events[e]
        vm = ev.views.get(role)
        if vm is None or vm.trivial or k in self.cap.tied:  # the cached form is already in θ's order
            return structured.event_structure(pb, sd, e, role)
        theta = tuple(pb.params.diff_leaves[k].shape)
        return views.use_structure(ev.rule, role, sd.operands[e], ev.meta, ev.y_shape, vm, True, theta)

    def _one_sample(self) -> structured.Side:
        """The capture on the problem's first sample (prices and sizes are read from it), computed once."""
        if self._one is None:
            with transform_friendly_attention():
                self._one = structured.side(self.problem, self.cap, 1, 0, 1)
        return self._one

    def _workspace_elements(self) -> int:
        """Elements per sample of the rules' work buffers (each buffer as large as its largest use)."""
        need: dict[str, int] = {}
        for k in self.slots.leaves:
            if k not in self.cap.covered:
                continue
            e, role = self.cap.covered[k]
            ev = self.cap.events[e]
            vm = ev.views.get(role)
            if vm is not None and not vm.trivial:
                continue  # formed by the einsum composed with its view
            for name, n in ev.rule.gradient_workspace(role, ev.meta, ev.y_shape).items():
                need[name] = max(need.get(name, 0), n)
        return sum(need.values())

    def compute(self, x: list[Any], out: torch.Tensor, chunk: int) -> Factors | None:
        axes = self.problem.x_axes or []
        parts: list[Factors] = []
        b = block_size(x, axes)
        for s, e, xc in chunks(x, axes, b, chunk):
            way = self._way(e - s)
            self._form(way, xc, out[s:e], parts)
            if way == WARM and e == b and self._explore(e - s):
                for again in (RULES, VMAP) * EXPLORE_ROUNDS:  # timed on this last chunk now: the next call takes the faster
                    self._form(again, xc, out[s:e], None)
        return Factors.cat(parts) if parts else None

    def _form(self, way: str, xc: list[Any], out: torch.Tensor, parts: list[Factors] | None) -> None:
        """Chunk ``xc``'s rows into ``out`` by ``way``, its seconds per sample kept in the table (the least of the
        times measured); the Gram-route factors appended to ``parts`` (unless None)."""
        g = out.shape[0]
        t0 = clock(out.device)
        if way == VMAP:
            pieces = self._jacobian_rows().pieces(xc)
            t1 = clock(out.device)
            torch.cat(pieces, dim=-1, out=out)
            if not self.rows_wanted:  # the caller keeps vmap's own results (:meth:`vmap_pieces`): the copy is not its cost
                t0 += clock(out.device) - t1
        else:
            pb = dataclasses.replace(self.problem, x1_leaves=xc, x2_leaves=None, n1=g, n2=g)
            with transform_friendly_attention():
                sd = structured.side(pb, self.cap, 1, 0, g)
            self._write(pb, sd, out)
            if self.gram_params and parts is not None:
                parts.append(self._factors(pb, sd))
            del sd
        table = self.buffers.seconds[("rows", g)]
        table[way] = min(table.get(way, math.inf), (clock(out.device) - t0) / g)

    def vmap_pieces(self, x: list[Any], g: int) -> list[torch.Tensor] | None:
        """Per slotted parameter ``(g, *out, numel)`` by ``vmap(jacrev)`` where that is the way chosen for chunks of
        ``g`` samples (:meth:`_way`; views of its results, no copy into a row buffer), else None."""
        if self.gram_params or self._way(g) != VMAP:
            return None
        t0 = clock(self.problem.device)
        pieces = self._jacobian_rows().pieces(x)
        table = self.buffers.seconds[("rows", g)]
        table[VMAP] = min(table[VMAP], (clock(self.problem.device) - t0) / g)
        return pieces

    def _way(self, g: int) -> str:
        """How a chunk of ``g`` samples is formed: by the rules, or by ``vmap(jacrev(f))`` (implementation 1's rows).

        Measured per chunk size, in :attr:`buffers`' table (``("rows", g)``, seconds per sample): the
        rules form the first chunk (:data:`WARM`: their own warm-up), the second (timed) and, where
        every parameter has a slot, the chunk's rows are estimated at most :data:`EXPLORE_FLOPS` and
        ``vmap(jacrev)`` needs no more transient memory per sample (the chunks were sized for the
        rules), ``vmap(jacrev)`` the third (timed); every later chunk is formed by the faster of the two
        (the least time measured per sample). Where the warm-up chunk is
        the call's last (``jacobian_fn`` on a batch that fits: one chunk), :meth:`compute` forms it
        again by both ways, alternating, :data:`EXPLORE_ROUNDS` times each, so that the second call
        with these shapes already takes the faster. Both give the same rows: on small models the
        rules' batched pass costs about what ``vmap(jacrev)`` costs whole, on large ones a fraction.
        """
        table = self.buffers.seconds.setdefault(("rows", g), {})
        if WARM not in table:
            return WARM
        if VMAP not in table and not self._vmap_allowed(g):
            table[VMAP] = math.inf
        for way in (RULES, VMAP):
            if way not in table:
                return way
        return self.measured_way(self.buffers.seconds, g) or RULES

    @staticmethod
    def measured_way(seconds: dict[Any, dict[str, float]], g: int) -> str | None:
        """The way :meth:`_way` takes for chunks of ``g`` samples once both were measured (``seconds``: a table of
        :attr:`buffers`), else None."""
        table = seconds.get(("rows", g), {})
        if RULES not in table or VMAP not in table:
            return None
        return VMAP if table[VMAP] < table[RULES] else RULES

    def _explore(self, g: int) -> bool:
        """Whether both ways are timed right after the rules' warm-up on the last chunk of a call (see :meth:`_way`)."""
        table = self.buffers.seconds[("rows", g)]
        if RULES in table or VMAP in table:
            return False
        if not self._vmap_allowed(g):
            table[VMAP] = math.inf
            return False
        return True

    def _vmap_allowed(self, g: int) -> bool:
        """Whether ``vmap(jacrev)`` may form chunks of ``g`` samples: every parameter has a slot, the chunk's rows are
        estimated at most :data:`EXPLORE_FLOPS`, and its transient memory fits: no more per sample than the rules'
        (for which the chunks were sized) or, where the caller gave :attr:`chunk_budget`, a chunk of ``g`` within it."""
        if self.gram_params or self.flops().row * g > EXPLORE_FLOPS:
            return False
        own = self._jacobian_rows().sample_bytes()
        if own.transient <= self.sample_bytes().transient:
            return True
        return self.chunk_budget is not None and chunk_size(self.chunk_budget, own, cap=g) >= g

    def _jacobian_rows(self) -> JacobianRows:
        if self._vmap is None:
            self._vmap = JacobianRows(self.problem)
        return self._vmap

    def _write(self, pb: Problem, sd: structured.Side, rows: torch.Tensor) -> None:
        """Every slotted parameter's per-sample gradient into its slot of ``rows`` ``(g, *out, width)``."""
        for k in self.slots.leaves:
            self.write(pb, sd, k, rows[..., self.slots.slot(k)])

    def write(self, pb: Problem, sd: structured.Side, k: int, view: torch.Tensor) -> None:
        """Parameter ``k``'s per-sample gradient (C order) into ``view`` ``(g, *out, numel)``, from the side pass ``sd``.

        ``pb`` is the problem of the side's ``g`` samples. Any parameter (slotted or not): the
        sketches of :mod:`ntkfunc._engines.sketch` form one parameter at a time into their own buffers.
        """
        if k in self.cap.fallback:
            view.copy_(sd.fb_jac[0][self.fallback.index(k)].reshape(view.shape))
            return
        uses = self.cap.tied.get(k) or [self.cap.covered[k]]
        if len(uses) == 1 and self._fast(sd, *uses[0], view):
            return
        for i, (e, role) in enumerate(uses):  # a tied parameter: the sum of its uses
            st = self._use_structure(pb, sd, e, role, k)
            jac = plan.jacobian_equation(self.layout, True, st, sd.cot[0][e]).run(self.limit).reshape(view.shape)
            jac = jac * st.scale if st.scale != 1.0 else jac
            view.copy_(jac) if i == 0 else view.add_(jac)

    def _fast(self, sd: structured.Side, e: int, role: str, view: torch.Tensor) -> bool:
        """The rule's own per-sample gradient (:meth:`~ntkfunc.rules.Rule.write_gradient`), for a parameter consumed
        as it is (no view); False where the rule declines."""
        ev = self.cap.events[e]
        vm = ev.views.get(role)
        if vm is not None and not vm.trivial:
            return False
        out = view.view(view.shape[0], math.prod(self.out_shape), view.shape[-1])
        return ev.rule.write_gradient(role, sd.operands[e], sd.cot[0][e], ev.meta, ev.y_shape, out, self.buffers)

    def _factors(self, pb: Problem, sd: structured.Side, params: dict[int, tuple[int, str]] | None = None) -> Factors:
        terms = []
        for _k, (e, role) in (self.gram_params if params is None else params).items():
            st = structured.event_structure(pb, sd, e, role)
            terms.append((_packed(st), sd.cot[0][e]))
        return Factors(terms)

    def flops(self) -> Flops:
        if self._flops is None:
            product = pair_flops(self.problem, self.out_shape, self.slots.width)
            self._flops = Flops(row_flops(self.problem, self.out_shape), product, self.gram_flops)
        return self._flops

    def gram(self, f1: Factors, f2: Factors) -> torch.Tensor | None:
        total: torch.Tensor | None = None
        for (s1, c1), (s2, c2) in zip(f1.terms, f2.terms):
            part = routes.contract(plan.gram_equation(self.layout, True, s1, s2, c1, c2), self.limit, self.buffers.seconds)
            scale = s1.scale * s2.scale
            part = part if scale == 1.0 else part * scale
            total = part if total is None else total + part
        return total


def _packed(st: Structure) -> Structure:
    """``st`` with each operand contiguous and its parameter letters last (Gram contractions become GEMMs)."""
    ops = []
    for letters, t in st.operands:
        order = [i for i, ch in enumerate(letters) if ch not in st.theta] + [i for i, ch in enumerate(letters) if ch in st.theta]
        ops.append(("".join(letters[i] for i in order), t.permute([0] + [1 + i for i in order]).contiguous()))
    return dataclasses.replace(st, operands=ops)


def jacobian_rows(problem: Problem, n1: int, n2: int, budget: int) -> RowSource:
    """Implementation 1's :data:`RowsFactory`."""
    return JacobianRows(problem)


def structured_rows(problem: Problem, n1: int, n2: int, budget: int) -> RowSource:
    """Implementations 3 and ``"auto"``: rule-formed rows, Gram route where it is priced cheaper."""
    return StructuredRows(problem, n1, n2, budget)


def per_sample_gradients(problem: Problem, x: list[Any], out: torch.Tensor | None = None, chunk: int | None = None) -> torch.Tensor:
    """Per-sample gradients of every differentiated parameter for the samples ``x``: ``(b, *out, P)``.

    ``problem``: a probed one-sample problem (:func:`ntkfunc._core.problem.make_problem`, batch
    axis 0); ``x``: the input leaves of the block (batch axes as ``problem.x_axes``); ``out``: a
    buffer to fill (allocated if None); ``chunk``: samples per batched pass (default: all).
    Parameters in the documented order (module docstring), rows formed by the rules
    (:class:`StructuredRows` without the Gram route).
    """
    source = StructuredRows(problem, routes="rows")
    axes = problem.x_axes or []
    b = block_size(x, axes)
    if out is None:
        out = torch.empty((b, *source.out_shape, source.slots.width), dtype=problem.out_dtype, device=problem.device)
    source.compute(x, out, chunk or b)
    return out
