"""What a structured-derivative rule is, the registry that holds them, and the one check of their output.

A rule knows one primitive ``y = op(θ, a)`` that is *linear in its parameter* θ
(a linear layer's weight or bias, a convolution kernel, a norm's affine, a broadcast
scale, an embedding table). The capture binds the primitive's arguments once
(:meth:`Rule.bind`: a dict by argument name) and hands that dict to the rule's jobs:

- ``match(bound, is_param)``: which arguments are parameters (``{role: tensor}``), or
  None when this call is outside what the rule handles (the parameters it consumes then
  fall back to Jacobian contraction; never a wrong kernel).
- ``capture(bound, is_param)``: run inside ``f`` (under ``vmap``/``jacrev``): the
  non-parameter operands to keep (e.g. the layer input, a norm's normalised input; None
  in place of a parameter) and static settings (stride, padding, ...).
- ``structure(role, operands, meta, y_shape)``: the Jacobian ``∂y/∂θ`` as an einsum
  factorisation :class:`Structure`. The NTK contribution of θ is then
  ``Σ_θ (c₁ ∂y₁/∂θ)(c₂ ∂y₂/∂θ)`` with ``c = ∂f/∂y`` the output cotangents, which the
  structured engine contracts with ``opt_einsum`` in one expression per parameter.

``meta`` is the rule's own frozen dataclass (:class:`~ntkfunc.rules.conv.ConvMeta`,
:class:`~ntkfunc.rules.linear.LinearMeta`, ...: typed settings, never string keys); only the rule
reads its fields. (A rule defined elsewhere may return any object: ntkfunc only hands it back.)

Every structure a rule returns goes through :func:`check_structure` (letters, operand
ranks, axis sizes and the parameter's size), in one place, before it is contracted.

Optional jobs: the per-sample maths of a role, kept once in the rule and reused wherever
per-sample gradients are formed or projected (as BackPACK keeps each layer's derivatives once
for all its extensions). Each has a default that declines, so that the generic path (the
rule's einsum) runs; a rule overrides them where it has a faster way:

- ``write_gradient(role, operands, cot, meta, y_shape, out, buffers)``: the role's per-sample
  gradient ``∂f_j/∂θ`` (C order) of every output entry ``j`` into ``out`` ``(g, O, numel)``
  from the cotangents ``cot`` ``(g, *out, *y)`` and the operands (batch-first, ``g`` samples);
  True if written, False where the call is outside the fast path (a convolution: im2col into
  reused :class:`~ntkfunc._core.buffers.Buffers` and one ``bmm`` per output entry; a linear layer:
  one ``bmm``);
- ``gradient_workspace(role, meta, y_shape)``: the elements per sample of each work buffer
  that ``write_gradient`` takes (by buffer name), for memory plans;
- ``factorable(role, meta, y_shape)``: whether the role's per-sample gradient factors as
  ``G = Σ_s c_s x_sᵀ`` (a :class:`Factorable`: rows ``R``, columns ``D``, positions ``S``), and
  ``factors(role, operands, cot, meta, y_shape, buffers)`` those factors, ``c`` ``(g, O, R, S)``
  and ``x`` ``(g, S, D)``, from which the sketches project ``G`` without forming it;
  ``padded_factors(...)`` the same before im2col (:class:`PaddedFactors`: ``c`` and the
  zero-padded input with its window), for a sketch that gathers patches itself;
- ``window_size(meta)``: input elements each output element reads (a convolution's kernel
  volume, 1 by default), for memory estimates of the operands a structure materialises;
- ``output(bound, operands)``: the op's result for the capture pass computed a cheaper way than
  calling the op again (eval-mode batch norm), and ``fresh_output``: whether the op returns a new
  tensor its backward never reads (the capture then adds its probe in place).
Families live in their own modules (``linear``, ``conv``, ``norm``, ``elementwise``,
``embedding``, ``concat``, ``parametrize``) and add themselves with :func:`register`; fused ops
that consume several parameters at once are re-run in ruled primitives by expansions
(:func:`expand`: ``attention``, ``recurrent``, ``W[ids]`` in ``embedding``); :func:`disabled`
switches every rule off for a block (everything then falls back: for debugging, and for
tests that prove a rule changed nothing).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import string
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar, TypeVar

import torch

from ntkfunc._core.buffers import Buffers

Tensor = torch.Tensor
IsParam = Callable[[object], bool]
"""``is_param(t)``: whether ``t`` is one of the parameters being differentiated."""
Bound = dict[str, Any]
"""A primitive's arguments by name (:meth:`Rule.bind`)."""
Meta = Any
"""A call's static settings, as :meth:`Rule.capture` returns them: the rule's frozen dataclass."""

