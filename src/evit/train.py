"""Training and fine-tuning with EViT: keep rate warmed up per iteration, checkpoints, resume, DDP.

Built on timm's factories (optimizer, scheduler, Mixup/CutMix, losses, EMA); validated at each epoch end
(or every N steps) into the run's summary.csv and best checkpoint (:mod:`evit.validation`). With
``torchrun`` it trains data-parallel (NCCL on GPU, gloo on CPU); only rank 0 writes.
A run loses nothing (:mod:`evit.runs`): its folder is locked, an earlier run there is never
overwritten, and a signal, a full disk or a diverging loss ends it with its last complete
checkpoint intact and one line saying so.
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import checkpoint, hosts, runs
from .cost import check_input_size as check_model_input
from .cost import native_input_size
from .loading import load_model
from .models import classes_keyword, given_classes, resolve_device, see_images_as_recorded
from .patch import patch, reductions, set_keep_rate
from .resolution import resize_images
from .schedule import drawn_keep_rate, keep_rate_at
from .validation import Validation, line
from .weights import first_non_finite


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


def distillation_loss(logits: torch.Tensor, teacher: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """KL divergence from the teacher's predicted distribution on ``x`` to the student's.

    A token-reduced student learns to predict what the same model predicts with every token:
    the unpatched model's full output is a richer target than the label alone.
    """
    with torch.no_grad():
        target = hosts.forward(teacher)(x).float().log_softmax(dim=-1)
    return F.kl_div(logits.float().log_softmax(dim=-1), target, log_target=True, reduction="batchmean")


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
    Returns ``cfg`` with the run's class list (a folder's classes are mapped by the names it began with)."""
    path = out / "config.json"
    if not path.is_file():
        return cfg
    try:
        started = json.loads(path.read_text())
        assert isinstance(started, dict)
    except (OSError, ValueError, AssertionError) as e:
        raise ValueError(f"--resume: {path} is damaged ({type(e).__name__}); it records the options the run was "
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
    return replace(cfg, class_names=cfg.class_names or started.get("class_names"))


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


def _distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


class Diverged(ValueError):
    """The loss or the weights became NaN or inf: the run stops without saving them."""


def _agreed(flag: float, world: int, device: torch.device) -> float:
    """The largest of every process's ``flag``: under DDP all processes stop at the same step."""
    if world == 1:
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True, overwrite: bool = False,
          on_step: Optional[Callable[[int], None]] = None) -> dict:
    """Train per ``cfg``; with ``resume``, continue from the newest checkpoint in ``cfg.out``.

    A fresh run into a ``cfg.out`` holding a run is refused unless ``overwrite`` (the earlier run is
    moved aside, :class:`evit.runs.RunFolder`). SIGINT/SIGTERM stop the run after the current step with a
    checkpoint (:class:`evit.runs.Interrupted`); a non-finite loss or weights stop it without one
    (:class:`Diverged`); a disk refusing a write ends it with :class:`evit.runs.DiskError`. Each says
    which checkpoint is intact. ``on_step(step)`` is called after every optimizer step (e.g. by tests
    that kill the process mid-run)."""
    check_data_options(cfg)
    # folders recorded by their absolute paths: a resume from another working directory compares the same folder
    cfg = replace(cfg, **{k: os.path.abspath(getattr(cfg, k)) for k in ("data", "distill")
                          if getattr(cfg, k) not in (None, "fashion-mnist") and os.path.exists(getattr(cfg, k))})
    out = Path(cfg.out)
    rank0 = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 writes
    folder = runs.RunFolder(out, resume, overwrite) if rank0 else None
    try:
        if folder is not None:
            folder.check()  # writes nothing: a refused run makes no folder
        if resume:
            cfg = check_resume(cfg, out)
        with runs.StopSignals() as signals:
            return _run(cfg, resume, progress, signals, on_step, folder)
    except OSError as e:
        error = runs.disk_error(e, out)
        if error is None:
            raise
        raise error from None
    except runs.Interrupted as e:
        raise runs.Interrupted(e.signum, f"{e}; {runs.kept(out)}") from None
    except Diverged as e:
        raise Diverged(f"{e}; the diverged weights were not saved, {runs.kept(out, advice='')}") from None
    finally:
        if folder is not None:
            folder.release()


