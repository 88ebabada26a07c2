"""The embedded default: a small ViT trained by this project on Fashion-MNIST, and test images.

Bundled in ``evit/assets``: the baseline weights, the weights trained with EViT (keep rates 0.5 to 0.7,
fusion by the renormalised average, as their metadata records),
a subset of the Fashion-MNIST test set (MIT licence, notice in ``assets/FASHION_MNIST_LICENSE``)
and the recipes that made the weights (``assets/recipes``), so ``evit eval`` and
``evit bench`` show real accuracy beside speed with no network.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

ASSETS = Path(__file__).parent / "assets"
RECIPES = ASSETS / "recipes"
WEIGHTS = {"baseline": "fashion_mnist_vit.safetensors", "evit": "fashion_mnist_vit_evit.safetensors",
           "dynamicvit": "fashion_mnist_vit_dynamicvit07.safetensors"}
TEST_SUBSET = "fashion_mnist_test_subset.npz"


def recipe_path(name: str) -> Path:
    """A bundled recipe by name (``fashion_mnist_baseline``) or a path to a JSON file."""
    p = Path(name)
    if p.suffix == ".json" and p.is_file():
        return p
    bundled = RECIPES / f"{name}.json"
    if bundled.is_file():
        return bundled
    known = ", ".join(sorted(f.stem for f in RECIPES.glob("*.json")))
    raise FileNotFoundError(f"recipe {name!r} is neither a JSON file nor a bundled recipe ({known})")


def architecture() -> tuple[str, dict]:
    recipe = json.loads(recipe_path("fashion_mnist_baseline").read_text())
    return recipe["model"], recipe["model_kwargs"]


def _missing(what: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"the embedded {what} is not in this installation ({ASSETS}); build it with "
        "the recipes in evit/assets/recipes (README: 'The embedded default model', in order from "
        "`evit train --recipe fashion_mnist_baseline`) and `evit.embedded.export`, or pass --model"
    )


def load_model(kind: str = "baseline") -> nn.Module:
    """The embedded model: ``'baseline'`` (trained at keep 1.0) or ``'evit'`` (trained with EViT at
    keep rates 0.5 to 0.7), unpatched; or ``'dynamicvit'`` (trained with DynamicViT at keep 0.7),
    patched with its predictors at keep 1.0."""
    from safetensors.torch import load_file

    from .checkpoint import TRAINED_WITH, recorded_settings
    from .data import record_fashion_mnist_training
    from .models import create_model

    path = ASSETS / WEIGHTS[kind]
    if not path.is_file():
        raise _missing(f"{kind} model")
    name, kwargs = architecture()
    model = create_model(name, **kwargs)
    if kind == "dynamicvit":
        from .patch import patch

        patch(model, 1.0, method="dynamicvit")
    model.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    setattr(model, TRAINED_WITH, recorded_settings(path))  # the EViT model: trained with fusion="mean"
    record_fashion_mnist_training(model)  # a folder of its images is read as its training tensors were
    return model.eval()


def test_subset() -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 (N, 1, 28, 28), labels int64 (N,)) of the bundled Fashion-MNIST test subset."""
    path = ASSETS / TEST_SUBSET
    if not path.is_file():
        raise _missing("test subset")
    with np.load(path) as z:
        return torch.from_numpy(z["images"]).unsqueeze(1), torch.from_numpy(z["labels"].astype(np.int64))


def write_test_subset(root: Path, train_images: int, test_images: int) -> Path:
    """The bundled test subset as Fashion-MNIST idx files in ``root``: its first ``train_images`` as the
    train split, the next ``test_images`` as the test split. Returns ``root``."""
    from .data import write_idx

    images, labels = test_subset()
    images, labels = images[:, 0].numpy(), labels.numpy()
    for stem, part in (("train", slice(0, train_images)), ("t10k", slice(train_images, train_images + test_images))):
        write_idx(root / f"{stem}-images-idx3-ubyte.gz", images[part])
        write_idx(root / f"{stem}-labels-idx1-ubyte.gz", labels[part])
    return root


def export(weights: Path, kind: str) -> Path:
    """Write trained ``weights`` into the package as the embedded ``kind`` model (fp16, to stay small),
    with the token-reduction settings they recorded (:func:`evit.checkpoint.recorded_settings`)."""
    from safetensors.torch import load_file

    from .checkpoint import recorded_settings, save_tensors, settings_metadata

    state = {k: v.half() if v.is_floating_point() else v for k, v in load_file(str(weights)).items()}
    out = ASSETS / WEIGHTS[kind]
    save_tensors(state, out, metadata=settings_metadata(recorded_settings(weights)) or None)
    return out
