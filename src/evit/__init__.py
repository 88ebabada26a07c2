"""evit: faster Vision Transformers by reorganising their image tokens (EViT, ICLR 2022).

    import timm, evit
    model = evit.patch(timm.create_model("deit_small_patch16_224"), keep_rate=0.7)
    evit.count_macs(model)          # 3.0e9 instead of 4.6e9
    evit.set_keep_rate(model, 0.5)  # change it later, e.g. in a warm-up schedule
"""
from . import methods
from .cost import count_macs
from .patch import apply, check_model, patch, reductions, set_keep_rate, token_counts, unpatch
from .reduction import default_locations
from .registry import register

__version__ = "0.1.0"
__all__ = [
    "patch", "unpatch", "apply", "set_keep_rate", "count_macs", "token_counts", "reductions",
    "default_locations", "check_model", "methods", "register",
]
