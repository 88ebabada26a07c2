"""Building models: timm names, ``--pretrained`` through timm, local checkpoints, the embedded default;
:func:`load_model` is the one way every command turns its flags into a model.

Pretrained weights come through timm from the Hugging Face Hub. Offline, the hub
client retries for most of a minute before failing; evit checks the hub first
(3 s) and, when it cannot be reached, looks in the local cache only, so the
answer is quick and says what to do.
"""
from __future__ import annotations

import json
import os
import socket
from typing import Callable, Optional

import torch
from torch import nn

from .weights import load_checkpoint

HUB_HOST = "huggingface.co"


def resolve_device(name: Optional[str] = None) -> torch.device:
    """The device to run on: ``name``, else this process's GPU (``LOCAL_RANK`` under torchrun), else
    the CPU. A name torch does not know, or a GPU this torch cannot see, is a clear ValueError."""
    if name is None:
        name = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"device {name!r}: {e}; use 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: this torch sees no CUDA GPU; use --device cpu")
    return device


def hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return False
    try:
        with socket.create_connection((HUB_HOST, 443), timeout=timeout):
            return True
    except OSError:
        return False


def device_text(device: torch.device) -> str:
    """'cpu, 2 threads' or 'cuda:0 (NVIDIA H100 80GB HBM3)': where a measurement ran, for its header."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{device}, {torch.get_num_threads()} threads"


def create_model(name: str, pretrained: bool = False, checkpoint: Optional[str] = None, **kwargs) -> nn.Module:
    """``timm.create_model`` with clear errors for unknown names, offline weights and bad checkpoints."""
    import timm

    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        raise ValueError(f"unknown timm model {name!r}" + (f"; similar names: {', '.join(close)}" if close else ""))
    if pretrained and checkpoint:
        raise ValueError("give either --pretrained or --checkpoint, not both")
    if pretrained and not hub_reachable():
        import huggingface_hub.constants as hub_constants

        hub_constants.HF_HUB_OFFLINE = True  # look in the local cache only; fail at once
        try:
            return timm.create_model(name, pretrained=True, **kwargs)
        except Exception as e:  # noqa: BLE001 - re-raised with what to do
            raise RuntimeError(
                f"cannot load pretrained weights for {name}: the Hugging Face Hub ({HUB_HOST}) is not reachable "
                f"and they are not in the local cache ({type(e).__name__}). Run once with network access to cache "
                "them, or pass a local checkpoint file (--checkpoint)."
            ) from None
    model = timm.create_model(name, pretrained=pretrained, **kwargs)
    if checkpoint:
        load_checkpoint(model, checkpoint)
    return model


EMBEDDED_LABEL = "embedded Fashion-MNIST ViT"


def architecture(model: Optional[str] = None, recipe: Optional[str] = None) -> tuple[str, dict]:
    """(timm model name, its keyword arguments): --model, with --recipe's ``model_kwargs`` when both are
    given; --recipe's model alone; else the embedded default's architecture."""
    from . import embedded

    if not recipe:
        return embedded.architecture() if model is None else (model, {})
    path = embedded.recipe_path(recipe)
    try:
        values = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read recipe {path}: {e}") from None
    if not isinstance(values, dict) or not (model or values.get("model")):
        raise ValueError(f"recipe {path} names no model (a JSON object with \"model\": a timm model name)")
    return model or values["model"], dict(values.get("model_kwargs") or {})


def load_model(model: Optional[str] = None, recipe: Optional[str] = None, pretrained: bool = False,
               checkpoint: Optional[str] = None, img_size: Optional[int] = None, kind: str = "baseline",
               model_kwargs: Optional[dict] = None,
               before_weights: Optional[Callable[[nn.Module], object]] = None) -> tuple[str, nn.Module]:
    """(label, model) for a command's --model, --recipe, --pretrained and --checkpoint: the one path every
    command takes, so no flag is ignored.

    The architecture: --model (a timm name; with --recipe, the recipe's ``model_kwargs``), --recipe's
    model, else the embedded default's. The weights: --pretrained (timm's, for a named model only),
    --checkpoint (any file :func:`evit.weights.load_checkpoint` reads; refused in one line when it does
    not fit), else for the embedded default its bundled ``kind`` weights ('baseline', 'evit',
    'dynamicvit'), else timm's random initialisation. ``img_size``: build the embedded architecture at
    this size, for a checkpoint trained there. ``model_kwargs`` add to the recipe's.
    ``before_weights(model)`` runs before the checkpoint loads (patch a learned method in first, so its
    weights have modules to load into).
    """
    if pretrained and checkpoint:
        raise ValueError("give either --pretrained or --checkpoint, not both")
    embedded_default = model is None and recipe is None
    if pretrained and embedded_default:
        raise ValueError("--pretrained needs --model (or a --recipe naming one): the embedded default model has "
                         "its own weights")
    if embedded_default and checkpoint is None:
        from . import embedded

        built = embedded.load_model(kind)
        if before_weights is not None:
            before_weights(built)
        return EMBEDDED_LABEL if kind == "baseline" else f"{EMBEDDED_LABEL} ({kind} weights)", built
    name, kwargs = architecture(model, recipe)
    kwargs = {**kwargs, **(model_kwargs or {})}
    if embedded_default and img_size:
        kwargs["img_size"] = img_size
    built = create_model(name, pretrained=pretrained, **kwargs)
    if before_weights is not None:
        before_weights(built)
    if checkpoint:
        load_checkpoint(built, checkpoint)
    if not (embedded_default and checkpoint):
        return name.split("/")[-1], built
    path = os.path.normpath(checkpoint)  # the run's folder for a run's model.safetensors, else the file's stem
    parent, base = os.path.split(path)
    return (os.path.basename(parent) if base == "model.safetensors" else os.path.splitext(base)[0]) or name, built
