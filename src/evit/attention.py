"""Fused attention that also hands out what token-reduction methods need.

A host's attention returns only its output, and with ``F.scaled_dot_product_attention``
the N x N probability matrix never exists. EViT needs one row of it: the class token's
attention to every token. That row is cheap to compute on its own (the class query
against all keys, O(N)), so :func:`attend` runs the fused kernel for the output and
computes the row beside it. It works on any host's attention through its
:class:`~evit.hosts.base.AttentionView` (the module's own projections, norms, dropout and
output projection); nothing is copied or re-initialised. Given a module instead of a view,
it finds the view (:func:`evit.hosts.attention_view`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .hosts import attention_view
from .hosts.base import AttentionView


@dataclass
class Seen:
    """What a reduction method may look at after a block's attention.

    cls_attn: (B, N) class token's attention probabilities to each token, mean over
        heads, before attention dropout. None unless asked for.
    keys: (B, N, head_dim) keys averaged over heads (ToMe's similarity). None unless asked for.
    """

    cls_attn: Optional[Tensor] = None
    keys: Optional[Tensor] = None


def _view(attn: Union[AttentionView, nn.Module]) -> AttentionView:
    return attn if isinstance(attn, AttentionView) else attention_view(attn)


def attend(
    attn: Union[AttentionView, nn.Module],
    x: Tensor,
    *,
    cls_attn: bool = False,
    keys: bool = False,
    bias: Optional[Tensor] = None,
    keep: Optional[Tensor] = None,
) -> tuple[Tensor, Seen]:
    """Run attention ``attn`` (a host's attention module or its view) on ``x`` (B, N, C) and return
    (output, Seen).

    ``bias`` is an additive attention bias broadcastable to (B, heads, N, N), e.g. ToMe's
    log token size; it is applied both to the output and to the class-token row.
    Dropout on the attention probabilities applies to the output only: the scores a
    method ranks by are the model's, not a random sample of them.

    ``keep`` (B, N), soft or hard 0..1 weights of tokens still in play (DynamicViT in training):
    each query attends to token j in proportion to ``keep[j]`` (and always to itself), as
    ``exp(a_ij) G_ij / sum_k exp(a_ik) G_ik``; the product form lets gradients reach ``keep``
    where a log-mask would divide by zero. It needs the explicit attention matrix (training only).
    """
    view = _view(attn)
    B, N, _ = x.shape
    q, k, v = view.project(x)

    if keep is not None:
        logits = (q * view.scale) @ k.transpose(-2, -1)
        if bias is not None:
            logits = logits + bias
        g = torch.maximum(keep[:, None, None, :].to(logits.dtype), torch.eye(N, dtype=logits.dtype, device=x.device))
        e = (logits - logits.amax(dim=-1, keepdim=True).detach()).exp() * g
        out = view.dropout(e / e.sum(dim=-1, keepdim=True)) @ v
    elif view.fused:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=view.dropout_p, scale=view.sdpa_scale)
    else:
        logits = (q * view.scale) @ k.transpose(-2, -1)
        if bias is not None:
            logits = logits + bias
        out = view.dropout(logits.softmax(dim=-1)) @ v

    seen = Seen()
    if cls_attn:
        # one bmm over (batch x heads): at batch 1 every operand is a view, and each op saved counts
        # there (a reducing block's small ops run with caches cold from the matrix products around them)
        q0, kt = q[:, :, :1].flatten(0, 1), k.transpose(-2, -1).flatten(0, 1)
        row = torch.baddbmm(q0[..., :1], q0, kt, beta=0, alpha=view.scale)  # beta=0: the first operand is ignored
        row = row.view(B, q.shape[1], N)
        if bias is not None:
            row = row + bias[..., 0, :]
        seen.cls_attn = row.softmax(dim=-1).mean(dim=1)  # (B, N)
    if keys:
        seen.keys = k.mean(dim=1)

    return view.finish(out.transpose(1, 2).reshape(B, N, view.num_heads * view.head_dim), x), seen  # B may be 0


def cross_attend(attn: Union[AttentionView, nn.Module], queries: Tensor, context: Tensor) -> Tensor:
    """Attention ``attn`` with queries from ``queries`` (B, M, C) and keys and values from ``context``
    (B, N, C): (B, M, C). The module's own weights; only the projections each side needs are computed."""
    view = _view(attn)
    q = view.queries(queries)
    k, v = view.keys_values(context)
    out = F.scaled_dot_product_attention(q, k, v, scale=view.scale)
    out = out.transpose(1, 2).reshape(queries.shape[0], queries.shape[1], view.num_heads * view.head_dim)
    return view.finish(out, queries)


def attention_probs(attn: Union[AttentionView, nn.Module], x: Tensor) -> Tensor:
    """The attention probabilities (B, heads, N, N) attention ``attn`` computes on ``x``."""
    view = _view(attn)
    return ((view.queries(x) * view.scale) @ view.keys_values(x)[0].transpose(-2, -1)).softmax(dim=-1)
