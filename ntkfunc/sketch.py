"""Sketched eNTKs: ``Sketch``, ``features_fn`` and ``sketched_ntk_fn``.

A random projection ``Π`` (``P x dim``, Johnson-Lindenstrauss) of the per-sample gradients
gives the features ``J(x) Π`` (``(N, *out, dim)``: a random-feature model of the linearised
network) and the unbiased kernel estimate ``K̂(x1, x2) = (J(x1) Π)(J(x2) Π)ᵀ``, whose
contraction costs ``N1 N2 dim`` instead of ``N1 N2 P``. ``Π`` is defined by its seed and never
stored (:mod:`ntkfunc._engines.sketch`); ``kernel_matrix(..., sketch=Sketch(...))`` does the
same for whole datasets, with the features written once to ``.npy``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from ntkfunc._core.checks import as_axes_tuple, refuse_batch_coupled
from ntkfunc._core.layout import Layout
from ntkfunc._core.ops import kernel_context
from ntkfunc._core.pytree import tree_map, tree_unflatten
from ntkfunc._core.types import ApplyFn, Axes, KernelFn, MemoryBudget, PyTree, VMapAxes
from ntkfunc._engines import Implementation, get_engine, refuse_without_rows
from ntkfunc._engines.sketch.error import SketchError, resketch, spread
from ntkfunc._engines.sketch.features import Featurizer
from ntkfunc._engines.sketch.plan import KINDS, SketchPlan

FeaturesFn = Callable[[PyTree, PyTree], PyTree]
"""``features(x, params) -> (N, *out, dim)`` (the output pytree of such tensors for pytree outputs)."""


@dataclasses.dataclass(frozen=True)
class Sketch:
    """A random projection ``Π`` (``P x dim``) of per-sample gradients, defined by ``seed`` and never stored.

    Args:
      dim: number of features per output entry (``k``); the kernel estimate's relative error
        falls like ``1 / sqrt(dim)``.
      seed: any int in ``[0, 2**63)``; the same seed gives the same ``Π`` on every device, tiling
        and rank (each parameter's part of ``Π`` is drawn from ``(seed, its position)``).
      kind: ``"countsketch"`` (one ``±1`` per row of ``Π``, hashed along each parameter's
        matrix shape; exact when ``dim`` holds every parameter), ``"tensorsketch"``
        (TensorSketch of linear and convolution weights from their cotangents and inputs, by
        FFTs: no per-sample gradient formed), ``"gaussian"`` (dense i.i.d. ``N(0, 1/dim)``, the
        reference: ``2 P dim`` FLOPs per gradient row; drawn in float32 and kept while it fits
        half the memory budget), or ``"auto"`` (per parameter, the predicted cheaper of
        TensorSketch and the count sketch among those whose error is no worse than a Gaussian
        projection's: no TensorSketch for rows wider than ``dim``; see :meth:`explain`).

    Every kind satisfies ``E[Π Πᵀ] = I``: the sketched kernel is unbiased.

    >>> import ntkfunc
    >>> ntkfunc.Sketch(512)
    Sketch(dim=512, seed=0, kind='auto')
    >>> ntkfunc.Sketch(0)
    Traceback (most recent call last):
    ...
    ValueError: Sketch(dim=0): expected a positive int (the number of features per output)
    """

    dim: int
    seed: int = 0
    kind: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.dim, bool) or not isinstance(self.dim, int) or self.dim < 1:
            raise ValueError(f"Sketch(dim={self.dim!r}): expected a positive int (the number of features per output)")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ValueError(f"Sketch(seed={self.seed!r}): expected an int in [0, 2**63)")
        if not isinstance(self.kind, str) or self.kind not in (*KINDS, "auto"):
            raise ValueError(f"Sketch(kind={self.kind!r}): expected 'auto' or one of {list(KINDS)}")

    def explain(self, f: ApplyFn, params: PyTree, x: PyTree, vmap_axes: VMapAxes = 0,
                implementation: None | int | str | Implementation = None) -> SketchPlan:
        """Which sketch and route each parameter gets for inputs like ``x``, with predicted costs (a printable table).

        >>> import torch, ntkfunc
        >>> model = torch.nn.Sequential(torch.nn.Linear(512, 2048), torch.nn.Tanh(), torch.nn.Linear(2048, 1))
        >>> f, params = ntkfunc.from_module(model)
        >>> plan = ntkfunc.Sketch(1024).explain(f, params, torch.randn(3, 512))
        >>> [(p.name, p.kind, p.route) for p in plan.params]  # the 1M-entry weight gradient is never formed
        [('0.weight', 'tensorsketch', 'fft'), ('0.bias', 'countsketch', 'formed'), ('2.weight', 'countsketch', 'factors'), ('2.bias', 'countsketch', 'formed')]
        >>> print(plan)  # doctest: +ELLIPSIS
        parameter  shape     kind          route    ms/sample  alternatives (ms/sample)
        0.weight   2048x512  tensorsketch  fft      ...
        """
        fz = _featurizer(f, self, vmap_axes, implementation, None, "Sketch.explain")
        x, params = _detached(x), _detached(params)
        with kernel_context(x, None, params):
            p0 = fz.problem(x, None, params)
            return fz.source(p0, x, params).plan

    def error_estimate(self, features1: torch.Tensor, features2: torch.Tensor | None = None, *, trace_axes: Axes = (-1,),
                       diagonal_axes: Axes = (), samples: int = 2048) -> SketchError:
        """The sketched kernel's error, from its own features: the Gaussian sketch's variance, by re-sketching them.

        Every entry's variance under a Gaussian ``Π`` is a function of inner products of the
        gradients, which the features preserve; two independent Gaussian re-sketches of the
        features (``dim x 256``) measure it, scaled to ``dim``
        (:mod:`ntkfunc._engines.sketch.error`). ``relative`` estimates ``‖K̂ - K‖_F / ‖K̂‖_F``
        without the exact kernel: in expectation exact for ``kind="gaussian"``, an upper
        bound for the count sketch (whose variance is the Gaussian's minus a diagonal term;
        zero for an exact ``dim >= P`` count sketch, whose estimate is still positive)
        when ``dim`` is at least every parameter's row width (``numel / shape[0]``).
        Not a bound for ``kind="tensorsketch"`` on a layer whose rows (``numel / shape[0]``)
        are wider than ``dim``, with traced outputs: its columns collide alike in every row,
        so every output gets the same error, which the trace then does not average away, and
        the actual error can exceed the estimate by up to ``sqrt(O)`` (``"auto"`` gives such
        layers the count sketch, whose folds are signed row by row). Computed on at most
        ``samples`` evenly spaced rows and columns, deterministically from the sketch's seed.

        Args:
          features1, features2: ``(N, *out, dim)`` from :func:`features_fn` (or a features
            ``.npy`` of :func:`ntkfunc.kernel_matrix`); ``features2=None`` means ``features1``.
          trace_axes, diagonal_axes: as for the kernel (axes of ``(N, *out)``).

        >>> import torch, ntkfunc
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 256), torch.nn.Tanh(), torch.nn.Linear(256, 1))
        >>> f, params = ntkfunc.from_module(model)
        >>> x = torch.randn(20, 4)
        >>> sketch = ntkfunc.Sketch(256, seed=1, kind="gaussian")
        >>> est = sketch.error_estimate(ntkfunc.features_fn(f, sketch)(x, params))
        >>> 0.0 < est.relative < 0.5
        True
        """
        f1 = torch.as_tensor(features1)
        f2 = f1 if features2 is None else torch.as_tensor(features2)
        for name, t in (("features1", f1), ("features2", f2)):
            if t.ndim < 2 or t.shape[-1] != self.dim:
                raise ValueError(f"Sketch(dim={self.dim}).error_estimate: {name} has shape {tuple(t.shape)}; expected (N, *out, {self.dim})")
        a1 = f1[spread(f1.shape[0], samples)]
        a2 = a1 if features2 is None else f2[spread(f2.shape[0], samples)]
        lay = Layout.make(a1.ndim - 1, 0, as_axes_tuple(trace_axes), as_axes_tuple(diagonal_axes), "Sketch.error_estimate")
        return resketch(a1, a2, lay, self.dim, self.seed)


def _detached(tree: PyTree) -> PyTree:
    """``tree`` with its tensors detached: sketched features and kernels are not differentiable (their products
    write into preallocated buffers), so params or inputs that require grad are taken as values."""
    return tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, tree)


def _featurizer(f: ApplyFn, sketch: Any, vmap_axes: VMapAxes, implementation: Any, memory_budget: MemoryBudget, api: str) -> Featurizer:
    """Check the arguments shared by the sketch functions (the caller's name in errors) and build the featurizer."""
    if not isinstance(sketch, Sketch):
        raise TypeError(f"{api}: sketch is a {type(sketch).__name__}; expected ntkfunc.Sketch(dim, seed=0, kind='auto')")
    engine = get_engine("auto" if implementation is None else implementation, api=api)
    refuse_without_rows(engine, api)
    refuse_batch_coupled(f, vmap_axes, api)
    return Featurizer(f, sketch.kind, sketch.dim, sketch.seed, vmap_axes, engine.captures, memory_budget, api)


def features_fn(f: ApplyFn, sketch: Sketch, vmap_axes: VMapAxes = 0, *,
                implementation: None | int | str | Implementation = None, memory_budget: MemoryBudget = None) -> FeaturesFn:
    """Returns ``features(x, params)``: the projected per-sample gradients ``J(x) Π``, ``(N, *out, dim)``.

    ``features(x1) features(x2)ᵀ`` (contracted over ``dim``, with the output-axis rule of
    ``ntk_fn``) is :func:`sketched_ntk_fn`'s kernel; the features are a random-feature model of
    the linearised network (``f(params0, x) + features(x) w`` for trainable ``w``).

    Args:
      f: ``f(params, x)``, as for ``ntk_fn`` (pytree outputs give the same pytree of features).
      sketch: the :class:`Sketch` (``dim``, ``seed``, ``kind``).
      vmap_axes: as for ``ntk_fn``; ``None`` (samples interact) gives the features of the batch
        as one unit, ``(*out, dim)``.
      implementation: how per-sample gradients are formed: ``None``/``"auto"``/``3`` (the
        structured capture, which also gives the factors TensorSketch needs) or ``1``
        (``vmap(jacrev)``); ``2`` has no per-sample gradients and is refused. The features are
        the same whichever is used.
      memory_budget: bytes (or ``"2GB"``) for the gradient passes; default as ``ntk_fn``.

    Shapes: an output leaf ``(N, d1, ..., dk)`` (batch axis anywhere) gives ``(N, d1, ..., dk, dim)``
    without its batch axis moved: batch first, then the other axes in order, then ``dim``.
    The features are not differentiable: params and inputs that require grad are taken as values.

    Example:
      >>> import torch, ntkfunc
      >>> model = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))
      >>> f, params = ntkfunc.from_module(model)
      >>> feats = ntkfunc.features_fn(f, ntkfunc.Sketch(64, seed=0))(torch.randn(5, 4), params)
      >>> feats.shape                                   # (N, O, dim)
      torch.Size([5, 3, 64])
    """
    fz = _featurizer(f, sketch, vmap_axes, implementation, memory_budget, "features_fn")

    def features(x: PyTree, params: PyTree) -> PyTree:
        x, params = _detached(x), _detached(params)
        with kernel_context(x, None, params):
            p0 = fz.problem(x, None, params)
            return tree_unflatten(fz.features(p0, x, params), p0.out_spec)

    features.__doc__ = f"Sketched features (dim={sketch.dim}, seed={sketch.seed}, kind={sketch.kind!r}) of f: features(x, params)."
    return features


def sketched_ntk_fn(f: ApplyFn, sketch: Sketch, trace_axes: Axes = (-1,), diagonal_axes: Axes = (), vmap_axes: VMapAxes = 0, *,
                    implementation: None | int | str | Implementation = None, memory_budget: MemoryBudget = None) -> KernelFn:
    """Returns ``kernel(x1, x2, params)``: the sketched eNTK ``(J(x1) Π)(J(x2) Π)ᵀ``, an unbiased estimate of ``ntk_fn``'s.

    Same output layout as ``ntk_fn(f, trace_axes, diagonal_axes, vmap_axes)`` (traced axes averaged,
    diagonal axes kept once, pytree outputs give pytrees, ``x2=None`` computes the features once),
    scaled so that ``E[kernel] = ntk_fn(...)`` over the sketch's randomness. Its error falls like
    ``1 / sqrt(sketch.dim)``; :meth:`Sketch.error_estimate` estimates it from the features alone.

    Args: as :func:`features_fn`, plus ``trace_axes`` and ``diagonal_axes`` as for ``ntk_fn``. Unlike ``ntk_fn``'s, the
    sketched kernel is not differentiable: params and inputs that require grad are taken as values.

    Example:
      >>> import torch, ntkfunc
      >>> model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double()
      >>> f, params = ntkfunc.from_module(model)
      >>> x1, x2 = torch.randn(5, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
      >>> kernel = ntkfunc.sketched_ntk_fn(f, ntkfunc.Sketch(512), trace_axes=())
      >>> kernel(x1, x2, params).shape                  # as ntk_fn: (N1, N2, O, O)
      torch.Size([5, 2, 3, 3])
      >>> exact = ntkfunc.ntk_fn(f, trace_axes=())(x1, x2, params)
      >>> bool(torch.allclose(kernel(x1, x2, params), exact))   # 512 >= P = 131: the count sketch is exact
      True
    """
    api = "sketched_ntk_fn"
    fz = _featurizer(f, sketch, vmap_axes, implementation, memory_budget, api)
    trace, diag = as_axes_tuple(trace_axes), as_axes_tuple(diagonal_axes)

    def kernel(x1: PyTree, x2: PyTree | None, params: PyTree) -> PyTree:
        x1, x2, params = _detached(x1), _detached(x2), _detached(params)
        with kernel_context(x1, x2, params):
            problem = fz.problem(x1, x2, params, trace, diag)
            f1 = fz.features(problem, x1, params)
            f2 = f1 if x2 is None else fz.features(problem, x2, params)
            return problem.finish([lay.contract(a, b, 1) for lay, a, b in zip(problem.layouts, f1, f2)])

    kernel.__doc__ = f"Sketched empirical NTK of {getattr(f, '__name__', 'f')} (dim={sketch.dim}, kind={sketch.kind!r}): kernel(x1, x2, params)."
    return kernel
