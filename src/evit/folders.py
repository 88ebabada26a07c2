"""ImageNet-style folders (``train/`` and ``val/``, one sub-folder per class) at the model's own input size.

Images are decoded and cropped straight to the size the model was built for, through timm's
transforms for that size (``timm.data.create_transform``): a model built at ``img_size`` 32 gets
32 px crops, not 224 px ones shrunk afterwards. The listing is evit's own rather than timm's
dataset, for three reasons that each hide a wrong number or a hang:

* labels come from one class list (``train/``'s sub-folders, a run's ``config.json``, or the names the
  model records for its classes, transformers' ``id2label``) and every split is mapped onto it *by
  name*: a ``val/`` with a class missing is still scored against the right labels, and a class the
  model does not know is refused;
* a named pipe, socket, device or broken link is skipped when listed, never opened (opening a
  pipe blocks a worker for ever);
* an image that fails to decode is dropped from its batch and named once, not replaced by its
  neighbour (timm's ``ImageDataset`` retries the next index, so that image is scored twice;
  :mod:`evit.images` reads them).

How the listed images become batches (decoding, transforms, seeded order) is :mod:`evit.images`' job.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from . import hosts
from .cost import native_input_size
from .data import check_grayscale, check_head
from .images import FolderLoader, Split, check_workers, split_loader, warn

LAYOUT = ("an ImageNet-style data set is a folder with train/ and val/, each holding one sub-folder "
          "of images per class")


#: image files PIL reads beyond timm's list (which has PNG and JPEG only): a folder of them is counted, not skipped
MORE_EXTENSIONS = (".bmp", ".gif", ".tif", ".tiff", ".webp")


def _extensions() -> tuple[str, ...]:
    from timm.data.readers.img_extensions import get_img_extensions

    return tuple(dict.fromkeys((*get_img_extensions(), *MORE_EXTENSIONS)))


def _natural(text: str):
    from timm.utils.misc import natural_key  # timm's class order, so a model trained by timm maps the same

    return natural_key(text)


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(_extensions())


def check_folder(path: Path) -> None:
    """Refuse a split path that is missing or not a folder, naming it."""
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: {LAYOUT}")
    if not path.is_dir():
        raise ValueError(f"{path} is a file, not a folder: {LAYOUT}")


def _scan(folder: Path):
    try:
        with os.scandir(folder) as entries:
            return sorted(entries, key=lambda e: _natural(e.name))
    except OSError as e:
        raise ValueError(f"cannot read folder {folder}: {e.strerror or e}") from None


def class_folders(split: Path) -> dict[str, Path]:
    """{class name: sub-folder} of ``split`` in timm's (natural) order, hidden folders aside. An image
    lying in ``split`` itself has no class: refused, naming it."""
    check_folder(split)
    folders, loose = {}, []
    for entry in _scan(split):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            folders[entry.name] = Path(entry.path)
        elif _is_image_name(entry.name):
            loose.append(entry.name)
    if loose:
        more = f" (and {len(loose) - 1} more)" if len(loose) > 1 else ""
        raise ValueError(f"{split / loose[0]}{more} lies directly in {split}, not in a class sub-folder; "
                         "move each image into the sub-folder named after its class")
    return folders


def _images_under(folder: Path, skipped: list[str], others: list[str]) -> list[str]:
    """Image files under ``folder`` (sub-folders included, each linked folder once); files that are not
    regular (pipes, sockets, devices, broken links) go to ``skipped`` unopened, other files (not hidden) to
    ``others``."""
    found, seen, todo = [], set(), [folder]
    while todo:
        here = todo.pop()
        status = here.stat()
        key = (status.st_dev, status.st_ino)
        if key in seen:
            continue
        seen.add(key)
        for entry in _scan(here):
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                todo.append(Path(entry.path))
            elif _is_image_name(entry.name):
                (found if entry.is_file() else skipped).append(entry.path)
            else:
                others.append(entry.path)
    return sorted(found, key=_natural)


def read_split(split: Path, classes: Sequence[str], source: str) -> Split:
    """The images of ``split``, each labelled by its class folder's position in ``classes`` (the class
    list of ``source``). A class folder ``classes`` lacks is refused; a class with no folder here is
    simply not scored; non-regular files are skipped and named."""
    folders = class_folders(split)
    index = {name: i for i, name in enumerate(classes)}
    unknown = [name for name in folders if name not in index]
    if unknown:
        shown = ", ".join(list(classes)[:5]) + (", ..." if len(classes) > 5 else "")
        raise ValueError(f"{split / unknown[0]}: class {unknown[0]!r} is not one of the {len(classes)} classes of "
                         f"{source} ({shown})" + (f"; {len(unknown) - 1} more unknown" if len(unknown) > 1 else "")
                         + "; rename or remove it")
    samples, skipped, others = [], [], []
    for name, folder in folders.items():
        samples += [(path, index[name]) for path in _images_under(folder, skipped, others)]
    for path in skipped:
        warn(f"skipped {path}: not a regular file (a named pipe, socket, device or broken link); not counted")
    if others:
        kinds = sorted({Path(p).suffix.lower() or "no extension" for p in others})
        many = len(others) > 1
        warn(f"{split}: {len(others)} file{'s' if many else ''} in class folders {'are' if many else 'is'} "
             f"not an image evit reads ({', '.join(kinds[:5])}{', ...' if len(kinds) > 5 else ''}; it reads "
             f"{', '.join(_extensions())}), e.g. {others[0]}; not counted")
    if not samples:
        raise ValueError(f"{split} holds no images ({', '.join(_extensions())} files in class sub-folders)")
    return Split(split, samples, tuple(classes))


def run_class_names(weights: Optional[str]) -> Optional[tuple[list[str], str]]:
    """(class names, where from) recorded in the ``config.json`` of the run that wrote ``weights``
    (beside it, or one folder up for a file in ``checkpoints/``); None when there is none."""
    if not weights:
        return None
    for folder in (Path(weights).parent, Path(weights).parent.parent):
        config = folder / "config.json"
        try:
            names = json.loads(config.read_text()).get("class_names")
        except (OSError, ValueError, AttributeError):
            continue
        if names:
            if not (isinstance(names, list) and all(isinstance(n, str) and n for n in names)
                    and len(set(names)) == len(names)):
                raise ValueError(f"{config}: its class_names is damaged ({json.dumps(names)[:80]}); it should be the "
                                 "run's class names in label order, a list of distinct names")
            return list(names), f"the run config {config}"
    return None


def _plain(name: str) -> str:
    """A class name as compared across datasets: lower case, letters and digits only
    ("T - shirt / top" = "T-shirt/top")."""
    return re.sub(r"[^0-9a-z]", "", name.lower())


def check_fashion_mnist_heads(models: Sequence[nn.Module]) -> None:
    """Refuse a model whose head is not Fashion-MNIST's ten classes (by width, and by name where it records names),
    or whose input is not its one grayscale channel."""
    from .data import FASHION_MNIST_CLASSES

    for model in models:
        check_head(hosts.head_outputs(model), len(FASHION_MNIST_CLASSES), "Fashion-MNIST")
        names = hosts.class_names(model)
        if names is not None and list(map(_plain, names)) != list(map(_plain, FASHION_MNIST_CLASSES)):
            raise ValueError(f"{hosts.model_name(model)}'s classes ({', '.join(names[:4])}, ...) are not Fashion-MNIST's "
                             f"({', '.join(FASHION_MNIST_CLASSES[:4])}, ...) in its order; evaluate it on its own data")
        check_grayscale(model)


def model_class_names(models: Sequence[nn.Module], split: Path) -> Optional[tuple[list[str], str]]:
    """(class list, where from) by the names the models record for their heads (transformers' ``id2label``),
    when ``split``'s class folders are named so (compared in :func:`_plain` form): each folder then takes the
    label of its name. None when no model records names, or no folder bears one of them (folders named another
    way, e.g. ImageNet's synset ids, are labelled in folder order as for any model); some folders named so and
    others not is refused."""
    named = [(m, n) for m in models if (n := hosts.class_names(m)) is not None]
    if not named:
        return None
    model, names = named[0]
    if any(n != names for _, n in named):
        raise ValueError("the models name their classes differently (id2label); evaluate them apart")
    plain = [_plain(n) for n in names]
    label_of = {p: i for i, p in enumerate(plain) if plain.count(p) == 1}
    folders = list(class_folders(split))
    matched = [f for f in folders if _plain(f) in label_of]
    if not matched:
        return None
    record = "id2label" if getattr(hosts.find(model), "library", "") == "transformers" else "class names"
    source = f"{hosts.model_name(model)}'s {record}"
    if len(matched) < len(folders):
        other = [f for f in folders if f not in matched]
        raise ValueError(f"{split}: some class folders bear the names of {source} ({matched[0]!r}, ...) and some do not "
                         f"({other[0]!r}{', ...' if len(other) > 1 else ''}); name them all as the model does")
    labels = list(names)
    for folder in matched:
        labels[label_of[_plain(folder)]] = folder
    return labels, source


def class_list(root: Path, num_outputs: int, given: Optional[tuple[list[str], str]] = None) -> tuple[list[str], str]:
    """(class names in label order, where they come from) for a model with ``num_outputs`` outputs:
    ``given`` (a run's config, or the model's own names), else ``root/train``'s sub-folders, else
    ``root/val``'s when they are exactly as many as the outputs. A head of another width is refused with both numbers."""
    if given is not None:
        names, source = given
    elif (root / "train").is_dir():
        names, source = list(class_folders(root / "train")), str(root / "train")
    else:
        names, source = list(class_folders(root / "val")), str(root / "val")
        if len(names) != num_outputs:
            raise ValueError(f"{source} has {len(names)} class folders but the model has {num_outputs} outputs, and "
                             f"there is no {root / 'train'} nor a run config (class_names) beside the checkpoint "
                             "to match them by name; add train/ or evaluate the weights of an evit run")
        return names, source
    check_head(num_outputs, len(names), source)
    return names, source


class FolderEval:
    """Evaluation batches of a folder's ``val/``, made for each model as it reads images (:meth:`for_model`, which
    :func:`evit.evaluate.evaluate` asks for): at its own input size and with its own preprocessing (mean, std,
    crop, interpolation: a file may record those it was trained with), so no model sees images resized or
    normalised for another's."""

    def __init__(self, split: Split, model: nn.Module, batch_size: int, workers: int = 2) -> None:
        self.split, self.model, self.batch_size, self.workers = split, model, batch_size, workers
        self.loaders: dict[tuple, FolderLoader] = {}

    def for_model(self, model: nn.Module) -> Iterator[tuple[Tensor, Tensor]]:
        size = tuple(int(s) for s in native_input_size(model))
        reading = hosts.data_config(model, size)
        key = (size, *(repr(reading.get(k)) for k in ("mean", "std", "crop_pct", "interpolation", "crop_mode",
                                                       "crop_offset")))
        if key not in self.loaders:
            self.loaders[key] = split_loader(self.split, model, self.batch_size, False, size, workers=self.workers)
        return self.loaders[key].batches(0)

    def __call__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return self.for_model(self.model)


def eval_batches(root: Path, models: Sequence[nn.Module], batch_size: int, workers: int = 2,
                 run_classes: Optional[tuple[list[str], str]] = None) -> FolderEval:
    """``root/val`` for evaluating ``models``, mapped by class name onto the class list (a run's, else the
    models' own names where the folders bear them, else ``root/train``'s); every model's head must be as wide
    as that list."""
    check_workers(workers)
    check_folder(root)
    check_folder(root / "val")
    widths = {hosts.head_outputs(m) for m in models}
    if len(widths) != 1:
        raise ValueError(f"the models have heads of different widths {sorted(map(str, widths))}; evaluate them apart")
    names, source = class_list(root, widths.pop(), run_classes or model_class_names(models, root / "val"))
    return FolderEval(read_split(root / "val", names, source), models[0], batch_size, workers)


@dataclass
class FolderData:
    """What training reads from a folder: its loaders and the class list they are labelled by."""

    train: FolderLoader
    val: FolderLoader
    class_names: list[str]


def train_data(root: Path, model: nn.Module, batch_size: int, *, seed: int = 0, workers: int = 2,
               val_split: Optional[float] = None, subset: Optional[int] = None, size: Optional[Sequence[int]] = None,
               class_names: Optional[Sequence[str]] = None, rank: int = 0, world: int = 1) -> FolderData:
    """Training and validation loaders over ``root`` at ``model``'s input size (or ``size``): labels by
    class name from ``class_names`` or ``root/train``'s sub-folders; validation on ``root/val``, or on
    a seeded ``val_split`` share of ``train/``; ``subset`` images drawn (seeded) from the rest."""
    from .data import check_subset, held_out

    check_workers(workers)
    check_folder(root)
    check_folder(root / "train")
    if val_split is None:
        check_folder(root / "val")
    given = (list(class_names), "the recipe's class_names") if class_names else None
    names, source = class_list(root, hosts.head_outputs(model), given)
    train = read_split(root / "train", names, source)
    if val_split is not None:
        kept, held = held_out(len(train.samples), val_split, seed)
        train, val = train.subset(kept), train.subset(held)
    else:
        val = read_split(root / "val", names, source)
    if subset is not None:
        check_subset(subset, len(train.samples), str(root / "train"))
        train = train.subset(torch.randperm(len(train.samples), generator=torch.Generator().manual_seed(seed))[:subset]
                             .sort().values)
    size = size or native_input_size(model)
    return FolderData(split_loader(train, model, batch_size, True, size, seed, workers, rank, world),
                      split_loader(val, model, batch_size, False, size, seed, workers), names)
