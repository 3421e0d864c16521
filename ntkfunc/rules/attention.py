"""Expansion of ``F.multi_head_attention_forward`` (``nn.MultiheadAttention``) into ruled primitives.

The fused functional consumes all four projection parameters at once (and slices the packed
``in_proj_weight`` with ``split`` for cross-attention), so without help they would all fall
back to Jacobians. The capture re-runs the call as

- the input projection: one ``F.linear`` with the packed ``in_proj_weight`` and ``in_proj_bias``
  over the query tokens (self-attention) or over the query, key (and value) tokens
  concatenated along the sequence (cross-attention: ``nn.TransformerDecoder``'s memory), each
  of q, k, v then read from its rows and its third of the features; with separate
  ``q/k/v_proj_weight`` (``kdim``/``vdim``) three ``F.linear`` and the packed bias as one ``add``;
- ``bias_k`` / ``bias_v`` as an ``add`` broadcast over the batch, then concatenated to k and v;
- the attention core in plain ops: ``attn_mask`` (2-D or 3-D, boolean or additive),
  ``key_padding_mask``, ``is_causal``, ``add_zero_attn``, per-head weights averaged or not, as
  torch computes them (the ``need_weights=False`` path's ``scaled_dot_product_attention`` gives
  rows whose keys are all masked zero weights, the other path NaN: both kept);
- the output projection: ``F.linear``,

so the linear, add and concatenation rules handle every parameter. Dropout in training mode
and ``static_k`` / ``static_v`` are left to the fused op (its parameters fall back). The values
are the fused op's up to rounding.

Example:
  >>> import torch
  >>> from ntkfunc.rules import expansion
  >>> att = torch.nn.MultiheadAttention(8, 2).eval()
  >>> x, memory = torch.randn(5, 3, 8), torch.randn(7, 3, 8)
  >>> args = (x, memory, memory, 8, 2, att.in_proj_weight, att.in_proj_bias, None, None, False, 0.0,
  ...         att.out_proj.weight, att.out_proj.bias)
  >>> out, w = expansion(torch.nn.functional.multi_head_attention_forward)(*args, training=False)
  >>> torch.allclose(out, att(x, memory, memory)[0], atol=1e-6), w.shape
  (True, torch.Size([3, 5, 7]))
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ntkfunc.rules.base import expand

Tensor = torch.Tensor


class _Unsupported(Exception):
    """A call outside what the expansion reproduces: the fused op runs instead."""


def _additive(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A boolean mask (True: masked) as an additive float mask, as ``F._canonical_mask`` makes it."""
    if mask is None or mask.is_floating_point():
        return mask
    if mask.dtype != torch.bool:
        raise _Unsupported
    return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))


