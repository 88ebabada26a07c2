"""Pictures of the tokens each reduction stage kept: ``evit show``.

For each image, one row: the input, then one panel per stage. A patch whose token
was kept alone is shown as it is; a patch that was dropped, or pooled into EViT's
fused token, is greyed out; for methods that merge (ToMe), patches merged into one
token share a colour. The predicted class titles the row when labels are known.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from . import hosts
from .masks import token_groups
from .outputs import check_file_destination
from .patch import reductions


def figure_path(out: str) -> Path:
    """The file a figure saved to ``out`` lands in: matplotlib adds ``.png`` to a name without an extension, so
    that is the name to check against the inputs and to report."""
    path = Path(out)
    return path.with_name(path.name + ".png") if not path.suffix else path


def _require_matplotlib():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("evit show needs matplotlib: pip install 'evit[show]' (or pip install matplotlib)") from None
    return plt


def stage_picture(display: np.ndarray, token: Tensor, size: Tensor, merges: bool) -> np.ndarray:
    """``display`` (H, W, 3) in [0, 1] with the patches of one stage greyed or coloured; token/size (h, w)."""
    H, W, _ = display.shape
    h, w = token.shape
    up = lambda t: np.kron(t.numpy(), np.ones((H // h, W // w)))[:H, :W]  # noqa: E731 - patch grid to pixels
    tok, sz = up(token), up(size)
    out = display.copy()
    grey = out.mean(axis=-1, keepdims=True) * 0.35 + 0.6  # faded, so kept patches stand out
    dropped = (tok < 0) | ((sz > 1) & (not merges))
    out = np.where(dropped[..., None], grey, out)
    if merges:  # colour each merged group alike
        colours = np.random.default_rng(0).uniform(0.15, 0.95, size=(int(tok.max()) + 2, 3))
        tint = colours[tok.clip(min=0).astype(int)]
        grouped = (sz > 1)[..., None]
        out = np.where(grouped, 0.45 * out + 0.55 * tint, out)
    return out.clip(0, 1)


def show(model: nn.Module, images: Tensor, display: Sequence[np.ndarray], out: str,
         class_names: Optional[Sequence[str]] = None, titles: Optional[Sequence[str]] = None) -> Path:
    """Write a PNG to ``out``: for each image, the input and the tokens kept at each stage.

    ``images``: the model's input batch; ``display``: the same images as (H, W, 3) arrays in [0, 1]
    at the model's input size (what the patches cut).
    """
    plt = _require_matplotlib()
    stages = token_groups(model, images)
    methods = reductions(model)
    with torch.no_grad():
        predicted = hosts.adapter(model).forward(images).argmax(dim=-1).tolist()
    rows, cols = len(display), 1 + len(stages)
    fig, axes = plt.subplots(rows, cols, figsize=(2.1 * cols, 2.3 * rows), squeeze=False)
    for b in range(rows):
        axes[b, 0].imshow(display[b])
        label = class_names[predicted[b]] if class_names else f"class {predicted[b]}"
        axes[b, 0].set_title(f"predicted: {label}" + (f"\n{titles[b]}" if titles else ""), fontsize=8)
        for s, stage in enumerate(stages):
            merges = methods[stage.block].groups_patches
            axes[b, s + 1].imshow(stage_picture(display[b], stage.token[b], stage.size[b], merges))
            if b == 0:
                axes[b, s + 1].set_title(f"after block {stage.block}\n{stage.tokens} tokens", fontsize=8)
            if merges:
                groups = len(set(stage.token[b][stage.size[b] > 1].tolist()))
                axes[b, s + 1].set_xlabel(f"{groups} merged groups", fontsize=7)
            else:
                axes[b, s + 1].set_xlabel(f"{int((stage.size[b] == 1).sum())} patches kept", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    first = next(iter(methods.values()))
    groups = ";\nmerged patches share a colour" if any(m.groups_patches for m in methods.values()) else ""
    fused = "fused or dropped" if getattr(first, "fuse", False) else "dropped"
    fig.suptitle(f"{first.label or type(first).__name__}: patches greyed out were {fused}{groups}", fontsize=9)
    fig.tight_layout()
    path = figure_path(out)
    check_file_destination(path, out)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def load_images(paths: Sequence[str], model: nn.Module) -> tuple[Tensor, list[np.ndarray]]:
    """(model input batch, display arrays) for image files, with the model's own preprocessing at the size and
    channels it was built for (its host's data configuration, applied by timm's transforms)."""
    from .cost import native_input_size
    from .images import image_transform, open_image

    transform, mode = image_transform(model, native_input_size(model), train=False)
    norm = transform.transforms[-1]  # timm's evaluation transform ends by normalising
    mean, std = torch.as_tensor(norm.mean).view(-1, 1, 1), torch.as_tensor(norm.std).view(-1, 1, 1)
    batch, display = [], []
    for p in paths:
        try:
            x = transform(open_image(p, mode))
        except ValueError as e:
            raise ValueError(f"cannot read image {p}: {e}") from None
        batch.append(x)
        shown = (x * std + mean).clamp(0, 1)
        display.append(shown.expand(3, -1, -1).permute(1, 2, 0).numpy())
    return torch.stack(batch), display


def fashion_images(paths: Sequence[str] = (), count: int = 4) -> tuple[Tensor, list[np.ndarray]]:
    """(input batch, display arrays) for the embedded Fashion-MNIST model: image files made 28 x 28
    grey, or, with no paths, the first bundled test image of each of ``count`` classes."""
    from . import embedded
    from .data import normalize
    from .images import open_image

    if paths:
        grey = []
        for p in paths:
            try:
                grey.append(torch.from_numpy(np.array(open_image(p, "L").resize((28, 28)))))
            except ValueError as e:
                raise ValueError(f"cannot read image {p}: {e}") from None
        raw = torch.stack(grey).unsqueeze(1)
    else:
        if not 1 <= count <= 10:
            raise ValueError(f"--count must be 1..10 (one bundled image per class), got {count}")
        raw, labels = embedded.test_subset()
        raw = raw[[int((labels == c).nonzero()[0]) for c in range(count)]]
    display = [(r[0].float() / 255).unsqueeze(-1).expand(-1, -1, 3).numpy() for r in raw]
    return normalize(raw), display
