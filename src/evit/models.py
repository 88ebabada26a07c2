"""Building models: timm names, ``--pretrained`` through timm, ``hf:`` transformers models, and local
checkpoints (:mod:`evit.loading` turns a command's flags into a model through these).

Pretrained weights come through timm from the Hugging Face Hub. Offline, the hub
client retries for most of a minute before failing; evit checks the hub first
(3 s) and, when it cannot be reached, looks in the local cache only, so the
answer is quick and says what to do.
"""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from . import hosts
from .checkpoint import (DATA_KEY, PREPROCESSING_KEY, TRAINED_WITH, recorded_data, recorded_preprocessing,
                         recorded_settings)
from .data import FASHION_MNIST_CLASSES, record_fashion_mnist_training
from .weights import first_non_finite, mismatch, read_state

HUB_HOST = "huggingface.co"
HF_PREFIX = "hf:"  # --model hf:CONFIG_OR_ID: a transformers model


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


def create_model(name: str, pretrained: bool = False, checkpoint: Optional[str] = None, weights_follow: bool = False,
                 fresh_head: bool = False, **kwargs) -> nn.Module:
    """``timm.create_model`` with clear errors for unknown names, offline weights and bad checkpoints; a name
    ``hf:CONFIG_OR_ID`` builds a transformers model instead (:func:`transformers_model`). ``weights_follow``: the
    caller loads a checkpoint into it next (a transformers folder's own weights are then not needed).
    ``fresh_head`` (fine-tuning): pretrained weights whose head is for another class count load without it (said
    on stderr); otherwise such a model, whose head would be untrained, is refused."""
    if name.startswith(HF_PREFIX):
        if pretrained and checkpoint:
            raise ValueError("give either --pretrained or --checkpoint, not both")
        model = transformers_model(name[len(HF_PREFIX):], pretrained, checkpoint=bool(checkpoint) or weights_follow,
                                   fresh_head=fresh_head, **kwargs)
        if checkpoint:
            load_checkpoint(model, checkpoint)
        return _finite(model, name) if pretrained else model
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
            model = timm.create_model(name, pretrained=True, **kwargs)
        except Exception as e:  # noqa: BLE001 - re-raised with what to do
            raise RuntimeError(
                f"cannot load pretrained weights for {name}: the Hugging Face Hub ({HUB_HOST}) is not reachable "
                f"and they are not in the local cache ({type(e).__name__}). Run once with network access to cache "
                "them, or pass a local checkpoint file (--checkpoint)."
            ) from None
        return _finite(_pretrained_head(model, name, fresh_head), name)
    model = timm.create_model(name, pretrained=pretrained, **kwargs)
    if checkpoint:
        load_checkpoint(model, checkpoint)
    return _finite(_pretrained_head(model, name, fresh_head), name) if pretrained else model


def _pretrained_head(model: nn.Module, name: str, fresh_head: bool) -> nn.Module:
    """``model`` as timm loaded its pretrained weights, or a refusal when timm left their head out (it does when
    the model is built for another class count than the weights': the head is then untrained), unless
    ``fresh_head`` (fine-tuning on other classes), when that is said."""
    trained_for, outputs = hosts.untrained_head_of(model), hosts.head_outputs(model)
    if trained_for is None:
        return model
    if not fresh_head:
        raise ValueError(f"the pretrained weights of {name} have a head for {trained_for} classes, and the model asks "
                         f"for {outputs} (num_classes): its head would be untrained; leave num_classes out, or "
                         "fine-tune the weights on your classes first (evit train --pretrained)")
    print(f"evit: the pretrained head of {name} has {trained_for} outputs and the model's {outputs}: the rest loads, "
          "the head starts untrained", file=sys.stderr)
    return model


def _finite(model: nn.Module, name: str) -> nn.Module:
    """``model``, or a one-line refusal when its pretrained weights hold NaN or inf."""
    bad = first_non_finite(model.state_dict())
    if bad:
        raise ValueError(f"the pretrained weights of {name} hold non-finite values: {bad}; refusing to use them")
    return model