def _project(query: Tensor, key: Tensor, value: Tensor, same: tuple[bool, bool], embed: int, in_proj_weight: Tensor | None,
             in_proj_bias: Tensor | None, separate: tuple[Tensor | None, Tensor | None, Tensor | None] | None
             ) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v ``(length, batch, E)``, each parameter consumed by one ruled call."""
    qk_same, kv_same = same
    if separate is not None:
        wq, wk, wv = separate
        if wq is None or wk is None or wv is None:
            raise _Unsupported
        q, k, v = F.linear(query, wq), F.linear(key, wk), F.linear(value, wv)
        if in_proj_bias is not None:
            zeros = torch.zeros(3, embed, dtype=in_proj_bias.dtype, device=in_proj_bias.device)
            b = torch.add(zeros, in_proj_bias.view(3, embed))
            q, k, v = q + b[0], k + b[1], v + b[2]
        return q, k, v
    if in_proj_weight is None:
        raise _Unsupported
    if qk_same and kv_same:  # self-attention: the packed projection of the tokens
        z = F.linear(query, in_proj_weight, in_proj_bias)
        return z[..., :embed], z[..., embed : 2 * embed], z[..., 2 * embed :]
    if key.shape != value.shape or key.shape[1:] != query.shape[1:]:
        raise _Unsupported
    length, src = query.shape[0], key.shape[0]
    tokens = torch.cat([query, key] if kv_same else [query, key, value])  # along the sequence
    z = F.linear(tokens, in_proj_weight, in_proj_bias)
    v_rows = z[length:] if kv_same else z[length + src :]
    return z[:length, :, :embed], z[length : length + src, :, embed : 2 * embed], v_rows[..., 2 * embed :]


def _append_bias(t: Tensor, bias: Tensor, batch: int) -> Tensor:
    """``cat([t, bias repeated over the batch])`` with ``bias`` ``(1, 1, E)`` consumed by one broadcast ``add``."""
    return torch.cat([t, torch.add(torch.zeros(1, batch, t.shape[-1], dtype=t.dtype, device=t.device), bias)])


def _safe_softmax(scores: Tensor) -> Tensor:
    """Softmax over the keys, zero for rows whose keys are all masked (``scaled_dot_product_attention``'s math)."""
    weights = torch.softmax(scores, dim=-1)
    return torch.where((scores == float("-inf")).all(-1, keepdim=True), torch.zeros_like(weights), weights)


@expand(F.multi_head_attention_forward)
def multi_head_attention(
    query: Tensor, key: Tensor, value: Tensor, embed_dim_to_check: int, num_heads: int,
    in_proj_weight: Tensor | None, in_proj_bias: Tensor | None, bias_k: Tensor | None,
    bias_v: Tensor | None, add_zero_attn: bool, dropout_p: float, out_proj_weight: Tensor,
    out_proj_bias: Tensor | None, training: bool = True, key_padding_mask: Tensor | None = None,
    need_weights: bool = True, attn_mask: Tensor | None = None, use_separate_proj_weight: bool = False,
    q_proj_weight: Tensor | None = None, k_proj_weight: Tensor | None = None,
    v_proj_weight: Tensor | None = None, static_k: Tensor | None = None,
    static_v: Tensor | None = None, average_attn_weights: bool = True, is_causal: bool = False,
) -> Any:
    """Multi-head attention in primitives ``(L, B, E) -> ((L, B, E), weights)``; NotImplemented where unsupported."""
    unsupported = (
        (dropout_p > 0 and training) or static_k is not None or static_v is not None or (bias_k is None) != (bias_v is None)
        or query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim()
        or query.shape[-1] != embed_dim_to_check or embed_dim_to_check % num_heads
        or (is_causal and attn_mask is None)
    )
    if unsupported:
        return NotImplemented
    try:
        return _attention(
            query, key, value, num_heads, in_proj_weight, in_proj_bias, bias_k, bias_v, add_zero_attn, out_proj_weight,
            out_proj_bias, key_padding_mask, need_weights, attn_mask,
            (q_proj_weight, k_proj_weight, v_proj_weight) if use_separate_proj_weight else None, average_attn_weights, is_causal,
        )
    except _Unsupported:
        return NotImplemented


def _attention(
    query: Tensor, key: Tensor, value: Tensor, num_heads: int, in_proj_weight: Tensor | None, in_proj_bias: Tensor | None,
    bias_k: Tensor | None, bias_v: Tensor | None, add_zero_attn: bool, out_proj_weight: Tensor, out_proj_bias: Tensor | None,
    key_padding_mask: Tensor | None, need_weights: bool, attn_mask: Tensor | None,
    separate: tuple[Tensor | None, Tensor | None, Tensor | None] | None, average_attn_weights: bool, is_causal: bool,
) -> tuple[Tensor, Tensor | None]:
    """``F.multi_head_attention_forward`` without dropout or static keys, step by step as torch 2.x computes it."""
    same = (query is key, key is value)
    batched = query.dim() == 3
    if not batched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    length, batch, embed = query.shape
    head = embed // num_heads
    key_padding_mask = _additive(key_padding_mask, query.dtype)
    if is_causal and key_padding_mask is None and not need_weights:
        attn_mask = None  # torch then lets scaled_dot_product_attention build the causal mask
    else:
        attn_mask = _additive(attn_mask, query.dtype)
        is_causal = is_causal and key_padding_mask is None
    q, k, v = _project(query, key, value, same, embed, in_proj_weight, in_proj_bias, separate)
    if attn_mask is not None:  # (L, S) for every head and sequence, or (B * heads, L, S)
        expected = (length, key.shape[0]) if attn_mask.dim() == 2 else (batch * num_heads, length, key.shape[0])
        if tuple(attn_mask.shape) != expected:
            raise _Unsupported
        attn_mask = attn_mask.unsqueeze(0) if attn_mask.dim() == 2 else attn_mask
    if bias_k is not None and bias_v is not None:
        k, v = _append_bias(k, bias_k, batch), _append_bias(v, bias_v, batch)
        attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
        key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
    q = q.reshape(length, batch * num_heads, head).transpose(0, 1)
    k = k.reshape(k.shape[0], batch * num_heads, head).transpose(0, 1)
    v = v.reshape(v.shape[0], batch * num_heads, head).transpose(0, 1)
    if add_zero_attn:
        zeros = torch.zeros(batch * num_heads, 1, head, dtype=k.dtype, device=k.device)
        k, v = torch.cat([k, zeros], dim=1), torch.cat([v, zeros], dim=1)
        attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
        key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
    src = k.shape[1]
    if key_padding_mask is not None:
        if key_padding_mask.shape != (batch, src):
            raise _Unsupported
        key_padding_mask = key_padding_mask.view(batch, 1, 1, src).expand(-1, num_heads, -1, -1).reshape(batch * num_heads, 1, src)
        attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
    if is_causal and attn_mask is None:  # scaled_dot_product_attention's causal mask (top-left aligned)
        keep = torch.ones(length, src, dtype=torch.bool, device=q.device).tril()
        attn_mask = torch.zeros(1, length, src, dtype=q.dtype, device=q.device).masked_fill(~keep, float("-inf"))
    scores = torch.bmm(q * head**-0.5, k.transpose(1, 2))
    if attn_mask is not None:
        scores = scores + attn_mask
    weights = torch.softmax(scores, dim=-1) if need_weights else _safe_softmax(scores)
    out = torch.bmm(weights, v).transpose(0, 1).reshape(length * batch, embed)
    out = F.linear(out, out_proj_weight, out_proj_bias).view(length, batch, -1)
    avg: Tensor | None = None
    if need_weights:
        avg = weights.view(batch, num_heads, length, src)
        avg = avg.mean(1) if average_attn_weights else avg
        avg = avg.squeeze(0) if not batched else avg
    return (out.squeeze(1) if not batched else out), avg
