"""Embedding family: ``F.embedding(ids, W)``, ``y[..., d] = W[ids[...], d]``; ``W[ids]``.

``∂y/∂W`` is a one-hot of the ids, so the NTK contribution counts coinciding tokens
weighted by cotangent products: ``Σ_{p,q} [ids₁[p] = ids₂[q]] (c₁[p]·c₂[q])``. Rows at
``padding_idx`` get no gradient in PyTorch, hence no kernel contribution here either.
``max_norm`` (which rewrites W in place) and ``scale_grad_by_freq`` fall back.

``F.embedding_bag`` (``nn.EmbeddingBag``) reaches the capture as ``F.embedding`` followed by the
bags' reductions (:mod:`ntkfunc._core.batchable` computes it so inside every kernel), so its
table is on this rule.

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
