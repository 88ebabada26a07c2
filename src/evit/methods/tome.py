"""ToMe, Token Merging (Bolya et al., ICLR 2023): merge similar tokens instead of dropping any.

In each block, between attention and MLP, the tokens of the whole sequence are split
alternately into two sets A (positions 0, 2, 4, ...: the class token is A's first) and B
(1, 3, 5, ...). Every token of A draws an edge to its most similar token of B (cosine
similarity of the keys, mean over heads); the ``r`` strongest edges are kept and their A
tokens are merged into their B partners. Prefix tokens (class, distillation, registers)
take no part: their rows in A and columns in B are -inf before the best edge is taken,
and ``r`` is at most half the other tokens. Ties are broken as the authors' code breaks
them (``max`` over B, then ``argsort(descending=True)`` of the best scores: the first
``r`` merge).

A merged token is the size-weighted average of what it holds (size: how many input
patches it stands for), and every later block adds ``log(size)`` to the attention
logits (proportional attention), so a token that stands for many patches gets the
weight of many. Both work on top of the fused attention kernel: the log sizes are its
additive mask.

After a merge the order is: the prefix tokens, the unmerged tokens of A in their
original order, then B in its order. The order decides the next block's sets, so it is
part of the method: with one class token it is the authors' order (they sort the
unmerged A tokens, which puts the class token first); with a distillation token too it
is theirs as well (they put the distillation token, B's first, second); registers, which
their code does not know, are kept at the front in the same way, so heads that read
``x[:, 0]`` or ``x[:, 1]`` stay right. A model without prefix tokens (average-pooled)
keeps the unmerged A tokens in score order, as the authors' code does when there is no
class token.

No parameters: works off the shelf, better after fine-tuning.
"""
from __future__ import annotations

import math
import numbers
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
        if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r < 0:  # numpy's integers too
            raise ValueError(f"ToMe's r must be a count of tokens to merge (int >= 0), got {r!r}")
        self.r = int(r)

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
        merged, unmerged, into = bipartite_matching(seen.keys, r, p)
        unmerged = unmerged[:, (p + 1) // 2:]  # the prefix tokens of A are put back at the front below

        def merge(t: Tensor) -> Tensor:
            """(B, N, D) -> (B, N - r, D): prefix, unmerged A, then B (prefix excepted) with the merged A added in."""
            a, b = t[:, ::2], t[:, 1::2]
            D = t.shape[-1]
            b = b.scatter_add(1, into.unsqueeze(-1).expand(-1, -1, D), a.gather(1, merged.unsqueeze(-1).expand(-1, -1, D)))
            return torch.cat([t[:, :p], a.gather(1, unmerged.unsqueeze(-1).expand(-1, -1, D)), b[:, p // 2:]], dim=1)

        if state.track:  # disjoint 0/1 rows: their sum is their union
            state.record(merge(state._sources(x).to(torch.int32)).to(torch.uint8))
        new_size = merge(size.unsqueeze(-1))  # sums of sizes
        state.size = new_size.squeeze(-1)
        return merge(x * size.unsqueeze(-1).to(x.dtype)) / new_size.to(x.dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}"


@torch.no_grad()
def bipartite_matching(keys: Tensor, r: int, p: int) -> tuple[Tensor, Tensor, Tensor]:
    """ToMe's matching of ``keys`` (B, N, C), the first ``p`` of them prefix tokens, for ``r`` merges.

    Returns (merged, unmerged, into): positions in set A (even positions of the sequence) of the
    ``r`` tokens to merge (B, r) and of the rest (B, |A| - r), and the positions in set B (odd
    positions) of the partners the merged ones go into (B, r). With prefix tokens the unmerged
    positions are sorted, so A's prefix tokens come first and the rest keep their original order.
    """
    metric = keys / keys.norm(dim=-1, keepdim=True)
    scores = metric[:, ::2] @ metric[:, 1::2].transpose(1, 2)  # (B, |A|, |B|)
    scores[:, :(p + 1) // 2] = -math.inf  # prefix tokens of A merge into nothing
    scores[:, :, :p // 2] = -math.inf  # and nothing merges into those of B
    best, partner = scores.max(dim=-1)
    order = best.argsort(dim=-1, descending=True)
    merged, unmerged = order[:, :r], order[:, r:]
    if p:
        unmerged = unmerged.sort(dim=-1).values
    return merged, unmerged, partner.gather(1, merged)
