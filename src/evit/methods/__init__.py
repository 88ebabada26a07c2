"""Token-reduction methods, one per file, each a :class:`TokenReduction` registered by name.

A new method is its own file here, registered with one line (``@register`` on its class, see
:mod:`evit.registry`), and imported below so that ``evit.methods`` exports it.
"""
from ..reduction import Keep, TokenReduction, TokenState
from ..registry import METHODS, register
from .base import KeepRateReduction, kept_count
from .evit import EViT, TopK
from .random_drop import RandomDrop
from .tome import ToMe
from .dynamicvit import DynamicViT
from .stvit import STViT
from .patch_slimming import PatchSlimming
from .slice import Ideal, Slice  # (registration order above is the order the command line lists them in)

__all__ = ["TokenReduction", "TokenState", "KeepRateReduction", "kept_count", "EViT", "TopK", "RandomDrop",
           "ToMe", "DynamicViT", "STViT", "PatchSlimming", "Slice", "Ideal", "Keep", "METHODS", "register"]
