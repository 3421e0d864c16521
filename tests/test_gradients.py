"""Kernels are differentiable: autograd and torch.func.grad against central finite differences.

Every reference here is a float64 central difference of the kernel itself along a random
direction in (x1, x2, params) jointly; torch's own higher-order AD is never trusted
(its second-order rules for fused layer_norm / batch_norm are wrong in torch 2.13).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree

import ntkfunc
from ntkfunc.api import available_implementations
from tests.zoo import CASES, Case, _module_case

_H = 1e-5
_TOL = 1e-6


class BatchNormEvalNet(nn.Module):
    """Conv + BatchNorm2d in eval mode (non-trivial running statistics) + InstanceNorm + RMSNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.inorm = nn.InstanceNorm2d(3, affine=True)
        self.head = nn.Linear(3, 4)
        self.rms = nn.RMSNorm(4)
        self.out = nn.Linear(4, 2)
        with torch.no_grad():
            self.bn.running_mean.copy_(torch.tensor([0.3, -0.2, 0.1]))
            self.bn.running_var.copy_(torch.tensor([0.5, 2.0, 1.5]))
            self.bn.weight.copy_(torch.tensor([1.2, 0.7, -0.9]))
            self.inorm.weight.copy_(torch.tensor([0.8, 1.1, 1.3]))

    def forward(self, x):
        h = torch.tanh(self.bn(self.conv(x)))
        h = self.inorm(h).mean(dim=(2, 3))
        return self.out(torch.tanh(self.rms(self.head(h))))


EXTRA = [Case("batchnorm_eval_instancenorm_rmsnorm", _module_case(lambda: BatchNormEvalNet().eval(), lambda n, dt: torch.randn(n, 2, 4, 4).to(dt)), 2)]
ALL_CASES = CASES + EXTRA


def _floating(t):
    return isinstance(t, torch.Tensor) and t.is_floating_point()


def _directions(tree, gen):
    return pytree.tree_map(lambda t: torch.randn(t.shape, dtype=t.dtype, generator=gen) if _floating(t) else None, tree)


def _shift(tree, direction, h):
    return pytree.tree_map(lambda t, d: t + h * d if d is not None else t, tree, direction,
                           is_leaf=lambda x: x is None)


def _dot(grads, direction):
    total = torch.zeros((), dtype=torch.float64)
    for g, d in zip(pytree.tree_leaves(grads), [d for d in pytree.tree_leaves(direction, is_leaf=lambda x: x is None) if d is not None]):
        total = total + (g * d).sum()
    return total


def _loss_fn(kernel, weights_seed=3):
    cache = {}

    def loss(x1, x2, params):
        k = pytree.tree_leaves(kernel(x1, x2, params))
        if "w" not in cache:
            gen = torch.Generator().manual_seed(weights_seed)
            cache["w"] = [torch.randn(t.shape, dtype=t.dtype, generator=gen) for t in k]
        return sum((t * w).sum() for t, w in zip(k, cache["w"]))

    return loss


def _check(loss, x1, x2, params, gen):
    """autograd.grad and torch.func.grad of ``loss`` vs a central difference along a random direction."""
    d1, d2, dp = _directions(x1, gen), (None if x2 is None else _directions(x2, gen)), _directions(params, gen)
    fd = (loss(_shift(x1, d1, _H), None if x2 is None else _shift(x2, d2, _H), _shift(params, dp, _H))
          - loss(_shift(x1, d1, -_H), None if x2 is None else _shift(x2, d2, -_H), _shift(params, dp, -_H))) / (2 * _H)

    # the floating leaves as one flat list of arguments
    trees = [x1, x2, params]
    flat = [pytree.tree_flatten(t) if t is not None else ([], None) for t in trees]
    positions = [(i, j) for i, (leaves, _) in enumerate(flat) for j, leaf in enumerate(leaves) if _floating(leaf)]
    dirs = [pytree.tree_leaves(d, is_leaf=lambda x: x is None) if d is not None else [] for d in (d1, d2, dp)]
    dvec = [dirs[i][j] for i, j in positions]

    def rebuild(args):
        leaves = [list(lv) for lv, _ in flat]
        for (i, j), a in zip(positions, args):
            leaves[i][j] = a
        return [None if spec is None else pytree.tree_unflatten(lv, spec) for lv, (_, spec) in zip(leaves, flat)]

    args = [flat[i][0][j].detach().clone().requires_grad_(True) for i, j in positions]
    value = loss(*rebuild(args))
    grads = torch.autograd.grad(value, args, allow_unused=True)
    ad = sum(((g if g is not None else torch.zeros_like(d)) * d).sum() for g, d in zip(grads, dvec))
    assert abs(ad - fd) <= _TOL * max(abs(fd), 1.0), f"autograd {ad.item()} vs finite difference {fd.item()}"

    fgrads = torch.func.grad(lambda *a: loss(*rebuild(a)), argnums=tuple(range(len(args))))(*[a.detach() for a in args])
    fad = sum((g * d).sum() for g, d in zip(fgrads, dvec))
    assert abs(fad - fd) <= _TOL * max(abs(fd), 1.0), f"torch.func.grad {fad.item()} vs finite difference {fd.item()}"


