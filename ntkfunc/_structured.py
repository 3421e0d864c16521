"""Implementation 3: structured derivatives (Novak et al. 2022), with per-primitive rules.

``Θ = Σ_θ Σ_{k: y_k consumes θ} (∂f₁/∂y_k)(∂y_k/∂θ)(∂y_k/∂θ)ᵀ(∂f₂/∂y_k)ᵀ``. For each tile of
samples:

1. :mod:`ntkfunc._capture` finds the primitives that consume parameters (once per call).
2. One ``vmap(jacrev(h))`` per block of samples, with respect to zero probes added to
   the primitives' outputs (and to the fallback parameters, if any), gives the
   cotangents ``c_k = ∂f/∂y_k`` for every output component (O VJPs per sample, never
   P) and, as auxiliary outputs, the operands each rule needs.
3. Each covered parameter's rule (:mod:`ntkfunc.rules`) describes ``∂y/∂θ`` as an
   einsum; its kernel contribution is a single ``opt_einsum`` contraction of
   ``c₁``, the x1 operands, ``c₂`` and the x2 operands, with the output-axis letters of
   :class:`ntkfunc._tree.Layout` (traced axes summed, diagonal axes shared), so
   opt_einsum contracts traced axes early and chooses between forming ``∂f/∂θ`` and
   Gram paths (``(c₁c₂ᵀ) ⊙ (x₁x₂ᵀ)``), whichever costs fewer FLOPs. Paths are cached per
   equation and shapes.
4. Fallback parameters (no rule, used through a view, tied, ...) are contracted from
   their Jacobians exactly as in implementation 1.

Memory: sample blocks are sized so that the cotangents (``b x O x Σ numel(y_k)``), the
operands and the fallback Jacobians fit the budget, and tiled with ``_blocks.tiles``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional, Sequence

import opt_einsum
import torch
from torch.func import jacrev, vmap

from ntkfunc import _capture
from ntkfunc._blocks import Accumulator, tiles
from ntkfunc._jacobian import per_sample_activation_bytes
from ntkfunc._problem import Problem
from ntkfunc._tree import Layout
from ntkfunc.rules import Structure

_SAFETY = 0.7


@dataclasses.dataclass
class Side:
    """What one block of samples contributes: cotangents, operands, fallback Jacobians."""

    cot: list[list[torch.Tensor]]  # [out leaf][event]: (b, *out_sample, *y)
    operands: list[list[Optional[torch.Tensor]]]  # [event]: batch-first operands
    fb_jac: list[list[torch.Tensor]]  # [out leaf][fallback param]: (b, *out_sample, *param)
    cap: _capture.Capture
    structures: dict[tuple[int, str], Structure] = dataclasses.field(default_factory=dict)
    jacobians: dict[tuple[int, str, int], torch.Tensor] = dataclasses.field(default_factory=dict)


def side(problem: Problem, cap: _capture.Capture, which: int, start: int, stop: int) -> Side:
    """Cotangents at every event's output and the rules' operands for samples ``start:stop``."""
    leaves = problem.params.diff_leaves
    fb_idx = sorted(cap.fallback)
    fb = [leaves[k] for k in fb_idx]
    deltas = [torch.zeros(e.y_shape, dtype=e.y_dtype, device=problem.device) for e in cap.events]
    x = problem.x_block(which, start, stop)
    fn = problem.sample_fn(fb_idx) if problem.vmapped else problem.batch_fn(fb_idx)
    slots: list = []
    h = _capture.probed(problem, cap, fn, slots)
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
    return Side(cot, _capture.unpack(aux, slots[-1]), fb_jac, cap)


@functools.lru_cache(maxsize=4096)
def _expression(eq: str, shapes: tuple[tuple[int, ...], ...], memory_limit: Optional[int]) -> Any:
    return opt_einsum.contract_expression(eq, *shapes, memory_limit=memory_limit)


class _Symbols:
    def __init__(self, start: int) -> None:
        self.next = start

    def new(self) -> str:
        s = opt_einsum.get_symbol(self.next)
        self.next += 1
        return s


def equation(lay: Layout, vmapped: bool, s1: Structure, s2: Structure, c1: torch.Tensor, c2: torch.Tensor) -> tuple[str, list[torch.Tensor]]:
    """The einsum of one parameter's kernel contribution: two samples' factors sharing θ's letters.

    ``c1``/``c2``: cotangents ``(b, *out_sample, *y)`` (``(*out, *y)`` when not vmapped).
    """
    lhs1, lhs2, out = lay.operand_subscripts(0)
    if sorted(s1.theta) != sorted(s2.theta):
        raise RuntimeError(f"rule structures disagree on parameter axes: {s1.theta!r} vs {s2.theta!r}")
    sym = _Symbols(2 * lay.ndim)
    theta = {ch: sym.new() for ch in s1.theta}
    terms: list[str] = []
    tensors: list[torch.Tensor] = []
    for s, c, lhs in ((s1, c1, lhs1), (s2, c2, lhs2)):
        local = dict(theta)
        for ch in s.y + "".join(sub for sub, _ in s.operands):
            if ch not in local:
                local[ch] = sym.new()
        if not vmapped:  # the whole batch is one unit: a size-1 sample axis with its own letter
            c, lhs = c.unsqueeze(0), sym.new() + lhs
        batch = lhs[0]
        terms.append(lhs + "".join(local[ch] for ch in s.y))
        tensors.append(c.reshape(*c.shape[: len(lhs)], *s.y_shape))
        for sub, t in s.operands:
            letters = "".join(local[ch] for ch in sub)
            if t.shape[0] == 1 and c.shape[0] != 1:
                t = t.squeeze(0)  # shared by all samples
            else:
                letters = batch + letters
            terms.append(letters)
            tensors.append(t if t.dtype == c.dtype else t.to(c.dtype))
    return ",".join(terms) + "->" + out, tensors


def presum(eq: str, tensors: Sequence[torch.Tensor]) -> tuple[str, list[torch.Tensor]]:
    """Sum out axes that only one operand has (opt_einsum contracts pairs and would carry them)."""
    lhs, out = eq.split("->")
    terms = lhs.split(",")
    result_terms, result = [], []
    for i, (term, t) in enumerate(zip(terms, tensors)):
        others = set(out).union(*[set(u) for j, u in enumerate(terms) if j != i])
        alone = [d for d, ch in enumerate(term) if ch not in others]
        if alone:
            t = t.sum(alone)
            term = "".join(ch for ch in term if ch in others)
        result_terms.append(term)
        result.append(t)
    return ",".join(result_terms) + "->" + out, result


def contract(eq: str, tensors: Sequence[torch.Tensor], memory_limit: Optional[int]) -> torch.Tensor:
    """``opt_einsum`` contraction with a path cached per equation and shapes."""
    eq, tensors = presum(eq, tensors)
    expr = _expression(eq, tuple(tuple(t.shape) for t in tensors), memory_limit)
    return expr(*tensors, backend="torch")


def _event_structure(sd: Side, e: int, role: str) -> Structure:
    key = (e, role)
    if key not in sd.structures:
        ev = sd.cap.events[e]
        sd.structures[key] = ev.rule.structure(role, sd.operands[e], ev.meta, ev.y_shape)
    return sd.structures[key]


def jacobian_equation(lay: Layout, vmapped: bool, s: Structure, c: torch.Tensor) -> tuple[str, list[torch.Tensor]]:
    """The einsum forming one side's ``∂f/∂θ = c ∂y/∂θ``: ``(b, *out_sample, *θ)`` (``(*out, *θ)`` unvmapped)."""
    lhs, _, _ = lay.operand_subscripts(0)
    sym = _Symbols(2 * lay.ndim)
    local = {ch: sym.new() for ch in s.theta}
    for ch in s.y + "".join(sub for sub, _ in s.operands):
        if ch not in local:
            local[ch] = sym.new()
    out = lhs + "".join(local[ch] for ch in s.theta)
    lhs_c = lhs if vmapped else sym.new() + lhs
    if not vmapped:
        c = c.unsqueeze(0)
    terms = [lhs_c + "".join(local[ch] for ch in s.y)]
    tensors = [c.reshape(*c.shape[: len(lhs_c)], *s.y_shape)]
    for sub, t in s.operands:
        letters = "".join(local[ch] for ch in sub)
        if t.shape[0] == 1 and c.shape[0] != 1:
            t = t.squeeze(0)
        else:
            letters = lhs_c[0] + letters
        terms.append(letters)
        tensors.append(t if t.dtype == c.dtype else t.to(c.dtype))
    return ",".join(terms) + "->" + out, tensors


