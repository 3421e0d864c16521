"""Ops that torch cannot batch under the nesting a kernel uses, computed another way there.

Every kernel runs ``f`` under nested ``torch.func`` transforms (implementation 1: samples
vmapped outside, output cotangents vmapped inside ``jacrev``; implementation 2: tangents
outside, samples inside ``jvp``). A few torch ops break there although they work on one
sample without transforms:

- ``prelu``: the batching rule of its backward mixes up the two vmap levels (torch 2.13):
  a silently wrong kernel when a block's sample count equals the number of outputs, a shape
  error otherwise. Computed as ``where(x > 0, x, w x)`` with the weight on the channel axis,
  the same arithmetic as torch's kernel (the same numbers).
- ``lstm`` / ``gru`` / ``rnn_tanh`` / ``rnn_relu`` and their cells: without an initial state
  the module builds a zero state with ``torch.zeros`` (not batched) and the op adds the
  batched input projection into a product of it in place. The state is made batched like
  the op's other tensors first (``h + 0`` with a zero that carries their batch levels), which
  changes no value.
- ``rrelu`` outside training (``nn.RReLU`` in eval mode): torch's op has no batching rule;
  it is ``leaky_relu`` with the mean slope, which is what torch computes.
- ``embedding_bag``: its backward has no derivative, so implementation 2's forward mode
  (which transposes a VJP for ops without a forward-mode rule) fails. Computed as
  ``embedding`` followed by the bag's sum / mean / max (per-sample weights and ``padding_idx``
  included); ``max_norm`` and ``scale_grad_by_freq`` (whose gradient is not the derivative)
  keep torch's op.

:class:`BatchableOps` is entered around every call of ``f`` inside a kernel computation
(``Problem._call`` in :mod:`ntkfunc._core.problem`), on top of any mode the engine has
entered, so that implementation 3's capture sees the same calls in each of its passes; and
around ``ntk_vp_fn``'s and ``taylor_expand``'s passes. ``Problem._call`` leaves it out where the
probe of ``f`` under ``vmap`` (once per input signature) found that ``f`` calls none of these ops
(:attr:`BatchableOps.used`): a mode costs a Python call per op, a few microseconds each, which
is most of a small model's overhead over ``vmap(grad)``; the ops ``f`` calls depend on the input
signature alone, as for implementation 3's capture. Every replacement computes what
torch's op computes (the same numbers for ``prelu``, ``rrelu`` and the recurrent layers;
``embedding_bag`` up to the order of its sums).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import vjp
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from ntkfunc._core.forward_ad import SCALAR_OVERLOADS, scalar_overload

_ft = torch._C._functorch
_is_wrapped = _ft.is_functorch_wrapped_tensor


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]


# --- prelu ----------------------------------------------------------------------------------


def prelu(input: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.prelu`` from ``where`` and ``mul``: ``x`` where ``x > 0``, else ``w x`` (``w`` per channel, axis 1).

    >>> x, w = torch.randn(2, 3, 4), torch.rand(3)
    >>> torch.equal(prelu(x, w), F.prelu(x, w))
    True
    """
    if weight.numel() == 1:
        w = weight.reshape(())
    elif input.ndim >= 2 and input.shape[1] == weight.numel():
        w = weight.reshape((-1,) + (1,) * (input.ndim - 2))
    else:  # channels that do not match: torch's op says so
        return torch.prelu(input, weight)
    return torch.where(input > 0, input, w * input)


# --- rrelu ----------------------------------------------------------------------------------


def rrelu(input: torch.Tensor, lower: float = 1.0 / 8, upper: float = 1.0 / 3, training: bool = False, inplace: bool = False) -> torch.Tensor:
    """``F.rrelu`` outside training: ``leaky_relu`` with the mean slope, as torch computes it (its op has no batching rule).

    >>> x = torch.randn(5)
    >>> torch.equal(rrelu(x), F.rrelu(x))
    True
    """
    if training:  # a random slope per element: torch's op
        return F.rrelu(input, lower, upper, training, inplace)
    return F.leaky_relu(input, (lower + upper) / 2, inplace)


# --- recurrent layers -----------------------------------------------------------------------


def _batched_like(state: torch.Tensor, others: Sequence[torch.Tensor]) -> torch.Tensor:
    """``state + 0``, where the zero carries every batch level of ``others`` (the values are unchanged)."""
    zero = None
    for t in others:
        if _is_wrapped(t) and t.is_floating_point():
            z = torch.zeros_like(t.reshape(-1)[:1]).sum()
            zero = z if zero is None else zero + z
    return state if zero is None else state + zero.to(state.dtype)


