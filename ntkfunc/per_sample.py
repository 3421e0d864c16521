"""``jacobian_fn``: per-sample Jacobians (and, of a loss, per-sample gradients) at the row engine's speed.

What ``torch.func.vmap(torch.func.jacrev(f_single))`` computes, BackPACK's ``BatchGrad``
(``p.grad_batch``) and Opacus' ``GradSampleModule`` (``p.grad_sample``) store, and ntkfunc's
``kernel_matrix`` keeps in its panels: ``∂f(x_n)/∂θ`` for every sample ``n``, output entry and
parameter. Check the arguments, ask the engine registry for the implementation's rows
(:mod:`ntkfunc._engines.rows.per_sample`), and shape them like ``params`` (or flat).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ntkfunc._core.cache import KernelCache
from ntkfunc._core.checks import check_bool, explained_f_errors, refuse_batch_coupled, split_vmap_axes
from ntkfunc._core.heap import settle_heap
from ntkfunc._core.memory import parse_budget
from ntkfunc._core.ops import exact_higher_order, keeps_graph, needs_higher_order
from ntkfunc._core.problem import Params, make_problem
from ntkfunc._core.pytree import tree_leaves, tree_unflatten
from ntkfunc._core.types import ApplyFn, MemoryBudget, PyTree, VMapAxes
from ntkfunc._engines import Implementation, get_engine, refuse_param_vmap, refuse_without_rows
from ntkfunc._engines.rows import per_sample

JacobianFn = Callable[..., PyTree]
"""``jac(x, params, *, out=None)``: per-sample Jacobians (see :func:`jacobian_fn`)."""


def jacobian_fn(f: ApplyFn, vmap_axes: VMapAxes = 0, *, implementation: None | int | str | Implementation = None,
                flat: bool = False, memory_budget: MemoryBudget = None) -> JacobianFn:
    """Returns ``jac(x, params, *, out=None)``: the Jacobian of ``f`` with respect to ``params``, per sample of ``x``.

    For ``f(params, x)`` with outputs ``(N, *out)``, ``jac(x, params)`` has the structure of ``params``;
    each floating leaf ``θ`` holds ``∂f(x_n)/∂θ`` as ``(N, *out, *θ.shape)`` (batch first, then the
    other output axes in order) and integer leaves hold ``None``. With ``flat=True`` it is one tensor
    ``(N, *out, P)``: the floating leaves in pytree-flatten order (``model.named_parameters()`` order
    for :func:`ntkfunc.from_module`), each flattened row-major, i.e.
    ``torch.cat([j.reshape(N, *out, -1) for j in leaves], -1)``. A pytree of outputs gives that
    pytree, each leaf holding its Jacobians (as ``torch.func.jacrev``: outputs outside, ``params``
    inside). The per-sample gradients of a loss are ``jacobian_fn`` of the per-sample loss
    (``(N,)`` outputs: ``(N, *θ.shape)`` per leaf, no reduction over samples).

    The same object elsewhere (see the README's table):

    - ``torch.func``: ``vmap(jacrev(f_single), in_dims=(None, 0))(params, x)``, ``f_single`` running one
      sample (``vmap(grad(loss_single))`` for a loss); ``jacobian_fn`` forms the gradients from one
      batched backward pass through the rules of ``ntkfunc.rules`` instead of asking torch for
      per-sample weight gradients, in chunks that fit ``memory_budget``;
    - BackPACK: ``p.grad_batch`` after ``with backpack(BatchGrad()): loss.backward()`` (a ``mean``
      loss scales it by ``1/N``);
    - Opacus: ``p.grad_sample`` of ``GradSampleModule(model)`` after ``loss.backward()``.

    Args:
      f: ``f(params, x) -> outputs`` as for :func:`ntkfunc.ntk_fn` (``f`` always receives inputs with
        their batch axis, of size 1 when samples are processed one by one).
      vmap_axes: the batch axis of inputs and outputs, as for ``ntk_fn`` (an int, a pytree of ints, or
        ``(x_axes, fx_axes, {})``); ``None`` when samples interact: the Jacobian of the whole batch
        as one unit, ``(*out, *θ.shape)`` (``(*out, P)`` flat), with ``out`` the whole output's shape.
      implementation: how the rows are formed: ``None``/``"auto"`` (the structured rules; ``vmap(jacrev)``
        where implementation 1's whole work costs less than probing ``f``), ``3`` (the rules) or ``1``
        (``vmap(jacrev)``); ``2`` has no per-sample gradients and is refused. The Jacobians are the
        same up to float rounding whichever is used.
      flat: one ``(N, *out, P)`` tensor instead of a pytree like ``params``.
      memory_budget: bytes (or ``"2GB"``) the gradient passes may hold on top of the result (which
        itself is ``N O P`` numbers): samples are processed in chunks that fit; default as ``ntk_fn``.
        The rules' work buffers (im2col patches, within that budget) are kept by ``jac`` for its next
        call with the same input shapes, and so are the ways it measured faster on its first call.

    ``jac(x, params, out=buf)`` writes the Jacobians into ``buf``, a contiguous tensor shaped like the
    ``flat=True`` result ``(N, *out, P)`` (same dtype and device), and returns views of it (the pytree
    like ``params``, or ``buf`` itself with ``flat=True``). Calling it again with the same ``buf`` (a
    training loop's per-sample gradients) writes the next batch over the last one: no new ``N O P``
    numbers are allocated. A new result of more than 32 MiB is a fresh ``mmap`` whose pages the
    kernel faults in and zeroes as the Jacobians are written, which on a wide model costs more than
    computing them (an MLP with 670k parameters, N=64: 4.8x; RESULTS.md section 15). ``out`` needs
    ``f`` to return one tensor with its batch axis first, and a result nothing will differentiate.

    Differentiable: when ``x`` or a parameter requires grad (or an outer ``torch.func`` transform
    wraps them, e.g. ``vmap`` over an ensemble of ``params``), the Jacobians come from ``vmap(jacrev)``
    and ``torch.autograd`` / ``torch.func`` differentiate through them (the row buffers, written in
    place, could not be).

    Example:
      >>> import torch, ntkfunc
      >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
      >>> f, params = ntkfunc.from_module(model)
      >>> x = torch.randn(5, 4)
      >>> jac = ntkfunc.jacobian_fn(f)(x, params)
      >>> {k: tuple(v.shape) for k, v in jac.items()}          # (N, O, *θ.shape)
      {'0.weight': (5, 3, 8, 4), '0.bias': (5, 3, 8), '2.weight': (5, 3, 3, 8), '2.bias': (5, 3, 3)}
      >>> ntkfunc.jacobian_fn(f, flat=True)(x, params).shape  # (N, O, P)
      torch.Size([5, 3, 67])
      >>> single = lambda p, xi: f(p, xi[None])[0]
      >>> ref = torch.func.vmap(torch.func.jacrev(single), in_dims=(None, 0))(params, x)
      >>> all(torch.allclose(jac[k], ref[k], atol=1e-6) for k in params)
      True
      >>> y = torch.tensor([0, 2, 1, 1, 0])
      >>> loss = lambda p, batch: torch.nn.functional.cross_entropy(f(p, batch[0]), batch[1], reduction="none")
      >>> grads = ntkfunc.jacobian_fn(loss)((x, y), params)    # per-sample gradients: (N, *θ.shape)
      >>> grads["2.weight"].shape
      torch.Size([5, 3, 8])
      >>> buf = torch.empty(5, 67)                              # reused from batch to batch: (N, P)
      >>> again = ntkfunc.jacobian_fn(loss)((x, y), params, out=buf)
      >>> again["2.weight"].untyped_storage().data_ptr() == buf.data_ptr()    # a view of buf
      True
      >>> bool(torch.allclose(again["2.weight"], grads["2.weight"], atol=1e-6))
      True
    """
    api = "jacobian_fn"
    engine = get_engine("auto" if implementation is None else implementation, api=api)
    refuse_without_rows(engine, api, "f, ")
    flat = check_bool(flat, "flat", api)
    split_vmap_axes(vmap_axes, api)
    refuse_batch_coupled(f, vmap_axes, api)
    auto = engine.implementation == Implementation.AUTO
    cache, cat_cache = KernelCache(), KernelCache()

    def jac(x: PyTree, params: PyTree, *, out: torch.Tensor | None = None) -> PyTree:
        refuse_param_vmap(engine, params, api)
        settle_heap()  # as a kernel call: the result and work buffers of the last call reused, not faulted in again
        tensors = [t for t in tree_leaves((x, params)) if isinstance(t, torch.Tensor)]
        higher = needs_higher_order(tensors)
        differentiable = keeps_graph(tensors, higher)  # the rows cannot be written in place
        # kernel_context's routing, the attention part entered where f runs (make_problem's probes, the rows' passes):
        # not at all for an f its probe found calling no attention function
        with exact_higher_order(higher), explained_f_errors(api, params, {"x": x}, vmap_axes):
            p0 = make_problem(f, x, None, params, vmap_axes, (), (), cache, api=api)
            # a given budget is checked here; the default is read only where the rows might not fit it (planned_budget)
            budget = None if memory_budget is None else parse_budget(memory_budget, p0.device)
            jacs = per_sample.jacobians(p0, x, params, vmap_axes, budget, captures=engine.captures, auto=auto,
                                        flat=flat, cache=cache, cat_cache=cat_cache, differentiable=differentiable, out=out)
        leaves = [j.flat() for j in jacs] if flat else [like_params(j.pieces, p0.params) for j in jacs]
        return tree_unflatten(leaves, p0.out_spec)

    name = engine.name if auto else int(engine.implementation)
    jac.__doc__ = (f"Per-sample Jacobians of {getattr(f, '__name__', 'f')} (implementation {name}"
                   f"{', flat' if flat else ''}): jac(x, params, *, out=None).")
    return jac


def like_params(pieces: list[torch.Tensor], params: Params) -> PyTree:
    """Per-parameter pieces ``(..., numel)`` (one per floating leaf, in order) as a pytree like ``params``: each
    floating leaf ``(..., *θ.shape)`` (a view), others None."""
    leaves: list = [None] * len(params.leaves)
    for pos, theta, piece in zip(params.diff_index, params.diff_leaves, pieces, strict=True):
        leaves[pos] = piece.reshape(*piece.shape[:-1], *theta.shape)
    return tree_unflatten(leaves, params.spec)
