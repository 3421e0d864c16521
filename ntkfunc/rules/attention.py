"""Expansion of ``F.multi_head_attention_forward`` (``nn.MultiheadAttention``) into ruled primitives.

The fused functional consumes all four projection parameters at once, so without
help they would all fall back to Jacobians. For self-attention (``query is key is
value``) without masks, extra key/value biases or dropout, the capture re-runs the
call as ``F.linear`` (packed q/k/v projection) -> scaled dot-product attention in
plain ops -> ``F.linear`` (output projection), and the linear rule handles the
parameters. Other configurations are left to the fused op (and the fallback).

Example:
  >>> import torch
  >>> from ntkfunc.rules import expansion
  >>> att = torch.nn.MultiheadAttention(8, 2).eval()
  >>> x = torch.randn(5, 3, 8)
  >>> args = (x, x, x, 8, 2, att.in_proj_weight, att.in_proj_bias, None, None, False, 0.0,
  ...         att.out_proj.weight, att.out_proj.bias)
  >>> out, w = expansion(torch.nn.functional.multi_head_attention_forward)(*args, training=False)
  >>> torch.allclose(out, att(x, x, x)[0], atol=1e-6), w.shape
  (True, torch.Size([3, 5, 5]))
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ntkfunc.rules.base import expand

Tensor = torch.Tensor


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
    """Self-attention in primitives ``(L, B, E) -> ((L, B, E), weights)``; NotImplemented otherwise."""
    unsupported = (
        not (query is key and key is value) or in_proj_weight is None or bias_k is not None or bias_v is not None
        or add_zero_attn or (dropout_p > 0 and training) or key_padding_mask is not None or attn_mask is not None
        or use_separate_proj_weight or static_k is not None or static_v is not None or is_causal
        or query.dim() not in (2, 3) or query.shape[-1] != embed_dim_to_check
    )
    if unsupported:
        return NotImplemented
    assert in_proj_weight is not None
    unbatched = query.dim() == 2
    x = query.unsqueeze(1) if unbatched else query
    length, batch, embed = x.shape
    head = embed // num_heads
    qkv = F.linear(x, in_proj_weight, in_proj_bias).unflatten(-1, (3, embed))  # (L, B, 3, E)
    q, k, v = (qkv.select(2, i).reshape(length, batch * num_heads, head).transpose(0, 1) for i in range(3))
    weights = torch.softmax(torch.bmm(q * head**-0.5, k.transpose(1, 2)), dim=-1)  # (B*H, L, L)
    out = torch.bmm(weights, v).transpose(0, 1).reshape(length * batch, embed)
    out = F.linear(out, out_proj_weight, out_proj_bias).view(length, batch, embed)
    avg: Tensor | None = None
    if need_weights:
        avg = weights.view(batch, num_heads, length, length)
        avg = avg.mean(1) if average_attn_weights else avg
        avg = avg.squeeze(0) if unbatched else avg
    return (out.squeeze(1) if unbatched else out), avg
