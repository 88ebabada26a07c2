"""Random drop: the token counts of Top-K, chosen at random.

The floor any scoring rule must beat: if ranking by attention (EViT, Top-K) is no
better than this at the same counts, the ranking is not what helps.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..attention import Seen
from ..registry import register
from .base import KeepRateReduction, kept_count, prefix_index, select_tokens


@register
class RandomDrop(KeepRateReduction):
    needs_class_token = False
    name, label = "random", "Random drop"

    def __init__(self, keep_rate: float = 0.7, fuse: bool = False, seed: Optional[int] = None) -> None:
        if fuse:
            raise ValueError("RandomDrop drops tokens; it has no fused token")
        super().__init__(keep_rate, fuse=False)
        self.seed = seed
        self.generator = None if seed is None else torch.Generator().manual_seed(seed)

    @classmethod
    def create(cls, block: int, keep_rate: float = 0.7, fuse: bool = False, seed: Optional[int] = 0) -> "RandomDrop":
        """Each block draws from its own generator (``seed + block``): repeatable runs."""
        return cls(keep_rate, seed=None if seed is None else seed + block)

    def forward(self, x: Tensor, seen: Seen) -> Tensor:
        p = self.num_prefix_tokens
        B, N, _ = x.shape
        k = kept_count(self.keep_rate, N - p)
        if k >= N - p:
            return x
        noise = torch.rand(B, N - p, generator=self.generator).to(x.device)
        keep = noise.topk(k, dim=1, sorted=False).indices
        if self.state.track:
            self.state.follow(x, torch.cat([prefix_index(keep, p), keep + p], dim=1))
        return torch.cat([x[:, :p], select_tokens(x, keep, p)], dim=1)

    def extra_repr(self) -> str:
        return f"keep_rate={self.keep_rate}, seed={self.seed}"
