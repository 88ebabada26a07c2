"""Input sizes: reading a size given as N, (H, W) or (C, H, W), resizing a model, resizing images.

Used by the budget solver (a larger input at equal cost), evaluation (one data set for models
of different input sizes) and training (higher-resolution fine-tuning).
"""
from __future__ import annotations

from typing import Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from . import hosts

Size = Union[int, Sequence[int]]


def spatial(size: Size, what: str = "img_size") -> tuple[int, int]:
    """(H, W) from N, (H, W) or (C, H, W)."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer, Sequence, torch.Size)):
        raise TypeError(f"{what} must be an int N, (H, W) or (C, H, W), got {size!r}")
    dims = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)[-2:]
    if len(dims) != 2 or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in dims):
        raise TypeError(f"{what} must be an int N, (H, W) or (C, H, W), got {size!r}")
    if min(dims) < 1:
        raise ValueError(f"{what} must be positive, got {size!r}")
    return int(dims[0]), int(dims[1])


def set_input_size(model: nn.Module, img_size: Size) -> nn.Module:
    """Make ``model`` (a ViT a host serves) take ``img_size`` inputs, in place; return it.

    ``img_size`` is N (square), (H, W) or (C, H, W). The position embeddings are resampled by
    the host library itself (timm: its own ``VisionTransformer.set_input_size``, bicubic, prefix
    tokens kept, the resize timm uses when it loads weights at a new size, so a model resized
    here matches one timm builds at that size). Each side must be a multiple of the patch size:
    the patch embedding would otherwise crop (or pad) the image silently. Resizing to the current
    size changes nothing; resizing back to an earlier size does not restore the embeddings
    (resampling loses detail): reload the weights for that.
    """
    host = hosts.adapter(model)
    host.set_input_size(spatial(img_size))
    return model


def resize_images(x: Tensor, img_size: Optional[Size]) -> Tensor:
    """``x`` (B, C, H, W) resized (bilinear) to ``img_size``; unchanged when None or already that size."""
    hw = None if img_size is None else spatial(img_size)
    if hw is None or tuple(x.shape[-2:]) == hw:
        return x
    return torch.nn.functional.interpolate(x, size=hw, mode="bilinear", align_corners=False)


def resize_batches(batches: Iterable[tuple[Tensor, Tensor]], img_size: Optional[Size]) -> Iterator[tuple[Tensor, Tensor]]:
    """Batches with images resized (bilinear) to ``img_size``: Fashion-MNIST is 28 px, and a model
    resized to a larger input sees the same images upsampled. Applied to the normalised batch, as
    the model would see it; batches already at that size pass unchanged."""
    for x, y in batches:
        yield resize_images(x, img_size), y
