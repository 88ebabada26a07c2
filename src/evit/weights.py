"""Reading weight files: one way for every command, one clear line for every file that cannot serve.

A checkpoint is a ``.safetensors`` file or a torch file (``torch.load`` with ``weights_only``: a
file never runs code). A torch file holds a state dict, or a training checkpoint with the state dict
under ``model`` (DeiT's and the official EViT's, whose ``args`` is an ``argparse.Namespace``: allowed
as data) or ``state_dict``. A file that is damaged, holds something else, or does not fit the model
is refused naming the file and the first keys that differ with their shapes; weights holding NaN or
inf are refused naming the first such tensor, so they are never evaluated into a plausible number.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import re
from pathlib import Path
from typing import Mapping, Optional

import torch
from torch import Tensor, nn

from . import hosts

#: keys under which training scripts store the model's state dict (DeiT, EViT: 'model'; Lightning, timm:
#: 'state_dict'), the model's own before its EMA copy (DeiT: 'model_ema'; timm: 'state_dict_ema'), taken
#: when a file holds only that
STATE_KEYS = ("model", "state_dict", "model_ema", "state_dict_ema")


def _shape(t: Tensor) -> str:
    return "[" + ", ".join(map(str, t.shape)) + "]"


def first_non_finite(state: Mapping[str, Tensor]) -> Optional[str]:
    """'name (k of n values NaN or inf)' for the first floating tensor of ``state`` that is not all finite."""
    for name, t in state.items():
        if isinstance(t, Tensor) and t.is_floating_point():
            bad = (~torch.isfinite(t)).sum().item()
            if bad:
                return f"{name} ({bad} of {t.numel()} values NaN or inf)"
    return None


def check_finite(model: nn.Module, what: str) -> None:
    """Raise ValueError when ``model`` holds a NaN or inf weight: it would score a plausible, wrong number."""
    bad = first_non_finite(model.state_dict())
    if bad:
        raise ValueError(f"{what} holds non-finite weights: {bad}; refusing to use them")


def torch_reason(e: Exception) -> str:
    """What torch's weights-only unpickler objected to, without its advice to turn the safety off."""
    text = str(e)
    found = re.search(r"unsupported (?:global:? )?GLOBAL ([\w.]+)", text, re.IGNORECASE)
    if found:
        return f"it holds pickled Python objects ({found.group(1)}), not only tensors and plain data"
    found = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    reason = found.group(1) if found else text.splitlines()[0] if text else type(e).__name__
    return f"it is not a torch checkpoint ({reason.strip()[:120]})"


#: what PyTorch's wrappers put before a module's parameter names: DataParallel / DDP, torch.compile
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def unwrapped_names(state: dict) -> dict:
    """``state`` with the wrappers' prefixes dropped, in any order and nesting (a compiled DDP model saves
    ``_orig_mod.module.blocks...``), which timm's ``clean_state_dict`` of timm 1.0.16 does not do."""
    def name(key: str) -> str:
        while key.startswith(WRAPPER_PREFIXES):
            key = key[len(next(p for p in WRAPPER_PREFIXES if key.startswith(p))):]
        return key

    return {name(k): v for k, v in state.items()}


def is_safetensors(p: Path) -> bool:
    """Whether ``p`` is read as safetensors, by its first bytes more than its name: a torch file (a zip, or a
    legacy pickle) named .safetensors is read as torch, and safetensors named .pth (an 8-byte header length,
    then the JSON header's '{') as safetensors."""
    with open(p, "rb") as f:
        head = f.read(9)
    if head[8:9] == b"{":  # first: a header length ending in byte 0x80 starts the file as a pickle would
        return True
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":  # byte 8 of these is never '{'
        return False
    return p.suffix == ".safetensors"


def load_torch(path: Path, plain_data: list) -> object:
    """``torch.load`` of ``path`` with ``weights_only`` (a file never runs code), accepting the classes in
    ``plain_data`` as data where torch can be told so (2.5 and newer). The file is opened here, so torch reads
    it by its bytes, not by its name."""
    allowed = getattr(torch.serialization, "safe_globals", None)
    with allowed(plain_data) if allowed is not None else contextlib.nullcontext(), open(path, "rb") as f:
        return torch.load(f, map_location="cpu", weights_only=True)


