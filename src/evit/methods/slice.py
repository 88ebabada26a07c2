"""The ideal: token counts without the work of choosing them.

:class:`Slice` cuts a keep-rate method's token counts by plain slicing (no scoring,
no gather, no fusion); :class:`Ideal` does the same for any method's counts (ToMe's
included). That is the limit of what any implementation of those counts can reach:
:mod:`evit.bench` measures it beside each method so a reported speed-up can be read
against what was possible.
"""
from __future__ import annotations

from torch import Tensor

from ..attention import Seen
from ..reduction import TokenReduction
from ..registry import register
from .base import KeepRateReduction


@register
class Slice(KeepRateReduction):
    needs_class_token = False
    name, listed = "slice", False

    def forward(self, x: Tensor, seen: Seen) -> Tensor:
        return x[:, : self.output_tokens(x.shape[1])]


class Ideal(TokenReduction):
    """The token counts of ``method``, cut by slicing."""

    needs_class_token = False

    def __init__(self, method: TokenReduction) -> None:
        super().__init__()
        object.__setattr__(self, "counts", method)  # not a submodule: only its counts are used

    def output_tokens(self, n_tokens: int) -> int:
        self.counts.num_prefix_tokens = self.num_prefix_tokens
        return self.counts.output_tokens(n_tokens)

    def forward(self, x: Tensor, seen: Seen) -> Tensor:
        return x[:, : self.output_tokens(x.shape[1])]
