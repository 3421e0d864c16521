"""One kernel evaluation, checked and normalised: inputs, parameters, outputs, layouts.

Every implementation starts from a :class:`Problem`: it validates ``x1``/``x2``,
``vmap_axes`` and the output axes, runs ``f`` once on one sample to learn the
output shapes (and to catch in-place mutation, integer outputs and parameters the
output does not depend on), then once under ``vmap`` (to name an op that ``vmap`` cannot
batch), and exposes ``f`` in the two forms the implementations
differentiate:

- ``sample_fn(param_leaves, x_leaves)``: one sample in (its batch axis removed),
  output leaves out (their batch axis removed). ``f`` itself always receives the
  sample with a batch axis of size 1, as in neural-tangents.
- ``batch_fn(param_leaves, x_leaves)``: the whole batch (``vmap_axes=None``).
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable, Hashable, Sequence
from typing import Any, TypeVar

import torch
from torch.func import vjp, vmap
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from ntkfunc._core.batchable import BatchableOps
from ntkfunc._core.cache import KernelCache, ProbeResult, Signature
from ntkfunc._core.checks import VmapFailure, split_vmap_axes
from ntkfunc._core.layout import Layout
from ntkfunc._core.ops import ATTENTION_FUNCTIONS, transform_friendly_attention
from ntkfunc._core.pytree import broadcast_prefix, tree_flatten, tree_unflatten
from ntkfunc._core.types import ApplyFn, Axes, PyTree, VMapAxes

_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
_T = TypeVar("_T")


@dataclasses.dataclass
class Params:
    """Flat view of a parameter pytree: the floating leaves are differentiated."""

    leaves: list[torch.Tensor]
    spec: Any
    diff_index: list[int]  # positions of the differentiated (floating) leaves

    @staticmethod
    def make(params: PyTree, api: str = "ntk_fn") -> Params:
        leaves, spec = pytree.tree_flatten(params)
        if not all(isinstance(leaf, torch.Tensor) for leaf in leaves):
            for path, leaf in pytree.tree_flatten_with_path(params)[0]:
                if not isinstance(leaf, torch.Tensor):
                    raise TypeError(
                        f"{api}: params{pytree.keystr(path)} is a {type(leaf).__name__}; expected every "
                        "leaf of params to be a torch.Tensor"
                    )
        diff = [i for i, t in enumerate(leaves) if t.is_floating_point() or t.is_complex()]
        if not diff:
            raise ValueError(f"{api}: params has no floating-point tensor: nothing to differentiate")
        return Params(leaves, spec, diff)

    @functools.cached_property
    def names(self) -> list[str]:
        """Each leaf's path as ``keystr`` prints it (``"params"`` for a lone tensor); found when first asked for
        (error messages, warnings, reports), not on every call."""
        with_path, _ = pytree.tree_flatten_with_path(tree_unflatten(self.leaves, self.spec))
        return [pytree.keystr(path) or "params" for path, _ in with_path]

    @property
    def diff_leaves(self) -> list[torch.Tensor]:
        return [self.leaves[i] for i in self.diff_index]

    @property
    def diff_names(self) -> list[str]:
        return [self.names[i] for i in self.diff_index]

    def rebuild(self, diff_leaves: Sequence[torch.Tensor], subset: Sequence[int] | None = None) -> PyTree:
        """The params pytree with differentiated leaves replaced (``subset``: which of them)."""
        leaves = list(self.leaves)
        positions = self.diff_index if subset is None else [self.diff_index[k] for k in subset]
        for pos, leaf in zip(positions, diff_leaves):
            leaves[pos] = leaf
        return tree_unflatten(leaves, self.spec)


@dataclasses.dataclass
class Problem:
    """A checked kernel evaluation ``K(x1, x2)`` of ``f`` at ``params``.

    Attributes:
      x1_leaves / x2_leaves: flat inputs; ``x2_leaves is None`` when ``x2=None``.
      x_axes: batch axis of each input leaf (None: not batched), or None (vmap_axes=None).
      n1 / n2: numbers of samples (1 when vmap_axes=None: the batch is one unit).
      out_spec: pytree structure of ``f``'s output.
      out_shapes1 / out_shapes2: full output shapes per leaf (batch axis included).
      layouts: one :class:`Layout` per output leaf.
    """

    f: ApplyFn
    params: Params
    x1_leaves: list[Any]
    x2_leaves: list[Any] | None
    x_spec: Any
    x_axes: list[int | None] | None
    fx_axes: list[int] | None
    n1: int
    n2: int
    out_spec: Any
    out_shapes1: list[tuple[int, ...]]
    out_shapes2: list[tuple[int, ...]]
    out_dtype: torch.dtype
    device: torch.device
    layouts: list[Layout]
    api: str = "ntk_fn"  # the public function being computed (named in error messages)
    cache: KernelCache | None = None  # the kernel function's cache (its closure), when the inputs have a signature
    signature: Signature | None = None
    batchable: bool = True  # f calls an op BatchableOps computes another way (or it is not known): f runs under that mode
    attention: bool = True  # f calls one of ops.ATTENTION_FUNCTIONS (or it is not known): f runs under their routing

    @property
    def symmetric(self) -> bool:
        return self.x2_leaves is None

    @property
    def vmapped(self) -> bool:
        return self.x_axes is not None

    def remember(self, what: str, compute: Callable[[], _T], *key: Hashable,
                 keep: Callable[[_T], bool] | None = None) -> _T:
        """``compute()``, found once per input signature (and ``key``) and kept in the kernel function's cache.

        Only for what depends on shapes, dtypes and structure alone, never on values; ``keep``
        can refuse to keep a result that turned out to depend on values. Without a cache
        (inputs under an outer transform, or a one-off problem) it is computed each time.
        """
        if self.cache is None or self.signature is None:
            return compute()
        k = (what, self.signature, key)
        if k in self.cache.derived:
            return self.cache.derived[k]
        value = compute()
        if keep is None or keep(value):
            self.cache.derived[k] = value
        return value

    # --- the function in differentiable forms ---------------------------------------
    def _call(self, param_leaves: Sequence[torch.Tensor], x_leaves: Sequence[Any], subset: Sequence[int] | None) -> list[torch.Tensor]:
        """``f``'s output leaves; with the ops torch cannot batch computed another way (:class:`BatchableOps`, entered
        unless the probe of ``f`` under ``vmap`` found none of them: ``batchable``)."""
        params, x = self.params.rebuild(param_leaves, subset), tree_unflatten(list(x_leaves), self.x_spec)
        if self.batchable:
            with BatchableOps():
                out = self.f(params, x)
        else:
            out = self.f(params, x)
        leaves, spec = tree_flatten(out)
        if spec != self.out_spec:
            raise ValueError(f"{self.api}: f returned outputs of structure {spec}; expected {self.out_spec} as on the first sample")
        return leaves

    def sample_fn(self, subset: Sequence[int] | None = None) -> Callable[..., list[torch.Tensor]]:
        """``g(param_leaves, x_leaves)`` on one sample; ``subset`` selects which diff leaves are arguments."""
        assert self.x_axes is not None and self.fx_axes is not None
        x_axes, fx_axes = self.x_axes, self.fx_axes

        def g(param_leaves: Sequence[torch.Tensor], x_leaves: Sequence[Any]) -> list[torch.Tensor]:
            xs = [x if a is None else x.unsqueeze(a) for x, a in zip(x_leaves, x_axes)]
            outs = self._call(param_leaves, xs, subset)
            return [o.squeeze(a) for o, a in zip(outs, fx_axes)]

        return g

    def batch_fn(self, subset: Sequence[int] | None = None) -> Callable[..., list[torch.Tensor]]:
        def g(param_leaves: Sequence[torch.Tensor], x_leaves: Sequence[Any]) -> list[torch.Tensor]:
            return self._call(param_leaves, x_leaves, subset)

        return g

    def x_block(self, which: int, start: int, stop: int) -> list[Any]:
        """Samples ``start:stop`` of x1 (``which=1``) or x2 (``which=2``, x1 if symmetric)."""
        leaves = self.x1_leaves if which == 1 or self.x2_leaves is None else self.x2_leaves
        if self.x_axes is None:
            return leaves
        return [x if a is None else x.narrow(a, start, stop - start) for x, a in zip(leaves, self.x_axes)]

    def sample_out_shapes(self, which: int) -> list[tuple[int, ...]]:
        """Per-sample output shapes (batch axis removed) of x1's or x2's outputs."""
        shapes = self.out_shapes1 if which == 1 else self.out_shapes2
        if self.fx_axes is None:
            return shapes
        return [s[:a] + s[a + 1 :] for s, a in zip(shapes, self.fx_axes)]

    def kernel_shapes(self) -> list[tuple[int, ...]]:
        return [lay.kernel_shape(s1, s2) for lay, s1, s2 in zip(self.layouts, self.out_shapes1, self.out_shapes2)]

    def finish(self, kernels: list[torch.Tensor]) -> PyTree:
        """Divide by the traced sizes and restore the output pytree."""
        out = [k / lay.trace_size(s) for k, lay, s in zip(kernels, self.layouts, self.out_shapes1)]
        return tree_unflatten(out, self.out_spec)


# --- construction -----------------------------------------------------------------


def _fmt_shapes(leaves: Sequence[Any]) -> str:
    return ", ".join(str(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__ for x in leaves)


def _check_inputs(
    x1_leaves: list[Any], x2_leaves: list[Any] | None, spec1: Any, spec2: Any, x_axes: list[int | None] | None, api: str
) -> tuple[int, int]:
    if not x1_leaves:
        raise ValueError(f"{api}: x1 has no tensors; expected a tensor or a pytree of tensors")
    for x in x1_leaves + (x2_leaves or []):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{api}: inputs must be tensors (or pytrees of tensors); got a {type(x).__name__}")
    if x2_leaves is not None and spec1 != spec2:
        raise ValueError(f"{api}: x1 and x2 have different structures: {spec1} vs {spec2}")

    def batch_size(leaves: list[torch.Tensor], name: str) -> int:
        if x_axes is None:
            return 1
        sizes = set()
        for x, a in zip(leaves, x_axes):
            if a is None:
                continue
            if not -x.ndim <= a < max(x.ndim, 1) or x.ndim == 0:
                raise ValueError(
                    f"{api}(vmap_axes): axis {a} does not exist in {name} of shape {tuple(x.shape)}; "
                    "expected the batch axis of every input leaf (or vmap_axes=None for functions whose samples interact)"
                )
            sizes.add(x.shape[a])
        if len(sizes) > 1:
            raise ValueError(f"{api}: {name} leaves have different batch sizes {sorted(sizes)} along vmap_axes; shapes: {_fmt_shapes(leaves)}")
        if not sizes:
            raise ValueError(f"{api}(vmap_axes): maps no leaf of {name}; expected at least one batched input")
        n = sizes.pop()
        if n == 0:
            raise ValueError(f"{api}: {name} has no samples (size 0 along its batch axis); expected at least one sample")
        return n

    n1 = batch_size(x1_leaves, "x1")
    n2 = batch_size(x2_leaves, "x2") if x2_leaves is not None else n1
    if x2_leaves is not None:
        for k, (a, b) in enumerate(zip(x1_leaves, x2_leaves)):
            ax = None if x_axes is None else x_axes[k]
            sa = [d for i, d in enumerate(a.shape) if ax is None or i != ax % a.ndim]
            sb = [d for i, d in enumerate(b.shape) if ax is None or i != ax % b.ndim]
            if (x_axes is not None and sa != sb) or a.ndim != b.ndim:
                raise ValueError(
                    f"{api}: x1 and x2 have mismatched feature shapes: {tuple(a.shape)} vs {tuple(b.shape)} "
                    f"(input leaf {k}); expected equal shapes except along the batch axis {ax}"
                )
            if a.dtype != b.dtype:
                raise ValueError(f"{api}: x1 and x2 have different dtypes {a.dtype} and {b.dtype} (input leaf {k}); expected the same")
    return n1, n2


def _probe(
    f: ApplyFn, params: Params, x_leaves: list[Any], x_spec: Any, x_axes: list[int | None] | None, check: bool, api: str
) -> tuple[list[torch.Tensor], Any]:
    """Run ``f`` on the first sample (or the whole batch): output leaves and structure.

    With ``check``, on copies: also refuse in-place mutation of params or inputs and
    non-floating outputs, and warn about parameters the output does not depend on.
    """
    if x_axes is not None:
        x_leaves = [x if a is None else x.narrow(a, 0, 1) for x, a in zip(x_leaves, x_axes)]
    if not check:
        with torch.no_grad():
            out = f(tree_unflatten(params.leaves, params.spec), tree_unflatten(x_leaves, x_spec))
        return tree_flatten(out)

    p_copy = [t.detach().clone() for t in params.leaves]
    x_copy = [x.detach().clone() for x in x_leaves]
    with torch.enable_grad():  # non-leaf copies, so that an in-place op in f shows as a version bump
        for i in params.diff_index:
            p_copy[i] = p_copy[i].requires_grad_(True) + 0
    versions = [t._version for t in p_copy] + [x._version for x in x_copy]
    with torch.enable_grad():
        out = f(tree_unflatten(p_copy, params.spec), tree_unflatten(x_copy, x_spec))
    changed = [params.names[i] for i, t in enumerate(p_copy) if t._version != versions[i]]
    changed += [f"input leaf {k}" for k, x in enumerate(x_copy) if x._version != versions[len(p_copy) + k]]
    if changed:
        raise ValueError(
            f"{api}: f modified {', '.join(changed)} in place; expected a pure function f(params, x) "
            "(use out-of-place ops, e.g. `x = x * 2` instead of `x *= 2`)"
        )
    out_leaves, out_spec = tree_flatten(out)
    for k, o in enumerate(out_leaves):
        if not isinstance(o, torch.Tensor):
            raise TypeError(f"{api}: f returned a {type(o).__name__} as output leaf {k}; expected tensors")
        if not (o.is_floating_point() or o.is_complex()):
            raise TypeError(
                f"{api}: f returned an output of dtype {o.dtype} (leaf {k}); expected floating-point outputs, "
                "since an integer output (e.g. argmax) has no derivative"
            )
    graph_out = [o for o in out_leaves if o.requires_grad]
    diff = [p_copy[i] for i in params.diff_index]
    if not graph_out:
        raise ValueError(f"{api}: f's output does not depend on any parameter: every kernel entry would be zero")
    grads = torch.autograd.grad(graph_out, diff, [torch.ones_like(o) for o in graph_out], allow_unused=True)
    unused = [name for name, g in zip(params.diff_names, grads) if g is None]
    if unused:
        warnings.warn(
            f"{api}: the output of f does not depend on {', '.join(unused)}; their kernel contribution is zero",
            stacklevel=4,
        )
    return [o.detach() for o in out_leaves], out_spec


class _FailingOp(TorchFunctionMode):
    """Remembers the outermost torch function (as ``f`` called it) that raised, and whether ``f`` called one of
    :data:`~ntkfunc._core.ops.ATTENTION_FUNCTIONS`."""

    def __init__(self) -> None:
        super().__init__()
        self.op: str | None = None
        self.attention = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in ATTENTION_FUNCTIONS:
            self.attention = True
        try:
            return func(*args, **(kwargs or {}))
        except Exception:
            if self.op is None:
                self.op = _op_name(func)
            raise


def _op_name(func: Any) -> str:
    """``torch.lstm``, ``Tensor.__getitem__``, ``torch.nn.functional.embedding_bag``."""
    name = getattr(func, "__name__", None) or repr(func)
    owner = getattr(func, "__objclass__", None) or getattr(func, "__self__", None)
    if isinstance(owner, type) and issubclass(owner, torch._C.TensorBase):
        return f"Tensor.{name}"
    module = getattr(func, "__module__", None)
    if module in (None, "torch._C._VariableFunctions", "torch._C") or (module or "").startswith("torch._C"):
        return f"torch.{name}"
    return f"{module}.{name}"


def _probe_vmap(f: ApplyFn, params: Params, x_leaves: list[Any], x_spec: Any, x_axes: list[int | None]) -> tuple[bool, bool]:
    """Run ``f`` on the first sample under ``vmap`` (and a grad level, as the kernels do): a :class:`VmapFailure` if it
    fails; else whether ``f`` called an op that :class:`BatchableOps` computes another way (``BatchableOps.used``),
    and whether it called one of :data:`~ntkfunc._core.ops.ATTENTION_FUNCTIONS`.

    Called once per input signature after ``f`` ran on that sample without ``vmap``, so a
    failure here is one of ``vmap`` (boolean-mask indexing, an op without a batching rule, an
    in-place write into a tensor that is not batched), and its message names the op.
    """
    first = [x if a is None else x.narrow(a, 0, 1) for x, a in zip(x_leaves, x_axes)]
    ops = BatchableOps()  # as Problem._call runs f

    def one(xs: list[Any]) -> torch.Tensor:
        xs = [x if a is None else x.unsqueeze(a) for x, a in zip(xs, x_axes)]
        with ops:
            vjp(lambda diff: f(params.rebuild(diff), tree_unflatten(xs, x_spec)), params.diff_leaves)
        return torch.zeros(())

    recorder = _FailingOp()
    try:
        with recorder:
            vmap(one, in_dims=(x_axes,))(first)
    except Exception as err:
        raise VmapFailure(recorder.op, err) from err
    return ops.used, recorder.attention


def make_problem(
    f: ApplyFn,
    x1: PyTree,
    x2: PyTree | None,
    params: PyTree,
    vmap_axes: VMapAxes,
    trace_axes: Axes,
    diagonal_axes: Axes,
    cache: KernelCache | None = None,
    *,
    api: str = "ntk_fn",
) -> Problem:
    """Check everything and build the :class:`Problem` (runs ``f`` on one sample).

    ``cache`` (owned by the caller's closure) remembers what the probe of ``f`` found for a
    given signature of shapes, dtypes and devices, so that repeated calls (a kernel per
    training step) run ``f`` only when the signature changes. ``api`` names the public
    function in error messages.
    """
    p = Params.make(params, api)
    x1_leaves, spec1 = tree_flatten(x1)
    x2_leaves, spec2 = (None, None) if x2 is None else tree_flatten(x2)
    x_axis, fx_axis = split_vmap_axes(vmap_axes, api)
    x_axes = None if x_axis is None else _broadcast(x_axis, x1_leaves, lambda: x1, api)
    if x_axis is not None and fx_axis is None:
        raise ValueError(f"{api}(vmap_axes={vmap_axes!r}): an input batch axis needs an output batch axis too")
    n1, n2 = _check_inputs(x1_leaves, x2_leaves, spec1, spec2, x_axes, api)
    if x_axes is not None:
        x_axes = [None if a is None else a % x.ndim for a, x in zip(x_axes, x1_leaves)]

    wrapped = any(_is_wrapped(t) for t in p.leaves + x1_leaves + (x2_leaves or []))
    key = None if wrapped or cache is None else signature_of(p, x1_leaves, x2_leaves, spec1, x_axes)
    probe = None if key is None or cache is None else cache.probes.get(key)
    if probe is None:
        with transform_friendly_attention():  # f as the kernels run it (the caller's routing, where it entered it)
            out1, out_spec = _probe(f, p, x1_leaves, spec1, x_axes, not wrapped, api)
            found = (True, True)  # not probed under vmap: f runs under BatchableOps and the attention routing
            if x_axes is not None and not wrapped:
                found = _probe_vmap(f, p, x1_leaves, spec1, x_axes)
            out2 = out1 if x2_leaves is None else _probe(f, p, x2_leaves, spec2, x_axes, False, api)[0]
        probe = ProbeResult(out1, out2, out_spec, *found)
        if key is not None and cache is not None:
            cache.probes[key] = probe
    out1, out2, out_spec = probe.out1, probe.out2, probe.out_spec

    fx_axes: list[int] | None = None
    shapes1 = [tuple(o.shape) for o in out1]
    shapes2 = [tuple(o.shape) for o in out2]
    if x_axes is not None:
        raw = _broadcast(fx_axis, out1, lambda: tree_unflatten(out1, out_spec), api)
        fx_axes = []
        for k, (o, a) in enumerate(zip(out1, raw)):
            if a is None or not -o.ndim <= a < o.ndim:
                raise ValueError(
                    f"{api}(vmap_axes): output leaf {k} of shape {tuple(o.shape)} has no batch axis {a}; "
                    "expected f to keep the batch axis of its input (or pass vmap_axes=None)"
                )
            a %= o.ndim
            if o.shape[a] != 1:
                raise ValueError(
                    f"{api}: f(params, x) on one sample returned shape {tuple(o.shape)} with size {o.shape[a]} "
                    f"along its batch axis {a}; expected 1. The output batch axis does not match "
                    f"vmap_axes={vmap_axes!r}; if the samples of a batch interact (e.g. BatchNorm in training "
                    "mode), pass vmap_axes=None"
                )
            fx_axes.append(a)
        shapes1 = [s[:a] + (n1,) + s[a + 1 :] for s, a in zip(shapes1, fx_axes)]
        shapes2 = [s[:a] + (n2,) + s[a + 1 :] for s, a in zip(shapes2, fx_axes)]

    layouts = []
    for k, (s1, s2) in enumerate(zip(shapes1, shapes2)):
        lay = Layout.make(len(s1), None if fx_axes is None else fx_axes[k], trace_axes, diagonal_axes, api)
        if len(s1) != len(s2):
            raise ValueError(f"{api}: f(x1) and f(x2) have different ndims {len(s1)} and {len(s2)} (output leaf {k})")
        for i in lay.trace + lay.diagonal:
            if s1[i] != s2[i]:
                raise ValueError(
                    f"{api}: f(x1) has shape {s1} and f(x2) has shape {s2} (output leaf {k}): traced and diagonal "
                    f"axes must match, axis {i} differs ({s1[i]} vs {s2[i]})"
                )
        layouts.append(lay)

    dtypes = {o.dtype for o in out1}
    out_dtype = out1[0].dtype if len(dtypes) == 1 else torch.promote_types(*list(dtypes)[:2])
    return Problem(
        f=f, params=p, x1_leaves=x1_leaves, x2_leaves=x2_leaves, x_spec=spec1, x_axes=x_axes,
        fx_axes=fx_axes, n1=n1, n2=n2, out_spec=out_spec, out_shapes1=shapes1, out_shapes2=shapes2,
        out_dtype=out_dtype, device=out1[0].device, layouts=layouts, api=api,
        cache=None if key is None else cache, signature=key, batchable=probe.batchable, attention=probe.attention,
    )


def _broadcast(prefix: Any, leaves: list[Any], tree: Callable[[], PyTree], api: str) -> list[Any]:
    """``broadcast_prefix(prefix, tree())`` for a tree already flattened into ``leaves``: an int (the usual axis) needs
    neither the tree nor a second flatten."""
    if prefix is None or isinstance(prefix, int):
        return [prefix] * len(leaves)
    return broadcast_prefix(prefix, tree(), api=api)


def signature_of(p: Params, x1: list[Any], x2: list[Any] | None, spec: Any, x_axes: list[int | None] | None) -> Signature:
    """What the probe's findings depend on: structures, per-sample shapes, dtypes, devices (and parameters' contiguity)."""

    def meta(leaves: list[Any]) -> tuple:
        out = []
        for k, t in enumerate(leaves):
            shape = list(t.shape)
            axis = None if x_axes is None else x_axes[k]
            if axis is not None:
                shape[axis] = -1
            out.append((tuple(shape), t.dtype, t.device))
        return tuple(out)

    # contiguity: the structured capture follows views of contiguous parameters only (structured.views)
    params = tuple((tuple(t.shape), t.dtype, t.device, t.is_contiguous()) for t in p.leaves)
    return (str(p.spec), params, str(spec), meta(x1), None if x2 is None else meta(x2), None if x_axes is None else tuple(x_axes))
