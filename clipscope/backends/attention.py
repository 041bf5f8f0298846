"""Explicit multi-head attention, one function per module family, for head-level sites.

Fused attention kernels (``scaled_dot_product_attention``) never materialize the per-head tensors
that head-level sites expose. While such a site is captured or ablated, the hooks layer runs the
attention module through the function of its family here instead of its own ``forward``
(:class:`~clipscope.hooks.AttentionHeads`): the same computation, written out (Vaswani et al.,
"Attention Is All You Need", NeurIPS 2017, eq. 1 and section 3.2.2), with each per-head tensor passed
through a hook point, batch first:

- ``v``: the values, ``(B, S, heads, d_head)``;
- ``pattern``: ``softmax(q k^T / sqrt(d_head) + mask)``, ``(B, heads, L, S)``;
- ``z``: ``pattern @ v`` per head, ``(B, L, heads, d_head)``;
- ``result``: each head's share of the output projection, ``z[..., h, :] @ W[h]``,
  ``(B, L, heads, D)``, built only while a capture or ablation uses it; the output is then
  ``result.sum(heads) + b`` (Elhage et al., "A Mathematical Framework for Transformer Circuits",
  2021: the output projection splits into one independent term per head). In a block with layer
  scale (CaiT, Touvron et al., ICCV 2021: the block adds ``gamma * attention output``), ``gamma`` is
  folded into ``W`` and ``b``, so that ``result`` is each head's contribution to the residual stream;
  the module's output stays unscaled (``result.sum(heads) / gamma + b``; where ``gamma`` is 0 the
  stream gets nothing and the output reads ``b``).

A hook point's hooks may replace its tensor (an ablation); everything after it is computed from the
replacement. Each function returns what the module's own ``forward`` returns.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..hooks import HeadPoints


def output_projection(module: nn.Module, layer_scale: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The output projection of an attention module with ``out_proj`` (an ``nn.Linear``) and ``num_heads``,
    split by head: ``(W, b)`` with ``W`` of shape ``(heads, d_head, D)`` and ``b`` ``(D,)`` (zeros
    without a bias), detached, in the module's dtype and on its device, both times ``layer_scale.gamma``
    ``(D,)`` if given (the block's layer scale after the attention). ``z[..., h, :] @ W[h]`` is head
    ``h``'s result."""
    linear, heads = module.out_proj, module.num_heads
    weight = linear.weight.detach()
    out_features, in_features = weight.shape
    bias = linear.bias.detach() if linear.bias is not None else weight.new_zeros(out_features)
    weight = weight.T.reshape(heads, in_features // heads, out_features)
    if layer_scale is None:
        return weight, bias
    gamma = layer_scale.gamma.detach()
    return weight * gamma, bias * gamma


def _heads_forward(points: HeadPoints, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   mask: torch.Tensor | None, scale: float, projection: nn.Linear, dropout: float = 0.0,
                   gamma: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The computation both families share, from per-head ``q`` ``(B, L, H, dh)``, ``k`` and ``v``
    ``(B, S, H, dh)`` and an additive ``mask`` broadcastable to ``(B, H, L, S)``; ``dropout`` (the
    probability, 0 outside training) drops attention weights after the ``pattern`` point, as the modules
    do; ``gamma`` ``(D,)`` is the block's layer scale, folded into ``result``. Returns the output
    ``(B, L, D)`` and the attention weights ``(B, H, L, S)``."""
    v = points("v", v)
    scores = torch.einsum("blhd,bshd->bhls", q * scale, k)
    if mask is not None:
        scores = scores + mask
    pattern = points("pattern", scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype))
    if dropout > 0:
        pattern = F.dropout(pattern, p=dropout)
    z = points("z", torch.einsum("bhls,bshd->blhd", pattern, v))
    if not points.wants("result"):
        return projection(z.flatten(-2)), pattern
    heads = z.shape[-2]
    weight = projection.weight.T.reshape(heads, z.shape[-1], -1)
    if gamma is not None:
        weight = weight * gamma
    out = points("result", torch.einsum("blhd,hde->blhe", z, weight)).sum(dim=-2)
    if gamma is not None:
        out = out / gamma.masked_fill(gamma == 0, 1)
    return (out if projection.bias is None else out + projection.bias), pattern


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask (``True`` = masked out, as ``nn.MultiheadAttention`` takes it) as an additive one."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def multihead_attention(module: nn.MultiheadAttention, points: HeadPoints, query: torch.Tensor, key: torch.Tensor,
                        value: torch.Tensor, key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                        attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                        is_causal: bool = False, *,
                        layer_scale: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``torch.nn.MultiheadAttention.forward`` (open_clip's transformer blocks), written out.

    Takes the module's arguments: batched ``query``/``key``/``value`` in the module's layout
    (``batch_first`` or sequence first), ``attn_mask`` ``(L, S)`` or ``(B * heads, L, S)`` and
    ``key_padding_mask`` ``(B, S)``, boolean (``True`` = not attended) or additive. ``is_causal`` is
    only a hint that ``attn_mask`` is causal, as in the module. ``layer_scale`` (not a module argument; the
    backend binds it) is the block's layer scale after this attention, whose ``gamma`` ``result`` includes.
    Returns ``(output, weights)`` like the module: the weights (averaged over heads if
    ``average_attn_weights``) or ``None`` unless ``need_weights``.
    Modules with ``bias_k``/``bias_v`` or ``add_zero_attn`` are not declared for head sites.
    """
    if not module.batch_first:
        query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
    heads, width = module.num_heads, module.embed_dim
    if module.in_proj_weight is not None:
        w_q, w_k, w_v = module.in_proj_weight.chunk(3)
    else:
        w_q, w_k, w_v = module.q_proj_weight, module.k_proj_weight, module.v_proj_weight
    b_q, b_k, b_v = module.in_proj_bias.chunk(3) if module.in_proj_bias is not None else (None, None, None)
    batch, length, source = query.shape[0], query.shape[1], key.shape[1]
    q = F.linear(query, w_q, b_q).view(batch, length, heads, -1)
    k = F.linear(key, w_k, b_k).view(batch, source, heads, -1)
    v = F.linear(value, w_v, b_v).view(batch, source, heads, -1)
    mask = None
    if attn_mask is not None:
        mask = _additive(attn_mask, q.dtype)
        mask = mask.view(batch, heads, length, source) if mask.ndim == 3 else mask
    if key_padding_mask is not None:
        padding = _additive(key_padding_mask, q.dtype).view(batch, 1, 1, source)
        mask = padding if mask is None else mask + padding
    dropout = module.dropout if module.training else 0.0
    gamma = None if layer_scale is None else layer_scale.gamma
    out, pattern = _heads_forward(points, q, k, v, mask, (width // heads) ** -0.5, module.out_proj, dropout, gamma)
    out = out if module.batch_first else out.transpose(0, 1)
    if not need_weights:
        return out, None
    return out, pattern.mean(dim=1) if average_attn_weights else pattern


def clip_attention(module: nn.Module, points: HeadPoints, hidden_states: torch.Tensor,
                   attention_mask: torch.Tensor | None = None, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' ``CLIPAttention.forward`` under the eager, sdpa or flash attention implementation (the
    masks they prepare; flex attention's block masks are not tensors and raise), written out.

    ``attention_mask`` is what the model prepared: additive ``(B, 1, L, S)`` (eager), boolean with
    ``True`` = attended (sdpa), a ``(B, S)`` padding mask (flash attention), or ``None``. transformers 4.x
    passes the text tower's causal mask apart, as ``causal_attention_mask`` (additive ``(B, 1, L, L)``,
    ``None`` in the image tower), which is then added and alone says whether attention is causal (its
    flash path takes it as ``is_causal``). transformers 5 passes none: with ``None`` or a padding mask,
    ``is_causal`` (the keyword the text encoder passes, else the module's attribute, if it has one) adds a
    causal mask, as its sdpa and flash paths do. Attention dropout applies in training mode.
    Returns ``(output, pattern)``, as the eager implementation does.
    """
    batch, length, _ = hidden_states.shape
    shape = (batch, length, module.num_heads, module.head_dim)
    q = module.q_proj(hidden_states).view(shape)
    k = module.k_proj(hidden_states).view(shape)
    v = module.v_proj(hidden_states).view(shape)
    mask = _clip_mask(module, attention_mask, kwargs, length, q.dtype)
    dropout = module.dropout if module.training else 0.0
    return _heads_forward(points, q, k, v, mask, module.scale, module.out_proj, dropout)


def _clip_mask(module: nn.Module, attention_mask: Any, kwargs: dict[str, Any], length: int,
               dtype: torch.dtype) -> torch.Tensor | None:
    """The additive mask, broadcastable to ``(B, heads, L, L)``, for :func:`clip_attention`'s arguments."""
    if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
        raise TypeError("head-level sites need the eager, sdpa or flash attention implementation; this "
                        f"{type(attention_mask).__name__} mask is not a tensor "
                        "(model.model.clip.set_attn_implementation('sdpa'))")
    full = attention_mask is not None and attention_mask.ndim == 4  # prepared in full by eager / sdpa
    mask = None
    if full:
        mask = _additive(~attention_mask, dtype) if attention_mask.dtype == torch.bool else attention_mask.to(dtype)
    elif attention_mask is not None:  # flash attention's padding mask (B, S), 1 = attended
        mask = _additive(~attention_mask.bool(), dtype)[:, None, None, :]
    is_causal = kwargs.get("is_causal")
    is_causal = getattr(module, "is_causal", False) if is_causal is None else is_causal
    causal = None
    if "causal_attention_mask" in kwargs:  # transformers 4.x: the mask itself, or None (not causal)
        causal = kwargs["causal_attention_mask"]
        if causal is not None:
            causal = _additive(~causal, dtype) if causal.dtype == torch.bool else causal.to(dtype)
    elif is_causal and not full and length > 1:
        causal = _additive(torch.ones(length, length, dtype=torch.bool, device=module.q_proj.weight.device).triu(1),
                           dtype)
    return mask if causal is None else causal if mask is None else mask + causal
