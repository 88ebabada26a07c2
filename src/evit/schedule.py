"""The keep-rate warm-up: from 1 to the target on a cosine, per iteration (as in the paper)."""
from __future__ import annotations

import math
import random


def keep_rate_at(step: int, target: float, start_step: int = 0, span_steps: int = 0) -> float:
    """Keep rate at optimizer ``step``: 1 before ``start_step``, ``target`` after
    ``start_step + span_steps``, a half cosine between. ``span_steps`` 0 means no warm-up."""
    if start_step < 0 or span_steps < 0:
        raise ValueError(f"keep-rate warm-up lengths must be >= 0, got start {start_step}, span {span_steps} steps")
    if span_steps <= 0:
        return target if step >= start_step else 1.0
    t = min(max((step - start_step) / span_steps, 0.0), 1.0)
    return target + (1.0 - target) * 0.5 * (1.0 + math.cos(math.pi * t))


def drawn_keep_rate(step: int, low: float, high: float, seed: int = 0) -> float:
    """A keep rate drawn uniformly from [low, high] for optimizer ``step``.

    Training on a range of keep rates gives one model that serves all of them (a model
    trained at 0.7 alone loses more at 0.5). The draw depends only on (seed, step), so a
    resumed run draws what the uninterrupted run would have.
    """
    return low + (high - low) * random.Random(seed * 1_000_003 + step).random()