def transformers_model(spec: str, pretrained: bool = False, fresh_head: bool = False, **kwargs) -> nn.Module:
    """A transformers model from ``CONFIG_OR_ID[:key=value,...]``: a local folder with config.json, a model type
    (``vit``, ``deit``, ``clip_vision_model``, ``dinov2``, ...) with its config's settings changed by the
    pairs (random weights unless ``pretrained``), or a Hub id (needs the network or a cache; offline it
    fails at once)."""
    import importlib.util

    if importlib.util.find_spec("transformers") is None:  # an optional extra
        raise RuntimeError("hf: models need transformers 5.21 or newer: pip install 'evit[transformers]'")
    from .hosts.transformers_models import create_model as create, parse_spec

    name, overrides = parse_spec(spec)
    if not hub_reachable():  # a Hub id is looked up in the local cache only: fail at once, not after a minute
        import huggingface_hub.constants as hub_constants

        hub_constants.HF_HUB_OFFLINE = True
    return create(name, pretrained, fresh_head=fresh_head, **{**overrides, **kwargs})


def classes_keyword(name: str) -> str:
    """The building keyword that sizes model ``name``'s head: transformers' ``num_labels``, timm's ``num_classes``."""
    return "num_labels" if name.startswith(HF_PREFIX) else "num_classes"


def given_classes(name: str, kwargs: dict) -> Optional[int]:
    """The head width asked for by ``kwargs`` (a recipe's ``num_classes``) or by ``name`` (an ``hf:`` spec's
    ``num_labels``); None when neither asks."""
    if name.startswith(HF_PREFIX):
        from .hosts.transformers_models import parse_spec

        kwargs = {**parse_spec(name[len(HF_PREFIX):])[1], **kwargs}
    return kwargs.get(classes_keyword(name))


def read_checkpoint(model: nn.Module, path: str) -> dict:
    """The weights of ``path`` (a ``.safetensors`` file or a torch checkpoint) in ``model``'s names, or a one-line
    refusal: non-finite values are refused; a ViT trained at another input size has its position embeddings
    resampled (its host's filter: timm's), for fine-tuning at a higher resolution."""
    state = read_state(path)
    bad = first_non_finite(state)
    if bad:
        raise ValueError(f"checkpoint {path} holds non-finite weights: {bad}; refusing to use them")
    host = hosts.find(model)
    if host is not None:  # its host's way: timm resamples the position embeddings to this input size
        given = {k: tuple(v.shape) for k, v in state.items()}
        try:
            state = host.adapt_state_dict(state)
        except (RuntimeError, ValueError, KeyError, IndexError) as e:
            # a file of another architecture trips the filter (a reshape): name what differs, where it can be named
            raise ValueError(mismatch(path, model, state)
                             or f"checkpoint {path} does not fit this model: {str(e).splitlines()[0]}") from None
        own = model.state_dict()
        resampled = [k for k, v in state.items() if k in given and given[k] != tuple(v.shape) and k in own]
        if resampled:  # said once the weights have loaded (not quiet: they now run at a size not trained at)
            k = resampled[0]
            state = _ReadState(state)
            state.note = (f"evit: {path} was trained at another input size; its {k} ({_shape(given[k])}) is "
                          f"resampled to this model's ({_shape(state[k].shape)})")
    return state


class _ReadState(dict):
    """A checkpoint's weights as :func:`read_checkpoint` adapted them, with the line to say once they load."""

    note: str = ""


def _shape(shape) -> str:
    return "x".join(map(str, shape))


def head_rows(model: nn.Module, state: dict, path: str) -> Optional[int]:
    """The outputs of the head in ``state`` when they differ from ``model``'s (weights for other classes); else None.
    Heads of different widths in one file (a distilled DeiT's ``head`` and ``head_dist``) are refused."""
    own = model.state_dict()
    widths = {name: int(state[k].shape[0]) for name in hosts.head_names(model)
              if (k := f"{name}.weight") in state and k in own and state[k].dim() == own[k].dim()}
    if len(set(widths.values())) > 1:
        raise ValueError(f"checkpoint {path} holds heads of different widths ({_widths(widths)}): they were not "
                         "trained on one class list; give weights whose heads agree")
    rows = next(iter(widths.values()), None)
    return rows if rows is not None and rows != hosts.head_outputs(model) else None


def _widths(outputs: dict[str, int]) -> str:
    return ", ".join(f"{name} {rows} outputs" for name, rows in outputs.items())


