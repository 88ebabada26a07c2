"""Checkpoints that survive a kill: every file is written to a temporary name, flushed and
renamed into place, and ``latest.json`` (itself replaced atomically) names the newest
complete checkpoint. A run killed at any moment resumes from the last one named there.

Weights written here carry, in their safetensors metadata (``"evit.method"``, ``"evit.fusion"``,
...), the token-reduction settings they were trained with, so a model is later run the way it
was trained (:func:`recorded_settings`, :func:`trained_settings`): EViT's fusion changes what
the weights compute.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    # safetensors creates its files 0600; give every file the mode a plain open() would, so
    # weights can be shared, installed as package data, or read by another user.
    os.chmod(tmp, 0o666 & ~_umask())
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_tensors(state: dict[str, torch.Tensor], path: Path, metadata: Optional[dict[str, str]] = None) -> None:
    """Write ``state`` as safetensors (with string ``metadata``), atomically."""
    _atomic(Path(path), lambda p: save_file(state, str(p), metadata=metadata))


def save_text(text: str, path: Path) -> None:
    """Write ``text`` to ``path``, atomically."""
    _atomic(Path(path), lambda p: p.write_text(text))


def save_weights(model: nn.Module, path: Path, settings: Optional[Mapping[str, Any]] = None) -> None:
    """Write ``model``'s weights with the token-reduction ``settings`` they were trained with
    (default: those recorded where the model's weights were loaded from, :data:`TRAINED_WITH`)."""
    settings = getattr(model, TRAINED_WITH, {}) if settings is None else settings
    save_tensors({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, path,
                 metadata=settings_metadata(settings) or None)


#: metadata keys are this prefix and a setting's name
PREFIX = "evit."
#: the attribute in which :func:`evit.models.load_checkpoint` leaves a model the settings its file recorded
TRAINED_WITH = "evit_trained_with"
#: recorded for the record, not re-applied: the keep rate is chosen at each evaluation
NOT_APPLIED = ("method", "keep_rate", "keep_rate_min", "locations")


def settings_metadata(settings: Mapping[str, Any]) -> dict[str, str]:
    """Token-reduction settings as safetensors metadata: ``{"evit.method": "evit", "evit.fusion": "sum",
    "evit.fuse": "true", ...}`` (strings as they are, other values as JSON)."""
    return {PREFIX + k: v if isinstance(v, str) else json.dumps(v) for k, v in settings.items() if v is not None}


def config_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The token-reduction settings of a training configuration (``TrainConfig`` as a dict, a run's
    config.json): {} for a run that trained unpatched. A configuration without ``fusion`` comes from
    evit before fusion was a choice, when EViT always fused by the renormalised average: "mean"."""
    method = config.get("method", "evit")
    if method == "evit" and config.get("keep_rate", 1.0) >= 1.0:
        return {}
    settings: dict[str, Any] = {"method": method}
    if method == "evit":
        fuse = config.get("fuse", True)
        settings.update(fuse=fuse, **({"fusion": config.get("fusion", "mean")} if fuse else {}))
    settings.update(config.get("method_settings") or {})
    settings.update({k: config.get(k) for k in ("keep_rate", "keep_rate_min", "locations")})
    return settings


def recorded_settings(path: Path) -> dict[str, Any]:
    """The token-reduction settings weights file ``path`` was trained with: its safetensors metadata;
    for a training run's ``model.safetensors`` written before evit recorded them there, the run's
    ``config.json`` beside it; else {} (e.g. a torch ``.pth`` file: none recorded)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
    found = {k[len(PREFIX):]: _decode(v) for k, v in metadata.items() if k.startswith(PREFIX)}
    config = path.with_name("config.json")
    if not found and path.name == "model.safetensors" and config.is_file():
        try:
            found = config_settings(json.loads(config.read_text()))
        except (OSError, ValueError, AttributeError):
            return {}
    return found


def _decode(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def trained_settings(model: nn.Module, method: str = "evit") -> dict[str, Any]:
    """The settings of ``method`` (by name) that ``model``'s weights were trained with, as their file
    recorded (EViT's ``fuse`` and ``fusion``): defaults for patching it with that method; {} when the
    file recorded none, or another method."""
    recorded = getattr(model, TRAINED_WITH, {})
    if recorded.get("method") != method:
        return {}
    return {k: v for k, v in recorded.items() if k not in NOT_APPLIED}


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # GPU training draws drop-path masks there
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def save(directory: Path, step: int, model: nn.Module, extra: dict[str, Any], keep: int = 2,
         settings: Optional[Mapping[str, Any]] = None) -> Path:
    """Write checkpoint ``step`` (model weights as safetensors, with ``settings`` as in :func:`save_weights`;
    the rest as a torch file)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights, state = directory / f"step{step:08d}.safetensors", directory / f"step{step:08d}.pt"
    save_weights(model, weights, settings)
    _atomic(state, lambda p: torch.save({**extra, "step": step, "rng": rng_state()}, str(p)))
    pointer = {"step": step, "weights": weights.name, "state": state.name}
    _atomic(directory / "latest.json", lambda p: p.write_text(json.dumps(pointer)))
    old = sorted(directory.glob("step*.pt"))[:-keep]
    for f in old:
        for g in (f, f.with_suffix(".safetensors")):
            g.unlink(missing_ok=True)
    return weights


def latest(directory: Path) -> Optional[dict]:
    pointer = Path(directory) / "latest.json"
    if not pointer.is_file():
        return None
    info = json.loads(pointer.read_text())
    return {"step": info["step"], "weights": Path(directory) / info["weights"], "state": Path(directory) / info["state"]}


def load(directory: Path, model: nn.Module) -> Optional[dict]:
    """Load the newest checkpoint's weights into ``model``; return its saved state (or None)."""
    found = latest(directory)
    if found is None:
        return None
    model.load_state_dict(load_file(str(found["weights"])))
    return torch.load(str(found["state"]), map_location="cpu", weights_only=False)
