"""``ntk_fn``: the empirical neural tangent kernel of ``f(params, x)``.

Semantics follow ``neural_tangents.empirical_ntk_fn``; implementations are looked
up in a table so that each lives in its own module.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

from ntkfunc import _jacobian, _structured, _vp
from ntkfunc._memory import parse_budget
from ntkfunc._ops import transform_friendly_attention
from ntkfunc._problem import Problem, make_problem
from ntkfunc._tree import as_axes_tuple
from ntkfunc._typing import ApplyFn, Axes, Implementation, KernelFn, MemoryBudget, PyTree, VMapAxes

ImplFn = Callable[[Problem, int], list]

_IMPLS: dict[int, ImplFn] = {
    Implementation.JACOBIAN_CONTRACTION: _jacobian.kernel,
    Implementation.NTK_VECTOR_PRODUCTS: _vp.kernel,
    Implementation.STRUCTURED_DERIVATIVES: _structured.kernel,
}


def register_implementation(implementation: int, fn: ImplFn) -> None:
    """Add an implementation to the table (used by optional modules; refuses duplicates)."""
    if implementation in _IMPLS:
        raise KeyError(f"implementation {implementation} is already registered")
    _IMPLS[int(implementation)] = fn


def available_implementations() -> list[int]:
    """The implementations ``ntk_fn`` accepts, in increasing order."""
    return sorted(int(k) for k in _IMPLS)


def _check_implementation(implementation: Union[int, Implementation]) -> int:
    if isinstance(implementation, bool) or implementation not in _IMPLS:
        raise ValueError(
            f"ntk_fn: implementation={implementation!r}; expected one of {sorted(int(k) for k in _IMPLS)} "
            f"({', '.join(Implementation(k).name for k in sorted(_IMPLS))})"
        )
    return int(implementation)


def ntk_fn(
    f: ApplyFn,
    trace_axes: Axes = (-1,),
    diagonal_axes: Axes = (),
    vmap_axes: VMapAxes = 0,
    implementation: Union[int, Implementation] = Implementation.JACOBIAN_CONTRACTION,
    *,
    memory_budget: MemoryBudget = None,
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
    """
    impl = _check_implementation(implementation)
    trace_axes, diagonal_axes = as_axes_tuple(trace_axes), as_axes_tuple(diagonal_axes)
    _refuse_batch_coupled(f, vmap_axes)

    def kernel(x1: PyTree, x2: Optional[PyTree], params: PyTree) -> PyTree:
        with transform_friendly_attention():
            problem = make_problem(f, x1, x2, params, vmap_axes, trace_axes, diagonal_axes)
            budget = parse_budget(memory_budget, problem.device)
            return problem.finish(_IMPLS[impl](problem, budget))

    kernel.__doc__ = f"Empirical NTK of {getattr(f, '__name__', 'f')} (implementation {impl}): kernel(x1, x2, params)."
    return kernel


def _refuse_batch_coupled(f: ApplyFn, vmap_axes: VMapAxes) -> None:
    reason = getattr(f, "__ntkfunc_batch_coupled__", None)
    if reason and vmap_axes is not None:
        raise ValueError(
            f"ntk_fn(vmap_axes={vmap_axes!r}): {reason}, so its output for one sample depends on the "
            "rest of the batch and a per-sample kernel would be wrong; pass vmap_axes=None (exact kernel "
            "of the whole batch) or call model.eval() before from_module"
        )