LETTERS = string.ascii_letters


@dataclasses.dataclass
class Structure:
    """``∂y/∂θ`` of one sample as an einsum: ``J[θ] = Σ c[y] ∏ operands`` (letters local to the rule).

    Attributes:
      y_shape: shape (per sample) of a view of the primitive's output ``y``; ``y`` names its axes.
      y: one letter per axis of ``y_shape``.
      theta: letters of the parameter's axes (those shared by the two samples' factors).
      operands: ``(letters, tensor)`` pairs; each tensor has a leading sample axis (of size
        ``b``, the block of samples, or 1 when shared by all) that the letters do not name.
      scale: constant factor of ``∂y/∂θ`` (e.g. ``-1`` for ``a - θ``).
      window: where one operand is the patches of an input under a convolution window, that input and the
        window (:class:`Window`): the Gram route may then contract the input's own Gram instead of the
        patches'. None otherwise; a transformation that renames letters or reshapes operands drops it.
    """

    y_shape: tuple[int, ...]
    y: str
    theta: str
    operands: list[tuple[str, Tensor]]
    scale: complex | float = 1.0
    window: Window | None = None


@dataclasses.dataclass(frozen=True)
class Window:
    """Operand ``operand`` of a :class:`Structure` is the patches of ``x`` under a convolution window.

    ``x`` ``(n, *batch sizes, *spatial)`` (leading sample axis as the operand's) is the unpadded input: its
    axes after the sample axis are named ``batch`` (letters the patches share with it, same sizes) then one
    axis per spatial axis, which the patches replace by their output positions (letters ``positions``) and
    window offsets (letters ``offsets``): ``patches[..., s, k] = x_padded[..., stride s + dilation k]``, with
    ``x`` zero-padded by ``pads`` ``(left, right)`` per axis (negative: cropped).
    """

    operand: int
    x: Tensor
    batch: str
    positions: str
    offsets: str
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    pads: tuple[tuple[int, int], ...]


def window_out_size(size: int, kernel: int, stride: int = 1, dilation: int = 1, pads: tuple[int, int] = (0, 0)) -> int:
    """Output positions of a window over ``size`` input positions, padded by ``pads`` ``(left, right)``, along one axis.

    >>> window_out_size(32, 3, 2, 1, (1, 1))  # a 3x3 convolution, stride 2, padding 1
    16
    """
    return (size + pads[0] + pads[1] - dilation * (kernel - 1) - 1) // stride + 1


def window_offset_range(size_in: int, size_out: int, offset: int, stride: int, dilation: int,
                        left: int) -> tuple[int, tuple[int, int, int], tuple[int, int, int]] | None:
    """Along one axis, the output positions ``s`` whose window offset ``offset`` reads an input position
    ``u = stride s + dilation offset - left`` inside ``[0, size_in)`` (not the padding): the phase ``φ = u mod stride``,
    the range of ``s`` and that of ``(u - φ) / stride`` (the index among the positions of phase ``φ``), as
    ``(φ, (start, stop, 1), (start, stop, 1))``; None if there are none.

    >>> window_offset_range(4, 4, 0, 1, 1, 1)  # 3x3, padding 1, offset 0: u = s - 1, inside for s = 1..3
    (0, (1, 4, 1), (0, 3, 1))
    >>> window_offset_range(8, 4, 2, 2, 1, 1)  # stride 2, offset 2: u = 2 s + 1, phase 1, its positions 0..3
    (1, (0, 4, 1), (0, 4, 1))
    """
    t = dilation * offset - left
    phase, shift = t % stride, t // stride
    n_phase = max(0, (size_in - phase + stride - 1) // stride)  # input positions of this phase
    lo, hi = max(0, -shift), min(size_out - 1, n_phase - 1 - shift)
    if hi < lo:
        return None
    return phase, (lo, hi + 1, 1), (lo + shift, hi + shift + 1, 1)


@dataclasses.dataclass(frozen=True)
class Factorable:
    """A role whose per-sample gradient is ``G = Σ_s c_s x_sᵀ``: ``rows`` R (of ``c``), ``cols`` D (of ``x``), ``positions`` S.

    A linear layer's weight ``(out, in)`` over the input's positions; a 2-D convolution's kernel
    ``(C_out, C_in kh kw)`` over the output positions (``x`` its im2col patches).
    """

    rows: int
    cols: int
    positions: int


@dataclasses.dataclass(frozen=True)
class PaddedFactors:
    """A 2-D convolution's gradient factors before im2col: ``c`` ``(g, O, R, S)`` and the zero-padded input
    ``x`` ``(g, C, Hp, Wp)``, whose patches under the window (``kernel``, ``stride``, ``dilation``) are ``G``'s ``x``."""

    c: Tensor
    x: Tensor
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]


