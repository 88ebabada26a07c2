"""ImageNet-style folders (``train/`` and ``val/``, one sub-folder per class) through ``timm.data``.

timm's dataset reports an unreadable image by its path (a warning naming the file) and
moves to the next sample, so one corrupt file does not end a run deep in a worker.
"""
from __future__ import annotations

from pathlib import Path


class FolderLoader:
    """Wraps a timm loader with the ``batches(epoch, start)`` interface of :class:`evit.data.TensorLoader`."""

    def __init__(self, loader) -> None:
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def batches(self, epoch: int, start: int = 0):
        sampler = getattr(self.loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        for i, batch in enumerate(self.loader):
            if i >= start:
                yield batch


def folder_loaders(cfg, rank: int = 0, world: int = 1, input_size=None):
    """(train, val) loaders over ``cfg.data`` with timm's transforms for ``cfg.model``'s input size."""
    from timm.data import create_dataset, create_loader, resolve_data_config

    root = Path(cfg.data)
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise FileNotFoundError(
                f"{root / split} is not a folder: an ImageNet-style data set has {root}/train and {root}/val, "
                "each with one sub-folder of images per class"
            )
    from .models import create_model

    data_cfg = resolve_data_config({"input_size": input_size} if input_size else {},
                                   model=create_model(cfg.model, **cfg.model_kwargs))
    loaders = []
    for split, training in (("train", True), ("val", False)):
        ds = create_dataset("", root=str(root / split), is_training=training)
        if len(ds) == 0:
            raise ValueError(f"{root / split} holds no images")
        loaders.append(FolderLoader(create_loader(
            ds, input_size=data_cfg["input_size"], batch_size=cfg.batch_size, is_training=training,
            mean=data_cfg["mean"], std=data_cfg["std"], interpolation=data_cfg["interpolation"],
            crop_pct=data_cfg["crop_pct"], num_workers=2, distributed=world > 1, use_prefetcher=False,
        )))
    return tuple(loaders)
