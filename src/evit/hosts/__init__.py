"""The model libraries evit serves: all evit knows of a library lives in its host file(s).

* :mod:`evit.hosts.timm`: timm's VisionTransformer (ViT, DeiT, DeiT III, DINOv2, CLIP, ...);
* :mod:`evit.hosts.transformers`: Hugging Face transformers' ViT, DeiT, CLIP vision, DINOv2 (with
  registers) and SigLIP vision models (the optional extra ``evit[transformers]``), and
  :mod:`evit.hosts.transformers_models`, building them from a spec (``hf:vit:hidden_size=384``).

A host file defines a :class:`~evit.hosts.base.Host` (the model: blocks, prefix tokens, pooling,
input size), a :class:`~evit.hosts.base.BlockView` per block type and an
:class:`~evit.hosts.base.AttentionView` per attention type. The patch mechanism and the tools
reach a model only through these. A new host is one more file here and one more line in
:func:`find` and :func:`attention_view`.
"""
from __future__ import annotations

import functools
import sys
from typing import Callable, Iterable, Optional, Sequence

from torch import Tensor, nn

from . import timm as timm_host
from .base import AttentionView, BlockView, Host, base_class

__all__ = ["AttentionView", "BlockView", "Host", "adapter", "attention_view", "base_class", "check_trainable",
           "class_names", "data_config", "find", "forward", "head_outputs", "model_name",
           "unwrapped", "view_class"]


def _transformers():
    """evit's transformers host, if transformers is loaded (a model of it can only exist then)."""
    if "transformers" not in sys.modules:
        return None
    from . import transformers as hf_host

    return hf_host


def unwrapped(model: nn.Module) -> nn.Module:
    """The model inside ``DataParallel`` / ``DistributedDataParallel`` wrappers (``.module``) and ``torch.compile``'s
    (``._orig_mod``; its guards recompile when a patch changes the model), else ``model``: evit works on the host's
    model, whatever runs it."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def find(model: nn.Module) -> Optional[Host]:
    """The host adapter for ``model`` (or the model a DDP wrapper holds), or None when no host serves its family."""
    model = unwrapped(model)
    if timm_host.serves(model):
        return timm_host.TimmHost(model)
    hf = _transformers()
    return hf.host(model) if hf is not None and hf.serves(model) else None


def adapter(model: nn.Module) -> Host:
    """:func:`find`, raising a TypeError that names what is served when nothing serves ``model``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"evit.patch expects a timm VisionTransformer or a transformers ViT, got {type(model).__name__}")
    model = unwrapped(model)
    found = find(model)
    if found is None:
        raise TypeError(
            f"evit cannot patch {timm_host.model_name(model)} ({type(model).__name__}): only timm VisionTransformer "
            "models (ViT, DeiT, DeiT III, DINOv2, CLIP ViT) and transformers' ViT, DeiT, CLIP vision, DINOv2 and SigLIP "
            "vision models are supported, not Swin, EVA, ConvNeXt or other families"
        )
    return found


def view_class(block_class: type) -> type:
    """The :class:`BlockView` class for blocks of ``block_class`` (a served host's block class)."""
    if timm_host.serves_block(block_class):
        return timm_host.TimmBlock
    hf = _transformers()
    view = hf.view_class(block_class) if hf is not None else None
    if view is None:
        raise TypeError(f"evit does not know block class {block_class.__name__}")
    return view


def attention_view(module: nn.Module) -> AttentionView:
    """The view of one attention module of a served model (``evit.attention.attend(module, x)``)."""
    if timm_host.serves_attention(module):
        return timm_host.TimmAttention(module)
    hf = _transformers()
    view = hf.attention_view(module) if hf is not None else None
    if view is None:
        raise TypeError(f"evit does not know attention module {type(module).__name__}")
    return view


def forward(model: nn.Module) -> Callable[[Tensor], Tensor]:
    """What to call for ``model``'s main output tensor on images (a classifier's logits): ``model`` itself when
    its library returns that tensor (timm: the very same call, at the same speed), else its host's forward run
    through ``model``, so that a DDP wrapper's own call (which syncs the gradients) is the one made."""
    found = find(model)
    if found is None or found.returns_tensor:
        return model
    return functools.partial(found.forward, runner=model)


def check_trainable(model: nn.Module) -> None:
    """Raise ValueError, in one line, when ``model`` cannot be trained as a classifier on its logits (no
    classification head, or a head its library does not train); a model no host serves is left to timm."""
    found = find(model)
    if found is not None:
        found.check_trainable()


def head_outputs(model: nn.Module) -> int:
    """Outputs of ``model``'s classification head: its host's answer, else timm's ``num_classes`` (0 if none)."""
    found = find(model)
    return found.head_outputs if found is not None else getattr(model, "num_classes", 0)


def head_names(model: nn.Module) -> tuple[str, ...]:
    """Names of the modules holding ``model``'s classification head (:attr:`~evit.hosts.base.Host.head_names`)."""
    found = find(model)
    return found.head_names if found is not None else ()


def head_keys(model: nn.Module, keys: Iterable[str]) -> set[str]:
    """Those of the state-dict entries ``keys`` that belong to a classification head
    (:meth:`~evit.hosts.base.Host.in_head`)."""
    found = find(model)
    return {k for k in keys if found.in_head(k)} if found is not None else set()


def untrained_head_of(model: nn.Module) -> Optional[int]:
    """The class count of pretrained weights whose head ``model``'s library left out, building ``model`` for
    another (:attr:`~evit.hosts.base.Host.untrained_head_of`); else None."""
    found = find(model)
    return found.untrained_head_of if found is not None else None


def class_names(model: nn.Module) -> Optional[list[str]]:
    """The names ``model`` records for its head's classes, in output order (transformers' ``id2label``); else None."""
    found = find(model)
    return found.class_names if found is not None else None


def recorded_preprocessing(model: nn.Module) -> Optional[dict]:
    """How ``model``'s weights were trained to see images, where evit recorded it
    (:attr:`~evit.hosts.base.Host.recorded_preprocessing`); else None."""
    found = find(model)
    return found.recorded_preprocessing if found is not None else None


def data_config(model: nn.Module, input_size: Optional[Sequence[int]] = None) -> dict:
    """Preprocessing for ``model``'s images (timm's keys), at ``input_size``: its host's, else timm's for any timm model."""
    found = find(model)
    return found.data_config(input_size) if found is not None else timm_host.data_config(model, input_size)


def model_name(model: nn.Module) -> str:
    """How messages name ``model``: its host's name for it, else timm's architecture name or its class name."""
    found = find(model)
    return found.name if found is not None else timm_host.model_name(unwrapped(model))