class Rule:
    """Base class of a rule; subclasses set ``name`` and define ``match``, ``capture`` and ``structure``.

    ``names``/``defaults`` describe the op's signature for the default :meth:`bind`
    (positional order, then keywords); a rule whose op takes its arguments otherwise
    (``einsum(eq, *operands)``) overrides :meth:`bind`. The optional per-sample jobs
    (``write_gradient``, ``gradient_workspace``, ``factorable``, ``factors``, ``padded_factors``,
    ``window_size``: module docstring) decline by default.
    """

    name: ClassVar[str] = "rule"
    names: ClassVar[tuple[str, ...]] = ()
    defaults: ClassVar[dict[str, Any]] = {}
    fresh_output: ClassVar[bool] = False
    """True where the op returns a new tensor that its backward never reads (a convolution, a linear map, a norm):
    the capture pass then adds its probe to that tensor in place instead of to a copy of it (on a CIFAR ResNet-18 the
    rows took 43.1 → 41.5 ms per sample; ``benchmarks/bench_capture.py``, RESULTS.md "Rows, round 4"). Leave False
    where the backward may read the output (attention, an RNN cell) or the output may be a view."""
    static_meta: ClassVar[bool] = False
    """True when :meth:`capture`'s ``meta`` depends only on shapes and non-tensor arguments, never
    on a tensor's values: ntkfunc may then keep the capture for later calls with the same input
    signature (a kernel per training step). Leave False for a rule that reads values into meta."""

    def bind(self, args: tuple, kwargs: dict) -> Bound | None:
        """The call's arguments by name (positional first, then defaults); None if the call does not fit."""
        return bind(args, kwargs, self.names, self.defaults)

    def match(self, a: Bound, is_param: IsParam) -> dict[str, Tensor] | None:
        raise NotImplementedError(f"Subclass {type(self).__name__} must define match()")

    def capture(self, a: Bound, is_param: IsParam) -> tuple[list[Tensor | None], Meta]:
        raise NotImplementedError(f"Subclass {type(self).__name__} must define capture()")

    def structure(self, role: str, operands: Sequence[Tensor | None], meta: Meta, y_shape: tuple[int, ...]) -> Structure:
        raise NotImplementedError(f"Subclass {type(self).__name__} must define structure()")

    def output(self, a: Bound, operands: Sequence[Tensor | None]) -> Tensor | None:
        """The op's result for the capture pass, computed a cheaper way than calling the op again after
        :meth:`capture` (differentiable as the op is, equal up to float rounding); None: the op is called."""
        return None

    # --- optional: the per-sample maths of a role (module docstring); the defaults decline ------

    def write_gradient(self, role: str, operands: Sequence[Tensor | None], cot: Tensor, meta: Meta, y_shape: tuple[int, ...],
                       out: Tensor, buffers: Buffers) -> bool:
        """Write the role's per-sample gradient into ``out`` ``(g, O, numel)``; False: not handled (the einsum runs)."""
        return False

    def gradient_workspace(self, role: str, meta: Meta, y_shape: tuple[int, ...]) -> dict[str, int]:
        """Elements per sample of each buffer (by name) that :meth:`write_gradient` takes."""
        return {}

    def factorable(self, role: str, meta: Meta, y_shape: tuple[int, ...]) -> Factorable | None:
        """The sizes of ``G = Σ_s c_s x_sᵀ`` if the role's per-sample gradient factors so, else None."""
        return None

    def factors(self, role: str, operands: Sequence[Tensor | None], cot: Tensor, meta: Meta, y_shape: tuple[int, ...],
                buffers: Buffers) -> tuple[Tensor, Tensor] | None:
        """``(c (g, O, R, S), x (g, S, D))`` of a :meth:`factorable` role; None where this call is outside it."""
        return None

    def padded_factors(self, role: str, operands: Sequence[Tensor | None], cot: Tensor, meta: Meta,
                       y_shape: tuple[int, ...]) -> PaddedFactors | None:
        """The factors of a convolution's kernel before im2col; None for anything else."""
        return None

    def window_size(self, meta: Meta) -> int:
        """Input elements each output element reads (a convolution's kernel volume); 1 by default."""
        return 1


