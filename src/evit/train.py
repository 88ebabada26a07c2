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
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import checkpoint, hosts, runs
from .models import resolve_device, see_images_as_recorded
from .patch import reductions, set_keep_rate
from .resolution import resize_images
from .schedule import drawn_keep_rate, keep_rate_at
from .train_setup import (TrainConfig, build_model, build_teacher, check_data_options, check_input_size,
                          check_resume, data_size, make_loaders)
from .validation import Validation, line
from .weights import first_non_finite


def distillation_loss(logits: torch.Tensor, teacher: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """KL divergence from the teacher's predicted distribution on ``x`` to the student's.

    A token-reduced student learns to predict what the same model predicts with every token:
    the unpatched model's full output is a richer target than the label alone.
    """
    with torch.no_grad():
        target = hosts.forward(teacher)(x).float().log_softmax(dim=-1)
    return F.kl_div(logits.float().log_softmax(dim=-1), target, log_target=True, reduction="batchmean")


def read_images_as_the_run_began(model: nn.Module, cfg: TrainConfig) -> None:
    """A resumed run, whose starting weights are not read again, reads its images as it began: as its checkpoint
    records (every weights file carries on the record of the starting ones; the file now at ``--init``'s path is
    not read), or, for a run whose checkpoints predate that record, as its starting file records while it is there
    (said in one line when it is gone)."""
    header = checkpoint.newest_header(Path(cfg.out) / "checkpoints")
    if header is not None and checkpoint.records_reading(header):
        see_images_as_recorded(model, header, names=False)
    elif cfg.init and Path(cfg.init).is_file():
        see_images_as_recorded(model, cfg.init, names=False)
    elif cfg.init:
        print(f"evit train: the run's checkpoints predate evit's record of how weights see images, and the file it "
              f"started from ({cfg.init}) is gone: it reads images its architecture's way, which differs from how it "
              "began if that file was trained on Fashion-MNIST's tensors", file=sys.stderr)


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
    resuming = resume and checkpoint.latest(out / "checkpoints") is not None  # its weights replace the starting ones
    model = build_model(cfg, starting_weights=not resuming).to(device)
    if resuming:
        read_images_as_the_run_began(model, cfg)
    hosts.check_trainable(model)  # before any run folder is made
    check_input_size(cfg, model)
    # how it is trained, recorded in every weights file written (step checkpoints, best, final; EMA copies it)
    trained_with = checkpoint.config_settings(asdict(cfg))
    setattr(model, checkpoint.TRAINED_WITH, trained_with)
    # Fashion-MNIST's tensors: how the weights see images (a folder: the model's own preprocessing, recorded with
    # the weights when the starting weights recorded one, see evit.checkpoint.PREPROCESSING_KEY)
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
        state = checkpoint.load(out / "checkpoints", model)
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