@functools.lru_cache(maxsize=4096)
def _cost(eq: str, shapes: tuple[tuple[int, ...], ...]) -> int:
    return int(opt_einsum.contract_path(eq, *shapes, shapes=True)[1].opt_cost)


def _shapes(tensors: Sequence[torch.Tensor]) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(t.shape) for t in tensors)


def _out_shape(eq: str, tensors: Sequence[torch.Tensor]) -> tuple[int, ...]:
    lhs, out = eq.split("->")
    sizes = {ch: d for term, t in zip(lhs.split(","), tensors) for ch, d in zip(term, t.shape)}
    return tuple(sizes[ch] for ch in out)


def _side_jacobian(sd: Side, e: int, role: str, leaf: int, lay: Layout, vmapped: bool, memory_limit: Optional[int]) -> torch.Tensor:
    key = (e, role, leaf)
    if key not in sd.jacobians:
        eq, tensors = jacobian_equation(lay, vmapped, _event_structure(sd, e, role), sd.cot[leaf][e])
        # contiguous: the einsum leaves the parameter axes transposed, which makes J₁ J₂ᵀ several times slower
        sd.jacobians[key] = contract(eq, tensors, memory_limit).contiguous()
    return sd.jacobians[key]


@dataclasses.dataclass
class Route:
    """How one covered parameter's block is contracted, with opt_einsum's FLOP estimates."""

    use_gram: bool
    gram_flops: int
    jacobian_flops: int
    eq: str
    tensors: list[torch.Tensor]

    @property
    def flops(self) -> int:
        return self.gram_flops if self.use_gram else self.jacobian_flops


