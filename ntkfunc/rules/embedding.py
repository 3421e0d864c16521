"""Embedding family: ``F.embedding(ids, W)``, ``y[..., d] = W[ids[...], d]``; ``F.embedding_bag``; ``W[ids]``.

``∂y/∂W`` is a one-hot of the ids, so the NTK contribution counts coinciding tokens
weighted by cotangent products: ``Σ_{p,q} [ids₁[p] = ids₂[q]] (c₁[p]·c₂[q])``. Rows at
``padding_idx`` get no gradient in PyTorch, hence no kernel contribution here either.
``max_norm`` (which rewrites W in place) and ``scale_grad_by_freq`` fall back.

``F.embedding_bag`` (``nn.EmbeddingBag``) reduces the rows of each bag: with ``mode="sum"`` or
``"mean"`` it is ``y = M W`` with ``M[b, v]`` the (per-sample weighted, or averaged) count of
token ``v`` in bag ``b``, padding excluded; with ``"max"`` each output entry is one row's entry,
``∂y[b, d]/∂W[v, d] = [v = argmax]`` (the rows torch's own kernel selects).

Indexing a parameter with an integer tensor, ``W[ids]`` (learned positions indexed by position
ids, as in Whisper), is expanded into ``F.embedding(ids, W)`` during capture; other indexing is a
view of the parameter (followed into its consumer as any view).

Example:
  >>> import torch
  >>> from ntkfunc.rules import lookup
  >>> ids, w = torch.tensor([[1, 4, 1]]), torch.randn(5, 3)
  >>> rule = lookup(torch.nn.functional.embedding)
  >>> bound = rule.bind((ids, w), {})
  >>> rule.match(bound, lambda t: t is w)
  {'weight': ...}
  >>> ops, meta = rule.capture(bound, lambda t: t is w)
  >>> s = rule.structure("weight", [ids.unsqueeze(0)], meta, (1, 3, 3))
  >>> s.operands[0][1].shape  # one-hot of the ids: (samples, 1, 3, vocabulary)
  torch.Size([1, 1, 3, 5])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ntkfunc.rules.base import LETTERS, Bound, IsParam, Rule, Structure, Tensor, expand, register

_NAMES = ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse")
_DEFAULTS = {"padding_idx": None, "max_norm": None, "norm_type": 2.0, "scale_grad_by_freq": False, "sparse": False}


@dataclasses.dataclass(frozen=True)
class EmbeddingMeta:
    """An embedding's ``vocab`` (rows of the table) and ``padding_idx`` (non-negative, or None)."""

    vocab: int
    padding_idx: int | None


@register(F.embedding)
class Embedding(Rule):
    static_meta = True
    name = "embedding"
    names = _NAMES
    defaults = _DEFAULTS

    def match(self, a: Bound, is_param: IsParam) -> dict[str, Tensor] | None:
        if a["max_norm"] is not None or a["scale_grad_by_freq"] or not is_param(a["weight"]):
            return None
        if not isinstance(a["input"], torch.Tensor) or a["weight"].ndim != 2:
            return None
        return {"weight": a["weight"]}

    def capture(self, a: Bound, is_param: IsParam) -> tuple[list[Tensor | None], EmbeddingMeta]:
        vocab = int(a["weight"].shape[0])
        pad = a["padding_idx"]
        if pad is not None and pad < 0:
            pad += vocab
        return [a["input"]], EmbeddingMeta(vocab, pad)

    def structure(self, role: str, operands: Sequence[Tensor | None], meta: EmbeddingMeta, y_shape: tuple[int, ...]) -> Structure:
        (ids,) = operands
        assert ids is not None
        onehot = F.one_hot(ids.long(), meta.vocab)
        if meta.padding_idx is not None:
            keep = torch.ones(meta.vocab, dtype=onehot.dtype, device=onehot.device)
            onehot = onehot * keep.index_fill(0, torch.tensor([meta.padding_idx], device=onehot.device), 0)
        pos = LETTERS[: len(y_shape) - 1]
        return Structure(y_shape, pos + "z", "yz", [(pos + "y", onehot)])


_BAG_NAMES = ("input", "weight", "offsets", "max_norm", "norm_type", "scale_grad_by_freq", "mode", "sparse",
              "per_sample_weights", "include_last_offset", "padding_idx")
BAG_DEFAULTS = {"offsets": None, "max_norm": None, "norm_type": 2, "scale_grad_by_freq": False, "mode": "mean", "sparse": False,
                 "per_sample_weights": None, "include_last_offset": False, "padding_idx": None}
_BAG_MODES = ("sum", "mean", "max")


@dataclasses.dataclass(frozen=True)
class EmbeddingBagMeta:
    """An embedding bag's ``mode`` (``"sum"``, ``"mean"`` or ``"max"``)."""

    mode: str


def _bags(ids: Tensor, offsets: Tensor | None, include_last_offset: bool) -> tuple[Tensor, Tensor | None]:
    """``(ids (n,), offsets)`` of the bags: a 2-D input ``(bags, length)`` is one bag per row (offsets None)."""
    if ids.dim() == 2:
        return ids, None
    assert offsets is not None
    return ids, offsets[:-1] if include_last_offset else offsets


def _one_hot(ids: Tensor, vocab: int, dtype: torch.dtype) -> Tensor:
    """``F.one_hot`` without its check of the largest id (a value ``vmap`` cannot read per sample)."""
    return (ids.unsqueeze(-1) == torch.arange(vocab, device=ids.device)).to(dtype)


