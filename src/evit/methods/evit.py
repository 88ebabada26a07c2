"""EViT (Liang et al., ICLR 2022): keep the attentive tokens, fuse the rest into one.

Image tokens are ranked by the class token's attention to them (mean over
heads). The top ``keep_rate`` share is kept; with ``fuse`` the rest become one
token appended after the kept ones. At a later location that fused token is
ranked like any other image token.

``fusion`` says how the rest become one token:

- ``"sum"`` (default): the class token's attention to each of them times the token,
  summed; the weights are not renormalised. This is what the authors' code computes,
  and their released checkpoints were trained with it: evit gives those weights the
  outputs they were trained to give.
- ``"mean"``: the same weights divided by their total, a weighted average. It keeps the
  fused token on the scale of the tokens it replaces (the plain sum is shrunk by the
  small total attention of the inattentive tokens), but it is a different model from
  the paper's: use it for weights trained with it (evit's embedded EViT model was;
  its checkpoint records so, and evit runs it that way).

The kept count is ``ceil(keep_rate * n)`` of the ``n`` image tokens, as in the authors'
code (``ceil(keep_rate * (N - 1))`` with one class token), in score order after the prefix
tokens, as their code keeps them.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..attention import Seen, compiling
from ..registry import register
from .base import KeepRateReduction, kept_count, select_tokens


#: how the inattentive tokens are fused: the authors' attention-weighted sum, or its renormalised average
FUSIONS = ("sum", "mean")


@register
class EViT(KeepRateReduction):
    needs_cls_attn = ranks_prefix_first = True
    name, label, exports = "evit", "EViT", True

    def __init__(self, keep_rate: float = 0.7, fuse: bool = True, fusion: str = "sum") -> None:
        super().__init__(keep_rate, fuse)
        if fusion not in FUSIONS:
            raise ValueError(f"EViT's fusion must be one of {', '.join(map(repr, FUSIONS))}, got {fusion!r}: "
                             "'sum' is the authors' (their released weights'), 'mean' the renormalised average")
        self.fusion = fusion

    def forward(self, x: Tensor, seen: Seen) -> Tensor:
        p, N = self.num_prefix_tokens, x.shape[1]
        k = kept_count(self.keep_rate, N - p)
        if k >= N - p:
            return x
        # Every op counts at batch 1 (a reducing block's small ops run with caches cold from the matrix
        # products around them), so the selection is five ops: the prefix tokens come ranked first (they
        # score +inf: evit.attention.class_token_attention), one sorted topk gives (prefix, kept in score
        # order as the authors keep them, the next-ranked token), one gather takes those tokens, and the
        # last one's slot receives the fused token.
        row = seen.cls_attn  # this block's own tensor: safe to edit in place (autograd follows the edits)
        order = row.topk(p + k + self.fuse, dim=1).indices
        if p > 1:  # tied at inf: back to their own order
            order[:, :p] = order[:, :p].sort(dim=1).values
        keep = order[:, :p + k]
        if self.state.track:
            self._follow(x, keep)
        if not self.fuse:
            return select_tokens(x, keep)
        out = select_tokens(x, order)
        # the rest's weights are the scores with the prefix and kept tokens zeroed: one product with all
        # tokens fuses them, so the rest is never gathered
        weight = row.scatter_(1, keep, 0.0).unsqueeze(1)
        if weight.dtype != x.dtype:
            weight = weight.to(x.dtype)
        if self.fusion == "sum" and not (torch.is_grad_enabled() or compiling()):
            torch.bmm(weight, x, out=out[:, -1:])  # into its slot (out= takes no gradients; compile breaks there)
        else:
            fused = torch.bmm(weight, x)
            out[:, -1:] = fused / _total(weight) if self.fusion == "mean" else fused
        return out

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", fusion={self.fusion!r}" if self.fuse else "")

    def _follow(self, x: Tensor, keep: Tensor) -> None:
        """Tell the shared state which tokens were kept (``keep``, prefix included) and, with ``fuse``, which were fused."""
        (B, N, _), n = x.shape, keep.shape[1]
        rest = torch.ones(B, N, dtype=torch.bool, device=x.device).scatter_(1, keep, False)
        rest = torch.arange(N, device=x.device).expand(B, -1)[rest].view(B, N - n)
        self.state.follow(x, torch.cat([keep, rest], dim=1) if self.fuse else keep,
                          fused_from=n if self.fuse else None)


def _total(weight: Tensor) -> Tensor:
    """Sum of fusion weights, kept away from zero: with ``fusion="mean"`` the fused token is their weighted average."""
    return weight.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(weight.dtype).tiny)


@register
class TopK(EViT):
    """EViT without fusion: the inattentive tokens are dropped."""

    name, label = "topk", "Top-K"

    def __init__(self, keep_rate: float = 0.7, fuse: bool = False) -> None:
        if fuse:
            raise ValueError("TopK drops the inattentive tokens; for fusion use EViT")
        super().__init__(keep_rate, fuse=False)

    @classmethod
    def create(cls, block: int, keep_rate: float = 0.7, fuse: bool = False, **settings) -> "TopK":
        return cls(keep_rate, **settings)
