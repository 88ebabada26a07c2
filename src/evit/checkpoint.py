"""Checkpoints that survive a kill: every file is serialised, written to a temporary name, flushed and
renamed into place, and ``latest.json`` (itself replaced atomically) names the newest complete
checkpoint. A run killed at any moment resumes from the last one named there.

Writes go through Python's own file I/O, so a full or read-only disk is an ``OSError`` naming the
file (torch and safetensors report it as a generic error of their own), and a failed write leaves
no temporary file behind. Weights holding NaN or inf are never written.

Weights written here carry, in their safetensors metadata (``"evit.method"``, ``"evit.fusion"``,
...), the token-reduction settings they were trained with, so a model is later run the way it
was trained (:func:`recorded_settings`, :func:`trained_settings`): EViT's fusion changes what
the weights compute.
"""
from __future__ import annotations

import io
import json
import math
import os
import random
import re
from pathlib import Path
from typing import Any, BinaryIO, Callable, Mapping, Optional

import numpy as np
import torch
from safetensors.torch import save as safetensors_bytes
from torch import nn

from . import hosts
from .reduction import NOT_APPLIED, TRAINED_WITH, trained_settings  # noqa: F401 - where models are loaded and saved
from .weights import first_non_finite, is_safetensors, load_torch, mismatch, read_state, torch_reason

POINTER = "latest.json"


class _File(io.FileIO):
    """A file that remembers the OSError of a failed write: torch wraps it in a RuntimeError of its own."""

    error: Optional[OSError] = None

    def write(self, data) -> int:
        view, done = memoryview(data).cast("B"), 0
        try:
            while done < len(view):
                done += super().write(view[done:])
        except OSError as e:
            self.error = e
            raise
        return done


