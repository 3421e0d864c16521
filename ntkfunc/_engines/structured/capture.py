"""Capture: find the primitives of ``f`` that consume parameters, and probe their outputs.

Mechanism: a :class:`torch.overrides.TorchFunctionMode`. It sees every torch function
``f`` calls (``F.linear``, ``torch.matmul``, ``Tensor.__matmul__``/``add``/``mul``,
``F.conv2d``, ``F.layer_norm``, ``F.embedding``, ...) with the very tensor objects ``f``
passes, before dispatch. That is why it stays correct under ``torch.func``: the mode
runs inside the ``vmap(jacrev(...))`` we apply, the parameters it looks for are *not*
transformed (we differentiate with respect to probes, not parameters), so they keep
their identity through ``functional_call`` and hand-written code alike, while the
inputs and activations it records are ordinary batched/grad-tracking tensors that the
transforms return as auxiliary outputs. An FX / ``make_fx`` graph would instead need
tracing ``f`` once per shape, loses Python-level structure (``F.linear`` becomes
``addmm`` on a transposed view) and does not compose with transforms applied around
``ntk_fn``; a ``TorchDispatchMode`` sits below autograd and would see decomposed ops.

Two passes:

1. :func:`discover` runs ``f`` once (one sample, plain autograd) with parameter
   copies that require grad. Every call with a registered rule that accepts it is an
   *event*; the mode calls the op with the parameters *detached*. Afterwards the
   gradient of the output with respect to each parameter copy must be None: any
   remaining path (an op without a rule, an op the mode cannot see) shows up there.
   Views of a parameter (``W.T``, ``cls_token.expand(n, -1, -1)``, ``gamma.reshape(...)``:
   :data:`~ntkfunc._engines.structured.views.VIEW_FUNCS`) are followed into the op that
   consumes them, and the rule is composed with the view
   (:mod:`~ntkfunc._engines.structured.views`). A parameter is *covered* when it reaches
   the output only through one event, and *tied* when it reaches it only through several
   (weight tying: every pair of uses is contracted, cross terms included); every other
   parameter falls back to Jacobian contraction (unknown ops, views that do not compose,
   uses that do not pair), so exactness never depends on coverage.
2. :class:`Injector` runs inside ``vmap(jacrev(h))``: at the k-th event it records
   the rule's operands (aux outputs) and returns ``y_k + δ_k`` with a zero probe
   ``δ_k``, so ``∂f/∂δ_k`` is the cotangent at ``y_k`` for every output component.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Container, Sequence
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from ntkfunc import rules
from ntkfunc._core.problem import Problem
from ntkfunc._engines.structured import views

_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def op_name(func: Any) -> str:
    """A readable name: ``linear``, ``TensorBase.matmul``, ``Tensor.T`` (attribute views)."""
    owner = getattr(func, "__self__", None)
    if getattr(func, "__name__", "") == "__get__" and owner is not None:
        return f"Tensor.{getattr(owner, '__name__', '?')}"
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)


@dataclasses.dataclass
class Event:
    """One captured primitive call: ``roles`` maps a rule role to a parameter index.

    ``meta``: the rule's settings of this call (its own dataclass, read only by the rule).
    ``views``: for the roles whose tensor is a view of the parameter, how it addresses it.
    """

    func: Any
    rule: rules.Rule
    roles: dict[str, int]
    meta: rules.Meta
    y_shape: tuple[int, ...]
    y_dtype: torch.dtype
    views: dict[str, views.ViewMap] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Capture:
    """Result of :func:`discover`.

    Attributes:
      events: events with at least one covered parameter (roles restricted to covered ones).
      covered: parameter index -> (event position, role), for parameters used by one event.
      fallback: parameter indices computed by Jacobian contraction, with a reason each.
      uses: parameter index -> names of the functions that consumed it (for ``explain``).
      tied: parameter index -> its ``(event position, role)`` uses, for parameters used by
        several events (or roles): their kernel sums every pair of uses.
      static: every event's rule declares ``static_meta`` (its ``meta`` depends on shapes and
        settings only, never on a tensor's values): the capture may then be reused for inputs
        of the same signature.
    """

    events: list[Event]
    covered: dict[int, tuple[int, str]]
    fallback: dict[int, str]
    uses: dict[int, list[str]]
    api: str = "ntk_fn"
    tied: dict[int, list[tuple[int, str]]] = dataclasses.field(default_factory=dict)
    static: bool = True

    @property
    def ruled(self) -> list[int]:
        """Indices of the parameters that get their kernel from rules (covered and tied)."""
        return sorted([*self.covered, *self.tied])


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]


def _expanded(mode: TorchFunctionMode, func: Any, args: tuple, kwargs: dict) -> Any:
    """Run the registered expansion of a fused op with ``mode`` active inside it, or NotImplemented."""
    fn = rules.expansion(func)
    if fn is None:
        return NotImplemented
    with mode:
        return fn(*args, **kwargs)


def _no_param(t: object) -> bool:
    return False


class _ParamMode(TorchFunctionMode):
    """Sees every torch function call; a call that consumes a parameter is matched against the rules once.

    Subclasses say what happens to a matched call (:meth:`matched`) and to any other call that
    touches a parameter (:meth:`unmatched`); expansions of fused ops run with the mode active.
    With ``follow_views``, the result of a view function (:func:`views.is_view_func`) of a
    parameter counts as that parameter (``ids`` maps it to the same index, ``chains`` holds
    the functions applied); whether it really is a view is checked where it is consumed.
    """

    ids: dict[int, int]  # id of a parameter, or of a followed view of one -> the parameter's index
    chains: dict[int, tuple[str, ...]]  # id of a followed view -> the view functions applied
    keep: list[torch.Tensor]  # the followed views (alive while the mode is)
    follow_views: bool = True

    def _is_param(self, t: object) -> bool:
        return isinstance(t, torch.Tensor) and id(t) in self.ids

    def _follow(self, func: Any, args: tuple, kwargs: dict) -> Any:
        """Run a view function of one parameter and track its result; NotImplemented for any other call."""
        if not (self.follow_views and views.is_view_func(func) and args and self._is_param(args[0])):
            return NotImplemented
        if any(self._is_param(t) for t in _tensors((args[1:], kwargs))):
            return NotImplemented
        out = func(*args, **kwargs)
        if isinstance(out, torch.Tensor) and out is not args[0]:
            self.ids[id(out)] = self.ids[id(args[0])]
            self.chains[id(out)] = self.chains.get(id(args[0]), ()) + (op_name(func),)
            self.keep.append(out)  # ids stay unique while the mode holds them
        return out

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        touched = [t for t in _tensors((args, kwargs)) if id(t) in self.ids]
        if not touched:
            return func(*args, **kwargs)
        out = _expanded(self, func, args, kwargs)  # first: an expansion may take over a view function (W[ids])
        if out is not NotImplemented:
            return out
        out = self._follow(func, args, kwargs)
        if out is not NotImplemented:
            return out
        rule = rules.lookup(func)
        bound = rule.bind(args, kwargs) if rule is not None else None
        roles = rule.match(bound, self._is_param) if rule is not None and bound is not None else None
        if rule is None or bound is None or roles is None:
            return self.unmatched(func, args, kwargs, touched)
        return self.matched(func, args, kwargs, rule, bound, roles)

    def matched(self, func: Any, args: tuple, kwargs: dict, rule: rules.Rule, bound: rules.Bound, roles: dict[str, torch.Tensor]) -> Any:
        raise NotImplementedError(f"Subclass {type(self).__name__} must define matched()")

    def unmatched(self, func: Any, args: tuple, kwargs: dict, touched: list[torch.Tensor]) -> Any:
        return func(*args, **kwargs)


class _Recorder(_ParamMode):
    """Discovery pass: records events and other uses; calls events with detached parameters."""

    def __init__(self, roots: Sequence[torch.Tensor], follow_views: bool) -> None:
        super().__init__()
        self.roots = list(roots)
        self.ids: dict[int, int] = {id(c): k for k, c in enumerate(roots)}
        self.follow_views = follow_views
        self.chains: dict[int, tuple[str, ...]] = {}
        self.keep: list[torch.Tensor] = []
        self.events: list[Event] = []
        self.calls: list[tuple[rules.Bound, set[int]]] = []  # per event: its bound arguments, ids of the detached roles
        self.uses: dict[int, list[str]] = {}
        self.plain: dict[int, list[str]] = {}
        self.bad_views: dict[int, str] = {}
        self.static = True

    def unmatched(self, func: Any, args: tuple, kwargs: dict, touched: list[torch.Tensor]) -> Any:
        out = func(*args, **kwargs)
        # metadata queries (.shape, .dtype) return no tensor; integer or boolean results (``W.diagonal().int()``,
        # ``W > 0``) carry no derivative (the autograd check below still sees any path they hide)
        if any(t.is_floating_point() or t.is_complex() for t in _tensors(out)):
            for t in touched:
                k = self.ids[id(t)]
                self.plain.setdefault(k, []).append(op_name(func))
                self.uses.setdefault(k, []).append(op_name(func))
        return out

    def matched(self, func: Any, args: tuple, kwargs: dict, rule: rules.Rule, bound: rules.Bound, roles: dict[str, torch.Tensor]) -> Any:
        ids = {id(t) for t in roles.values()}
        detached: dict[int, torch.Tensor] = {}

        def detach(t: Any) -> Any:
            if isinstance(t, torch.Tensor) and id(t) in ids:
                if id(t) not in detached:
                    detached[id(t)] = t.detach()
                return detached[id(t)]
            return t

        index = {r: self.ids[id(t)] for r, t in roles.items()}
        maps: dict[str, views.ViewMap] = {}
        for r, t in roles.items():
            if id(t) in self.chains:
                vm = views.ViewMap.of(t, self.roots[index[r]], self.chains[id(t)])
                if isinstance(vm, str):
                    self.bad_views.setdefault(index[r], f"consumed by {op_name(func)} through {' -> '.join(self.chains[id(t)])}: {vm}")
                else:
                    maps[r] = vm
        args, kwargs, bound = pytree.tree_map(detach, (args, kwargs, bound))
        _, meta = rule.capture(bound, _no_param)
        self.static = self.static and rule.static_meta
        y = func(*args, **kwargs)
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"rule {rule.name} matched {op_name(func)}, which returned a {type(y).__name__}; expected a tensor")
        for r, k in index.items():
            via = f" through {maps[r].describe()}" if r in maps else ""
            self.uses.setdefault(k, []).append(f"{op_name(func)} ({rule.name}){via}")
        self.events.append(Event(func, rule, index, meta, tuple(y.shape), y.dtype, maps))
        self.calls.append((bound, {id(t) for t in detached.values()}))
        return y

    def use_structures(self, k: int, uses: Sequence[tuple[int, str]]) -> list[rules.Structure] | str:
        """The composed structures of parameter ``k``'s uses on this sample, or why they cannot be formed."""
        out = []
        for e, role in uses:
            ev = self.events[e]
            bound, detached = self.calls[e]
            operands, _ = ev.rule.capture(bound, lambda t, ids=detached: isinstance(t, torch.Tensor) and id(t) in ids)  # type: ignore[misc]
            operands = [None if t is None else t.detach().unsqueeze(0) for t in operands]
            try:
                out.append(views.use_structure(ev.rule, role, operands, ev.meta, ev.y_shape, ev.views.get(role),
                                               len(uses) > 1, tuple(self.roots[k].shape)))
            except views.ViewError as err:
                return f"consumed by {op_name(ev.func)} ({ev.rule.name}): {err}"
        return out


