"""Implementation 1: Jacobian contraction, planned under a memory budget.

``Θ(x1, x2) = Σ_p J_p(x1) J_p(x2)ᵀ`` where ``J_p`` is the per-sample Jacobian of the
outputs with respect to parameter tensor ``p`` (``vmap(jacrev(f))``). Each parameter's
contribution is one einsum whose subscripts come from the output layout (traced
axes are summed inside the contraction, diagonal axes kept once).

Memory: the whole Jacobian is ``N x O x P`` numbers. When it does not fit in the
budget the work is split into sample blocks (tiles of ``x1 x x2``, Jacobians of x2
blocks recomputed per x1 block) and, if even one sample's Jacobian is too large, into
groups of parameter tensors (one ``jacrev`` per group). Cost and peak memory are set
by :func:`plan`; with ``x2=None`` each tile's Jacobian is computed once and tiles
below the diagonal are mirrored.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
from torch.func import jacrev, vmap

from ntkfunc._core.memory import SAFETY, backward_transient, fmt_bytes, itemsize, outputs_per_sample
from ntkfunc._core.problem import Problem
from ntkfunc._core.tiles import Accumulator, tiles


@dataclasses.dataclass(frozen=True)
class Plan:
    groups: list[list[int]]  # indices into the differentiated parameter leaves
    block: int  # samples per block (x1 and x2)


def plan(problem: Problem, budget: int, n_kernels: int = 1) -> Plan:
    """Parameter groups and sample block size whose Jacobians fit ``budget`` bytes.

    Per sample, parameter ``p`` costs ``O * numel(p) * itemsize`` bytes of Jacobian, and
    computing it holds about ``2 O`` copies of the activations (the vmapped backward)
    plus temporaries the size of the largest parameter's Jacobian.
    One group (all parameters) is preferred: splitting parameters re-runs the backward
    pass per group, while smaller sample blocks only recompute x2's Jacobians.
    ``n_kernels`` kernels are held at the end (one per parameter with ``per_param``).
    """
    leaves = problem.params.diff_leaves
    size = itemsize(problem.out_dtype)
    sizes = jacobian_bytes(problem)
    total = sum(sizes)
    n_all = problem.n1 + (0 if problem.symmetric else problem.n2)
    n_max = max(problem.n1, problem.n2)
    kernel_bytes = n_kernels * sum(math.prod(s) for s in problem.kernel_shapes()) * size
    usable = max(budget * SAFETY - 2 * kernel_bytes, budget * 0.25)
    everything = list(range(len(leaves)))
    if not problem.vmapped:
        return Plan(pack_groups(sizes, usable / 2, problem) if 2 * total > usable else [everything], 1)
    if n_all * total <= 0.1 * usable:  # clearly fits: skip the activation estimate
        return Plan([everything], n_max)
    # While a block's Jacobian is built, backward temporaries about the size of the
    # largest parameter's Jacobian and ~2 O copies of the activations are alive.
    transient = problem.remember("backward_transient", lambda: backward_transient(problem)) + max(sizes)
    if n_all * total + n_max * transient <= usable:
        return Plan([everything], n_max)
    block = int(usable // (2 * total + transient))
    if block >= 1:
        return Plan([everything], min(block, n_max))
    groups = pack_groups(sizes, (usable - transient) / 2, problem)
    largest = max(sum(sizes[k] for k in g) for g in groups)
    block = max(1, int(usable // (2 * largest + transient)))
    return Plan(groups, min(block, n_max))


def jacobian_bytes(problem: Problem) -> list[int]:
    """Bytes of one sample's Jacobian with respect to each differentiated parameter leaf."""
    o, size = outputs_per_sample(problem), itemsize(problem.out_dtype)
    return [o * t.numel() * size for t in problem.params.diff_leaves]


def pack_groups(sizes: Sequence[int], capacity: float, problem: Problem) -> list[list[int]]:
    """Consecutive parameter leaves packed into groups of at most ``capacity`` bytes."""
    groups: list[list[int]] = [[]]
    used = 0.0
    for k, s in enumerate(sizes):
        if s > capacity:
            raise MemoryError(
                f"the Jacobian of {problem.params.diff_names[k]} alone needs {fmt_bytes(s)} per sample "
                f"(outputs x numel x itemsize) and the memory budget leaves {fmt_bytes(max(capacity, 0))} "
                "for it; raise memory_budget, or use implementation=2 (NTK-vector products), which never "
                "holds a parameter Jacobian per output"
            )
        if used + s > capacity and groups[-1]:
            groups.append([])
            used = 0.0
        groups[-1].append(k)
        used += s
    return groups