def route(problem: Problem, leaf: int, e: int, role: str, s1: Side, s2: Side) -> Route:
    """The cheaper of one Gram-style contraction of both sides' factors, or ``J₁ J₂ᵀ``.

    Both are exact. The Jacobian route forms each side's ``∂f/∂θ`` from the rule (kept for
    the other tiles of the row, so it is not counted again) and contracts them as
    implementation 1 does.
    """
    lay = problem.layouts[leaf]
    st1, st2 = _event_structure(s1, e, role), _event_structure(s2, e, role)
    c1, c2 = s1.cot[leaf][e], s2.cot[leaf][e]
    eq, tensors = equation(lay, problem.vmapped, st1, st2, c1, c2)
    gram = _cost(*_presum_shapes(eq, tensors))
    if st1.theta != st2.theta:
        return Route(True, gram, gram, eq, tensors)
    jac = 0
    j_shapes = []
    for i, (sd, st, c) in enumerate(((s1, st1, c1), (s2, st2, c2))):
        jeq, jt = jacobian_equation(lay, problem.vmapped, st, c)
        j_shapes.append(_out_shape(jeq, jt))
        if (e, role, leaf) not in sd.jacobians and not (i == 1 and s1 is s2):
            jac += _cost(*_presum_shapes(jeq, jt))
    lhs1, lhs2, out = lay.operand_subscripts(len(st1.theta))
    jac += _cost(f"{lhs1},{lhs2}->{out}", tuple(j_shapes))
    return Route(gram <= jac, gram, jac, eq, tensors)


def _presum_shapes(eq: str, tensors: Sequence[torch.Tensor]) -> tuple[str, tuple[tuple[int, ...], ...]]:
    """``presum``'s equation and shapes without computing anything."""
    lhs, out = eq.split("->")
    terms = lhs.split(",")
    new_terms, shapes = [], []
    for i, (term, t) in enumerate(zip(terms, tensors)):
        others = set(out).union(*[set(u) for j, u in enumerate(terms) if j != i])
        new_terms.append("".join(ch for ch in term if ch in others))
        shapes.append(tuple(d for ch, d in zip(term, t.shape) if ch in others))
    return ",".join(new_terms) + "->" + out, tuple(shapes)