def discover(problem: Problem, which: int = 1) -> Capture:
    """Run ``f`` on the first sample of x1 (``which=1``) or x2 and decide rule or fallback per parameter."""
    leaves = problem.params.diff_leaves
    # Under an outer transform (vmap over an ensemble of params) autograd cannot run here:
    # the mode alone, which also sees torch.ops calls, decides.
    check = not any(_is_wrapped(t) for t in leaves)
    copies = [t.detach().clone().requires_grad_(True) if check else t.clone() for t in leaves]
    if problem.vmapped:
        x = problem.x_block(which, 0, 1)
        x = [a if ax is None else a.squeeze(ax) for a, ax in zip(x, problem.x_axes)]  # type: ignore[arg-type]
        fn = problem.sample_fn()
    else:
        x, fn = problem.x_block(which, 0, problem.n1), problem.batch_fn()
    mode = _Recorder(copies, follow_views=check)  # strides of transformed tensors are not those of their storage
    grads: Sequence[torch.Tensor | None] = [None] * len(copies)
    with torch.enable_grad() if check else contextlib.nullcontext():
        with mode:
            outs = fn(copies, x)
        live = [o for o in outs if o.requires_grad] if check else []
        if live:
            grads = torch.autograd.grad(live, copies, [torch.ones_like(o) for o in live], allow_unused=True)
    uses_of = _uses(mode.events, {})
    fallback: dict[int, str] = {}
    for k in range(len(leaves)):
        if k in mode.plain:
            fallback[k] = f"consumed by {', '.join(sorted(set(mode.plain[k])))} (no rule, or a view of it)"
        elif grads[k] is not None:
            fallback[k] = "reaches the output through ops the capture cannot see"
        elif k in mode.bad_views:
            fallback[k] = mode.bad_views[k]
        elif k not in uses_of:
            fallback[k] = "not used"
        elif len(uses_of[k]) > 1 or any(r in mode.events[e].views for e, r in uses_of[k]):
            reason = _pairing_problem(mode, k, uses_of[k])
            if reason is not None:
                fallback[k] = reason
    return _assemble(mode.events, fallback, mode.uses, problem.api, mode.static)


