"""Implementation 2: NTK-vector products, ``Θ(x1, x2) v = J(x1) (J(x2)ᵀ v)``.

For a tile of samples, VJPs at ``x2`` turn every output cotangent (the columns of
the identity, one per output component of x2) into parameter cotangents; JVPs at
each ``x1`` sample push all of them forward at once (``vmap`` over tangents, primal
computation shared). The parameter axis is never contracted explicitly, which is
why this wins for models whose parameters are reused across many positions
(convolutions) when N is small. Cost ``N1 N2 O [FP]``.

Memory per tile: the x2 cotangents (``b2 x O x P``) plus, per x1 sample, the
activation tangents of ``b2 x O`` JVPs; tiles are sized by :func:`plan`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch.func import jvp, vjp, vmap

from ntkfunc._core.memory import SAFETY, fmt_bytes, itemsize, per_sample_activation_bytes
from ntkfunc._core.ops import load_forward_ad_decompositions
from ntkfunc._core.problem import Problem
from ntkfunc._core.tiles import Accumulator, tiles
from ntkfunc._engines import jacobian


def plan(problem: Problem, budget: int) -> tuple[int, int]:
    """Block sizes ``(b1, b2)`` for x1 and x2: ``b2 x cot + b1 x b2 x per_pair <= usable``."""
    leaves = problem.params.diff_leaves
    size = itemsize(problem.out_dtype)
    o1 = sum(math.prod(s) for s in problem.sample_out_shapes(1))
    o2 = sum(math.prod(s) for s in problem.sample_out_shapes(2))
    cot = o2 * sum(t.numel() for t in leaves) * size  # per x2 sample
    usable = budget * SAFETY
    if not problem.vmapped:
        return 1, 1
    b2 = int(usable / 2 // max(cot, 1))
    if b2 < 1:
        raise MemoryError(
            f"{problem.api}(implementation=2): one sample's parameter cotangents need {fmt_bytes(cot)} (outputs x parameters x itemsize) "
            f"and the memory budget allows {fmt_bytes(usable / 2)}; raise memory_budget"
        )
    # Under vmap over x1 samples, batching rules may broadcast the (x1-independent)
    # parameter tangents to every x1 sample: budget a copy of the x2 block's cotangents
    # per x1 sample, and balance b1 and b2 so that neither collapses to 1 needlessly.
    per_pair = o2 * (2 * per_sample_activation_bytes(problem) + o1 * size) + o2 * size + cot
    b2 = min(b2, problem.n2, max(1, math.isqrt(int(usable // max(per_pair, 1)))))
    b1 = int((usable - b2 * cot) // max(b2 * per_pair, 1))
    return max(1, min(b1, problem.n1)), b2


def jvp_by_double_vjp(fn, primals, tangents):
    """``jvp`` for functions with ops that lack forward-mode rules: transpose the (linear) VJP."""
    out, vjp_fn = vjp(fn, *primals)[:2]
    transpose = vjp(vjp_fn, torch.utils._pytree.tree_map(torch.zeros_like, out))[1]
    return out, transpose(tuple(tangents))[0]  # the cotangent of vjp_fn's output: one per primal


def kernel(problem: Problem, budget: int, per_param: bool = False) -> list:
    """The kernel per output leaf; with ``per_param``, per leaf a list over the parameters.

    Per-parameter components are not obtained from JVPs: a JVP pushes all parameters'
    tangents through one forward pass and only their sum comes out, so separating ``L``
    parameter tensors would take ``L`` JVP passes. Instead the x2 cotangents (which are
    the per-parameter x2 Jacobians) are contracted with the x1 Jacobians parameter by
    parameter, i.e. implementation 1's path, at the cost of one full kernel.
    """
    if per_param:
        return jacobian.kernel(problem, budget, per_param=True)
    load_forward_ad_decompositions()
    b1, b2 = plan(problem, budget)
    everything = list(range(len(problem.params.diff_leaves)))
    acc = Accumulator(problem)
    push: Callable[..., Any] = jvp
    for tile in tiles(problem, b1, b2):
        cot = jacobian.jacobians(problem, everything, 2, tile.j0, tile.j1)  # [out leaf][param]: (b2, *out2, *p)
        try:
            blocks = _tile(problem, tile.i0, tile.i1, cot, push)
        except NotImplementedError as err:  # an op without a forward-mode derivative
            if "forward AD" not in str(err) or push is jvp_by_double_vjp:
                raise
            push = jvp_by_double_vjp
            blocks = _tile(problem, tile.i0, tile.i1, cot, push)
        for leaf, block in enumerate(blocks):
            acc.add(leaf, tile, block)
    return acc.result()


def _tile(problem: Problem, i0: int, i1: int, cot: list[list[torch.Tensor]], push_forward=jvp) -> list[torch.Tensor]:
    """Kernel blocks per output leaf for x1 samples ``i0:i1`` against the x2 cotangents ``cot``."""
    leaves = problem.params.diff_leaves
    n_leaves = len(problem.layouts)
    shapes2 = [tuple(c[0].shape[: c[0].ndim - leaves[0].ndim]) for c in cot]  # (b2, *out2) per leaf
    # One batch of tangents: all output leaves' cotangents, flattened, concatenated.
    tangents = [
        torch.cat([cot[leaf][k].reshape(-1, *leaves[k].shape) for leaf in range(n_leaves)])
        for k in range(len(leaves))
    ]
    sizes = [math.prod(s) for s in shapes2]
    x1 = problem.x_block(1, i0, i1)

    if problem.vmapped:
        g = problem.sample_fn()

        def push(x: list) -> list[torch.Tensor]:
            return vmap(lambda t: push_forward(lambda p: g(p, x), (leaves,), (t,))[1])(tangents)

        outs = vmap(push, in_dims=(problem.x_axes,))(x1)  # per leaf: (b1, T, *out1)
    else:
        g = problem.batch_fn()
        outs = [o.unsqueeze(0) for o in vmap(lambda t: push_forward(lambda p: g(p, x1), (leaves,), (t,))[1])(tangents)]

    blocks = []
    offset = 0
    for leaf, lay in enumerate(problem.layouts):
        o = outs[leaf].narrow(1, offset, sizes[leaf])  # (b1, b2*O2, *out1) or (1, O2, *out1)
        offset += sizes[leaf]
        out1 = o.shape[2:]
        o = o.reshape(o.shape[0], *shapes2[leaf], *out1)  # (b1, b2, *out2, *out1)
        k2 = len(shapes2[leaf])
        perm = [0] + list(range(1 + k2, 1 + k2 + len(out1))) + list(range(1, 1 + k2))
        full = o.permute(perm)  # (b1, *out1, b2, *out2): batch-first on both sides
        if not problem.vmapped:
            full = full.squeeze(0)
        blocks.append(lay.reduce_full(full))
    return blocks
