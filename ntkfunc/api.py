"""``ntk_fn``: the empirical neural tangent kernel of ``f(params, x)``.

Semantics follow ``neural_tangents.empirical_ntk_fn``; implementations are looked
up in a table so that each lives in its own module.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Callable, Iterator, Optional, Union

import torch
from torch.utils import _pytree as pytree

from ntkfunc import _auto, _jacobian, _structured, _vp
from ntkfunc._memory import parse_budget
from ntkfunc._ops import exact_higher_order, needs_higher_order, transform_friendly_attention
from ntkfunc._problem import Problem, make_problem
from ntkfunc._tree import as_axes_tuple, tree_unflatten
from ntkfunc._typing import ApplyFn, Axes, Implementation, KernelFn, MemoryBudget, PyTree, VMapAxes

ImplFn = Callable[..., list]
"""``fn(problem, budget_bytes) -> [kernel per output leaf]``; an implementation that can
split the kernel by parameter also accepts ``per_param=True`` and then returns, per
output leaf, a list over the differentiated parameter leaves (see :func:`supports_per_param`)."""

_IMPLS: dict[int, ImplFn] = {
    Implementation.JACOBIAN_CONTRACTION: _jacobian.kernel,
    Implementation.NTK_VECTOR_PRODUCTS: _vp.kernel,
    Implementation.STRUCTURED_DERIVATIVES: _structured.kernel,
    Implementation.AUTO: _auto.kernel,
}


_NO_ENSEMBLE_VMAP: set[int] = set()
"""Implementations that cannot run under ``torch.func.vmap`` over the parameters."""


def register_implementation(implementation: int, fn: ImplFn, *, supports_param_vmap: bool = True) -> None:
    """Add an implementation to the table (used by optional modules; refuses duplicates).

    ``supports_param_vmap=False`` makes kernels of this implementation refuse, with a clear
    error, to run under ``torch.func.vmap`` over ``params`` (an ensemble axis).
    """
    if implementation in _IMPLS:
        raise KeyError(f"implementation {implementation} is already registered")
    _IMPLS[int(implementation)] = fn
    if not supports_param_vmap:
        _NO_ENSEMBLE_VMAP.add(int(implementation))


def supports_param_vmap(implementation: int) -> bool:
    """Whether kernels of ``implementation`` work under ``torch.func.vmap`` over ``params``."""
    return int(implementation) not in _NO_ENSEMBLE_VMAP


def _refuse_param_vmap(implementation: int, params: PyTree) -> None:
    if supports_param_vmap(implementation):
        return
    if any(isinstance(t, torch.Tensor) and torch._C._functorch.is_batchedtensor(t) for t in pytree.tree_leaves(params)):
        raise NotImplementedError(
            f"ntk_fn(implementation={implementation}) does not support torch.func.vmap over params (an ensemble "
            f"axis); expected one of implementations {[i for i in available_implementations() if supports_param_vmap(i)]} "
            "for vmapped params, or a Python loop over the ensemble"
        )


def available_implementations() -> list[int]:
    """The implementations ``ntk_fn`` accepts, in increasing order."""
    return sorted(int(k) for k in _IMPLS)


def supports_per_param(implementation: int) -> bool:
    """Whether implementation ``implementation`` accepts ``per_param=True``."""
    return "per_param" in inspect.signature(_IMPLS[implementation]).parameters


def _check_implementation(implementation: Union[int, str, Implementation]) -> int:
    if isinstance(implementation, str) and implementation.lower() == "auto":
        implementation = Implementation.AUTO
    if isinstance(implementation, bool) or isinstance(implementation, str) or implementation not in _IMPLS:
        raise ValueError(
            f"ntk_fn: implementation={implementation!r}; expected 'auto' or one of {sorted(int(k) for k in _IMPLS)} "
            f"({', '.join(Implementation(k).name for k in sorted(_IMPLS))})"
        )
    return int(implementation)


def ntk_fn(
    f: ApplyFn,
    trace_axes: Axes = (-1,),
    diagonal_axes: Axes = (),
    vmap_axes: VMapAxes = 0,
    implementation: Union[int, str, Implementation] = Implementation.JACOBIAN_CONTRACTION,
    *,
    memory_budget: MemoryBudget = None,
    per_param: bool = False,
) -> KernelFn:
    """Returns ``kernel(x1, x2, params)``, the empirical NTK ``Θ = J(x1) J(x2)ᵀ`` of ``f``.

    Args:
      f: ``f(params, x) -> outputs``, pure; ``params`` and ``x`` pytrees of tensors (integer
        inputs such as token ids work). ``f`` always receives inputs with their batch axis
        (of size 1 when samples are processed one by one).
      trace_axes: output axes whose pair is traced and *averaged* (trace / axis size).
      diagonal_axes: output axes of which only the diagonal is kept.
      vmap_axes: batch axis of inputs and outputs (int, or a pytree of ints matching ``x``,
        or ``(x_axes, fx_axes, {})``); ``None`` when samples interact (BatchNorm with batch
        statistics): the kernel is then computed on the whole batch at once.
      implementation: 1 Jacobian contraction, 2 NTK-vector products, 3 structured derivatives
        (per-primitive rules of ``ntkfunc.rules``; see ``Implementation`` and ``ntkfunc.explain``).
      memory_budget: bytes (or ``"2GB"``) the Jacobians may occupy; default 80% of free
        CUDA memory, or half of the available RAM on CPU. Work is tiled to fit.
      per_param: return the kernel split by parameter tensor (the "layerwise components"
        ``Θ_p = J_p(x1) J_p(x2)ᵀ``): a pytree with the structure of ``params`` holding, per
        floating-point parameter tensor, its kernel (same shape / output pytree as the full
        kernel), and ``None`` for non-floating leaves (integer constants have no derivative
        and contribute nothing). The components sum to the full kernel, and computing them
        costs one kernel evaluation (the per-parameter terms of the same sum are kept apart).
        Implementation 2 computes them by contracting its x2 cotangents with x1 Jacobians
        per parameter (implementation 1's path): splitting its JVPs by parameter would cost
        one JVP pass per parameter tensor instead. Use :func:`ntkfunc.group_kernels` to sum
        them per module.

    Shapes: outputs ``(N, d1, ..., dk)`` give ``(N1, N2)`` followed, for each output axis
    in order, by nothing (traced), ``d_i`` (diagonal) or ``(d_i, d_i)``. A pytree output gives
    the same pytree of kernels. dtype and device follow the outputs of ``f``.

    Example:
      >>> import torch, ntkfunc
      >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
      >>> f, params = ntkfunc.from_module(model)
      >>> x1, x2 = torch.randn(5, 4), torch.randn(2, 4)
      >>> ntkfunc.ntk_fn(f)(x1, x2, params).shape
      torch.Size([5, 2])
      >>> ntkfunc.ntk_fn(f, trace_axes=())(x1, None, params).shape
      torch.Size([5, 5, 3, 3])
      >>> ntkfunc.ntk_fn(f, trace_axes=(), diagonal_axes=(-1,), implementation=2)(x1, x2, params).shape
      torch.Size([5, 2, 3])
      >>> per = ntkfunc.ntk_fn(f, per_param=True)(x1, x2, params)
      >>> sorted(per), per["0.weight"].shape
      (['0.bias', '0.weight', '2.bias', '2.weight'], torch.Size([5, 2]))
      >>> bool(torch.allclose(sum(per.values()), ntkfunc.ntk_fn(f)(x1, x2, params), atol=1e-5))
      True
    """
    impl = _check_implementation(implementation)
    if not isinstance(per_param, bool):
        raise TypeError(f"ntk_fn(per_param={per_param!r}): expected True or False")
    if per_param and not supports_per_param(impl):
        raise NotImplementedError(
            f"ntk_fn(implementation={impl}, per_param=True): implementation {impl} cannot split the kernel "
            f"by parameter; expected one of {[k for k in available_implementations() if supports_per_param(k)]}"
        )
    trace_axes, diagonal_axes = as_axes_tuple(trace_axes), as_axes_tuple(diagonal_axes)
    _refuse_batch_coupled(f, vmap_axes)
    probe_cache: dict = {}

    def kernel(x1: PyTree, x2: Optional[PyTree], params: PyTree) -> PyTree:
        _refuse_param_vmap(impl, params)
        with kernel_context(x1, x2, params):
            problem = make_problem(f, x1, x2, params, vmap_axes, trace_axes, diagonal_axes, probe_cache)
            return compute(problem, impl, memory_budget, per_param)

    split = ", split by parameter" if per_param else ""
    kernel.__doc__ = f"Empirical NTK of {getattr(f, '__name__', 'f')} (implementation {impl}{split}): kernel(x1, x2, params)."
    return kernel


def _per_param_tree(problem: Problem, per_leaf: list) -> PyTree:
    """``[out leaf][diff param]`` kernels -> the params pytree of finished kernels (None: constants)."""
    leaves: list = [None] * len(problem.params.leaves)
    for k, pos in enumerate(problem.params.diff_index):
        leaves[pos] = problem.finish([per_leaf[leaf][k] for leaf in range(len(problem.layouts))])
    return tree_unflatten(leaves, problem.params.spec)


@contextlib.contextmanager
def kernel_context(*trees: PyTree) -> Iterator[None]:
    """The op routing every kernel is computed under.

    Attention always uses its math backend; normalisation ops are decomposed into
    elementary ops when the kernel may be differentiated again (a leaf of ``trees``
    requires grad or is wrapped by an outer ``torch.func`` transform), because torch's
    fused norms have wrong second-order derivatives. Otherwise the fused ops are kept.
    """
    with transform_friendly_attention(), exact_higher_order(needs_higher_order(trees)):
        yield


def compute(problem: Problem, implementation: int, memory_budget: MemoryBudget = None, per_param: bool = False) -> PyTree:
    """The NTK of a checked :class:`Problem` with a registered implementation (split by parameter if asked)."""
    budget = parse_budget(memory_budget, problem.device)
    if per_param:
        return _per_param_tree(problem, _IMPLS[implementation](problem, budget, per_param=True))
    return problem.finish(_IMPLS[implementation](problem, budget))


def _refuse_batch_coupled(f: ApplyFn, vmap_axes: VMapAxes) -> None:
    reason = getattr(f, "__ntkfunc_batch_coupled__", None)
    if reason and vmap_axes is not None:
        raise ValueError(
            f"ntk_fn(vmap_axes={vmap_axes!r}): {reason}, so its output for one sample depends on the "
            "rest of the batch and a per-sample kernel would be wrong; pass vmap_axes=None (exact kernel "
            "of the whole batch) or call model.eval() before from_module"
        )
