"""STViT, semantic tokens (Chang et al., CVPR 2023): a few tokens that summarise the image replace it.

At one chosen block, after attention, the image tokens are replaced by a small grid of
semantic tokens: each starts as the spatial average of a window of image tokens (a
cluster centre initialised by pooling), then is refined by attention, as a query over
all the image tokens (keys and values), so it can gather what its window missed. Every
later block runs on the prefix tokens and the semantic tokens only.

The refinement reuses the chosen block's own attention weights (its first norm, attention
and LayerScale, named by its host's block view) through :func:`evit.attention.cross_attend`, so the method has no new
parameters and runs off the shelf; fine-tuning (``evit train --method stvit``) lets the
model adapt, as the paper trains its semantic-token module. The paper's recovery module
(for dense prediction) is not part of classification and is left out.

``keep_rate`` sets how many semantic tokens replace the ``n`` image tokens: a grid of
``round(sqrt(keep_rate * n))`` squared.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import hosts
from ..attention import Seen, cross_attend
from ..patch import reductions
from ..registry import register
from .base import KeepRateReduction


@register
class STViT(KeepRateReduction):
    groups_patches = True
    needs_image_size = True  # its windows lie on the input's grid
    name, label = "stvit", "STViT"
    #: grids of 6, 5, 4 and 3 squared of 7 x 7 image tokens (12, 10, 8, 6 of DeiT's 14): its grid side is
    #: round(sqrt(keep_rate * n)), so shared keep rates would give repeated grids
    compare_grid, own_grid = (0.75, 0.5, 0.33, 0.18), True

    def __init__(self, keep_rate: float = 0.5, fuse: bool = False, refine: bool = True) -> None:
        if fuse:
            raise ValueError("STViT replaces the image tokens by semantic tokens; it has no fused token")
        super().__init__(keep_rate, fuse=False)
        self.refine = bool(refine)

    @classmethod
    def create(cls, block: int, keep_rate: float = 0.5, fuse: bool = False, **settings) -> "STViT":
        return cls(keep_rate, **settings)

    @classmethod
    def default_locations(cls, depth: int) -> tuple[int, ...]:
        return (depth // 4,)  # one block: semantic tokens replace the image tokens once

    def bind(self, model: nn.Module) -> None:
        others = [i for i, m in reductions(model).items() if isinstance(m, STViT)]
        if others:
            raise ValueError(f"STViT replaces the image tokens once: give one location, not blocks {others + [self.block]}")
        host = hosts.adapter(model)
        object.__setattr__(self, "_view", host.view(host.blocks[self.block]))  # its attention refines; not a submodule
        object.__setattr__(self, "_host", host)  # its grid is read at each forward: the model may be resized

    def grid_side(self, n: int) -> int:
        """Side of the semantic-token grid for ``n`` image tokens."""
        return max(1, round(math.sqrt(self.keep_rate * n)))

    def output_tokens(self, n_tokens: int) -> int:
        n = n_tokens - self.num_prefix_tokens
        g = self.grid_side(n)
        return n_tokens if g * g >= n else self.num_prefix_tokens + g * g

    def _image_grid(self, n: int) -> tuple[int, int]:
        """The grid of the ``n`` image tokens: that of the input running now (its size recorded by the model's
        image entry, see ``needs_image_size``), so that a model taking any size pools a 7 x 28 input on 7 x 28,
        not on its own 14 x 14 of the same count. Before the model's first forward, the model's grid or a square."""
        host, hw = getattr(self, "_host", None), self.state.image_hw
        grid = host.patch_grid(hw) if host is not None else None
        if grid is not None and grid[0] * grid[1] == n:
            return grid
        side = math.isqrt(n)
        if side * side != n or hw is not None:
            of = f"the input's {grid[0]}x{grid[1]} grid" if hw is not None else \
                f"the model's {grid[0]}x{grid[1]} grid nor a square" if grid is not None else "a known grid nor a square"
            raise ValueError(f"STViT pools image tokens on their grid, but {n} tokens are not {of}, and it "
                             "cannot tell theirs (an earlier block already reducing, or tokens not from the "
                             "model's input): run it on the model's own tokens")
        return side, side

    def forward(self, x: Tensor, seen: Seen) -> Tensor:
        p, N = self.num_prefix_tokens, x.shape[1]
        if self.output_tokens(N) == N:
            return x
        h, w = self._image_grid(N - p)
        g = self.grid_side(N - p)
        semantic = _pool(x[:, p:], (h, w), g)
        if self.refine:
            view = self._view
            refined = cross_attend(view.attention, view.attention_norm(semantic), view.attention_norm(x[:, p:]))
            semantic = semantic + view.attention_scale(refined)
        if self.state.track:
            sources = self.state._sources(x)
            pooled = _pool(sources[:, p:].float(), (h, w), g, max_pool=True).to(sources.dtype)
            self.state.record(torch.cat([sources[:, :p], pooled], dim=1))
        return torch.cat([x[:, :p], semantic], dim=1)

    def extra_repr(self) -> str:
        return f"keep_rate={self.keep_rate}, refine={self.refine}"


def _pool(tokens: Tensor, grid: tuple[int, int], side: int, max_pool: bool = False) -> Tensor:
    """(B, h*w, D) tokens on an h x w grid, pooled to (B, side*side, D) by windows."""
    B, _, D = tokens.shape
    image = tokens.transpose(1, 2).reshape(B, D, *grid)
    pooled = (F.adaptive_max_pool2d if max_pool else F.adaptive_avg_pool2d)(image, side)
    return pooled.flatten(2).transpose(1, 2)
