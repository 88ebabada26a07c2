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

#: keep-rate methods and their off-the-shelf settings; ToMe's are per-block merge counts
KEEP_RATE_METHODS = ("evit", "topk", "random", "stvit", "patchslimming")


#: STViT's shares of semantic tokens: 6, 5, 4 and 3 squared of 7 x 7 image tokens (12, 10, 8, 6 of DeiT's 14)
STVIT_KEEP_RATES = (0.75, 0.5, 0.33, 0.18)

#: methods with trained parameters: they run only on weights trained with them
LEARNED = ("dynamicvit",)


def grid(methods: Sequence[str], keep_rates: Sequence[float], tome_r: Sequence[int],
         trained: Optional[dict[str, str]] = None, baseline: str = "baseline") -> tuple[list, list[str]]:
    """((model name, setting) pairs, methods skipped for want of trained weights): the unpatched
    baseline, each method at each setting on the baseline weights (learned methods excepted), and
    each trained method (``trained``: method -> model name) on its own weights."""
    trained = trained or {}
    settings: list[tuple[str, object]] = [(baseline, 1.0)]
    skipped = []
    for method in methods:
        if method == "tome":
            specs = [{"method": "tome", "r": r} for r in tome_r]
        elif method == "stvit":  # its grid side is round(sqrt(keep_rate * n)): distinct grids, not the shared rates
            specs = [{"method": "stvit", "keep_rate": r} for r in STVIT_KEEP_RATES]
        elif method in KEEP_RATE_METHODS + LEARNED:
            specs = [{"method": method, "keep_rate": r} for r in keep_rates if r < 1.0]
        else:
            raise ValueError(f"evit compare does not know method {method!r}; choose from "
                             f"{', '.join(KEEP_RATE_METHODS + ('tome',) + LEARNED)}")
        if method not in LEARNED:
            settings += [(baseline, s) for s in specs]
        elif method not in trained:
            skipped.append(method)
        if method in trained:
            settings += [(trained[method], s) for s in specs]
    return settings, skipped


def load_trained(name: str, kwargs: dict, trained: dict[str, str]) -> dict[str, nn.Module]:
    """{"<method>-trained": model} for weights trained with each method (a learned method's modules
    are created by patching before its weights load)."""
    from .models import load_model
    from .patch import patch

    models = {}
    for method, path in trained.items():
        learned = (lambda m, method=method: patch(m, 1.0, method=method)) if method in LEARNED else None
        model = load_model(name, model_kwargs=kwargs, checkpoint=str(path), before_weights=learned)[1]
        models[f"{method}-trained"] = model.eval()
    return models


def compare(models: dict[str, nn.Module], settings, batches_fn, speed_reps: int = 10,
            speed_batch: int = 64, images=None, device=None) -> list[dict]:
    """Rows of :func:`evit.evaluate.evaluate` for every setting, each labelled with its series
    (``images``: calibration images for methods that choose from data)."""
    rows = evaluate(models, settings, batches_fn, speed_reps=speed_reps, speed_batch=speed_batch, images=images,
                    device=device)
    for row in rows:
        row["series"] = f"{row['method']} ({row['model']})" if row["method"] != "none" else "unpatched"
        row["setting_text"] = setting_text(row)
    return rows


def plot(rows: list[dict], out: str, title: str = "") -> Path:
    """Top-1 against measured speed-up and against GMACs, one line per method and weights."""
    from .show import _require_matplotlib

    plt = _require_matplotlib()
    path = Path(out)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {out}: folder {path.parent} does not exist")
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
