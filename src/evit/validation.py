"""Validation while training: top-1/top-5 on held-out images at the keep rate being trained, one row
of the run's ``summary.csv`` each time, and ``best.safetensors`` by validation top-1 beside the last
weights.

``summary.csv`` is rewritten whole and atomically at each row, and a row replaces any row of the same
or a later step, so a run killed after a validation but before its next checkpoint, then resumed,
ends with exactly one row per validation, as an uninterrupted run does. Validation draws no random
numbers and restores every generator anyway, so it leaves the training stream (and a resumed run's
bit-identical end) untouched.
"""
from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from typing import Optional

from torch import nn

from . import checkpoint
from .evaluate import hits, percent
from .patch import set_keep_rate

COLUMNS = ("epoch", "step", "train_loss", "val_top1", "val_top5", "lr", "keep_rate", "img_per_s")
FORMATS = {"epoch": "{:.4g}", "train_loss": "{:.6f}", "val_top1": "{:.4f}", "val_top5": "{:.4f}", "lr": "{:.6e}",
           "keep_rate": "{:.4f}", "img_per_s": "{:.1f}"}


class Summary:
    """The rows of ``summary.csv`` at ``path``; with ``resume_step``, the run's rows up to that step are kept."""

    def __init__(self, path: Path, resume_step: Optional[int] = None) -> None:
        self.path, self.rows = Path(path), []
        if resume_step is not None and self.path.is_file():
            with open(self.path, newline="") as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]

    def best_top1(self) -> Optional[float]:
        return max((float(r["val_top1"]) for r in self.rows), default=None)

    def add(self, row: dict) -> None:
        """Append ``row`` (every column of :data:`COLUMNS`), dropping rows of its step or later; rewrite the file."""
        text = {k: "" if row[k] is None else FORMATS.get(k, "{}").format(row[k]) for k in COLUMNS}  # top-5 of <= 5 classes
        self.rows = [r for r in self.rows if int(r["step"]) < row["step"]] + [text]
        out = io.StringIO()
        writer = csv.DictWriter(out, COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        checkpoint.save_text(out.getvalue(), self.path)


def line(row: dict, epochs: int, total: int) -> str:
    """A row as one progress line (for a terminal or a log file)."""
    return (f"epoch {row['epoch']:.4g}/{epochs} step {row['step']}/{total}: train loss {row['train_loss']:.4f}, "
            f"val top-1 {row['val_top1']:.2f}%, top-5 {_top5(row['val_top5'])}, lr {row['lr']:.2e}, "
            f"keep {row['keep_rate']:.3f}, {row['img_per_s']:.0f} img/s")


def _top5(value: Optional[float]) -> str:
    return "- (5 classes or fewer)" if value is None else f"{value:.2f}%"


def validate(model: nn.Module, batches, keep_rate: Optional[float] = None) -> tuple[float, Optional[float]]:
    """(top-1 %, top-5 % or None for 5 classes or fewer) of ``model`` on ``batches`` in eval mode, at ``keep_rate`` (None: as it is);
    the model's mode and every random generator are as they were afterwards."""
    rng, was_training = checkpoint.rng_state(), model.training
    try:
        if keep_rate is not None:
            set_keep_rate(model, keep_rate)
        top1, top5 = hits(model, batches)
    finally:
        checkpoint.set_rng_state(rng)
        model.train(was_training)
    return percent(top1), percent(top5)


class Validation:
    """When to validate (every ``eval_every`` steps, else at each epoch end, and at the last step), the
    training loss and speed since the last row, ``summary.csv`` and the best checkpoint in ``out``."""

    def __init__(self, loader, out: Path, per_epoch: int, eval_every: Optional[int] = None,
                 resume_step: Optional[int] = None, state: Optional[dict] = None) -> None:
        self.loader, self.out, self.per_epoch, self.eval_every = loader, Path(out), per_epoch, eval_every
        self.summary = Summary(self.out / "summary.csv", resume_step)
        self.best = self.summary.best_top1()
        self.loss_sum, self.loss_steps = (state["loss_sum"], state["loss_steps"]) if state else (0.0, 0)
        self.images, self.since = 0, time.perf_counter()

    def state(self) -> dict:
        """What a checkpoint keeps, so a resumed run's next row averages the same losses."""
        return {"loss_sum": self.loss_sum, "loss_steps": self.loss_steps}

    def record(self, loss: float, images: int) -> None:
        self.loss_sum, self.loss_steps, self.images = self.loss_sum + loss, self.loss_steps + 1, self.images + images

    def due(self, step: int, total: int) -> bool:
        return step == total or step % (self.eval_every or self.per_epoch) == 0

    def run(self, model: nn.Module, step: int, lr: float, keep_rate: Optional[float]) -> dict:
        """Validate ``model`` at ``keep_rate``, add its row, write ``best.safetensors`` when top-1 is the best yet."""
        rate = self.images / max(time.perf_counter() - self.since, 1e-9)
        top1, top5 = validate(model, self.loader.batches(0), keep_rate)
        row = dict(epoch=step / self.per_epoch, step=step, train_loss=self.loss_sum / max(self.loss_steps, 1),
                   val_top1=top1, val_top5=top5, lr=lr, keep_rate=1.0 if keep_rate is None else keep_rate,
                   img_per_s=rate)
        if self.best is None or top1 > self.best:
            self.best = top1
            checkpoint.save_weights(model, self.out / "best.safetensors")
        self.summary.add(row)
        self.loss_sum, self.loss_steps, self.images, self.since = 0.0, 0, 0, time.perf_counter()
        return row
