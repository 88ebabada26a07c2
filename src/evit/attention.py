"""Fused attention that also hands out what token-reduction methods need.

timm's ``Attention.forward`` returns only the attention output, and with
``F.scaled_dot_product_attention`` the N x N probability matrix never exists.
EViT needs one row of it: the class token's attention to every token. That row
is cheap to compute on its own (the class query against all keys, O(N)), so
:func:`attend` runs the fused kernel for the output and computes the row
beside it. It reuses the attention module's own submodules (qkv, q_norm,
k_norm, attn_drop, norm, gate, proj, proj_drop); nothing is copied or
re-initialised.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class Seen:
    """What a reduction method may look at after a block's attention.

    cls_attn: (B, N) class token's attention probabilities to each token, mean over
        heads, before attention dropout. None unless asked for.
    keys: (B, N, head_dim) keys averaged over heads (ToMe's similarity). None unless asked for.
    """

    cls_attn: Optional[Tensor] = None
    keys: Optional[Tensor] = None


def attend(
    attn: nn.Module,
    x: Tensor,
    *,
    cls_attn: bool = False,
    keys: bool = False,
    bias: Optional[Tensor] = None,
    keep: Optional[Tensor] = None,
) -> tuple[Tensor, Seen]:
    """Run timm ``Attention`` ``attn`` on ``x`` (B, N, C) and return (output, Seen).

    ``bias`` is an additive attention bias broadcastable to (B, heads, N, N), e.g. ToMe's
    log token size; it is applied both to the output and to the class-token row.
    Dropout on the attention probabilities applies to the output only: the scores a
    method ranks by are the model's, not a random sample of them.

    ``keep`` (B, N), soft or hard 0..1 weights of tokens still in play (DynamicViT in training):
    each query attends to token j in proportion to ``keep[j]`` (and always to itself), as
    ``exp(a_ij) G_ij / sum_k exp(a_ik) G_ik``; the product form lets gradients reach ``keep``
    where a log-mask would divide by zero. It needs the explicit attention matrix (training only).
    """
    B, N, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    dropout_p = attn.attn_drop.p if attn.training else 0.0

    if keep is not None:
        logits = (q * attn.scale) @ k.transpose(-2, -1)
        if bias is not None:
            logits = logits + bias
        g = torch.maximum(keep[:, None, None, :].to(logits.dtype), torch.eye(N, dtype=logits.dtype, device=x.device))
        e = (logits - logits.amax(dim=-1, keepdim=True).detach()).exp() * g
        out = attn.attn_drop(e / e.sum(dim=-1, keepdim=True)) @ v
    elif attn.fused_attn:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p)
    else:
        logits = (q * attn.scale) @ k.transpose(-2, -1)
        if bias is not None:
            logits = logits + bias
        out = attn.attn_drop(logits.softmax(dim=-1)) @ v

    seen = Seen()
    if cls_attn:
        row = (q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)  # (B, H, 1, N)
        if bias is not None:
            row = row + bias[..., :1, :]
        seen.cls_attn = row.softmax(dim=-1).mean(dim=(1, 2))  # (B, N)
    if keys:
        seen.keys = k.mean(dim=1)

    out = out.transpose(1, 2).reshape(B, N, attn.num_heads * attn.head_dim)  # explicit: B may be 0
    out = attn.norm(out)
    if gate is not None:
        out = out * gate
    out = attn.proj_drop(attn.proj(out))
    return out, seen


def _heads(attn: nn.Module, x: Tensor, part: slice) -> Tensor:
    """Rows ``part`` of ``attn.qkv`` (q: 0, k: 1, v: 2) applied to ``x`` (B, N, C), split into heads."""
    rows = slice(part.start * attn.qkv.out_features // 3, part.stop * attn.qkv.out_features // 3)
    weight, bias = attn.qkv.weight[rows], None if attn.qkv.bias is None else attn.qkv.bias[rows]
    B, N, _ = x.shape
    heads = F.linear(x, weight, bias).reshape(B, N, part.stop - part.start, attn.num_heads, attn.head_dim)
    return heads.permute(2, 0, 3, 1, 4)


def cross_attend(attn: nn.Module, queries: Tensor, context: Tensor) -> Tensor:
    """timm ``Attention`` ``attn`` with queries from ``queries`` (B, M, C) and keys and values from
    ``context`` (B, N, C): (B, M, C). The module's own weights (qkv, q/k norms, norm, gate, proj);
    only the rows of the fused qkv projection each side needs are computed."""
    q = attn.q_norm(_heads(attn, queries, slice(0, 1))[0])
    k, v = _heads(attn, context, slice(1, 3)).unbind(0)
    out = F.scaled_dot_product_attention(q, attn.k_norm(k), v, scale=attn.scale)
    out = attn.norm(out.transpose(1, 2).reshape(queries.shape[0], queries.shape[1], attn.num_heads * attn.head_dim))
    if getattr(attn, "gate", None) is not None:
        out = out * attn.gate(queries).sigmoid()
    return attn.proj(out)


def attention_probs(attn: nn.Module, x: Tensor) -> Tensor:
    """The attention probabilities (B, heads, N, N) timm ``Attention`` ``attn`` computes on ``x``."""
    q, k, _ = _heads(attn, x, slice(0, 3)).unbind(0)
    return ((attn.q_norm(q) * attn.scale) @ attn.k_norm(k).transpose(-2, -1)).softmax(dim=-1)
