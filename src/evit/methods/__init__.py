"""Token-reduction methods, one per file, all :class:`TokenReduction` subclasses."""
from .base import KeepRateReduction, TokenReduction, kept_count
from .evit import EViT, TopK
from .slice import Slice

__all__ = ["TokenReduction", "KeepRateReduction", "kept_count", "EViT", "TopK", "Slice"]
