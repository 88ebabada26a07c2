"""The ideal: the same token counts as a keep-rate method, cut by plain slicing.

No scoring, no gather, no fusion: the limit of what any implementation of those
counts can reach. :mod:`evit.bench` measures it beside each method so a reported
speed-up can be read against what was possible.
"""
from __future__ import annotations

from torch import Tensor

from ..attention import Seen
from .base import KeepRateReduction


class Slice(KeepRateReduction):
    def forward(self, x: Tensor, seen: Seen) -> Tensor:
        return x[:, : self.output_tokens(x.shape[1])]