def bag_matrix(a: Bound, dtype: torch.dtype) -> Tensor:
    """``M`` ``(bags, vocab)`` with ``embedding_bag(input, W) = M W`` for ``mode`` ``"sum"`` / ``"mean"``.

    >>> ids, w = torch.tensor([[1, 3, 3], [0, 2, 2]]), torch.randn(4, 2)
    >>> a = {**BAG_DEFAULTS, "input": ids, "weight": w, "mode": "mean", "padding_idx": 0}
    >>> torch.allclose(bag_matrix(a, w.dtype) @ w, F.embedding_bag(ids, w, mode="mean", padding_idx=0))
    True
    """
    ids, starts = _bags(a["input"].long(), a["offsets"], a["include_last_offset"])
    vocab = int(a["weight"].shape[0])
    keep = torch.ones(ids.shape, dtype=dtype, device=ids.device)
    if a["padding_idx"] is not None:
        keep = keep * (ids != a["padding_idx"] % vocab)
    weights = keep if a["per_sample_weights"] is None else keep * a["per_sample_weights"].to(dtype)
    onehot = _one_hot(ids, vocab, dtype)
    if starts is None:  # (bags, length): one bag per row
        m, count = torch.einsum("bl,blv->bv", weights, onehot), keep.sum(-1)
    else:  # (n,) with the bags' first positions: member[b, p] = starts[b] <= p < starts[b + 1] (the last to the end)
        pos = torch.arange(ids.shape[0], device=ids.device)
        ends = torch.cat([starts[1:], torch.full_like(starts[:1], ids.shape[0])])
        member = ((pos >= starts.unsqueeze(-1)) & (pos < ends.unsqueeze(-1))).to(dtype)
        m, count = (member * weights) @ onehot, member @ keep
    return m / count.clamp(min=1).unsqueeze(-1) if a["mode"] == "mean" else m


def bag_argmax(a: Bound) -> Tensor:
    """``mode="max"``: the one-hot ``(bags, D, vocab)`` of the row each output entry is taken from (empty bags: none).

    The first of equal maxima in the bag's order, as torch's kernels take it; padding entries never.
    """
    w = a["weight"].detach()
    vocab = int(w.shape[0])
    ids, starts = _bags(a["input"].long(), a["offsets"], a["include_last_offset"])
    keep = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
    if a["padding_idx"] is not None:
        keep = ids != a["padding_idx"] % vocab
    if starts is None:  # (bags, length)
        member, flat = keep, ids
    else:
        pos = torch.arange(ids.shape[0], device=ids.device)
        ends = torch.cat([starts[1:], torch.full_like(starts[:1], ids.shape[0])])
        member, flat = (pos >= starts.unsqueeze(-1)) & (pos < ends.unsqueeze(-1)) & keep, ids.expand(starts.shape[0], -1)
    rows = w[flat]  # (bags, length, D)
    scores = torch.where(member.unsqueeze(-1), rows, torch.full_like(rows, float("-inf")))
    first = scores.argmax(1)  # (bags, D): the position of the first maximum
    chosen = flat.gather(1, first)
    return _one_hot(chosen, vocab, w.dtype) * member.any(-1).to(w.dtype)[:, None, None]


@register(F.embedding_bag)
class EmbeddingBag(Rule):
    """``F.embedding_bag`` with ``mode`` sum, mean or max, a 2-D input or a 1-D input with offsets, per-sample weights."""

    static_meta = True
    name = "embedding_bag"
    names = _BAG_NAMES
    defaults = BAG_DEFAULTS

    def match(self, a: Bound, is_param: IsParam) -> dict[str, Tensor] | None:
        w, ids = a["weight"], a["input"]
        if not is_param(w) or not isinstance(w, torch.Tensor) or w.ndim != 2 or not isinstance(ids, torch.Tensor):
            return None
        if a["max_norm"] is not None or a["scale_grad_by_freq"] or a["mode"] not in _BAG_MODES or ids.dim() not in (1, 2) or ids.is_nested:
            return None
        if ids.dim() == 1 and not isinstance(a["offsets"], torch.Tensor):
            return None
        if any(is_param(a[k]) for k in ("input", "offsets", "per_sample_weights")):
            return None
        return {"weight": w}

    def capture(self, a: Bound, is_param: IsParam) -> tuple[list[Tensor | None], EmbeddingBagMeta]:
        dtype = a["weight"].dtype
        operand = bag_argmax(a) if a["mode"] == "max" else bag_matrix(a, dtype)
        return [operand], EmbeddingBagMeta(a["mode"])

    def structure(self, role: str, operands: Sequence[Tensor | None], meta: EmbeddingBagMeta, y_shape: tuple[int, ...]) -> Structure:
        (m,) = operands
        assert m is not None
        if meta.mode == "max":  # (bags, D, vocab): y[b, z] = W[argmax[b, z], z]
            return Structure(y_shape, "az", "yz", [("azy", m)])
        return Structure(y_shape, "az", "yz", [("ay", m)])  # y = M W


@expand(torch.Tensor.__getitem__)
def index_rows(self: Tensor, index: Any) -> Any:
    """``W[ids]`` (``ids`` an integer tensor, optionally followed by full slices) as ``F.embedding(ids, W)``; else NotImplemented."""
    first = index[0] if isinstance(index, tuple) and index else index
    rest = index[1:] if isinstance(index, tuple) else ()
    whole = all(r is Ellipsis or (isinstance(r, slice) and r == slice(None)) for r in rest)
    if not (isinstance(first, torch.Tensor) and whole and self.dim() >= 1) or first.dtype not in (torch.int32, torch.int64):
        return NotImplemented
    rows = self.shape[0]
    ids = torch.where(first < 0, first + rows, first)
    table = self if self.dim() == 2 else self.reshape(rows, -1)
    out = F.embedding(ids, table)
    return out if self.dim() == 2 else out.reshape(*ids.shape, *self.shape[1:])
