"""What the methods share: the keep-rate family, kept-token counts and token selection.

The interface itself (:class:`evit.reduction.TokenReduction`) lives below the patch
mechanism; this module holds the helpers only methods use.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..reduction import TokenReduction, check_keep_rate


def kept_count(keep_rate: float, n: int) -> int:
    """Image tokens kept of ``n``: ``ceil(keep_rate * n)``, robust to float error (0.7 * 100)."""
    return min(n, max(1, math.ceil(keep_rate * n - 1e-6)))


def select_tokens(x: Tensor, index: Tensor, offset: int = 0) -> Tensor:
    """``x[b, offset + index[b]]`` for each b: (B, N, C), (B, k) -> (B, k, C).

    On the CPU one ``index_select`` (over the flattened batch when B > 1): there it costs a quarter
    of ``gather`` with an expanded index, which matters at batch size 1. On a GPU one ``gather``:
    one kernel and the fewest ops to queue, which is what a small batch waits on there. (Not under
    ``torch.jit.trace``: a trace at batch 1 would keep that branch for every batch.)
    """
    B, N, C = x.shape
    if not x.is_cpu:
        return (x[:, offset:] if offset else x).gather(1, index.unsqueeze(-1).expand(-1, -1, C))
    if B == 1 and not torch.jit.is_tracing():
        return (x[:, offset:] if offset else x).index_select(1, index.view(-1))
    flat = (index + torch.arange(offset, B * N + offset, N, device=index.device).unsqueeze(1)).flatten()
    return x.reshape(B * N, C).index_select(0, flat).view(B, index.shape[1], C)  # explicit: B may be 0


def prefix_index(index: Tensor, p: int) -> Tensor:
    """Positions 0..p-1 for each row of ``index`` (B, k): (B, p)."""
    return torch.arange(p, device=index.device).expand(index.shape[0], p)


class KeepRateReduction(TokenReduction):
    """A method that keeps ``kept_count(keep_rate, n)`` image tokens, plus optionally one fused token."""

    def __init__(self, keep_rate: float, fuse: bool = False) -> None:
        super().__init__()
        self.keep_rate = check_keep_rate(keep_rate)
        self.fuse = bool(fuse)

    def output_tokens(self, n_tokens: int) -> int:
        n = n_tokens - self.num_prefix_tokens
        k = kept_count(self.keep_rate, n)
        if k >= n:
            return n_tokens
        return self.num_prefix_tokens + k + (1 if self.fuse else 0)

    def extra_repr(self) -> str:
        return f"keep_rate={self.keep_rate}, fuse={self.fuse}"
