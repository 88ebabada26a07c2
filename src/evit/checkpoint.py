"""Checkpoints that survive a kill: every file is written to a temporary name, flushed and
renamed into place, and ``latest.json`` (itself replaced atomically) names the newest
complete checkpoint. A run killed at any moment resumes from the last one named there.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any, Optional

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


def save_tensors(state: dict[str, torch.Tensor], path: Path) -> None:
    """Write ``state`` as safetensors, atomically."""
    _atomic(Path(path), lambda p: save_file(state, str(p)))


def save_text(text: str, path: Path) -> None:
    """Write ``text`` to ``path``, atomically."""
    _atomic(Path(path), lambda p: p.write_text(text))


def save_weights(model: nn.Module, path: Path) -> None:
    save_tensors({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, path)


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


def save(directory: Path, step: int, model: nn.Module, extra: dict[str, Any], keep: int = 2) -> Path:
    """Write checkpoint ``step`` (model weights as safetensors, the rest as a torch file)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights, state = directory / f"step{step:08d}.safetensors", directory / f"step{step:08d}.pt"
    save_weights(model, weights)
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