def param_block(problem: Problem, leaf: int, e: int, role: str, s1: Side, s2: Side, memory_limit: Optional[int]) -> torch.Tensor:
    """One covered parameter's kernel block (not divided by the trace size)."""
    lay = problem.layouts[leaf]
    r = route(problem, leaf, e, role, s1, s2)
    if r.use_gram:
        part = contract(r.eq, r.tensors, memory_limit)
    else:
        j1 = _side_jacobian(s1, e, role, leaf, lay, problem.vmapped, memory_limit)
        j2 = _side_jacobian(s2, e, role, leaf, lay, problem.vmapped, memory_limit)
        part = lay.contract(j1, j2, j1.ndim - len(lay.operand_subscripts(0)[0]))
    scale = _event_structure(s1, e, role).scale * _event_structure(s2, e, role).scale
    return part if scale == 1.0 else part * scale


def tile_kernel(problem: Problem, cap: _capture.Capture, s1: Side, s2: Side, memory_limit: Optional[int]) -> list[list[Optional[torch.Tensor]]]:
    """Per output leaf, per differentiated parameter: its kernel block for one tile.

    Not divided by the trace size; ``None`` for a parameter the output does not use.
    """
    leaves = problem.params.diff_leaves
    fb_idx = sorted(cap.fallback)
    blocks = []
    for leaf, lay in enumerate(problem.layouts):
        parts: list[Optional[torch.Tensor]] = [None] * len(leaves)
        for k, (e, role) in sorted(cap.covered.items()):
            parts[k] = param_block(problem, leaf, e, role, s1, s2, memory_limit)
        for j, k in enumerate(fb_idx):
            parts[k] = lay.contract(s1.fb_jac[leaf][j], s2.fb_jac[leaf][j], leaves[k].ndim)
        assert any(p is not None for p in parts)
        blocks.append(parts)
    return blocks


def block_size(problem: Problem, cap: _capture.Capture, budget: int, itemsize: int) -> int:
    """Samples per block so that both blocks' cotangents, operands and fallback Jacobians fit."""
    if not problem.vmapped:
        return 1
    o = max(sum(math.prod(s) for s in problem.sample_out_shapes(w)) for w in (1, 2))
    ys = sum(math.prod(e.y_shape) for e in cap.events)
    kvol = sum(math.prod(e.meta.get("kernel", (1,))) * math.prod(e.y_shape) for e in cap.events)
    fb = sum(problem.params.diff_leaves[k].numel() for k in cap.fallback)
    per_sample = itemsize * (o * (ys + fb) + 2 * kvol)
    n_max = max(problem.n1, problem.n2)
    usable = budget * _SAFETY
    n_all = problem.n1 + (0 if problem.symmetric else problem.n2)
    if n_all * per_sample <= 0.1 * usable:
        return n_max
    transient = (2 * o + 1) * per_sample_activation_bytes(problem)
    return max(1, min(n_max, int(usable // (2 * per_sample + transient))))


def kernel(problem: Problem, budget: int, per_param: bool = False, moved: Optional[dict[int, str]] = None) -> list:
    """Implementation 3 (see the module docstring): the kernel per output leaf.

    With ``per_param=True``: per output leaf, a list over the differentiated parameters
    (each parameter's term of the same sum, so no extra work). ``moved`` (parameter index
    -> reason) sends covered parameters to the reverse-mode Jacobian fallback.
    """
    cap = _capture.restrict(_capture.discover(problem), moved or {})
    cap2 = cap if problem.vmapped or problem.symmetric else _capture.restrict(_capture.discover(problem, 2), moved or {})
    itemsize = torch.empty((), dtype=problem.out_dtype).element_size()
    b = block_size(problem, cap, budget, itemsize)
    # opt_einsum's cap on intermediates (elements), a power of two so that cached paths are reused
    memory_limit = 1 << max(16, int(budget * _SAFETY / 4 // itemsize).bit_length() - 1)
    n_params = len(problem.params.diff_leaves)
    accs = [Accumulator(problem) for _ in range(n_params if per_param else 1)]
    current: Optional[tuple[int, Side]] = None
    for tile in tiles(problem, b, b):
        if current is None or current[0] != tile.i0:
            current = (tile.i0, side(problem, cap, 1, tile.i0, tile.i1))
        s1 = current[1]
        s2 = s1 if problem.symmetric and tile.on_diagonal else side(problem, cap2, 2, tile.j0, tile.j1)
        for leaf, parts in enumerate(tile_kernel(problem, cap, s1, s2, memory_limit)):
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


__all__ = ["kernel", "route", "side", "tile_kernel"]
