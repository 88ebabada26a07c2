"""Image files into batches: decoding, timm's transforms at a model's size, and loaders that lose nothing.

A split (:class:`Split`: image paths labelled by class) is read through one transform per input size.
What this module guarantees, each hiding a wrong number or a lost run otherwise:

* an image that fails to decode is dropped from its batch and named once, not replaced by its
  neighbour (timm's ``ImageDataset`` retries the next index, so that image is scored twice);
* a 16-bit image is scaled to 8 bits, not clipped to white; a pipe or device is never opened;
* order and augmentation are drawn per (seed, epoch, image), so a run resumed mid-epoch sees the same
  batches without decoding the ones before its checkpoint, with any number of workers.

Which images and which labels (the listing, the class list) is :mod:`evit.folders`' job.
"""
from __future__ import annotations

import contextlib
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from . import hosts
from .cost import native_input_size


def warn(text: str) -> None:
    """One plain line on stderr (also from a loader's worker processes)."""
    print(f"evit: warning: {text}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Split:
    """A split's images as (path, label) pairs, labelled by class name against ``classes``."""

    root: Path
    samples: list[tuple[str, int]]
    classes: tuple[str, ...]

    def subset(self, indices: Tensor) -> "Split":
        return Split(self.root, [self.samples[i] for i in indices.tolist()], self.classes)


@contextlib.contextmanager
def seeded(seed: Optional[int]):
    """Run with torch's, Python's and NumPy's global generators seeded by ``seed`` (timm's transforms draw
    from all of them), restoring them afterwards so the training stream is not disturbed."""
    if seed is None:
        yield
        return
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()
    torch.default_generator.manual_seed(seed)  # the CPU's alone: a GPU's stream is not touched
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        torch.set_rng_state(states[0])
        random.setstate(states[1])
        np.random.set_state(states[2])


def open_image(path: str, mode: str):
    """The image file ``path`` decoded to the PIL ``mode`` ('RGB' or 'L'), or ValueError with the reason. A 16-bit
    image is scaled to 8 bits first (PIL's own conversion clips it at 255: a white picture); one of 32-bit integers
    or floats, whose range says nothing of black and white, is refused unless it lies in 0..255 (floats within
    0..1, a scale of their own, are refused too: read as 0..255 they would be black)."""
    from PIL import Image

    if os.path.exists(path) and not os.path.isfile(path):  # a pipe or a device: reading it may wait forever
        kind = "a folder" if os.path.isdir(path) else "not a regular file (a pipe, socket or device)"
        raise ValueError(f"it is {kind}; give an image file")
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode.startswith("I;16"):
                image = Image.fromarray((np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8))
            elif image.mode in ("I", "F"):
                low, high = np.asarray(image).min(), np.asarray(image).max()
                if not 0 <= low <= high <= 255 or (image.mode == "F" and high <= 1):  # 0..1 would read as black
                    raise ValueError(f"its {image.mode} pixels span {low:g}..{high:g}, not 0..255; save it as an 8 or "
                                     "16-bit image")
            return image.convert(mode)
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None


class FolderDataset(torch.utils.data.Dataset):
    """A split's images through one transform. An image that cannot be read comes back as
    (path, reason): the loader drops it from the batch and names it, nothing stands in for it."""

    def __init__(self, split: Split, transform, mode: str) -> None:
        self.samples, self.transform, self.mode = split.samples, transform, mode

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, Optional[int]]):
        index, seed = key
        path, label = self.samples[index]
        try:
            image = open_image(path, self.mode)
        except ValueError as e:
            return path, str(e)
        with seeded(seed):
            return self.transform(image), label


def _collate(items):
    """(images, labels, [(path, reason) of the images that failed]); images None when all failed."""
    from torch.utils.data import default_collate

    good = [item for item in items if not isinstance(item[0], str)]
    failed = [item for item in items if isinstance(item[0], str)]
    images, labels = default_collate(good) if good else (None, None)
    return images, labels, failed


class EpochOrder(torch.utils.data.Sampler):
    """(image index, augmentation seed) pairs of one epoch from position ``skip`` on: shuffled by
    (seed, epoch) and sharded per rank for training, in order (and unseeded) for evaluation."""

    def __init__(self, n: int, epoch: int, seed: int, train: bool, rank: int = 0, world: int = 1, skip: int = 0):
        self.n, self.epoch, self.seed, self.train, self.rank, self.world, self.skip = n, epoch, seed, train, rank, world, skip

    def indices(self) -> Tensor:
        if not self.train:
            return torch.arange(self.n)
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100003 + self.epoch))
        per_rank = self.n // self.world
        return order[self.rank * per_rank:(self.rank + 1) * per_rank]

    def __len__(self) -> int:
        return max(0, len(self.indices()) - self.skip)

    def __iter__(self):
        for i in self.indices()[self.skip:].tolist():
            yield i, (((self.seed * 1_000_003 + self.epoch) * 10_000_019 + i) % 2**62 if self.train else None)