def _pairing_problem(mode: _Recorder, k: int, uses: Sequence[tuple[int, str]]) -> str | None:
    """Why parameter ``k``'s uses (views, several primitives) cannot be contracted by their rules, or None."""
    structures = mode.use_structures(k, uses)
    if isinstance(structures, str):
        return structures
    reason = views.check_uses(structures)
    return None if reason is None else f"used by {len(uses)} primitives (weight tying), but {reason}"


def _uses(events: Sequence[Event], fallback: Container[int]) -> dict[int, list[tuple[int, str]]]:
    """Parameter index -> its ``(event position, role)`` uses, for parameters not in ``fallback``."""
    uses: dict[int, list[tuple[int, str]]] = {}
    for e, ev in enumerate(events):
        for r, k in ev.roles.items():
            if k not in fallback:
                uses.setdefault(k, []).append((e, r))
    return uses


def _assemble(all_events: Sequence[Event], fallback: dict[int, str], uses: dict[int, list[str]], api: str,
              static: bool = True) -> Capture:
    """A :class:`Capture` from the recorded events, with ``fallback`` parameters left out of them."""
    events: list[Event] = []
    for e in all_events:
        roles = {r: k for r, k in e.roles.items() if k not in fallback}
        if roles:
            events.append(dataclasses.replace(e, roles=roles, views={r: v for r, v in e.views.items() if r in roles}))
    by_param = _uses(events, fallback)
    covered = {k: us[0] for k, us in by_param.items() if len(us) == 1}
    tied = {k: us for k, us in by_param.items() if len(us) > 1}
    return Capture(events, covered, fallback, uses, api, tied=tied, static=static)