def _recurrent(func: Callable[..., Any], state_at: Callable[[tuple], int]) -> Callable[..., Any]:
    """``func`` with its state argument (position ``state_at(args)``: a tensor or a list of them) batched like the rest."""

    def call(*args: Any, **kwargs: Any) -> Any:
        k = state_at(args)
        others = _tensors((args[:k], args[k + 1:], kwargs))
        state = args[k]
        if isinstance(state, torch.Tensor):
            state = _batched_like(state, others)
        else:
            state = type(state)(_batched_like(s, others) for s in state)
        args = (*args[:k], state, *args[k + 1:])
        first = args[0]
        if isinstance(first, torch.Tensor) and first.is_floating_point() and _ft.is_batchedtensor(first):
            # vmap innermost (no derivative level): torch has no batching rule for the fused op, but under a
            # grad level it is decomposed into ops that have one. The primal output of a vjp is that.
            return vjp(lambda x: func(x, *args[1:], **kwargs), first)[0]
        return func(*args, **kwargs)

    return call


def _sequence_state(args: tuple) -> int:
    """Position of the state: ``lstm(input, hx, params, ...)``, or 2 in the packed ``lstm(data, batch_sizes, hx, ...)`` (gru, rnn alike)."""
    packed = len(args) > 2 and isinstance(args[1], torch.Tensor) and not args[1].is_floating_point()  # batch_sizes
    return 2 if packed else 1


# --- embedding_bag ---------------------------------------------------------------------------


def embedding_bag(input: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor | None = None, max_norm: float | None = None,
                  norm_type: float = 2, scale_grad_by_freq: bool = False, mode: str = "mean", sparse: bool = False,
                  per_sample_weights: torch.Tensor | None = None, include_last_offset: bool = False,
                  padding_idx: int | None = None) -> torch.Tensor:
    """``F.embedding_bag`` as ``F.embedding`` and a reduction per bag (the cases :func:`_plain_bag` accepts).

    >>> w, ids = torch.randn(10, 3, dtype=torch.float64), torch.tensor([[1, 2, 4], [4, 3, 0]])
    >>> torch.allclose(embedding_bag(ids, w, mode="max", padding_idx=0), F.embedding_bag(ids, w, mode="max", padding_idx=0))
    True
    """
    if padding_idx is not None and padding_idx < 0:
        padding_idx += weight.shape[0]
    if input.ndim == 2:  # fixed-length bags, one per row
        emb = F.embedding(input, weight)  # (B, L, D)
        keep = None if padding_idx is None else (input != padding_idx)
        if per_sample_weights is not None:
            emb = emb * per_sample_weights.unsqueeze(-1).to(emb.dtype)
        if mode == "max":
            if keep is not None:
                emb = emb.masked_fill(~keep.unsqueeze(-1), float("-inf"))
            out = emb.gather(1, emb.argmax(1, keepdim=True)).squeeze(1)
            return out if keep is None else torch.where(keep.any(1, keepdim=True), out, torch.zeros_like(out))
        if keep is not None:
            emb = emb * keep.unsqueeze(-1).to(emb.dtype)
        total = emb.sum(1)
        if mode == "sum":
            return total
        count = torch.full_like(total[:, :1], input.shape[1]) if keep is None else keep.sum(1, keepdim=True).to(total.dtype)
        return total / count.clamp(min=1)
    # 1-D input with offsets: bag b holds positions offsets[b] to offsets[b + 1]
    assert offsets is not None
    bags = offsets.shape[0] - 1 if include_last_offset else offsets.shape[0]
    starts = offsets[:bags]
    seg = torch.bucketize(torch.arange(input.shape[0], device=input.device), starts, right=True) - 1  # bag of each position
    emb = F.embedding(input, weight)  # (n, D)
    keep = torch.ones_like(input, dtype=torch.bool) if padding_idx is None else (input != padding_idx)
    if include_last_offset:
        keep = keep & (torch.arange(input.shape[0], device=input.device) < offsets[bags])
    keep = keep & (seg >= 0)
    seg = seg.clamp(min=0)
    if per_sample_weights is not None:
        emb = emb * per_sample_weights.unsqueeze(-1).to(emb.dtype)
    zeros = emb.new_zeros(bags, emb.shape[1])
    if mode == "max":
        index = seg.unsqueeze(-1).expand_as(emb)
        masked = emb.masked_fill(~keep.unsqueeze(-1), float("-inf"))
        out = zeros.scatter_reduce(0, index, masked, reduce="amax", include_self=False)
        filled = zeros[:, 0].index_add(0, seg, keep.to(emb.dtype)) > 0
        return torch.where(filled.unsqueeze(-1), out, zeros)
    total = zeros.index_add(0, seg, emb * keep.unsqueeze(-1).to(emb.dtype))
    if mode == "sum":
        return total
    count = zeros[:, 0].index_add(0, seg, keep.to(emb.dtype))
    return total / count.clamp(min=1).unsqueeze(-1)


