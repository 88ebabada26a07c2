"""Hugging Face transformers' vision transformers: not served yet."""
from __future__ import annotations

from typing import Optional

from torch import nn

from .base import AttentionView, Host


def serves(model: nn.Module) -> bool:
    return False


def host(model: nn.Module) -> Host:  # pragma: no cover - nothing served yet
    raise TypeError(f"evit does not serve {type(model).__name__} yet")


def attention_view(module: nn.Module) -> Optional[AttentionView]:
    return None