def restrict(capture: Capture, moved: dict[int, str]) -> Capture:
    """``capture`` with the parameters in ``moved`` (index -> reason) sent to the fallback.

    Their primitives are no longer probed (events left without a covered parameter are
    dropped), so the probing pass sees exactly the calls it expects.
    """
    if not moved:
        return capture
    return _assemble(capture.events, {**capture.fallback, **moved}, capture.uses, capture.api, capture.static)


class Injector(_ParamMode):
    """Inside ``f`` under transforms: records operands of event k and adds probe ``deltas[k]`` to its output.

    Calls that touch a covered parameter without matching a rule are metadata queries and run as they are.
    """

    def __init__(self, capture: Capture, covered: Sequence[torch.Tensor], deltas: Sequence[torch.Tensor]) -> None:
        super().__init__()
        self.capture = capture
        self.ids = {id(t): k for k, t in enumerate(covered)}
        self.chains: dict[int, tuple[str, ...]] = {}
        self.keep: list[torch.Tensor] = []
        self.deltas = deltas
        self.aux: list[list[torch.Tensor]] = []  # per event: its operands that are tensors
        self.slots: list[tuple[int, list[int]]] = []  # per event: (number of operands, positions of the tensors)

    def matched(self, func: Any, args: tuple, kwargs: dict, rule: rules.Rule, bound: rules.Bound, roles: dict[str, torch.Tensor]) -> Any:
        k = len(self.aux)
        events = self.capture.events
        api = self.capture.api
        if k >= len(events) or events[k].func is not func:
            raise RuntimeError(
                f"{api}(implementation=3): call {k} of a parameter-consuming op is {op_name(func)}, but the capture "
                f"pass saw {op_name(events[k].func) if k < len(events) else 'no more calls'}; expected f to call the "
                "same ops on every sample (data-dependent control flow); use implementation=1 or 2"
            )
        operands, _ = rule.capture(bound, self._is_param)
        y = rule.output(bound, operands)
        if y is None:
            y = func(*args, **kwargs)
        if tuple(y.shape) != events[k].y_shape:
            raise RuntimeError(
                f"{api}(implementation=3): {op_name(func)} returned shape {tuple(y.shape)} on this sample and "
                f"{events[k].y_shape} in the capture pass; expected the same shapes for every sample"
            )
        self.slots.append((len(operands), [i for i, t in enumerate(operands) if t is not None]))
        self.aux.append([t for t in operands if t is not None])
        return _add_probe(y, self.deltas[k], rule.fresh_output)