def read_state(path: str) -> dict[str, Tensor]:
    """The state dict in ``path`` (see the module docstring), or a one-line error naming the file."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"checkpoint {path} is a folder, not a weights file: give a file in it (an evit run's: "
                         f"{p / 'model.safetensors'})")
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if is_safetensors(p):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return unwrapped_names(load_file(str(p)))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"checkpoint {path} is not a readable safetensors file ({p.stat().st_size} bytes: "
                             f"{str(e).splitlines()[0] if str(e) else type(e).__name__}); it is damaged or "
                             "truncated: write it again") from None
    # argparse.Namespace: the ``args`` DeiT-style training stores beside the weights, plain data (torch >= 2.5
    # can be told so; an older torch refuses such a file, naming the Namespace)
    try:
        loaded = load_torch(p, [argparse.Namespace])
    except OSError:  # the file could not be opened: said as the system says it
        raise
    except Exception as e:  # noqa: BLE001 - the unpickler raises anything on arbitrary bytes (IndexError, ...)
        raise ValueError(f"checkpoint {path} cannot be read safely: {torch_reason(e)}; save the model's "
                         "state_dict() with torch.save or safetensors") from None
    if isinstance(loaded, Mapping):
        inner = next((loaded[k] for k in STATE_KEYS if isinstance(loaded.get(k), Mapping)), None)
        loaded = inner if inner is not None else loaded
    if isinstance(loaded, Mapping) and {"optimizer", "rng", "step"} <= set(loaded):  # evit.checkpoint's own
        raise ValueError(f"checkpoint {path} is an evit run's training state (optimizer, random generators), not "
                         f"weights: give {p.with_suffix('.safetensors')} beside it")
    if not isinstance(loaded, Mapping):
        raise ValueError(f"checkpoint {path} holds a {type(loaded).__name__}, not a state dict (parameter names "
                         f"to tensors, or a training checkpoint with one under {' or '.join(map(repr, STATE_KEYS))})")
    odd = next((k for k, v in loaded.items() if not isinstance(v, Tensor)), None)
    if odd is not None:
        raise ValueError(f"checkpoint {path} is not a state dict: entry {odd!r} is a {type(loaded[odd]).__name__}, "
                         f"not a tensor (keys: {', '.join(map(str, list(loaded)[:5]))})")
    return unwrapped_names(dict(loaded))


def _run_config(path: str) -> Optional[Path]:
    """The ``config.json`` of the evit run that wrote ``path``, when one lies beside it: a recipe (it names a
    ``model``), not a transformers folder's config (``model_type``), which --recipe cannot read."""
    run = Path(path).with_name("config.json")
    try:
        return run if isinstance(json.loads(run.read_text()).get("model"), str) else None
    except (OSError, ValueError, AttributeError):
        return None


def mismatch(path: str, model: nn.Module, state: Mapping[str, Tensor], fresh_head: bool = False) -> Optional[str]:
    """One line naming the first keys whose shapes differ and the missing / unexpected keys; None if it fits.
    ``fresh_head``: the head's keys may be missing (it starts untrained)."""
    own = model.state_dict()
    # an empty buffer of a method takes the file's length (Patch Slimming's choice, made or saved at any keep rate)
    shapes = [f"{k} (checkpoint {_shape(v)}, model {_shape(own[k])})" for k, v in state.items()
              if k in own and v.shape != own[k].shape and not (".reduction." in k and own[k].numel() == 0)]
    # a learned method's fresh modules may start untrained, and a fresh head
    head = hosts.head_keys(model, own) if fresh_head else set()
    missing = [k for k in own if k not in state and ".reduction." not in k and k not in head]
    unexpected = [k for k in state if k not in own]
    if not (shapes or missing or unexpected):
        return None
    parts = []
    for label, keys in (("shapes differ for", shapes), ("missing", missing), ("unexpected", unexpected)):
        if keys:
            parts.append(f"{label} {', '.join(keys[:3])}" + (f" and {len(keys) - 3} more" if len(keys) > 3 else ""))
    hint = (" (it holds a token-reduction method's weights: patch the model with that method first; on the command "
            "line, evit compare --trained METHOD=FILE, evit show --method METHOD --checkpoint FILE and evit bench --method "
            "METHOD --checkpoint FILE load a learned method's (dynamicvit) and Patch Slimming's saved choice)"
            if any(".reduction." in k for k in unexpected) else "")
    run = _run_config(path)
    if not hint and run is not None:  # an evit run's weights: its config.json names the architecture they need
        hint = f" (the run's {run} records its model and model_kwargs: build it from them with --recipe {run})"
    name = hosts.model_name(model)
    return f"checkpoint {path} does not fit this model ({name}): {'; '.join(parts)}{hint}"
