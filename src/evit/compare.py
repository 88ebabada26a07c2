"""Methods side by side on one model and data set: accuracy against speed and cost.

Every setting of every method is evaluated on the same images, counted in the same
way and timed in the same interleaved run (:func:`evit.evaluate.evaluate`), so the
rows can be compared directly. Methods without parameters run off the shelf on the
baseline weights; a method trained for token reduction (EViT trained) runs on
the weights given for it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from torch import nn

from .evaluate import evaluate, setting_text
from .outputs import check_file_destination
from .registry import check_settings_apply, method_class, names


def grid(methods: Sequence[str], keep_rates: Optional[Sequence[float]] = None,
         r_values: Optional[Sequence[int]] = None, trained: Optional[dict[str, str]] = None,
         baseline: str = "baseline") -> tuple[list, list[str]]:
    """((model name, setting) pairs, methods skipped for want of trained weights): the unpatched
    baseline, each method at each setting on the baseline weights (learned methods excepted), and
    each trained method (``trained``: method -> model name) on its own weights.

    Each method's settings are its registered ``compare_grid``, unless ``keep_rates`` or ``r_values``
    give settings of its kind (and it does not keep its own grid, as STViT does)."""
    trained = trained or {}
    given = {"keep_rate": keep_rates, "r": r_values}
    settings: list[tuple[str, object]] = [(baseline, 1.0)]
    skipped = []
    for method in methods:
        try:
            cls = method_class(method)
        except ValueError:
            raise ValueError(f"evit compare does not know method {method!r}; choose from {', '.join(names())}") from None
        values = cls.compare_grid if cls.own_grid or not given[cls.setting] else given[cls.setting]
        specs = [{"method": method, cls.setting: v} for v in values if cls.setting != "keep_rate" or v < 1.0]
        if not cls.learned:
            settings += [(baseline, s) for s in specs]
        elif method not in trained:
            skipped.append(method)
        if method in trained:
            settings += [(trained[method], s) for s in specs]
    check_settings_apply(methods, {"keep_rate": "--keep-rates" if keep_rates else "", "r": "--r" if r_values else ""})
    return settings, skipped


def load_trained(name: str, kwargs: dict, trained: dict[str, str], baseline: Optional[nn.Module] = None) -> dict[str, nn.Module]:
    """{"<method>-trained": model} for weights trained with each method (a learned method's modules
    are created by patching before its weights load). Weights for another number of classes than
    ``baseline``'s are refused, naming the file: their rows would score other classes on the same images.

    A method that chooses its tokens from sample images (Patch Slimming) saves its choice with the weights of
    a patched model: it is loaded and kept on the model (:func:`evit.patch.keep_saved_state`), so the rows of the
    patch it was made for (:func:`evit.methods.patch_slimming.misfit`: its blocks, token count, patch grid and kept
    counts) run with it; the others choose again from the sample images (said on stderr)."""
    from . import hosts
    from .loading import keep_saved_choice, load_model, patch_for_weights

    models = {}
    for method, path in trained.items():
        model = load_model(name, model_kwargs=kwargs, checkpoint=str(path), before_weights=patch_for_weights(method))[1]
        if baseline is not None and (width := hosts.head_outputs(model)) != (base := hosts.head_outputs(baseline)):
            raise ValueError(f"--trained {method}={path}: its head has {width} outputs and the baseline's {base}; "
                             "compare weights trained on the same classes")
        model = keep_saved_choice(model, method, str(path), "evit compare")
        models[f"{method}-trained"] = model.eval()
    return models


def compare(models: dict[str, nn.Module], settings, batches_fn, speed_reps: int = 10,
            speed_batch: int = 64, images=None, device=None) -> list[dict]:
    """Rows of :func:`evit.evaluate.evaluate` for every setting, each labelled with its series
    (``images``: calibration images for methods that choose from data, or a function giving each model's own, read
    as it reads images: :func:`evit.evaluate.evaluate`)."""
    rows = evaluate(models, settings, batches_fn, speed_reps=speed_reps, speed_batch=speed_batch, images=images,
                    device=device)
    for row in rows:
        row["series"] = f"{method_class(row['method']).label} ({row['model']})" if row["method"] != "none" else "unpatched"
        row["setting_text"] = setting_text(row)
    return rows


def plot(rows: list[dict], out: str, title: str = "") -> Path:
    """Top-1 against measured speed-up and against GMACs, one line per method and weights."""
    from .show import _require_matplotlib, figure_path

    plt = _require_matplotlib()
    path = figure_path(out)
    check_file_destination(path, out)
    base = next((r for r in rows if r["method"] == "none"), None)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, x, label in ((axes[0], "speedup", "measured speed-up over the unpatched model (x)"),
                         (axes[1], "gmacs", "GMACs per image")):
        for series in dict.fromkeys(r["series"] for r in rows if r["method"] != "none"):
            chosen = [r for r in rows if r["series"] == series] + ([base] if base is not None else [])
            chosen.sort(key=lambda r: -r["gmacs"])  # from the unpatched model to the strongest reduction
            pts = [(r[x], r["top1"]) for r in chosen]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=4, label=series)
        if base is not None:
            ax.scatter([base[x]], [base["top1"]], color="black", zorder=5, label="unpatched")
        ax.set_xlabel(label)
        ax.set_ylabel("top-1 %")
        ax.grid(alpha=0.3)
    axes[1].invert_xaxis()  # cheaper to the right, like faster on the left panel
    axes[0].legend(fontsize=7, loc="lower left")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