RULES: dict[Any, Rule] = {}
"""The torch function a rule handles -> the rule (filled by :func:`register`)."""

EXPANSIONS: dict[Any, Callable[..., Any]] = {}
"""A fused torch function -> its re-implementation in ruled primitives (filled by :func:`expand`)."""

_DISABLED: contextvars.ContextVar[bool] = contextvars.ContextVar("ntkfunc_rules_disabled", default=False)
_FORCED: contextvars.ContextVar[bool] = contextvars.ContextVar("ntkfunc_rules_forced", default=False)

R = TypeVar("R", bound=type)


def register(*ops: Any) -> Callable[[R], R]:
    """Class decorator: ``@register(torch.nn.functional.linear)`` makes the rule handle those functions.

    Refuses a function that already has a rule (rules never shadow each other silently).
    """
    if not ops:
        raise ValueError("register: expected at least one op")

    def add(cls: R) -> R:
        rule = cls()
        for op in ops:
            if op in RULES:
                raise KeyError(f"{op} already has rule {RULES[op].name}; refusing {rule.name}")
            RULES[op] = rule
        return cls

    return add


def lookup(op: Any) -> Rule | None:
    """The rule for ``op``, or None (no rule, or rules :func:`disabled`): Jacobian contraction then."""
    if _DISABLED.get():
        return None
    try:
        return RULES.get(op)
    except TypeError:  # unhashable callables
        return None