def _setting(case):
    return ((), ()) if case.out_ndim == 2 else ((1,), ())


@pytest.mark.parametrize("impl", available_implementations())
@pytest.mark.parametrize("case", ALL_CASES, ids=str)
def test_ntk_gradients_match_finite_differences(case, impl):
    f, params, x1, x2, vmap_axes = case.build(torch.float64)
    tr, dg = _setting(case)
    kernel = ntkfunc.ntk_fn(f, trace_axes=tr, diagonal_axes=dg, vmap_axes=vmap_axes, implementation=impl)
    _check(_loss_fn(kernel), x1, x2, params, torch.Generator().manual_seed(0))


@pytest.mark.parametrize("impl", available_implementations())
@pytest.mark.parametrize("name", ["layernorm_mlp", "attention_matmul", "batchnorm_train_vmap_none"])
def test_symmetric_ntk_gradients_match_finite_differences(name, impl):
    case = next(c for c in CASES if c.name == name)
    f, params, x1, _, vmap_axes = case.build(torch.float64)
    budget = {"layernorm_mlp": 20_000, "attention_matmul": 300_000}.get(name)  # small: tiles are mirrored
    kernel = ntkfunc.ntk_fn(f, trace_axes=(), vmap_axes=vmap_axes, implementation=impl, memory_budget=budget)
    _check(_loss_fn(kernel), x1, None, params, torch.Generator().manual_seed(1))


@pytest.mark.parametrize("case", ALL_CASES, ids=str)
def test_nngp_gradients_match_finite_differences(case):
    f, params, x1, x2, vmap_axes = case.build(torch.float64)
    tr, dg = _setting(case)
    kernel = ntkfunc.nngp_fn(f, trace_axes=tr, diagonal_axes=dg, vmap_axes=vmap_axes)
    _check(_loss_fn(kernel), x1, x2, params, torch.Generator().manual_seed(2))


@pytest.mark.parametrize("name", ["layernorm_mlp", "resblock_groupnorm"])
def test_per_parameter_kernels_gradients_match_finite_differences(name):
    from ntkfunc import _jacobian
    from ntkfunc._memory import parse_budget
    from ntkfunc._problem import make_problem
    from ntkfunc.api import kernel_context

    case = next(c for c in CASES if c.name == name)
    f, params, x1, x2, vmap_axes = case.build(torch.float64)

    def per_param(x1, x2, params):
        with kernel_context(x1, x2, params):
            problem = make_problem(f, x1, x2, params, vmap_axes, (-1,), ())
            per = _jacobian.kernel(problem, parse_budget(None, problem.device), per_param=True)[0]
        return [k / problem.layouts[0].trace_size(problem.out_shapes1[0]) for k in per]

    _check(_loss_fn(per_param), x1, x2, params, torch.Generator().manual_seed(4))


def test_fused_layer_norm_second_order_is_wrong_without_decomposition():
    """Documents why ``exact_higher_order`` exists: if this starts failing, torch fixed its rules."""
    case = next(c for c in CASES if c.name == "layernorm_mlp")
    f, params, x1, x2, _ = case.build(torch.float64)
    from ntkfunc._problem import make_problem
    from ntkfunc import _jacobian

    def raw_kernel(x1, x2, params):  # the core without the decomposition
        problem = make_problem(f, x1, x2, params, 0, (), ())
        return problem.finish(_jacobian.kernel(problem, 10**9))

    loss = _loss_fn(raw_kernel)
    gen = torch.Generator().manual_seed(0)
    dp = _directions(params, gen)
    fd = (loss(x1, x2, _shift(params, dp, _H)) - loss(x1, x2, _shift(params, dp, -_H))) / (2 * _H)
    args = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    grads = torch.autograd.grad(loss(x1, x2, args), list(args.values()), allow_unused=True)
    ad = sum((g * dp[k]).sum() for g, k in zip(grads, args) if g is not None)
    assert abs(ad - fd) > 1e-3 * abs(fd)