def _plain_bag(args: tuple, kwargs: dict) -> bool:
    """Whether :func:`embedding_bag` computes this call (else torch's op runs: its own checks and errors)."""
    if len(args) > len(_EMBEDDING_BAG_ARGS) or any(k not in _EMBEDDING_BAG_ARGS for k in kwargs):
        return False
    bound = {**dict(zip(_EMBEDDING_BAG_ARGS, args)), **kwargs}
    input, weight = bound.get("input"), bound.get("weight")
    offsets, psw = bound.get("offsets"), bound.get("per_sample_weights")
    mode = bound.get("mode", "mean")
    if not (isinstance(input, torch.Tensor) and isinstance(weight, torch.Tensor)) or input.is_floating_point() or input.is_nested:
        return False
    if bound.get("max_norm") is not None or bound.get("scale_grad_by_freq", False) or weight.ndim != 2 or mode not in ("sum", "mean", "max"):
        return False
    if psw is not None and (mode != "sum" or tuple(psw.shape) != tuple(input.shape)):
        return False
    if input.ndim == 2:
        return offsets is None
    return input.ndim == 1 and isinstance(offsets, torch.Tensor) and offsets.ndim == 1


_EMBEDDING_BAG_ARGS = ("input", "weight", "offsets", "max_norm", "norm_type", "scale_grad_by_freq", "mode", "sparse",
                       "per_sample_weights", "include_last_offset", "padding_idx")  # F.embedding_bag's, in order


# --- the mode --------------------------------------------------------------------------------


def _decompositions() -> dict[Any, Callable[..., Any]]:
    table: dict[Any, Callable[..., Any]] = {torch.prelu: prelu, torch.Tensor.prelu: prelu, F.rrelu: rrelu}
    for name in ("lstm", "gru", "rnn_tanh", "rnn_relu"):
        table[getattr(torch, name)] = _recurrent(getattr(torch, name), _sequence_state)
    for name in ("lstm_cell", "gru_cell", "rnn_tanh_cell", "rnn_relu_cell"):
        table[getattr(torch, name)] = _recurrent(getattr(torch, name), lambda args: 1)
    return table


DECOMPOSITIONS: dict[Any, Callable[..., Any]] = _decompositions()
"""torch function -> how it is computed inside :class:`BatchableOps` (``F.embedding_bag``: see :func:`_plain_bag`)."""


class BatchableOps(TorchFunctionMode):
    """Computes the ops of the module docstring the way given there, for the calls made inside this mode.

    Example:
      >>> from torch.func import jacrev, vmap
      >>> w, x = torch.tensor([0.25]), torch.randn(3, 2)
      >>> with BatchableOps():
      ...     j = vmap(jacrev(lambda w, x: F.prelu(x, w)), in_dims=(None, 0))(w, x)
      >>> j.shape
      torch.Size([3, 2, 1])
    """

    def __init__(self, scalar_overloads: bool = False) -> None:
        super().__init__()
        self.used = False
        """Whether a call inside was one of the ops of the module docstring (computed another way, or looked at:
        ``embedding_bag``); where a probe of ``f`` finds none, the kernels call ``f`` without this mode (its Python
        call per op is all it would add)."""
        self.scalar_overloads = scalar_overloads
        """Also send tensor-by-number ``mul``/``div``/``add``/``sub`` to their ``.Scalar`` overloads, as
        :class:`~ntkfunc._core.forward_ad.ScalarOverloads` does (for forward mode, in this one mode: a second mode
        would cost every op another Python call)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if self.scalar_overloads and func in SCALAR_OVERLOADS:  # the membership test first: most ops are not
            op = scalar_overload(func, args, kwargs)
            if op is not None:
                return op(*args)
        kwargs = kwargs or {}
        impl = DECOMPOSITIONS.get(func)
        if impl is None:
            if func is not F.embedding_bag:
                return func(*args, **kwargs)
            impl = embedding_bag if _plain_bag(args, kwargs) else func
        self.used = True
        return impl(*args, **kwargs)
