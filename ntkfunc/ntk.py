"""``ntk_fn``: the empirical neural tangent kernel of ``f(params, x)``.

Semantics follow ``neural_tangents.empirical_ntk_fn``: check the arguments, ask the
engine registry (:mod:`ntkfunc._engines`) for the implementation, and shape the result.
"""

from __future__ import annotations

from ntkfunc._core.cache import KernelCache
from ntkfunc._core.checks import as_axes_tuple, check_bool, explained_f_errors, refuse_batch_coupled, split_vmap_axes
from ntkfunc._core.finite import NonFinite, check_kernels, check_mode
from ntkfunc._core.ops import kernel_context
from ntkfunc._core.problem import make_problem
from ntkfunc._core.types import ApplyFn, Axes, KernelFn, MemoryBudget, PyTree, VMapAxes
from ntkfunc._engines import Implementation, compute, get_engine, refuse_param_vmap, refuse_per_param


def ntk_fn(
    f: ApplyFn,
    trace_axes: Axes = (-1,),
    diagonal_axes: Axes = (),
    vmap_axes: VMapAxes = 0,
    implementation: int | str | Implementation = Implementation.AUTO,
    *,
    memory_budget: MemoryBudget = None,
    per_param: bool = False,
    nonfinite: NonFinite = "raise",
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
      implementation: ``"auto"`` (the default), 1 Jacobian contraction, 2 NTK-vector products,
        3 structured derivatives (per-primitive rules of ``ntkfunc.rules``; see ``Implementation``
        and ``ntkfunc.explain``). ``"auto"`` takes, per parameter, the cheaper of a rule and
        Jacobian contraction, and is implementation 1 outright (without probing ``f``'s
        primitives) when no rule pays; the kernel is the same up to float rounding.
        **Unlike neural-tangents**, whose default is 1 (``NtkImplementation.JACOBIAN_CONTRACTION``):
        pass ``implementation=1`` for its exact code path. Every implementation may be called
        from several threads at once (implementation 2's forward-mode sections, whose AD levels
        torch keeps per process, take turns on one lock).
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
      nonfinite: ``"raise"`` (default: a ``FloatingPointError`` naming the x1 and x2 samples whose
        kernel entries are NaN or infinite), ``"warn"`` (a ``RuntimeWarning``, the kernel is
        returned) or ``"ignore"`` (no check), as ``kernel_matrix``.

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
    api = "ntk_fn"
    engine = get_engine(implementation, api=api)
    if check_bool(per_param, "per_param", api):
        refuse_per_param(engine, api)
    trace_axes, diagonal_axes = as_axes_tuple(trace_axes), as_axes_tuple(diagonal_axes)
    split_vmap_axes(vmap_axes, api)
    check_mode(nonfinite, api)
    refuse_batch_coupled(f, vmap_axes, api)
    cache = KernelCache()

    def kernel(x1: PyTree, x2: PyTree | None, params: PyTree) -> PyTree:
        refuse_param_vmap(engine, params, api)
        with kernel_context(x1, x2, params), explained_f_errors(api, params, {"x1": x1, "x2": x2}, vmap_axes):
            problem = make_problem(f, x1, x2, params, vmap_axes, trace_axes, diagonal_axes, cache, api=api)
            result = compute(problem, engine, memory_budget, per_param)
        check_kernels(result, problem.layouts, nonfinite, api, problem.params.diff_names if per_param else None)
        return result

    split = ", split by parameter" if per_param else ""
    name = engine.name if engine.implementation == Implementation.AUTO else int(engine.implementation)
    kernel.__doc__ = f"Empirical NTK of {getattr(f, '__name__', 'f')} (implementation {name}{split}): kernel(x1, x2, params)."
    return kernel

