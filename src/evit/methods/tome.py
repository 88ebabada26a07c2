"""ToMe, Token Merging (Bolya et al., ICLR 2023): merge similar tokens instead of dropping any.

In each block, between attention and MLP, the image tokens are split alternately
into two sets A and B. Every token of A draws an edge to its most similar token of
B (cosine similarity of the keys, mean over heads); the ``r`` strongest edges are
kept and their A tokens are merged into their B partners. A merged token is the
size-weighted average of what it holds (size: how many input patches it stands
for), and every later block adds ``log(size)`` to the attention logits
(proportional attention), so a token that stands for many patches gets the weight
of many. Both work on top of the fused attention kernel: the log sizes are its
additive mask. Prefix tokens (class, distillation, registers) take no part in the
matching and are always kept, as the paper protects the class token.

No parameters: works off the shelf, better after fine-tuning.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import Tensor

from ..attention import Seen
from ..reduction import TokenReduction
from ..registry import register


@register
class ToMe(TokenReduction):
    needs_class_token = False
    name, label, setting = "tome", "ToMe", "r"
    compare_grid, bench_grid = (1, 2, 3, 4, 5, 6), (8, 13)  # tokens merged per block
    needs_keys = True
    tracks_size = True
    groups_patches = True

    def __init__(self, r: int = 8) -> None:
        super().__init__()
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise ValueError(f"ToMe's r must be a count of tokens to merge (int >= 0), got {r!r}")
        self.r = r

    @classmethod
    def create(cls, block: int, keep_rate: float = 1.0, fuse: bool = True,
               r: Union[int, Sequence[int]] = 8) -> "ToMe":
        """``r`` is a count for every block or a per-block schedule (indexed by block)."""
        if isinstance(r, (list, tuple)):
            if block >= len(r):
                raise ValueError(f"ToMe's r schedule has {len(r)} entries, but block {block} is patched")
            r = r[block]
        return cls(r)

    @classmethod
    def default_locations(cls, depth: int) -> tuple[int, ...]:
        return tuple(range(depth))  # ToMe merges in every block

    def merged_count(self, n_tokens: int) -> int:
        """Tokens merged away at this block: ``r``, at most half the image tokens."""
        return min(self.r, (n_tokens - self.num_prefix_tokens) // 2)

    def output_tokens(self, n_tokens: int) -> int:
        return n_tokens - self.merged_count(n_tokens)

    def forward(self, x: Tensor, seen: Seen) -> Tensor:
        p, (B, N, _) = self.num_prefix_tokens, x.shape
        r = self.merged_count(N)
        if r == 0:
            return x
        state = self.state
        size = state.size if state.size is not None else x.new_ones(B, N)

        metric = seen.keys[:, p:]
        metric = metric / metric.norm(dim=-1, keepdim=True)
        scores = metric[:, ::2] @ metric[:, 1::2].transpose(1, 2)  # (B, |A|, |B|)
        best, partner = scores.max(dim=-1)
        order = best.argsort(dim=-1, descending=True)
        merged, unmerged = order[:, :r], order[:, r:]  # positions in A
        into = partner.gather(1, merged)  # their partners, positions in B

        def merge(t: Tensor) -> Tensor:
            """(B, N, D) -> (B, N - r, D): prefix, unmerged A, then B with the merged A added in."""
            a, b = t[:, p::2], t[:, p + 1::2]
            D = t.shape[-1]
            moved = a.gather(1, merged.unsqueeze(-1).expand(-1, -1, D))
            b = b.scatter_add(1, into.unsqueeze(-1).expand(-1, -1, D), moved)
            return torch.cat([t[:, :p], a.gather(1, unmerged.unsqueeze(-1).expand(-1, -1, D)), b], dim=1)

        if state.track:  # disjoint 0/1 rows: their sum is their union
            state.record(merge(state._sources(x).to(torch.int32)).to(torch.uint8))
        new_size = merge(size.unsqueeze(-1))  # sums of sizes
        state.size = new_size.squeeze(-1)
        return merge(x * size.unsqueeze(-1).to(x.dtype)) / new_size.to(x.dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}"