def _add_probe(y: torch.Tensor, delta: torch.Tensor, fresh: bool) -> torch.Tensor:
    """``y + delta``; in place where the rule says ``y`` is a fresh output its backward never reads (``fresh``: an op's
    result inside the transforms is wrapped at their innermost level, as ``delta`` is, even one of constants alone)."""
    return y.add_(delta) if fresh else y + delta


def probed(
    problem: Problem, capture: Capture, fn: Callable[..., list[torch.Tensor]], slots: list
) -> Callable[..., tuple[list[torch.Tensor], list]]:
    """``h(deltas, fallback_leaves, x) -> (outputs, aux)``: ``fn`` with probes added at every event.

    ``aux[k]`` holds event k's tensor operands; their positions are appended to ``slots``
    (a transform traces ``h`` once, so ``slots[-1]`` describes what it returned).
    """
    leaves = problem.params.diff_leaves
    covered = [leaves[k] for k in capture.ruled]

    def h(deltas: Sequence[torch.Tensor], fb: Sequence[torch.Tensor], x: Sequence[Any]) -> tuple[list[torch.Tensor], list]:
        mode = Injector(capture, covered, deltas)
        with mode:
            outs = fn(fb, x)
        if len(mode.aux) != len(capture.events):
            raise RuntimeError(
                f"{capture.api}(implementation=3): f made {len(mode.aux)} captured calls on this sample and "
                f"{len(capture.events)} in the capture pass; expected the same ops for every sample"
            )
        slots.append(mode.slots)
        return outs, mode.aux

    return h


def unpack(aux: Sequence[Sequence[torch.Tensor]], slots: Sequence[tuple[int, list[int]]]) -> list[list[torch.Tensor | None]]:
    """Per event, the rule's operands with None back where a parameter was."""
    result: list[list[torch.Tensor | None]] = []
    for tensors, (size, pos) in zip(aux, slots):
        ops: list[torch.Tensor | None] = [None] * size
        for i, t in zip(pos, tensors):
            ops[i] = t
        result.append(ops)
    return result
