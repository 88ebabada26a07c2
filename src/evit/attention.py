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

import functools
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
        heads, before attention dropout; +inf for the first ``prefix_first`` tokens asked
        for (:func:`attend`), so that they rank first. None unless asked for.
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
    prefix_first: int = 0,
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

    ``prefix_first``: with ``cls_attn``, the first that many tokens (the prefix tokens a method always keeps)
    score +inf, so that a ranking by ``cls_attn`` puts them first.
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
        seen.cls_attn = class_token_attention(q, k, view.scale, bias, prefix_first)
    if keys:
        seen.keys = k.mean(dim=1)

    return view.finish(out.transpose(1, 2).reshape(B, N, view.num_heads * view.head_dim), x), seen  # B may be 0


def class_token_attention(q: Tensor, k: Tensor, scale: float, bias: Optional[Tensor] = None,
                          prefix_first: int = 0) -> Tensor:
    """The class token's attention probabilities to each token, mean over heads, (B, N), from queries ``q`` and
    keys ``k`` (B, heads, N, head_dim): the class query against all keys, O(N). ``bias`` as :func:`attend` takes it;
    the first ``prefix_first`` tokens score +inf, so that a ranking puts them first.

    Two batched products, at batch 1 on views only: the logits, and after their softmax the mean over heads with
    the +inf as one ``baddbmm`` of a row of +inf and 0 plus (1/heads, ...) times the probabilities, its constants
    made once per shape. On a CPU each small op of a reducing block runs with caches cold from the matrix
    products around it, unless its code has just run: the second product reruns the first's kernel, in place of
    a mean (a sum and a division) and a fill that ran cold. At batch 1 that and the views are about 1% of a
    DeiT-S forward (``python benchmarks/evit_batch1.py``). The same mean to rounding in float32 and float64. In
    half precision (a half-precision model, or autocast: there the product would run in the low-precision dtype,
    its weights 1/heads rounded, and round a third of the entries the other way from the mean), and while
    tracing, compiling or exporting (no cached tensor or batch-1 branch in a graph), the plain ``mean`` and
    ``fill_``; the same for tensor subclasses and under a dispatch mode (FakeTensorMode, FlopCounterMode, make_fx),
    whose tensors must not be cached for later forwards nor mixed with cached plain ones.
    """
    B, H, N, _ = k.shape
    cached = type(q) is torch.Tensor and not (compiling() or torch.jit.is_tracing() or in_dispatch_mode())
    if cached:
        first, weights = _head_mean_constants(H, N, prefix_first, q.dtype, q.device)
    if B == 1 and cached:
        q0, kt = q[0, :, :1], k[0].mT  # (heads, 1, d), (heads, d, N)
    else:
        q0, kt = q[:, :, :1].flatten(0, 1), k.transpose(-2, -1).flatten(0, 1)
    # beta=0: the first operand only has to broadcast; it is ignored
    logits = torch.baddbmm(first if cached else q0[..., :1], q0, kt, beta=0, alpha=scale).view(B, H, N)
    if bias is not None:
        logits = logits + bias[..., 0, :]
    probs = logits.softmax(dim=-1)
    if cached and probs.dtype == q.dtype and q.dtype in _EXACT_ENOUGH:  # not under autocast, nor in half precision
        mean = torch.baddbmm(first, weights if B == 1 else weights.expand(B, 1, H), probs)
        if mean.dtype == probs.dtype:  # else autocast ran the product (asking first costs as much as it saves)
            return mean.view(B, N)
    mean = probs.mean(dim=1)
    mean.narrow(1, 0, prefix_first).fill_(torch.inf)
    return mean


@functools.lru_cache(maxsize=256)
def _head_mean_constants(heads: int, n: int, prefix_first: int, dtype: torch.dtype, device: torch.device):
    """:func:`class_token_attention`'s constants: a (1, 1, n) row of +inf (the first ``prefix_first``) and 0, and
    (1, 1, heads) weights 1/heads."""
    with torch.inference_mode(False):  # usable in training too
        first = torch.zeros(1, 1, n, dtype=dtype, device=device)
        first.narrow(2, 0, prefix_first).fill_(torch.inf)
        return first, torch.full((1, 1, heads), 1.0 / heads, dtype=dtype, device=device)


#: dtypes in which the mean over heads as a product with weights 1/heads is the mean to rounding
_EXACT_ENOUGH = (torch.float32, torch.float64)

#: True while torch.compile or torch.export traces (torch._dynamo's before torch 2.3)
compiling = getattr(torch.compiler, "is_compiling", None) or torch._dynamo.is_compiling


def in_dispatch_mode() -> bool:
    """True under a torch dispatch mode (FakeTensorMode, FlopCounterMode, make_fx's tracing): tensors made there
    may be fake, or recorded into a graph."""
    return torch._C._len_torch_dispatch_stack() > 0


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
