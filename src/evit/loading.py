"""The one way every command turns its flags (--model, --recipe, --pretrained, --checkpoint) into a model:
a named architecture built by :mod:`evit.models`, or the embedded default with its bundled weights."""
from __future__ import annotations

import json
import os
from typing import Callable, Optional

from torch import nn

from .models import classes_keyword, create_model, head_rows, load_checkpoint, read_checkpoint

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
               model_kwargs: Optional[dict] = None, before_weights: Optional[Callable[[nn.Module], object]] = None,
               fresh_head: bool = False) -> tuple[str, nn.Module]:
    """(label, model) for a command's --model, --recipe, --pretrained and --checkpoint: the one path every
    command takes, so no flag is ignored.

    The architecture: --model (a timm name; with --recipe, the recipe's ``model_kwargs``), --recipe's
    model, else the embedded default's. The weights: --pretrained (timm's, for a named model only),
    --checkpoint (any file :func:`evit.models.load_checkpoint` reads; refused in one line when it does
    not fit), else for the embedded default its bundled ``kind`` weights ('baseline', 'evit', 'dynamicvit'),
    else timm's random initialisation. A checkpoint for another number of classes builds the model with its
    head; with ``fresh_head`` (fine-tuning on other classes) it loads without it. ``img_size``: build the
    embedded architecture at this size, for a checkpoint trained there. ``model_kwargs`` add to the recipe's.
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
    built = create_model(name, pretrained=pretrained, weights_follow=bool(checkpoint), fresh_head=fresh_head, **kwargs)
    if before_weights is not None:
        before_weights(built)
    if checkpoint:
        state = read_checkpoint(built, checkpoint)
        rows = None if fresh_head else head_rows(built, state, checkpoint)
        if rows is not None:  # weights for another number of classes: the model is built with their head
            built = create_model(name, weights_follow=True, **{**kwargs, classes_keyword(name): rows})
            if before_weights is not None:
                before_weights(built)
        load_checkpoint(built, checkpoint, fresh_head=fresh_head, state=state)
    if not (embedded_default and checkpoint):
        return name.split("/")[-1], built
    path = os.path.normpath(checkpoint)  # the run's folder for a run's model.safetensors, else the file's stem
    parent, base = os.path.split(path)
    return (os.path.basename(parent) if base == "model.safetensors" else os.path.splitext(base)[0]) or name, built


def patch_for_weights(method: str) -> Optional[Callable[[nn.Module], object]]:
    """What to do to a model before a weights file trained with ``method`` loads into it (``before_weights``): a
    learned method's modules are made by patching it (at its own blocks); a method that saves a choice of tokens
    (Patch Slimming) is patched at every block, so a file's choice loads wherever it was made; None for the others."""
    from . import hosts
    from .patch import patch
    from .registry import method_class

    cls = method_class(method)
    if cls.learned:
        return lambda model: patch(model, 1.0, method=cls.name)
    if cls.needs_images:
        return lambda model: patch(model, 1.0, range(len(hosts.adapter(model).blocks)), method=cls.name)
    return None


def keep_saved_choice(model: nn.Module, method: str, path: Optional[str], command: str) -> nn.Module:
    """After :func:`patch_for_weights` for a method that saves a choice of tokens: keep the choice the file held
    on the model (:func:`evit.patch.keep_saved_state`, which unpatches it), so patching it with that method uses
    it where the patch is the one it was made for (same blocks, token count and patch grid, as many tokens kept at
    each), and say so on stderr; other methods' models are returned as they are."""
    import sys

    from . import hosts
    from .patch import SAVED_STATE, keep_saved_state
    from .registry import method_class

    cls = method_class(method)
    if not cls.needs_images or cls.learned:
        return model
    saved = getattr(hosts.unwrapped(keep_saved_state(model)), SAVED_STATE, (None, {}))[1]
    if saved:
        print(f"{command}: {path} holds {cls.label}'s choice of tokens {cls.describe_saved(saved)}", file=sys.stderr)
    return model
