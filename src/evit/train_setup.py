"""What a training run is and what it starts from: its configuration, the model, the teacher and the data.

Everything here is decided before the first step, and refused in one line when it cannot work: a recipe's
unknown keys, options no run can use, a resume that would silently compute another run than the one it
continues (:func:`check_resume`), an input size the model does not take. The loop that runs it is
:mod:`evit.train`.
"""
from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Optional

from torch import nn

from . import hosts
from .cost import check_input_size as check_model_input
from .cost import native_input_size
from .loading import load_model
from .models import classes_keyword, given_classes
from .patch import patch


@dataclass
class TrainConfig:
    model: str = "vit_tiny_patch16_224"
    model_kwargs: dict = field(default_factory=dict)
    pretrained: bool = False
    init: Optional[str] = None  # local weights to start from (fine-tuning)
    data: str = "fashion-mnist"  # or a folder with train/ and val/ (ImageNet style)
    data_root: Optional[str] = None
    download: bool = False
    train_subset: Optional[int] = None  # N training images (Fashion-MNIST: the first N; a folder: a seeded draw)
    val_split: Optional[float] = None  # validate on this share of the training images (seeded), not val/ or the test set
    eval_every: Optional[int] = None  # validate every N steps (default: at each epoch end)
    workers: int = 2  # processes loading a folder's images (0: this one)
    class_names: Optional[list] = None  # the class list in label order; read from the data, kept in config.json
    img_size: Optional[int] = None  # data at N x N px (Fashion-MNIST: resized batches; default: the model's own size)
    epochs: int = 10
    max_steps: Optional[int] = None  # stop after this many optimizer steps in all
    batch_size: int = 128
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    mixup: float = 0.0
    cutmix: float = 0.0
    keep_rate: float = 1.0  # target; < 1 patches the model with ``method``
    keep_rate_min: Optional[float] = None  # draw each step's target from [keep_rate_min, keep_rate]: one model, many rates
    method: str = "evit"  # token-reduction method trained with (evit, topk, dynamicvit, tome, ...)
    method_settings: dict = field(default_factory=dict)  # its other settings (e.g. ToMe's r)
    keep_warmup_start: float = 0.0  # epochs before the keep rate leaves 1
    keep_warmup_epochs: float = 0.0  # cosine from 1 to keep_rate over this many epochs (0: none)
    locations: Optional[list] = None
    fuse: bool = True
    fusion: str = "sum"  # EViT: 'sum' (the authors' attention-weighted sum) or 'mean' (renormalised); recorded in the weights
    bf16: bool = False  # autocast to bfloat16 (on a CPU fast only with AVX512-BF16 or AMX)
    device: Optional[str] = None  # 'cpu', 'cuda', 'cuda:1', ...; None: the GPU when there is one
    ema_decay: float = 0.0  # 0: no EMA
    distill: Optional[str] = None  # weights of an unpatched teacher (same architecture): match its predictions
    distill_weight: float = 1.0  # weight of the soft-target loss beside the task loss
    distill_img_size: Optional[int] = None  # the teacher's own input size, when the student is trained larger
    seed: int = 0
    out: str = "runs/train"
    save_every: int = 200  # steps; also at every epoch end

    def __post_init__(self) -> None:
        for name in ("warmup_epochs", "keep_warmup_start", "keep_warmup_epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise ValueError(f"{name} (--{name.replace('_', '-')}) must be a number of epochs >= 0, got {value!r}")
        if self.keep_rate < 1 and self.keep_warmup_start + self.keep_warmup_epochs > self.epochs:
            raise ValueError(f"the keep-rate warm-up ends after epoch {self.keep_warmup_start + self.keep_warmup_epochs:g} "
                             f"(--keep-warmup-start + --keep-warmup-epochs), beyond the run's {self.epochs} epochs: it "
                             f"would never train at keep rate {self.keep_rate}; shorten it or raise --epochs")
        if self.warmup_epochs > self.epochs:
            raise ValueError(f"warmup_epochs {self.warmup_epochs:g} is longer than the run's {self.epochs} epochs: the "
                             "learning rate would never reach --lr; shorten the warm-up or raise --epochs")
        if not 0 < self.lr < math.inf:
            raise ValueError(f"--lr must be a positive number, got {self.lr}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"--ema-decay must lie in [0, 1) (0: no EMA; 0.9998 is typical), got {self.ema_decay}")
        if self.keep_rate_min is not None and not 0 < self.keep_rate_min <= self.keep_rate:
            raise ValueError(f"keep_rate_min {self.keep_rate_min} must lie in (0, keep_rate={self.keep_rate}]")
        if self.distill_img_size and (self.mixup or self.cutmix):
            raise ValueError("distill_img_size with Mixup/CutMix is not supported: the teacher would see unmixed "
                             "images")

    @classmethod
    def from_file(cls, path: str, **overrides) -> "TrainConfig":
        try:
            values = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read recipe {path}: {e}") from None
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"recipe {path} has unknown keys {sorted(unknown)}; known: {sorted(known)}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def check_input_size(cfg: TrainConfig, model: nn.Module) -> None:
    """Refuse a recipe whose ``img_size`` (the size the data is resized to) is not one the model takes
    (:func:`evit.cost.check_input_size`): it would fail on the first batch, deep inside its patch embedding."""
    if cfg.img_size is None:
        return
    host = hosts.adapter(model)
    channels, *built = host.input_size
    try:
        check_model_input(host, (channels, cfg.img_size, cfg.img_size))
    except ValueError:
        raise ValueError(f"the recipe's img_size {cfg.img_size} is not the size {cfg.model} is built at "
                         f"({built[0]}x{built[1]}): build it at {cfg.img_size} too (img_size in model_kwargs for a "
                         "timm model, image_size in an hf: spec; weights from --init are resampled to it), or leave "
                         "img_size out") from None


def data_size(cfg: TrainConfig, model: nn.Module) -> tuple[int, int]:
    """(H, W) the run's images are resized to: the recipe's ``img_size``, else the size the model takes."""
    return (cfg.img_size, cfg.img_size) if cfg.img_size else tuple(native_input_size(model)[1:])


def data_classes(cfg: TrainConfig) -> int:
    """How many classes the run's data has (the recorded class list's, Fashion-MNIST's, or the folder's train/
    sub-folders): the model's head is built that wide."""
    if cfg.class_names:
        count, source = len(cfg.class_names), "the recipe's class_names"
    elif cfg.data == "fashion-mnist":
        from .data import FASHION_MNIST_CLASSES

        return len(FASHION_MNIST_CLASSES)
    else:
        from .folders import check_folder, class_folders

        check_folder(Path(cfg.data))  # named as it was given
        count, source = len(class_folders(Path(cfg.data) / "train")), str(Path(cfg.data) / "train")
    if count < 2:  # one class: every loss is 0 and every answer right, whatever the weights
        raise ValueError(f"{source} has {count} class{'' if count == 1 else 'es'}; a classifier learns 2 or more: "
                         "give each class a sub-folder of images")
    return count


def build_model(cfg: TrainConfig, starting_weights: bool = True) -> nn.Module:
    """The model to train: ``cfg.model`` with a head as wide as the data's classes; ``cfg.init``'s weights
    (a head trained on other classes is left out and starts untrained), patched as the run trains it.
    Without ``starting_weights`` (a run resumed from its checkpoint, whose weights replace them) neither
    ``cfg.init`` nor ``cfg.pretrained`` is read: the file it started from may have been moved since."""
    def patched(model: nn.Module) -> None:  # patched first: a learned method's weights load with it
        if cfg.keep_rate < 1.0 or cfg.method != "evit":
            settings = {"fusion": cfg.fusion} if cfg.method == "evit" else {}  # EViT's own setting
            patch(model, 1.0, cfg.locations, fuse=cfg.fuse, method=cfg.method, **settings, **cfg.method_settings)

    key, classes = classes_keyword(cfg.model), data_classes(cfg)
    asked = given_classes(cfg.model, cfg.model_kwargs)
    if asked is not None and asked != classes:
        print(f"evit train: the model's {key}={asked} is not the data's {classes} classes: the head is built with "
              f"{classes} (the data decides it; leave {key} out)", file=sys.stderr)
    kwargs = {**cfg.model_kwargs, key: classes}
    return load_model(cfg.model, pretrained=cfg.pretrained and starting_weights,
                      checkpoint=cfg.init if starting_weights else None, model_kwargs=kwargs,
                      before_weights=patched, fresh_head=True)[1]


def build_teacher(cfg: TrainConfig, classes: int) -> nn.Module:
    """The unpatched model with weights ``cfg.distill``, frozen, for soft targets over the data's ``classes``."""
    if not Path(cfg.distill).is_file():
        raise FileNotFoundError(f"distill: teacher weights {cfg.distill} not found; train the baseline first")
    kwargs = dict(cfg.model_kwargs, **({"img_size": cfg.distill_img_size} if cfg.distill_img_size else {}))
    teacher = load_model(cfg.model, checkpoint=cfg.distill, model_kwargs=kwargs)[1]
    if hosts.head_outputs(teacher) != classes:
        raise ValueError(f"--distill: the teacher {cfg.distill} has {hosts.head_outputs(teacher)} outputs but the data "
                         f"{classes} classes; distil from a teacher trained on these classes")
    return teacher.eval().requires_grad_(False)


def check_data_options(cfg: TrainConfig) -> None:
    """Refuse data options no run can use, before anything is built."""
    if cfg.eval_every is not None and cfg.eval_every < 1:
        raise ValueError(f"--eval-every must be a positive number of steps, got {cfg.eval_every}")
    if cfg.workers < 0:
        raise ValueError(f"--workers must be 0 (load in this process) or more, got {cfg.workers}")
    if cfg.val_split is not None and not 0 < cfg.val_split < 1:
        raise ValueError(f"--val-split must lie strictly between 0 and 1 (a share of the training images), "
                         f"got {cfg.val_split}")


#: options a resumed run may change: where and how fast it runs, when it checkpoints, validates or stops, and
#: where it started from (the checkpoint replaces that); every other one changes what the run computes
RESUMABLE = ("out", "device", "workers", "save_every", "eval_every", "max_steps", "data_root", "download",
             "pretrained", "init")


def check_resume(cfg: TrainConfig, out: Path) -> TrainConfig:
    """Refuse resuming the run in ``out`` with options that change what it computes (its config.json
    records those it was started with): the resumed run would silently differ from the one asked for.
    Returns ``cfg`` with the run's class list (a folder's classes are mapped by the names it began with) and, where
    not given again, the weights it started from (``init``, ``pretrained``): config.json, rewritten from ``cfg``,
    keeps naming them, and a run whose checkpoints predate evit's record of how weights see images reads them as
    its starting file does (:func:`evit.train.read_images_as_the_run_began`)."""
    path = out / "config.json"
    if not path.is_file():
        return cfg
    try:
        started = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        started = e
    if not isinstance(started, dict):  # a plain condition: python -O strips asserts
        reason = type(started).__name__ if isinstance(started, Exception) else f"a JSON {type(started).__name__}"
        raise ValueError(f"--resume: {path} is damaged ({reason}); it records the options the run was "
                         "started with: restore it, or delete it to resume without comparing them") from None
    given = json.loads(json.dumps(asdict(cfg)))  # as config.json holds it: tuples as lists

    def same(name: str) -> bool:
        a, b = started[name], given[name]
        if name in ("data", "distill") and isinstance(a, str) and isinstance(b, str):
            a, b = os.path.realpath(a), os.path.realpath(b)  # the same folder, however it is named
        return a == b

    differ = [f"{k} {started[k]!r} (now {given[k]!r})" for k in given
              if k in started and k not in RESUMABLE and not (k == "class_names" and given[k] is None)
              and not same(k)]
    if differ:
        raise ValueError(f"--resume: the run in {out} was started with {', '.join(differ)}: resume it with the "
                         f"options it was started with ({path}), or train a new run from its weights with --init")
    return replace(cfg, class_names=cfg.class_names or started.get("class_names"), init=cfg.init or _text(started.get("init")),
                   pretrained=cfg.pretrained or started.get("pretrained") is True)


def _text(value) -> Optional[str]:
    return value if isinstance(value, str) else None


def make_loaders(cfg: TrainConfig, model: nn.Module, rank: int = 0, world: int = 1):
    """(train loader, validation loader, class names) for ``cfg.data``; a folder's images at ``model``'s
    input size as built (or ``cfg.img_size``), labelled by class name."""
    from .data import (FASHION_MNIST_CLASSES, TensorLoader, check_grayscale, check_head, check_subset, held_out,
                       load_fashion_mnist)

    if cfg.data != "fashion-mnist":
        from .folders import train_data

        size = None if cfg.img_size is None else (native_input_size(model)[0], cfg.img_size, cfg.img_size)
        data = train_data(Path(cfg.data), model, cfg.batch_size, seed=cfg.seed, workers=cfg.workers,
                          val_split=cfg.val_split, subset=cfg.train_subset, size=size, class_names=cfg.class_names,
                          rank=rank, world=world)
        return data.train, data.val, data.class_names
    check_head(hosts.head_outputs(model), len(FASHION_MNIST_CLASSES), "Fashion-MNIST")
    check_grayscale(model)
    x, y = load_fashion_mnist("train", cfg.data_root, cfg.download)
    if cfg.val_split is not None:
        kept, held = held_out(len(y), cfg.val_split, cfg.seed)
        (x, y), (vx, vy) = (x[kept], y[kept]), (x[held], y[held])
    else:
        vx, vy = load_fashion_mnist("test", cfg.data_root, cfg.download)
    check_subset(cfg.train_subset, len(y), "the Fashion-MNIST training set")
    if cfg.train_subset:
        x, y = x[: cfg.train_subset], y[: cfg.train_subset]
    train = TensorLoader(x, y, cfg.batch_size, train=True, seed=cfg.seed, rank=rank, world=world, drop_last=True)
    return train, TensorLoader(vx, vy, 256, size=data_size(cfg, model)), list(FASHION_MNIST_CLASSES)  # 28 px resized

