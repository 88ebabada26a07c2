"""EViT (Liang et al., ICLR 2022): keep the attentive tokens, fuse the rest into one.

Image tokens are ranked by the class token's attention to them (mean over
heads). The top ``keep_rate`` share is kept; with ``fuse`` the rest become one
token, their attention-weighted average, appended after the kept ones. At a
later location that fused token is ranked like any other image token.

Fusion weights are renormalised to sum to one: the paper calls the fused token
a weighted average, and a plain weighted sum (the original code) shrinks it by
the small total attention of the dropped tokens, so its residual stream starts
off-scale relative to every other token. Renormalising keeps it a token of the
same kind as the ones it replaces.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..attention import Seen
from .base import KeepRateReduction, kept_count


class EViT(KeepRateReduction):
    needs_cls_attn = True

    def __init__(self, keep_rate: float = 0.7, fuse: bool = True) -> None:
        super().__init__(keep_rate, fuse)

    def forward(self, x: Tensor, seen: Seen) -> Tensor:
        p = self.num_prefix_tokens
        n = x.shape[1] - p
        k = kept_count(self.keep_rate, n)
        if k >= n:
            return x
        if not self.fuse:
            keep = seen.cls_attn[:, p:].topk(k, dim=1, sorted=False).indices
            if self.state.track:
                self.state.follow(x, torch.cat([prefix_index(keep, p), keep + p], dim=1))
            return torch.cat([x[:, :p], select_tokens(x, keep, p)], dim=1)
        # One sort of all tokens, prefix forced first, gives the output order (prefix, kept)
        # and the rest with their weights. cls_attn is this block's own tensor: safe to edit.
        score = seen.cls_attn
        score[:, :p] = float("inf")
        score, order = score.sort(dim=1, descending=True, stable=True)  # stable: prefix order kept
        ranked = select_tokens(x, order)
        m = p + k
        if self.state.track:
            self.state.follow(x, order, fused_from=m)
        weight = score[:, m:]
        weight = weight / weight.sum(dim=1, keepdim=True).clamp_min(torch.finfo(weight.dtype).tiny)
        fused = torch.bmm(weight.unsqueeze(1).to(x.dtype), ranked[:, m:])  # (B, 1, C)
        if torch.is_grad_enabled():
            return torch.cat([ranked[:, :m], fused], dim=1)
        ranked[:, m:m + 1] = fused  # inference: reuse the first rest slot, no concatenation
        return ranked[:, :m + 1]


def select_tokens(x: Tensor, index: Tensor, offset: int = 0) -> Tensor:
    """``x[b, offset + index[b]]`` for each b: (B, N, C), (B, k) -> (B, k, C).

    One ``index_select`` (over the flattened batch when B > 1): on CPU it costs a
    fraction of ``gather`` with an expanded index, which matters at batch size 1.
    """
    B, N, C = x.shape
    if B == 1:
        return x[:, offset:].index_select(1, index.view(-1))
    flat = (index + (torch.arange(B, device=index.device).unsqueeze(1) * N + offset)).flatten()
    return x.reshape(B * N, C).index_select(0, flat).view(B, -1, C)


def prefix_index(index: Tensor, p: int) -> Tensor:
    """Positions 0..p-1 for each row of ``index`` (B, k): (B, p)."""
    return torch.arange(p, device=index.device).expand(index.shape[0], p)


class TopK(EViT):
    """EViT without fusion: the inattentive tokens are dropped."""

    def __init__(self, keep_rate: float = 0.7, fuse: bool = False) -> None:
        if fuse:
            raise ValueError("TopK drops the inattentive tokens; for fusion use EViT")
        super().__init__(keep_rate, fuse=False)

    @classmethod
    def create(cls, block: int, keep_rate: float = 0.7, fuse: bool = False, **settings) -> "TopK":
        return cls(keep_rate, **settings)
