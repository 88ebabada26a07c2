"""Multiply-accumulates of one image's forward, with the token counts the patch produces.

Counted by ``torch.utils.flop_counter.FlopCounterMode`` on a real forward, so every
matmul at its real (reduced) size is seen. On CPU, torch routes
``scaled_dot_product_attention`` to ``_scaled_dot_product_flash_attention_for_cpu``,
which FlopCounterMode does not know (it counted DeiT-S as 4.2 instead of 4.6 GMACs),
so that kernel is given torch's own SDPA formula here.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from . import hosts


def _cpu_flash_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _custom_mapping() -> dict:
    mapping = {}
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None:
        mapping[op] = _cpu_flash_sdpa_flops
    return mapping


def native_input_size(model: nn.Module) -> tuple[int, int, int]:
    """(C, H, W) the model takes now, as its host says (3 x 224 x 224 for a model no host serves)."""
    host = hosts.find(model)
    return tuple(host.input_size) if host is not None else (3, 224, 224)


def check_input_size(host: hosts.Host, input_size: Sequence[int]) -> None:
    """Refuse, in one line, an input of (C, H, W) ``input_size`` that ``host``'s model does not take as it is."""
    channels, *size = host.input_size
    c, *hw = (int(s) for s in input_size)
    if c != channels:
        raise ValueError(f"the model takes {channels}-channel images, not {c}-channel ones")
    if tuple(size) != tuple(hw) and not host.takes_any_size:
        raise ValueError(
            f"the model takes {size[0]}x{size[1]} inputs, not {hw[0]}x{hw[1]}: "
            f"call evit.resolution.set_input_size(model, {hw[0] if hw[0] == hw[1] else tuple(hw)}) first"
        )


@torch.no_grad()
def count_macs(model: nn.Module, input_size: Optional[Sequence[int]] = None) -> int:
    """MACs of one forward of ``model`` on one image of ``input_size`` (C, H, W; default: the
    model's native size, 3 x 224 x 224 for DeiT), in eval mode."""
    input_size = native_input_size(model) if input_size is None else tuple(input_size)
    if len(input_size) != 3 or any(int(s) <= 0 for s in input_size):
        raise ValueError(f"input_size must be (channels, height, width) with positive sizes, got {tuple(input_size)}")
    host = hosts.find(model)
    if host is not None:
        check_input_size(host, input_size)
    model = hosts.unwrapped(model)  # the model's own ops (not a compiled wrapper's graph)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    x = torch.randn(1, *[int(s) for s in input_size], device=device, dtype=dtype)
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False, custom_mapping=_custom_mapping()) as counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2
