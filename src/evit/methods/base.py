"""The one interface every token-reduction method implements.

A method is a small ``nn.Module`` placed in a block by :mod:`evit.patch`. After the
block's attention residual and before its MLP, the block calls
``method(x, seen)`` with the tokens ``x`` (B, N, C) and what attention exposed
(:class:`evit.attention.Seen`); the method returns the (usually shorter)
sequence. Prefix tokens (class, distillation, registers) sit at the front of
``x``; ``num_prefix_tokens`` is set by the patch and methods keep them.
"""
from __future__ import annotations

import math

from torch import Tensor, nn

from ..attention import Seen


def kept_count(keep_rate: float, n: int) -> int:
    """Image tokens kept of ``n``: ``ceil(keep_rate * n)``, robust to float error (0.7 * 100)."""
    return min(n, max(1, math.ceil(keep_rate * n - 1e-6)))


def check_keep_rate(keep_rate: float) -> float:
    if isinstance(keep_rate, bool) or not isinstance(keep_rate, (int, float)):
        raise TypeError(f"keep_rate must be a number in (0, 1], got {keep_rate!r}")
    if not 0.0 < keep_rate <= 1.0:
        raise ValueError(f"keep_rate must be in (0, 1], got {keep_rate}: it is the share of image tokens kept")
    return float(keep_rate)


class TokenReduction(nn.Module):
    """Base class: subclasses set what they need from attention and implement ``forward``."""

    #: ask :func:`evit.attention.attend` for the class token's attention row
    needs_cls_attn: bool = False
    #: ask for the keys (mean over heads)
    needs_keys: bool = False

    def __init__(self) -> None:
        super().__init__()
        self.num_prefix_tokens = 1

    def output_tokens(self, n_tokens: int) -> int:
        """Sequence length after this reduction for an input of ``n_tokens`` (prefix included)."""
        raise NotImplementedError

    def is_identity(self, n_tokens: int) -> bool:
        """True when this reduction leaves ``n_tokens`` tokens untouched (the block then runs timm's own forward)."""
        return self.output_tokens(n_tokens) == n_tokens

    def forward(self, x: Tensor, seen: Seen) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError


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
