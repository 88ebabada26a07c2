"""Token-reduction methods, one per file, all :class:`TokenReduction` subclasses."""
from .base import KeepRateReduction, TokenReduction, TokenState, kept_count
from .dynamicvit import DynamicViT
from .evit import EViT, TopK
from .patch_slimming import PatchSlimming
from .random_drop import RandomDrop
from .slice import Ideal, Keep, Slice
from .stvit import STViT
from .tome import ToMe

#: the methods :func:`evit.patch` knows by name
METHODS = {"evit": EViT, "topk": TopK, "random": RandomDrop, "tome": ToMe, "dynamicvit": DynamicViT,
           "stvit": STViT, "patchslimming": PatchSlimming, "slice": Slice}

__all__ = ["TokenReduction", "TokenState", "KeepRateReduction", "kept_count", "EViT", "TopK", "RandomDrop",
           "ToMe", "DynamicViT", "STViT", "PatchSlimming", "Slice", "Ideal", "Keep", "METHODS"]