def _atomic(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """``write(file)`` into ``path`` atomically: a temporary file, fsync, rename. New files get the mode a
    plain open() gives (the umask's), so weights can be shared, installed as package data or read by
    another user."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with _File(tmp, "w") as f:
            try:
                write(f)
            except Exception:
                if f.error is not None:
                    raise f.error from None
                raise
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if e.filename is None:  # a failed write() names no file: name the one being written
            e.filename = str(path)
        _remove(tmp)
        raise
    except BaseException:
        _remove(tmp)
        raise


def _remove(tmp: Path) -> None:
    try:
        tmp.unlink(missing_ok=True)
    except OSError:  # a read-only disk: nothing was written there either
        pass


def save_tensors(state: dict[str, torch.Tensor], path: Path, metadata: Optional[dict[str, str]] = None) -> None:
    """Write ``state`` as safetensors (with string ``metadata``), atomically; weights holding NaN or inf
    are refused."""
    bad = first_non_finite(state)
    if bad:
        raise ValueError(f"refusing to write {path}: the weights hold NaN or inf ({bad})")
    _atomic(Path(path), lambda f: f.write(safetensors_bytes(state, metadata=metadata)))


def save_text(text: str, path: Path) -> None:
    """Write ``text`` to ``path``, atomically."""
    _atomic(Path(path), lambda f: f.write(text.encode()))


#: metadata key naming evit's own data the weights were trained on ("fashion-mnist": its tensors), which says
#: how they see images (:func:`evit.data.record_fashion_mnist_training`); absent for a folder (the model's own)
DATA_KEY = "evit_data"
#: the attribute in which a model being trained carries that name (every weights file written of it records it)
TRAINED_ON = "evit_trained_on"
#: metadata key holding, as JSON, how the weights see images where evit recorded it on the model
#: (:func:`evit.hosts.recorded_preprocessing`: mean, std, crop_pct, interpolation), e.g. a folder run fine-tuned
#: from weights trained on Fashion-MNIST's tensors, which reads its folder as those were read; ``null``: the
#: model's own reading. Every weights file evit writes has it (or :data:`DATA_KEY`): a file without either was
#: written before evit recorded it
PREPROCESSING_KEY = "evit_preprocessing"
#: the interpolations a recorded reading may name (timm's transforms take these)
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")


def save_weights(model: nn.Module, path: Path, settings: Optional[Mapping[str, Any]] = None,
                 data: Optional[str] = None) -> None:
    """Write ``model``'s weights with the token-reduction ``settings`` they were trained with
    (default: those recorded where the model's weights were loaded from, :data:`TRAINED_WITH`) and the
    data they were trained on (default: the model's :data:`TRAINED_ON`), and how they see images where that was
    recorded on the model (:data:`PREPROCESSING_KEY`)."""
    settings = getattr(model, TRAINED_WITH, {}) if settings is None else settings
    data = getattr(model, TRAINED_ON, None) if data is None else data
    # how the weights see images: Fashion-MNIST's tensors say it; else the model's record (null: its own reading)
    reading = {} if data == "fashion-mnist" else {PREPROCESSING_KEY: json.dumps(hosts.recorded_preprocessing(model))}
    metadata = {**settings_metadata(settings), **({DATA_KEY: data} if data else {}), **reading}
    save_tensors({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, path,
                 metadata=metadata or None)


#: the data a weights file may record it was trained on (:data:`DATA_KEY`): evit's own data sets
KNOWN_DATA = ("fashion-mnist",)


def recorded_data(path: Path) -> Optional[str]:
    """The :data:`DATA_KEY` weights file ``path`` recorded, else None; a name evit does not know is refused naming
    the file (its images' reading would be unknown, not the model's own)."""
    data = (_metadata(Path(path)) or {}).get(DATA_KEY)
    if data is not None and data not in KNOWN_DATA:
        raise ValueError(f"{path}: its {DATA_KEY!r} metadata is damaged ({data[:80]!r}): the data evit trained the "
                         f"weights on is one of {', '.join(KNOWN_DATA)}, which says how they see images")
    return data


def records_reading(path: Path) -> bool:
    """Whether weights file ``path`` says how its weights see images (:data:`DATA_KEY` or :data:`PREPROCESSING_KEY`,
    even as the model's own): every file evit writes now does; one written before it recorded that does not."""
    metadata = _metadata(Path(path)) or {}
    return DATA_KEY in metadata or PREPROCESSING_KEY in metadata


def recorded_preprocessing(path: Path) -> Optional[dict]:
    """How the weights in file ``path`` see images (:data:`PREPROCESSING_KEY`), else None (the model's own); a
    record that is not a reading (an object of exactly mean, std, crop_pct and interpolation: one or three finite
    means and positive stds, JSON numbers all, a crop share in (0, 1], one of timm's interpolations) is refused
    naming the file and what is wrong."""
    text = (_metadata(Path(path)) or {}).get(PREPROCESSING_KEY)

    def damaged(why: str) -> ValueError:
        return ValueError(f"{path}: its {PREPROCESSING_KEY!r} metadata is damaged ({why}: {str(text)[:80]!r}); it "
                          "should say how the weights see images: an object of 1 or 3 finite means and positive stds, "
                          f"a crop_pct in (0, 1] and an interpolation of {', '.join(INTERPOLATIONS)}")
    try:
        found = None if text is None else json.loads(text)
    except ValueError:
        raise damaged("not JSON") from None
    if found is None:
        return None
    if not isinstance(found, dict) or set(found) != set(READING_KEYS):
        raise damaged("not an object of exactly " + ", ".join(READING_KEYS))
    mean, std, crop, interpolation = (found[k] for k in READING_KEYS)
    if not all(isinstance(v, list) and len(v) in (1, 3) and all(map(_number, v)) for v in (mean, std)):
        raise damaged("mean and std must be lists of 1 or 3 numbers")
    if not (_number(crop) and interpolation in INTERPOLATIONS):
        raise damaged("crop_pct must be a number, interpolation one of timm's")
    reading = dict(mean=tuple(map(float, mean)), std=tuple(map(float, std)), crop_pct=float(crop),
                   interpolation=interpolation)
    finite = all(math.isfinite(v) for v in (*reading["mean"], *reading["std"]))
    if not (finite and min(reading["std"]) > 0 and 0 < reading["crop_pct"] <= 1):
        raise damaged("a mean or std not finite, a std not positive, or a crop_pct outside (0, 1]")
    return reading


#: the keys of a recorded reading (:data:`PREPROCESSING_KEY`), in timm's names
READING_KEYS = ("mean", "std", "crop_pct", "interpolation")


def _number(value: Any) -> bool:
    """Whether ``value`` is a JSON number (not a bool, which Python counts as one, nor a string of digits)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _metadata(path: Path) -> Optional[dict[str, str]]:
    """The safetensors metadata of weights file ``path``; None for any other file (a torch file records none)."""
    if not (path.is_file() and is_safetensors(path)):
        return None
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


#: metadata keys are this prefix and a setting's name
PREFIX = "evit."


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
    metadata = _metadata(path)
    if metadata is None:
        return {}
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


def rng_state() -> dict:
    """Every generator's state, as tensors and plain data (NumPy's key as a tensor): a checkpoint holding it
    reads back with ``weights_only``."""
    name, key, *rest = np.random.get_state()
    numpy_state = (name, torch.from_numpy(key.astype(np.int64)), *rest)
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": numpy_state}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # GPU training draws drop-path masks there
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    name, key, *rest = state["numpy"]  # the key: a tensor (an array in older checkpoints)
    np.random.set_state((name, np.asarray(key, dtype=np.uint32), *rest))


def _steps(directory: Path) -> list[int]:
    """Steps of the checkpoints in ``directory`` (by number, not by name), ascending."""
    found = (re.fullmatch(r"step(\d+)\.pt", p.name) for p in directory.glob("step*.pt"))
    return sorted(int(m.group(1)) for m in found if m)


def _files(directory: Path, step: int) -> tuple[Path, Path]:
    return directory / f"step{step:08d}.safetensors", directory / f"step{step:08d}.pt"


def save(directory: Path, step: int, model: nn.Module, extra: dict[str, Any], keep: int = 2,
         settings: Optional[Mapping[str, Any]] = None) -> Path:
    """Write checkpoint ``step`` (model weights as safetensors, with ``settings`` as in :func:`save_weights`;
    the rest as a torch file), then name it in ``latest.json``, then delete this run's checkpoints older
    than the newest ``keep``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights, state = _files(directory, step)
    save_weights(model, weights, settings)
    _atomic(state, lambda f: torch.save({**extra, "step": step, "rng": rng_state()}, f))
    pointer = {"step": step, "weights": weights.name, "state": state.name}
    save_text(json.dumps(pointer), directory / POINTER)
    _prune(directory, step, keep)
    return weights


def _prune(directory: Path, step: int, keep: int) -> None:
    """Delete checkpoints older than the newest ``keep`` up to ``step`` (the one ``latest.json`` names).
    Checkpoints of a later step are left alone: they are not older than this one, whoever wrote them."""
    older = [s for s in _steps(directory) if s < step]
    for s in older[:max(0, len(older) - (keep - 1))]:
        for f in _files(directory, s):
            f.unlink(missing_ok=True)


def latest(directory: Path) -> Optional[dict]:
    """The checkpoint ``latest.json`` in ``directory`` names ({step, weights, state}), or None when there is
    none; a damaged pointer, or one naming a missing file, is a clear error."""
    pointer = Path(directory) / POINTER
    if not pointer.is_file():
        return None
    try:
        info = json.loads(pointer.read_text())
        found = {"step": int(info["step"]), "weights": Path(directory) / info["weights"],
                 "state": Path(directory) / info["state"]}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{pointer} is damaged ({type(e).__name__}: {e}); it should name the newest checkpoint") \
            from None
    missing = [p.name for p in (found["weights"], found["state"]) if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{pointer} names {', '.join(missing)}, which is missing from {directory}")
    return found


class Damaged(ValueError):
    """A checkpoint's file cannot be read (cut short or changed after it was written)."""


def _numpy_globals() -> list:
    """What the weights-only unpickler must accept for the NumPy generator state of checkpoints written
    before :func:`rng_state` kept it as a tensor (a uint32 array): NumPy's array reconstruction, plain data."""
    multiarray = getattr(np, "_core", getattr(np, "core", None)).multiarray
    return [multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def _read(found: dict) -> tuple[dict, dict]:
    """(weights, training state) of checkpoint ``found``; :class:`Damaged` naming the file that cannot be read.
    The state is read with ``weights_only`` (a run folder someone else wrote never runs code here)."""
    try:
        weights = read_state(str(found["weights"]))
    except ValueError as e:
        raise Damaged(str(e)) from None
    try:
        state = load_torch(found["state"], _numpy_globals())
    except EOFError:
        raise Damaged(f"checkpoint {found['state']} cannot be read (it ends early): it is damaged or "
                      "truncated") from None
    except OSError:  # the file could not be opened: said as the system says it
        raise
    except Exception as e:  # noqa: BLE001 - the unpickler raises anything on arbitrary bytes (IndexError, ...)
        raise Damaged(f"checkpoint {found['state']} cannot be read safely: {torch_reason(e)}") from None
    if not isinstance(state, dict) or not {"optimizer", "scheduler", "rng", "step"} <= set(state):
        raise Damaged(f"checkpoint {found['state']} is not a training state evit wrote")
    return weights, state


def load(directory: Path, model: nn.Module) -> Optional[dict]:
    """Load the weights of the newest checkpoint in ``directory`` (:func:`newest`) into ``model``; return its
    saved state (or None)."""
    read = newest(directory)
    if read is None:
        return None
    found, weights, state = read
    problem = mismatch(str(found["weights"]), model, weights)
    if problem:
        raise ValueError(f"{problem}: resume with the run's own configuration")
    model.load_state_dict(weights)
    return state


def newest_header(directory: Path) -> Optional[Path]:
    """The weights file of the newest checkpoint in ``directory`` whose header (its metadata) reads: what the run
    recorded of its weights (how they see images) before they are loaded; None when there is none."""
    found = latest(directory)
    if found is None:
        return None
    for step in [found["step"], *reversed([s for s in _steps(directory) if s < found["step"]])]:
        weights = _files(Path(directory), step)[0]
        if not weights.is_file():
            continue
        try:
            _metadata(weights)
        except Exception:  # noqa: BLE001 - a damaged file: the checkpoint before it is the one a resume loads
            continue
        return weights
    return None


def newest(directory: Path) -> Optional[tuple[dict, dict, dict]]:
    """(files, weights, training state) of the newest checkpoint in ``directory``, what a resume loads
    (:func:`load`); None when there is none.

    When that checkpoint is damaged, the newest earlier one whose files can be read is read instead
    (resuming is exact from any checkpoint), and the state's ``"fallback"`` says so; with none, the
    damage is the error."""
    directory = Path(directory)
    found = latest(directory)
    if found is None:
        return None
    try:
        weights, state = _read(found)
    except Damaged as damage:
        for step in reversed([s for s in _steps(directory) if s < found["step"]]):
            files = _files(directory, step)
            try:
                weights, state = _read({"step": step, "weights": files[0], "state": files[1]})
            except (Damaged, FileNotFoundError):
                continue
            state["fallback"] = f"{damage}; resuming from the checkpoint before it (step {step})"
            found = {"step": step, "weights": files[0], "state": files[1]}
            break
        else:
            raise ValueError(f"{damage}; no earlier checkpoint in {directory} can be read: start afresh with "
                             "--overwrite (moves the run aside)") from None
    return found, weights, state