def _fresh_head_note(model: nn.Module, path: str, theirs: dict) -> str:
    """The line said when the head of ``path`` (its entries' shapes ``theirs``) is left out and the model's
    starts untrained."""
    outputs = hosts.head_outputs(model)
    if not theirs:
        return (f"evit: {path} holds no classification head (a feature extractor's weights): the rest loads, the "
                f"model's head ({outputs} outputs) starts untrained")
    rows = {shape[0] for k, shape in theirs.items() if k.endswith(".weight") and len(shape) > 1}
    if len(rows) == 1 and rows != {outputs}:
        return (f"evit: the head of {path} has {rows.pop()} outputs and the model's {outputs}: the rest loads, the "
                "head starts untrained")
    named = sorted({k.rsplit(".", 1)[0] for k in theirs})
    return (f"evit: the head of {path} ({', '.join(named)}) does not fit the model's ({outputs} outputs): the rest "
            "loads, the head starts untrained")


def load_checkpoint(model: nn.Module, path: str, fresh_head: bool = False, state: Optional[dict] = None) -> None:
    """Load weights from a ``.safetensors`` file or a torch checkpoint into ``model``, or refuse in one line.

    ``state``: the file as :func:`read_checkpoint` read it for ``model``, when already read. ``fresh_head``
    (fine-tuning on other classes): a head in the file that does not fit the model's (another width, other
    names, or none: a feature extractor's weights) is left out, and the model's starts untrained (said on
    stderr once the rest has loaded). The token-reduction settings the file recorded (EViT's fusion,
    :func:`evit.checkpoint.recorded_settings`) are left on the model, so evaluating it patches it the way it
    was trained."""
    state = read_checkpoint(model, path) if state is None else state
    note = getattr(state, "note", "")
    own = model.state_dict()
    head = hosts.head_keys(model, [*own, *state])
    theirs = {k: tuple(v.shape) for k, v in state.items() if k in head}
    fresh = fresh_head and theirs != {k: tuple(v.shape) for k, v in own.items() if k in head}
    if fresh:
        state = {k: v for k, v in state.items() if k not in head}
    problem = mismatch(path, model, state, fresh_head=fresh)
    if problem and not theirs and head and not mismatch(path, model, state, fresh_head=True):
        raise ValueError(f"checkpoint {path} holds no classification head (a feature extractor's weights), so it "
                         f"scores no classes; fine-tune it on yours first: evit train --init {path} --data FOLDER")
    if problem:
        raise ValueError(problem)
    if fresh:
        print(_fresh_head_note(model, path, theirs), file=sys.stderr)
    model.load_state_dict(state, strict=False)
    if note:
        print(note, file=sys.stderr)
    setattr(model, TRAINED_WITH, recorded_settings(Path(path)))
    see_images_as_recorded(model, path, names=not fresh)  # a head left out: its classes are not the file's


def see_images_as_recorded(model: nn.Module, path: Union[str, Path], names: bool = True) -> None:
    """Make ``model`` read images as the weights file ``path`` records they were trained to: Fashion-MNIST's
    tensors (with ``names``, its classes too), or the preprocessing a run recorded (a folder fine-tuned from such
    weights); a file that records neither leaves the model's own."""
    if recorded_data(Path(path)) == "fashion-mnist":
        host = hosts.adapter(model)
        channels, outputs = host.input_size[0], None
        if names and host.head_names:
            outputs = host.head_outputs
        if channels != 1 or outputs not in (None, len(FASHION_MNIST_CLASSES)):
            raise ValueError(f"{path}: its {DATA_KEY!r} metadata is damaged or not for this model: it says the weights "
                             "were trained on Fashion-MNIST's tensors (1 channel, 10 classes), and the model takes "
                             f"{channels}-channel images{'' if outputs is None else f' into {outputs} classes'}")
        record_fashion_mnist_training(model, names)
    elif (reading := recorded_preprocessing(Path(path))) is not None:
        host = hosts.adapter(model)
        channels = host.input_size[0]
        if not len(reading["mean"]) == len(reading["std"]) == channels:
            raise ValueError(f"{path}: its {PREPROCESSING_KEY!r} metadata is damaged or not for this model: it gives "
                             f"{len(reading['mean'])} mean and {len(reading['std'])} std values, and the model takes "
                             f"{channels}-channel images")
        host.record_preprocessing(**reading)