def _run(cfg: TrainConfig, resume: bool, progress: bool, signals: runs.StopSignals,
         on_step: Optional[Callable[[int], None]], folder: Optional[runs.RunFolder]) -> dict:
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3

    rank, world = _distributed()
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed + rank)
    out = Path(cfg.out)
    resumed = checkpoint.newest(out / "checkpoints") if resume else None  # its weights replace the starting ones
    model = build_model(cfg, starting_weights=resumed is None).to(device)
    if resumed is not None:  # what the starting weights said of how they see images, the checkpoint says too
        see_images_as_recorded(model, resumed[0]["weights"])
    hosts.check_trainable(model)  # before any run folder is made
    check_input_size(cfg, model)
    # how it is trained, recorded in every weights file written (step checkpoints, best, final; EMA copies it)
    trained_with = checkpoint.config_settings(asdict(cfg))
    setattr(model, checkpoint.TRAINED_WITH, trained_with)
    # Fashion-MNIST's tensors: how the weights see images (a folder: the model's own preprocessing, nothing to record)
    setattr(model, checkpoint.TRAINED_ON, "fashion-mnist" if cfg.data == "fashion-mnist" else None)
    loader, val_loader, class_names = make_loaders(cfg, model, rank, world)
    cfg = replace(cfg, class_names=class_names)  # recorded in config.json: eval maps a val/ by these names
    per_epoch = len(loader)
    if per_epoch == 0:
        raise ValueError(f"batch size {cfg.batch_size} is larger than the training set; lower --batch-size")
    if folder is not None:  # model and data are good: lock the folder before its first read or write
        moved = folder.claim()
        if moved is not None:
            print(f"evit train: moved the earlier run in {out} to {moved}", file=sys.stderr)
    total = cfg.epochs * per_epoch if cfg.max_steps is None else min(cfg.max_steps, cfg.epochs * per_epoch)
    optimizer = create_optimizer_v2(model, "adamw", lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs,
                                       min_lr=cfg.min_lr, warmup_lr=cfg.lr * 0.01, step_on_epochs=False,
                                       updates_per_epoch=per_epoch)
    num_classes = hosts.head_outputs(model)
    mixup = (Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                   num_classes=num_classes) if cfg.mixup or cfg.cutmix else None)
    criterion = SoftTargetCrossEntropy() if mixup else LabelSmoothingCrossEntropy(cfg.label_smoothing)
    ema = ModelEmaV3(model, decay=cfg.ema_decay) if cfg.ema_decay else None
    teacher = build_teacher(cfg, num_classes).to(device) if cfg.distill else None

    step, state, keep, loss_avg = 0, None, 1.0, None
    if resume:
        state = checkpoint.load(resumed, model)
        if state is None and (out / "model.safetensors").exists():  # it finished and its checkpoints are gone:
            # starting again would redo it and write over its weights
            raise FileNotFoundError(f"--resume: no checkpoint in {out / 'checkpoints'}, but the run finished "
                                    f"({out / 'model.safetensors'}): start afresh with --overwrite (moves it aside), "
                                    "or train on from its weights with --init")
        if state is None and not (out / "config.json").is_file():
            advice = "start afresh with --overwrite (moves it aside)" if runs.holds_run(out) else "start without --resume"
            raise FileNotFoundError(f"--resume: no checkpoint in {out / 'checkpoints'}; {advice}")
        if state is None and rank == 0:  # started, stopped before its first checkpoint: it starts again, as it began
            print(f"evit train: the run in {out} stopped before its first checkpoint; starting it again from step 0",
                  file=sys.stderr)
    if state is not None:
        trained_by = state.get("processes", world)  # not recorded before evit did: taken as this one
        if trained_by != world:  # each process's share of the data, and so the steps per epoch, depend on it
            without = "" if trained_by > 1 else ", or without torchrun"
            raise ValueError(f"--resume: the run in {out} was trained by {trained_by} process{'es' * (trained_by > 1)} "
                             f"and this is {world}: resume it with {trained_by} (torchrun --nproc_per_node "
                             f"{trained_by}{without}), as its batches depend on it")
        if state.get("fallback"):
            print(f"evit train: {state['fallback']}", file=sys.stderr)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None and "ema" in state:
            ema.module.load_state_dict(state["ema"])
        checkpoint.set_rng_state(state["rng"])
        step, keep, loss_avg = state["step"], state.get("keep_rate", 1.0), state.get("loss_avg")
        if cfg.max_steps is not None and step > cfg.max_steps:  # it would end as the checkpoint, not at the steps asked
            raise ValueError(f"--resume: the run in {out} is at step {step}, past --max-steps {cfg.max_steps}: give "
                             f"--max-steps {step} or more (or none, to finish its {cfg.epochs * per_epoch} steps)")
    validation = Validation(val_loader, out, per_epoch, cfg.eval_every, step if resume else None,
                            state.get("validation") if state is not None else None)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        checkpoint.save_text(json.dumps(asdict(cfg), indent=2), out / "config.json")
    ddp_devices = [device] if device.type == "cuda" else None
    net = nn.parallel.DistributedDataParallel(model, device_ids=ddp_devices) if world > 1 else model
    forward = hosts.forward(net)  # the logits, whatever the model's library returns (timm: net itself)

    warm_start, warm_span = int(cfg.keep_warmup_start * per_epoch), int(cfg.keep_warmup_epochs * per_epoch)
    model.train()
    seen, t0 = 0, time.perf_counter()

    def finite() -> None:  # before weights are validated or written: NaN or inf never is
        bad = first_non_finite(model.state_dict())
        if bad:
            raise Diverged(f"the weights hold NaN or inf after step {step} ({bad}): training diverged (lower --lr)")

    def save() -> None:
        if rank == 0:
            finite()
            extra = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "keep_rate": keep,
                     "loss_avg": loss_avg, "validation": validation.state(), "processes": world}
            if ema is not None:
                extra["ema"] = ema.module.state_dict()
            checkpoint.save(out / "checkpoints", step, model, extra, settings=trained_with)

    from tqdm import tqdm

    show = progress and rank == 0
    bar = tqdm(total=total, initial=step, unit="step", file=sys.stderr, dynamic_ncols=True,
               disable=not (show and sys.stderr.isatty()))  # to a file: one plain line per validation instead
    signals.defer()  # from here a signal stops the run after the current step, with a checkpoint
    size = data_size(cfg, model)  # Fashion-MNIST's 28 px resized to what the model takes
    while step < total:
        epoch, start = divmod(step, per_epoch)
        for images, y in loader.batches(epoch, start):
            images, y = images.to(device, non_blocking=True), y.to(device, non_blocking=True)
            x = resize_images(images, size)
            if cfg.keep_rate < 1.0:
                target = cfg.keep_rate if cfg.keep_rate_min is None else drawn_keep_rate(
                    step, cfg.keep_rate_min, cfg.keep_rate, cfg.seed)
                keep = keep_rate_at(step, target, warm_start, warm_span)
                set_keep_rate(model, keep)
            if mixup:
                x, y = mixup(x, y)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                logits = forward(x)
                loss = criterion(logits, y)
                if teacher is not None:
                    seen_by_teacher = x if cfg.distill_img_size is None else resize_images(images, cfg.distill_img_size)
                    loss = loss + cfg.distill_weight * distillation_loss(logits, teacher, seen_by_teacher)
                for aux in filter(None, (m.aux_loss() for m in reductions(model).values())):
                    loss = loss + aux  # e.g. DynamicViT's keep-ratio loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            value = loss.item()
            if _agreed(not math.isfinite(value), world, device):  # before the update: the weights stay finite
                bar.close()
                raise Diverged(f"the loss is {value} at step {step + 1}: training diverged (lower --lr)")
            optimizer.step()
            step += 1
            scheduler.step_update(step)
            if ema is not None:
                ema.update(model, step=step)
            seen += len(x)
            loss_avg = value if loss_avg is None else 0.95 * loss_avg + 0.05 * value
            validation.record(value, len(x) * world)
            bar.update(1)
            if step % 10 == 0 or step == total:
                bar.set_postfix_str(f"ep {epoch + 1}/{cfg.epochs} loss {loss_avg:.4f} keep {keep:.3f} "
                                    f"lr {optimizer.param_groups[0]['lr']:.2e} "
                                    f"{seen * world / (time.perf_counter() - t0):.0f} img/s", refresh=False)
            if on_step is not None:
                on_step(step)
            if rank == 0 and validation.due(step, total):  # before the checkpoint: a resume never skips a row
                finite()
                checked = ema.module if ema is not None else model
                row = validation.run(checked, step, optimizer.param_groups[0]["lr"],
                                     keep_rate_at(step, cfg.keep_rate, warm_start, warm_span) if cfg.keep_rate < 1 else None)
                if show:
                    bar.write(line(row, cfg.epochs, total), file=sys.stderr)
            stop = int(_agreed(signals.received or 0, world, device))
            if step % cfg.save_every == 0 or step % per_epoch == 0 or step == total or stop:
                save()
            if stop:
                bar.close()  # the message goes on a line of its own
                raise runs.Interrupted(stop, f"stopped by {signal.Signals(stop).name} after step {step}")
            if step >= total:
                break
    bar.close()
    final = ema.module if ema is not None else model
    if rank == 0:
        checkpoint.save_weights(final, out / "model.safetensors", trained_with)
    if world > 1:
        dist.barrier()
    return {"step": step, "keep_rate": keep, "loss": loss_avg, "weights": str(out / "model.safetensors")}
