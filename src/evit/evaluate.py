"""Top-1 and top-5 beside cost and speed, per keep rate."""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch
from torch import nn

from .bench import paired_ratio, steady_allocator, text_table, time_interleaved
from .cost import count_macs, native_input_size
from .patch import patch, unpatch


@torch.inference_mode()
def accuracy(model: nn.Module, batches: Iterable) -> tuple[float, float, int]:
    """(top-1 %, top-5 %, number of images) of ``model`` over (images, labels) batches."""
    model.eval()
    top1 = top5 = total = 0
    for x, y in batches:
        logits = model(x)
        k = min(5, logits.shape[-1])
        best = logits.topk(k, dim=-1).indices
        top1 += (best[:, 0] == y).sum().item()
        top5 += (best == y[:, None]).any(dim=1).sum().item()
        total += len(y)
    if total == 0:
        raise ValueError("the evaluation data set is empty")
    return 100.0 * top1 / total, 100.0 * top5 / total, total


@torch.inference_mode()
def speedups(model: nn.Module, keep_rates: Sequence[float], batch_size: int = 64, reps: int = 10,
             locations: Optional[Sequence[int]] = None) -> dict[float, tuple[float, float]]:
    """{keep rate: (images/s, speed-up over the unpatched model)}, measured side by side in one run.
    ``model`` is patched in turn and left unpatched."""
    steady_allocator()
    model.eval()
    x = torch.randn(batch_size, *native_input_size(model))
    names = {"unpatched": None, **{f"keep@{r}": r for r in keep_rates}}

    def switch(name: str) -> None:
        r = names[name]
        unpatch(model) if r is None else patch(model, r, locations)

    times = time_interleaved({n: (lambda: model(x)) for n in names}, reps, 1, setup=switch)
    unpatch(model)
    return {r: (batch_size / sorted(times[n])[len(times[n]) // 2], paired_ratio(times["unpatched"], times[n]))
            for n, r in names.items() if r is not None}


def evaluate(
    models: dict[str, nn.Module],
    settings: Sequence[tuple[str, float]],
    batches_fn,
    locations: Optional[Sequence[int]] = None,
    speed_batch: int = 64,
    speed_reps: int = 10,
) -> list[dict]:
    """One row per (model name, keep rate) in ``settings``: top-1, top-5, GMACs, images/s, speed-up.

    ``batches_fn()`` yields fresh evaluation batches. Speed depends on the architecture and keep
    rate, not the weights, so it is measured once per keep rate on the first model.
    """
    first = next(iter(models.values()))
    speed = speedups(first, sorted({r for _, r in settings}), speed_batch, speed_reps, locations)
    rows = []
    for name, r in settings:
        model = models[name]
        patch(model, r, locations) if r < 1.0 else unpatch(model)
        top1, top5, n = accuracy(model, batches_fn())
        macs = count_macs(model) / 1e9
        unpatch(model)
        rows.append(dict(model=name, keep_rate=r, top1=top1, top5=top5, images=n,
                         gmacs=macs, images_per_s=speed[r][0], speedup=speed[r][1]))
    return rows


def format_rows(rows: list[dict]) -> str:
    head = ["model", "keep", "top-1 %", "top-5 %", "images", "GMACs", "img/s", "speed-up"]
    return text_table(head, [[r["model"], f"{r['keep_rate']:.2f}", f"{r['top1']:.2f}", f"{r['top5']:.2f}",
                              str(r["images"]), f"{r['gmacs']:.4f}", f"{r['images_per_s']:.0f}",
                              f"{r['speedup']:.2f}x"] for r in rows])
