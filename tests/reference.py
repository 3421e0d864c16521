"""An independent, obviously-correct float64 reference for empirical kernels.

No vmap, no per-sample tricks, no einsum subscripts: the whole batch goes through
``f`` at once, the Jacobian of every output entry with respect to the flattened
parameter vector comes from ``torch.autograd.functional.jacobian`` (one backward
pass per output entry), the full kernel is ``J1 @ J2.T``, and traces / diagonals
are taken one axis pair at a time with ``torch.diagonal``.
"""

from __future__ import annotations

import math

import torch
from torch.utils import _pytree as pytree


def flat_params(params):
    leaves, spec = pytree.tree_flatten(params)
    diff = [i for i, t in enumerate(leaves) if t.is_floating_point()]
    theta = torch.cat([leaves[i].detach().double().reshape(-1) for i in diff])

    def unflatten(vec):
        out, offset = list(leaves), 0
        for i in diff:
            n = leaves[i].numel()
            out[i] = vec[offset : offset + n].reshape(leaves[i].shape)
            offset += n
        return pytree.tree_unflatten(out, spec)

    return theta, unflatten


def full_jacobians(f, params, x):
    """Per output leaf: (output shape, Jacobian of shape (output numel, P))."""
    theta, unflatten = flat_params(params)
    outs = pytree.tree_leaves(f(unflatten(theta), x))
    result = []
    for k, o in enumerate(outs):
        def leaf_fn(vec, k=k):
            return pytree.tree_leaves(f(unflatten(vec), x))[k].reshape(-1)

        jac = torch.autograd.functional.jacobian(leaf_fn, theta)
        result.append((tuple(o.shape), jac))
    return result, pytree.tree_structure(f(unflatten(theta), x))


def trace_and_diagonal(full, ndim, trace_axes, diagonal_axes):
    """``full`` has shape ``(*s1, *s2)``; apply neural-tangents' trace / diagonal rule."""
    trace = sorted({a % ndim for a in trace_axes})
    diag = sorted({a % ndim for a in diagonal_axes})
    interleave = [p for i in range(ndim) for p in (i, ndim + i)]
    k = full.permute(interleave)  # (s1[0], s2[0], s1[1], s2[1], ...)
    size = 1
    for i in reversed(range(ndim)):
        if i in trace:
            size *= k.shape[2 * i]
            k = torch.diagonal(k, dim1=2 * i, dim2=2 * i + 1).sum(-1)
        elif i in diag:
            k = torch.diagonal(k, dim1=2 * i, dim2=2 * i + 1).movedim(-1, 2 * i)
    # Positions after processing: an untouched pair stays adjacent, in order.
    return k / size


def reference_kernel(f, params, x1, x2, trace_axes=(-1,), diagonal_axes=()):
    """The empirical NTK in float64 by the definition (the same pytree as ``f``'s output)."""
    j1, spec = full_jacobians(f, params, x1)
    j2 = j1 if x2 is None else full_jacobians(f, params, x2)[0]
    kernels = []
    for (s1, a), (s2, b) in zip(j1, j2):
        full = (a @ b.T).reshape(*s1, *s2)
        kernels.append(trace_and_diagonal(full, len(s1), trace_axes, diagonal_axes))
    return pytree.tree_unflatten(kernels, spec)


def reference_nngp(f, params, x1, x2, trace_axes=(-1,), diagonal_axes=()):
    """``f(x1) f(x2)ᵀ`` in float64 with the same output-axis rule."""
    o1 = pytree.tree_leaves(f(params, x1))
    o2 = o1 if x2 is None else pytree.tree_leaves(f(params, x2))
    spec = pytree.tree_structure(f(params, x1))
    kernels = []
    for a, b in zip(o1, o2):
        full = torch.einsum("i,j->ij", a.double().reshape(-1), b.double().reshape(-1)).reshape(*a.shape, *b.shape)
        kernels.append(trace_and_diagonal(full, a.ndim, trace_axes, diagonal_axes))
    return pytree.tree_unflatten(kernels, spec)


def max_rel_err(a, b):
    """max |a - b| / max |b| over all leaves (b the reference)."""
    la, lb = pytree.tree_leaves(a), pytree.tree_leaves(b)
    assert len(la) == len(lb)
    err = 0.0
    for x, y in zip(la, lb):
        assert tuple(x.shape) == tuple(y.shape), (x.shape, y.shape)
        scale = y.abs().max().item() or 1.0
        err = max(err, (x.double() - y.double()).abs().max().item() / scale)
    return err


def numel(shape):
    return math.prod(shape)
