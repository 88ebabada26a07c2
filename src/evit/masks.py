"""Which input patches each token stands for, stage by stage: for pictures and users' own plots.

Every method reports what it did to the shared :class:`evit.methods.TokenState` when
tracking is on: kept tokens are followed, fused or merged tokens hold the union of
their patches, dropped ones disappear. :func:`token_groups` turns that into one map
per reduction stage: for each image patch, the token it now belongs to (or -1 when
dropped), with the size of that token.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import hosts
from .patch import reductions


def token_sources(model: nn.Module, images: Tensor) -> list[tuple[int, Tensor]]:
    """Run ``model`` on ``images`` and return, for each reduction that changed the sequence,
    (block index, (B, N, N0) bool tensor: token n holds input token m; prefix tokens included,
    N0 = the input sequence length)."""
    methods = reductions(model)
    if not methods:
        raise ValueError("token_sources: the model has no token reduction; patch it first (evit.patch)")
    state = next(iter(methods.values())).state
    was_training = model.training
    state.track = True
    try:
        model.eval()
        with torch.no_grad():
            model(images)
        return [(block, s.bool()) for block, s in state.stages]
    finally:
        state.track = False
        state.reset()
        model.train(was_training)


@dataclass
class Stage:
    """One reduction stage, per image patch on the patch grid (B, H, W)."""

    block: int
    token: Tensor  # index of the token holding the patch, -1 if dropped
    size: Tensor  # how many image patches that token holds (0 if dropped)
    tokens: int  # sequence length after the stage (prefix included)


def token_groups(model: nn.Module, images: Tensor) -> list[Stage]:
    """Per reduction stage, the token each image patch belongs to and that token's size, on the patch grid."""
    sources = token_sources(model, images)
    host = hosts.adapter(model)
    p = host.num_prefix_tokens
    H, W = host.patch_grid(tuple(images.shape[-2:]))
    stages = []
    for block, src in sources:
        img = src[:, :, p:]  # (B, N, patches)
        size = img.sum(dim=-1)  # patches per token
        held = img.any(dim=1)  # (B, patches)
        token = torch.where(held, img.float().argmax(dim=1), torch.full_like(held, -1, dtype=torch.long))
        patch_size = torch.where(held, size.gather(1, token.clamp_min(0)), torch.zeros_like(token))
        B = images.shape[0]
        stages.append(Stage(block, token.view(B, H, W), patch_size.view(B, H, W), src.shape[1]))
    return stages