def jacobians(problem: Problem, group: Sequence[int], which: int, start: int, stop: int) -> list[list[torch.Tensor]]:
    """Batch-first Jacobians ``[out leaf][param in group]`` of shape ``(b, *out_sample, *param)``."""
    leaves = problem.params.diff_leaves
    args = [leaves[k] for k in group]
    x = problem.x_block(which, start, stop)
    if problem.vmapped:
        jac = vmap(jacrev(problem.sample_fn(group), argnums=0), in_dims=(None, problem.x_axes))
        return jac(args, x)
    return jacrev(problem.batch_fn(group), argnums=0)(args, x)


def summed_block(problem: Problem, leaf: int, ks: Sequence[int], a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    """The (not yet trace-normalised) kernel contribution of parameters ``ks`` together for output leaf ``leaf``, from
    their Jacobians ``a`` and ``b`` (one per parameter; ``b`` is ``a`` on the diagonal tile of ``x2=None``, whose
    upper sample blocks alone are contracted): their products accumulated into one result (``Layout.contract_sum``,
    ``contract_self_sum``) instead of one einsum per parameter and a sum, about 15 small ops fewer per parameter
    (``J Jᵀ`` of the attention setup of ``benchmarks/bench_vs_nt.py``: 9.3-9.7 -> 8.3-8.5 ms, one thread)."""
    lay, leaves = problem.layouts[leaf], problem.params.diff_leaves
    if all(x is y for x, y in zip(a, b)):
        return lay.contract_self_sum([(x, leaves[k].ndim) for x, k in zip(a, ks)])
    return lay.contract_sum([(x, y, leaves[k].ndim) for x, y, k in zip(a, b, ks)])


def contract(problem: Problem, j1: list[list[torch.Tensor]], j2: list[list[torch.Tensor]], group: Sequence[int]) -> list[list[torch.Tensor]]:
    """Per output leaf, per parameter of ``group``: its own kernel contribution (:func:`summed_block` of one)."""
    return [[summed_block(problem, leaf, [k], [a], [b]) for a, b, k in zip(j1[leaf], j2[leaf], group)]
            for leaf in range(len(problem.layouts))]


def contract_summed(problem: Problem, j1: list[list[torch.Tensor]], j2: list[list[torch.Tensor]], group: Sequence[int]) -> list[torch.Tensor]:
    """Per output leaf: the kernel contribution of the parameters of ``group`` together (:func:`summed_block`)."""
    return [summed_block(problem, leaf, group, j1[leaf], j2[leaf]) for leaf in range(len(problem.layouts))]


def kernel(problem: Problem, budget: int, per_param: bool = False) -> list:
    """The kernel per output leaf (a list), or per leaf a list over parameters if ``per_param``."""
    n_params = len(problem.params.diff_leaves)
    p = plan(problem, budget, n_params if per_param else 1)
    accs = [Accumulator(problem) for _ in range(n_params if per_param else 1)]
    for group in p.groups:
        for tile, j1, j2 in _tile_jacobians(problem, group, p.block):
            if not per_param:
                for leaf, summed in enumerate(contract_summed(problem, j1, j2, group)):
                    accs[0].add(leaf, tile, summed)
                continue
            for leaf, per in enumerate(contract(problem, j1, j2, group)):
                for k, c in zip(group, per):
                    accs[k].add(leaf, tile, c)
    if per_param:
        results = [acc.result() for acc in accs]
        return [[r[leaf] for r in results] for leaf in range(len(problem.layouts))]
    return accs[0].result()


def _tile_jacobians(problem: Problem, group: Sequence[int], block: int):
    """Yield ``(tile, J1, J2)``, computing each x1 block's Jacobian once per row of tiles."""
    current: tuple[int, list] | None = None
    for tile in tiles(problem, block, block):
        if current is None or current[0] != tile.i0:
            current = (tile.i0, jacobians(problem, group, 1, tile.i0, tile.i1))
        j1 = current[1]
        if problem.symmetric and tile.on_diagonal:
            j2 = j1
        else:
            j2 = jacobians(problem, group, 2, tile.j0, tile.j1)
        yield tile, j1, j2
