"""Data sets and loaders: ImageNet-style folders through ``timm.data``, and Fashion-MNIST.

Fashion-MNIST is read from Debian's ``dataset-fashion-mnist`` files (idx, gzip), from a
given folder with the same files, or downloaded by torchvision when online. It is held
as one uint8 tensor and augmented on whole batches, which on a CPU is many times
faster than a per-image PIL pipeline.
"""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from torch import Tensor, nn

from .resolution import resize_images

FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
# per-channel statistics of the Fashion-MNIST training images
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
HOW_TO_GET = ("install Debian's package (apt-get install dataset-fashion-mnist), or pass --data-root DIR with the "
              "four idx .gz files (evit train also takes --download, to fetch them with torchvision)")


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write ``array`` (uint8 values) as a gzipped idx file, the format :func:`load_fashion_mnist` reads:
    how tests and the GPU check make a data set from the bundled subset."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"cannot read {path}: {e}; the file is damaged, {HOW_TO_GET}") from None
    if len(data) < 8 or data[:2] != b"\x00\x00":
        raise ValueError(f"{path} is not an idx file; {HOW_TO_GET}")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated ({body.size} of {int(np.prod(shape))} values); {HOW_TO_GET}")
    return body.reshape(shape)


def _find(root: Optional[str], stem: str) -> Optional[Path]:
    roots = [Path(root)] if root else [Path(d) for d in FASHION_MNIST_DIRS]
    for r in roots:
        for candidate in (r / f"{stem}.gz", r / stem, r / "FashionMNIST" / "raw" / f"{stem}.gz", r / "FashionMNIST" / "raw" / stem):
            if candidate.is_file():
                return candidate
    return None


def load_fashion_mnist(split: str = "train", root: Optional[str] = None, download: bool = False) -> tuple[Tensor, Tensor]:
    """(images uint8 (N, 1, 28, 28), labels int64 (N,)) of Fashion-MNIST ``split`` ('train' or 'test')."""
    if split not in ("train", "test"):
        raise ValueError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
    stem = "train" if split == "train" else "t10k"
    images, labels = _find(root, f"{stem}-images-idx3-ubyte"), _find(root, f"{stem}-labels-idx1-ubyte")
    if (images is None or labels is None) and download:
        import torchvision

        target = root or os.path.expanduser("~/.cache/evit")
        torchvision.datasets.FashionMNIST(target, train=split == "train", download=True)
        return load_fashion_mnist(split, target, download=False)
    if images is None or labels is None:
        where = root or " or ".join(FASHION_MNIST_DIRS)
        raise FileNotFoundError(f"Fashion-MNIST {split} files not found in {where}; {HOW_TO_GET}")
    x, y = _read_idx(images), _read_idx(labels)
    if len(x) != len(y):
        raise ValueError(f"Fashion-MNIST {split}: {len(x)} images but {len(y)} labels; {HOW_TO_GET}")
    return torch.from_numpy(x.copy()).unsqueeze(1), torch.from_numpy(y.astype(np.int64))


