"""DynamicViT (Rao et al., NeurIPS 2021): a small learned module decides which tokens to keep.

At each chosen block a prediction module scores every image token from its own
features and a global feature (the average over the tokens still in play), giving
keep/drop probabilities. In training nothing is removed: a hard Gumbel-softmax
sample decides, the decisions multiply from stage to stage, and every later block
attends only to tokens still kept (attention masking, :func:`evit.attention.attend`
``keep``), so the decisions get gradients. A ratio loss pulls the share kept at each
stage to ``keep_rate`` of the tokens that reached it. At inference the top
``ceil(keep_rate * n)`` tokens by keep probability are kept and the rest dropped.

Unlike the paper, the decision is taken after the chosen block's attention (where
every method in evit acts), and the paper's distillation losses from the unpruned
teacher are not used: only the task loss and the ratio loss.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import hosts
from ..attention import Seen
from ..registry import register
from .base import KeepRateReduction, kept_count, prefix_index, select_tokens


class ScorePredictor(nn.Module):
    """Per-token log-probabilities of (keep, drop) from local features and a masked global average."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.head = nn.Sequential(nn.Linear(dim, dim // 2), nn.GELU(), nn.Linear(dim // 2, dim // 4), nn.GELU(),
                                  nn.Linear(dim // 4, 2))

    def forward(self, x: Tensor, in_play: Tensor) -> Tensor:
        z = self.embed(x)
        half = z.shape[-1] // 2
        local, whole = z[..., :half], z[..., half:]
        w = in_play.unsqueeze(-1).to(z.dtype)
        whole = (whole * w).sum(dim=1, keepdim=True) / w.sum(dim=1, keepdim=True).clamp_min(1e-6)
        return self.head(torch.cat([local, whole.expand_as(local)], dim=-1)).log_softmax(dim=-1)


@register
class DynamicViT(KeepRateReduction):
    masks_in_training = True
    name, label, learned = "dynamicvit", "DynamicViT", True

    def __init__(self, keep_rate: float = 0.7, fuse: bool = False, ratio_weight: float = 2.0) -> None:
        if fuse:
            raise ValueError("DynamicViT drops the tokens it does not keep; it has no fused token")
        super().__init__(keep_rate, fuse=False)
        self.ratio_weight = ratio_weight
        self.predictor: Optional[ScorePredictor] = None
        self._ratio: Optional[Tensor] = None

    @classmethod
    def create(cls, block: int, keep_rate: float = 0.7, fuse: bool = False, **settings) -> "DynamicViT":
        return cls(keep_rate, **settings)

    def bind(self, model: nn.Module) -> None:
        if self.predictor is None:  # on the model's device and in its dtype (a half-precision model on a GPU)
            param = next(model.parameters())
            self.predictor = ScorePredictor(hosts.adapter(model).embed_dim).to(param.device, param.dtype)

    def aux_loss(self) -> Optional[Tensor]:
        return None if self._ratio is None else self.ratio_weight * self._ratio

    def forward(self, x: Tensor, seen: Seen) -> Tensor:
        p, (B, N, _) = self.num_prefix_tokens, x.shape
        state = self.state
        if self.training and torch.is_grad_enabled():
            before = state.keep if state.keep is not None else x.new_ones(B, N)
            decision = F.gumbel_softmax(self.predictor(x[:, p:], before[:, p:]), hard=True)[..., 0]
            kept = decision * before[:, p:]
            share = kept.sum(dim=1) / before[:, p:].sum(dim=1).clamp_min(1.0)
            self._ratio = ((share - self.keep_rate) ** 2).mean()
            state.keep = torch.cat([before[:, :p], kept], dim=1)
            return x  # nothing removed in training: later blocks attend through state.keep
        k = kept_count(self.keep_rate, N - p)
        if k >= N - p:
            return x
        score = self.predictor(x[:, p:], x.new_ones(B, N - p))[..., 0]
        keep = score.topk(k, dim=1, sorted=False).indices
        if state.track:
            state.follow(x, torch.cat([prefix_index(keep, p), keep + p], dim=1))
        return torch.cat([x[:, :p], select_tokens(x, keep, p)], dim=1)

    def extra_repr(self) -> str:
        return f"keep_rate={self.keep_rate}, ratio_weight={self.ratio_weight}"
