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
from tests.zoo import CASES, Case, _module_case, implementations

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


@pytest.mark.parametrize("impl", implementations())
@pytest.mark.parametrize("case", ALL_CASES, ids=str)
def test_ntk_gradients_match_finite_differences(case, impl):
    f, params, x1, x2, vmap_axes = case.build(torch.float64)
    tr, dg = _setting(case)
    kernel = ntkfunc.ntk_fn(f, trace_axes=tr, diagonal_axes=dg, vmap_axes=vmap_axes, implementation=impl)
    _check(_loss_fn(kernel), x1, x2, params, torch.Generator().manual_seed(0))


@pytest.mark.parametrize("impl", implementations())
@pytest.mark.parametrize("name", ["layernorm_mlp", "attention_matmul", "batchnorm_train_vmap_none"])
def test_symmetric_ntk_gradients_match_finite_differences(name, impl):
    case = next(c for c in CASES if c.name == name)
    f, params, x1, _, vmap_axes = case.build(torch.float64)
    budget = {"layernorm_mlp": 20_000}.get(name)  # small: several tiles, some mirrored
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
    from ntkfunc._core.memory import parse_budget
    from ntkfunc._core.ops import kernel_context
    from ntkfunc._core.problem import make_problem
    from ntkfunc._engines import jacobian as _jacobian

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
    from ntkfunc._core.problem import make_problem
    from ntkfunc._engines import jacobian as _jacobian

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


@pytest.mark.parametrize("impl", implementations())
def test_kernel_fn_gradients_match_finite_differences(impl):
    case = next(c for c in CASES if c.name == "layernorm_mlp")
    f, params, x1, x2, vmap_axes = case.build(torch.float64)
    k = ntkfunc.kernel_fn(f, trace_axes=(), implementation=impl)
    _check(_loss_fn(lambda a, b, p: tuple(k(a, b, ("ntk", "nngp"), p))), x1, x2, params, torch.Generator().manual_seed(5))


def test_monte_carlo_kernel_gradients_in_inputs_match_finite_differences():
    def init(gen):
        return {"w": torch.randn(4, 8, generator=gen, dtype=torch.float64), "v": torch.randn(8, 2, generator=gen, dtype=torch.float64)}

    f = lambda p, x: torch.nn.functional.layer_norm(torch.tanh(x @ p["w"]), (8,)) @ p["v"]  # noqa: E731
    mc = ntkfunc.monte_carlo_kernel_fn(f, init, 3, get=("ntk", "nngp"), batch_size=2)
    x1, x2 = torch.randn(3, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    _check(_loss_fn(lambda a, b, p: tuple(mc(a, b))), x1, x2, {"unused": torch.zeros(1, dtype=torch.float64)},
           torch.Generator().manual_seed(6))


def test_decomposition_is_used_exactly_when_a_derivative_of_the_kernel_can_be_taken():
    from ntkfunc._core.ops import needs_higher_order

    x = torch.randn(3, 2)
    seen = {}

    def probe(name):
        def fn(t):
            seen[name] = needs_higher_order(t)
            return t.sum()
        return fn

    torch.func.vmap(probe("vmap"))(x)
    torch.func.vmap(lambda t: torch.func.vmap(probe("vmap(vmap)"))(t))(torch.randn(2, 3, 2))
    torch.func.grad(probe("grad"))(x)
    torch.func.vmap(torch.func.grad(probe("vmap(grad)")))(x)
    torch.func.grad(lambda t: torch.func.vmap(probe("grad(vmap)"))(t).sum())(x)
    torch.func.jvp(probe("jvp"), (x,), (x,))
    seen["plain"] = needs_higher_order(x)
    seen["requires_grad"] = needs_higher_order({"a": [x.clone().requires_grad_()]})
    with torch.no_grad():
        seen["no_grad"] = needs_higher_order(x.clone().requires_grad_())
    assert seen == {"vmap": False, "vmap(vmap)": False, "grad": True, "vmap(grad)": True, "grad(vmap)": True,
                    "jvp": True, "plain": False, "requires_grad": True, "no_grad": False}