def held_out(n: int, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """(kept, held out): indices of ``n`` items with ``round(fraction * n)`` of them drawn (seeded) for
    validation, each part in its original order. The draw depends only on ``n`` and ``seed``, so a
    resumed run holds out the same images."""
    if not 0 < fraction < 1:
        raise ValueError(f"--val-split must lie strictly between 0 and 1 (a share of train/ held out for "
                         f"validation), got {fraction}")
    k = round(fraction * n)
    if not 0 < k < n:
        raise ValueError(f"--val-split {fraction} of {n} training images leaves {'no image to validate on' if k == 0 else 'none to train on'}; "
                         "choose a share that leaves both")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[k:].sort().values, order[:k].sort().values


def check_head(outputs: int, classes: int, source: str) -> None:
    """Refuse a model whose head is not as wide as the data's class list (both numbers named)."""
    if outputs != classes:
        raise ValueError(f"the model's head has {outputs} outputs but {source} has {classes} classes; use weights "
                         "trained on these classes (evit train fine-tunes weights onto them: --init WEIGHTS, or --pretrained)")


def check_grayscale(model: nn.Module, source: str = "Fashion-MNIST") -> None:
    """Refuse a model that does not take ``source``'s grayscale tensors (one channel): it would fail deep inside,
    with torch's conv error or transformers' channel check."""
    from . import hosts
    from .cost import native_input_size

    channels = native_input_size(model)[0]
    if channels != 1:
        raise ValueError(f"{hosts.model_name(model)} takes {channels}-channel images, but {source}'s are grayscale "
                         "(1 channel): use a folder of images (--data DIR), which is read in the model's channels, or "
                         "build the model with one input channel (timm's in_chans=1, transformers' num_channels=1)")


def check_subset(size: Optional[int], available: int, where: str) -> None:
    """Refuse a --train-subset that is not a positive count no larger than the ``available`` images."""
    if size is not None and not 0 < size <= available:
        raise ValueError(f"--train-subset {size} asks for more images than the {available} in {where}"
                         if size > available else f"--train-subset must be a positive count, got {size}")


def record_fashion_mnist_training(model: nn.Module, names: bool = True) -> None:
    """Record on ``model`` that its weights were trained on Fashion-MNIST's tensors (:func:`normalize`: its mean
    and std, whole images, resized bilinearly; with ``names``, its classes in label order): a folder of such images
    is then read and labelled as the training data was, not with its architecture's defaults (for the embedded
    model, vit_tiny's ImageNet mean and crop cost 15 points of top-1 on the same images). Without ``names`` (a head
    built afresh for other classes) the model's class names are left as they are."""
    from . import hosts

    hosts.adapter(model).record_preprocessing(mean=(FASHION_MNIST_MEAN,), std=(FASHION_MNIST_STD,), crop_pct=1.0,
                                              interpolation="bilinear",
                                              class_names=FASHION_MNIST_CLASSES if names else None)


def normalize(images: Tensor) -> Tensor:
    """uint8 (B, 1, H, W) to the float input the models are trained on."""
    return (images.float() / 255.0 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD


def augment(images: Tensor, generator: torch.Generator, pad: int = 2) -> Tensor:
    """Random crop after zero padding, and random horizontal flip, on a whole uint8 batch."""
    B, C, H, W = images.shape
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (B,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (B,), generator=generator)
    rows = (dy[:, None] + torch.arange(H))[:, None, :, None].expand(B, C, H, W + 2 * pad)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(W))[:, None, None, :].expand(B, C, H, W)
    out = out.gather(3, cols)
    flip = torch.rand(B, generator=generator) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


@dataclass
class TensorLoader:
    """Batches of (normalised images, labels) from in-memory tensors; deterministic given ``seed`` and epoch.

    ``rank``/``world`` shard the data for data-parallel training (each process sees its own slice).
    """

    images: Tensor
    labels: Tensor
    batch_size: int
    train: bool = False
    seed: int = 0
    rank: int = 0
    world: int = 1
    drop_last: bool = False
    size: Optional[tuple[int, int]] = None  # (H, W) the normalised images are resized to (bilinear): a model's input

    def order(self, epoch: int) -> Tensor:
        if not self.train:
            idx = torch.arange(len(self.labels))
        else:
            g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            idx = torch.randperm(len(self.labels), generator=g)
        per_rank = len(idx) // self.world
        return idx[self.rank * per_rank:(self.rank + 1) * per_rank] if self.world > 1 else idx

    def __len__(self) -> int:
        n = len(self.labels) // self.world
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def batches(self, epoch: int, start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """Batches of ``epoch`` from batch index ``start`` on (for resuming mid-epoch)."""
        idx = self.order(epoch)
        g = torch.Generator().manual_seed(self.seed * 7919 + epoch * 131 + self.rank)
        for b in range(len(self)):
            sel = idx[b * self.batch_size:(b + 1) * self.batch_size]
            imgs = self.images[sel]
            if self.train:
                imgs = augment(imgs, g)  # drawn for skipped batches too, so a resume sees the same draws
            if b >= start:
                yield resize_images(normalize(imgs), self.size), self.labels[sel]