class FolderLoader:
    """Batches of one split with the ``batches(epoch, start)`` interface of :class:`evit.data.TensorLoader`.
    A failed image is named once per run (one line) and not counted."""

    def __init__(self, dataset: FolderDataset, batch_size: int, train: bool, seed: int = 0, workers: int = 2,
                 rank: int = 0, world: int = 1) -> None:
        self.dataset, self.batch_size, self.train, self.seed = dataset, batch_size, train, seed
        self.workers, self.rank, self.world = workers, rank, world
        self.named: set[str] = set()

    def __len__(self) -> int:
        n = len(self.dataset) // self.world if self.train else len(self.dataset)
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    def batches(self, epoch: int, start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        order = EpochOrder(len(self.dataset), epoch, self.seed, self.train, self.rank, self.world,
                           skip=start * self.batch_size)
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=self.batch_size, sampler=order, num_workers=self.workers, collate_fn=_collate,
            drop_last=self.train, generator=torch.Generator().manual_seed(self.seed))  # leaves the global RNG alone
        for images, labels, failed in loader:
            for path, reason in failed:
                if path not in self.named:
                    self.named.add(path)
                    warn(f"skipped {path}: cannot read it as an image ({reason}); not counted")
            if images is None:
                if self.train:
                    raise ValueError(f"none of the {len(failed)} images of a training batch could be read "
                                     f"(e.g. {failed[0][0]}); check the data set")
                continue
            yield images, labels


def image_transform(model: nn.Module, size: Sequence[int], train: bool):
    """timm's train or eval transform for ``size`` (C, H, W), with ``model``'s mean, std, interpolation
    and crop share (its host's data configuration, one value per channel), and the PIL mode to decode to."""
    from timm.data import create_transform

    channels = int(size[0])
    if channels not in (1, 3):
        raise ValueError(f"the model takes {channels} input channels; image folders give RGB (3) or grayscale (1)")
    cfg = hosts.data_config(model, size)
    mean, std = (tuple(cfg[k]) if len(cfg[k]) == channels else (sum(cfg[k]) / len(cfg[k]),) * channels
                 for k in ("mean", "std"))
    transform = create_transform(cfg["input_size"], is_training=train, interpolation=cfg["interpolation"], mean=mean,
                                 std=std, crop_pct=cfg["crop_pct"], crop_mode=cfg.get("crop_mode"))
    if cfg.get("crop_offset") == "floor" and not train:  # transformers' processors: torchvision's rounds the offset
        from torchvision.transforms import CenterCrop

        transform.transforms = [FloorCenterCrop(t.size) if isinstance(t, CenterCrop) else t for t in transform.transforms]
    return transform, "L" if channels == 1 else "RGB"


class FloorCenterCrop:
    """The centre ``size`` (height, width) of a PIL image, offset by half the margin rounded down, as transformers'
    image processors crop (torchvision's ``CenterCrop`` rounds half to even: one pixel apart for some sizes)."""

    def __init__(self, size: Sequence[int]) -> None:
        self.size = tuple(size)

    def __call__(self, image):
        from torchvision.transforms.functional import center_crop

        (h, w), (width, height) = self.size, image.size
        if h > height or w > width:  # a crop larger than the image pads it: torchvision's way
            return center_crop(image, [h, w])
        top, left = (height - h) // 2, (width - w) // 2
        return image.crop((left, top, left + w, top + h))


def split_loader(split: Split, model: nn.Module, batch_size: int, train: bool, size: Optional[Sequence[int]] = None,
                 seed: int = 0, workers: int = 2, rank: int = 0, world: int = 1) -> FolderLoader:
    """A loader over ``split`` at ``size`` (C, H, W; default: ``model``'s own input size as built)."""
    transform, mode = image_transform(model, size or native_input_size(model), train)
    return FolderLoader(FolderDataset(split, transform, mode), batch_size, train, seed, workers, rank, world)


def check_workers(workers: int) -> None:
    if workers < 0:
        raise ValueError(f"--workers must be 0 (load in this process) or more, got {workers}")