def expand(*ops: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: ``fn`` re-implements ``op`` in primitives that have rules (or returns NotImplemented).

    The capture runs ``fn`` instead of a fused op that consumes parameters (such as
    ``multi_head_attention_forward``), so the primitives inside get their rules.
    """

    def add(fn: Callable[..., Any]) -> Callable[..., Any]:
        for op in ops:
            if op in EXPANSIONS:
                raise KeyError(f"{op} already has expansion {EXPANSIONS[op].__name__}")
            EXPANSIONS[op] = fn
        return fn

    return add


def expansion(op: Any) -> Callable[..., Any] | None:
    """The expansion of ``op`` into ruled primitives, or None (none, or rules :func:`disabled`)."""
    if _DISABLED.get():
        return None
    try:
        return EXPANSIONS.get(op)
    except TypeError:
        return None


def enabled() -> bool:
    """Whether rules are in use here (False inside :func:`disabled`)."""
    return not _DISABLED.get()


def is_forced() -> bool:
    """Whether rules apply wherever they match, cheaper or not (True inside :func:`forced`)."""
    return _FORCED.get()


@contextlib.contextmanager
def forced() -> Iterator[None]:
    """Within the block (this thread / context only) every rule that matches is used.

    Outside it, implementation 3 and ``"auto"`` take a parameter's Jacobian from reverse mode
    (and skip the capture altogether) where that is cheaper than its rule; inside it every
    covered parameter's kernel term comes from its rule, so that a rule can be tested
    (:func:`ntkfunc.testing.check_rule` uses it) or measured.

    Example:
      >>> import torch, ntkfunc
      >>> from ntkfunc import rules
      >>> f = lambda p, x: torch.tanh(x @ p)
      >>> p, x = torch.randn(3, 2, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
      >>> with rules.forced():
      ...     k = ntkfunc.ntk_fn(f, implementation=3)(x, None, p)
      >>> bool(torch.allclose(k, ntkfunc.ntk_fn(f)(x, None, p)))
      True
    """
    token = _FORCED.set(True)
    try:
        yield
    finally:
        _FORCED.reset(token)


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Within the block (this thread / context only) no rule or expansion applies: every parameter falls back.

    Implementation 3 then computes every parameter's term from its reverse-mode Jacobian,
    which is the same kernel by another route; comparing the two proves a rule exact.

    Example:
      >>> import torch, ntkfunc
      >>> from ntkfunc import rules
      >>> with rules.disabled():
      ...     rules.lookup(torch.nn.functional.linear) is None
      True
      >>> rules.lookup(torch.nn.functional.linear).name
      'linear'
    """
    token = _DISABLED.set(True)
    try:
        yield
    finally:
        _DISABLED.reset(token)


# --- the one check of a rule's output -----------------------------------------------------


def check_structure(s: Structure, *, rule: str, role: str, theta_shape: Sequence[int]) -> Structure:
    """``s`` if it is a well-formed factorisation of ``∂y/∂θ`` for a parameter of ``theta_shape``.

    Checked: one distinct letter per axis of ``y`` and per operand axis, distinct θ letters
    that occur in ``y`` or an operand, operands of rank ``1 + len(letters)`` (their leading
    sample axis), one size per letter across ``y`` and the operands, and θ's sizes
    multiplying to the parameter's number of elements. A violation is a bug in the rule:
    a RuntimeError names the rule, the role and what is wrong.

    >>> x = torch.zeros(1, 3, 4)
    >>> s = Structure((3, 5), "az", "zy", [("ay", x)])
    >>> check_structure(s, rule="linear", role="weight", theta_shape=(5, 4)) is s
    True
    """

    def fail(what: str) -> RuntimeError:
        return RuntimeError(f"rule {rule} (role {role!r}) returned a malformed Structure: {what}")

    if len(s.y) != len(s.y_shape) or len(set(s.y)) != len(s.y):
        raise fail(f"y letters {s.y!r} for y_shape {tuple(s.y_shape)}; expected one distinct letter per axis")
    sizes = dict(zip(s.y, s.y_shape))
    for letters, t in s.operands:
        if not isinstance(t, torch.Tensor):
            raise fail(f"operand {letters!r} is a {type(t).__name__}; expected a tensor")
        if len(set(letters)) != len(letters) or t.ndim != 1 + len(letters):
            raise fail(
                f"operand {letters!r} of shape {tuple(t.shape)}; expected distinct letters and a leading sample "
                f"axis plus one axis per letter (ndim {1 + len(letters)})"
            )
        for ch, d in zip(letters, t.shape[1:]):
            if sizes.setdefault(ch, int(d)) != d:
                raise fail(f"letter {ch!r} has sizes {sizes[ch]} and {int(d)}; expected one size per letter")
    if len(set(s.theta)) != len(s.theta) or any(ch not in sizes for ch in s.theta):
        raise fail(f"theta letters {s.theta!r}; expected distinct letters that occur in y {s.y!r} or an operand")
    numel = math.prod(theta_shape)
    if math.prod(sizes[ch] for ch in s.theta) != numel:
        got = tuple(sizes[ch] for ch in s.theta)
        raise fail(f"theta axes of sizes {got} for a parameter of shape {tuple(theta_shape)}; expected {numel} elements")
    if not isinstance(s.scale, (int, float, complex)):
        raise fail(f"scale {s.scale!r}; expected a number")
    return s


# --- helpers shared by the families ---------------------------------------------------


def bind(args: tuple, kwargs: dict, names: Sequence[str], defaults: dict[str, Any]) -> Bound | None:
    """Arguments by name (positional first); None if too many positional or an unknown keyword is given.

    >>> bind((1, 2), {"c": 3}, ("a", "b", "c"), {"c": 0})
    {'c': 3, 'a': 1, 'b': 2}
    """
    if len(args) > len(names) or any(k not in names for k in kwargs):
        return None
    bound = dict(defaults)
    bound.update(zip(names, args))
    bound.update(kwargs)
    return bound


def einsum_structure(
    inputs: Sequence[str],
    output: str,
    theta_index: int,
    tensors: Sequence[Tensor | None],
    theta_shape: Sequence[int],
    y_shape: Sequence[int],
    scale: complex | float = 1.0,
) -> Structure:
    """The structure of ``y = einsum(inputs -> output)`` with respect to operand ``theta_index``.

    ``tensors`` are the other operands (batch-first; None at ``theta_index``). Size-1 axes that
    broadcast are dropped; a θ axis that appears nowhere else (y only depends on its sum)
    gets an operand of ones, so that summing it over θ gives its size.
    """
    sizes: dict[str, int] = {}
    for letters, shape in [(output, tuple(y_shape)), (inputs[theta_index], tuple(theta_shape))] + [
        (s, tuple(t.shape[1:])) for s, t in zip(inputs, tensors) if t is not None
    ]:
        for c, d in zip(letters, shape):
            sizes[c] = max(sizes.get(c, 1), d)
    operands = []
    for s, t in zip(inputs, tensors):
        if t is None:
            continue
        keep = [i for i, c in enumerate(s) if not (t.shape[1 + i] == 1 and sizes[c] > 1)]
        if len(keep) < len(s):
            t = t.reshape(t.shape[0], *[t.shape[1 + i] for i in keep])
            s = "".join(s[i] for i in keep)
        operands.append((s, t))
    seen = set(output).union(*[set(s) for s, _ in operands])
    theta = ""
    for c, d in zip(inputs[theta_index], theta_shape):
        if d == 1 and sizes[c] > 1:
            continue
        if c not in seen:
            operands.append((c, torch.ones(1, d)))  # leading size 1: shared by all samples
        theta += c
    return Structure(tuple(y_shape), output, theta, operands, scale)
