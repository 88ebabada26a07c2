"""The keep-rate warm-up: from 1 to the target on a cosine, per iteration (as in the paper)."""
from __future__ import annotations

import math


def keep_rate_at(step: int, target: float, start_step: int = 0, span_steps: int = 0) -> float:
    """Keep rate at optimizer ``step``: 1 before ``start_step``, ``target`` after
    ``start_step + span_steps``, a half cosine between. ``span_steps`` 0 means no warm-up."""
    if span_steps <= 0:
        return target if step >= start_step else 1.0
    t = min(max((step - start_step) / span_steps, 0.0), 1.0)
    return target + (1.0 - target) * 0.5 * (1.0 + math.cos(math.pi * t))
