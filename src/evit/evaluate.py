"""Top-1 and top-5 beside cost and speed, per keep rate or method setting."""
from __future__ import annotations

import copy
import json
from typing import Callable, Iterable, Iterator, Optional, Sequence, Union

import torch
from torch import nn

from . import hosts
from .checkpoint import trained_settings
from .cost import count_macs, native_input_size
from .models import resolve_device
from .patch import patch, reductions, set_keep_rate, unpatch
from .registry import method_class
from .resolution import resize_batches
from .timing import device_sync, paired_ratio, steady_allocator, text_table, time_interleaved


@torch.inference_mode()
def hits(model: nn.Module, batches: Iterable, what: str = "the model") -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Per image, in order: (top-1 right, top-5 right), two bool CPU tensors over all ``batches``,
    each batch run on the device of ``model``'s weights. Top-5 is None for a head of 5 classes or
    fewer: there every answer holds the right class, and a 100% would only look like a measurement.

    Weights or logits holding NaN or inf are refused (ValueError naming ``what``), never scored:
    ``topk`` over NaN ranks classes arbitrarily, a plausible and wrong number."""
    from .weights import check_finite

    check_finite(model, what)
    model.eval()
    host = hosts.find(model)
    forward = model if host is None else host.forward  # a classifier's logits, whatever its library returns
    weight = next(model.parameters(), None)
    top1, top5, bad, total = [], [], 0, 0
    for x, y in batches:
        logits = forward(x if weight is None else x.to(weight.device, non_blocking=True)).cpu()
        bad += int((~torch.isfinite(logits)).any(dim=-1).sum())
        total += len(logits)
        best = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        top1.append(best[:, 0] == y)
        top5.append((best == y[:, None]).any(dim=1))
    if bad:
        raise ValueError(f"{what} gave non-finite logits (NaN or inf) for {bad} of {total} images; not scored")
    if not top1:
        raise ValueError("the evaluation data set is empty")
    return torch.cat(top1), (torch.cat(top5) if logits.shape[-1] > 5 else None)


def accuracy(model: nn.Module, batches: Iterable) -> tuple[float, Optional[float], int]:
    """(top-1 %, top-5 % (None for 5 classes or fewer), number of images) of ``model`` over (images, labels) batches."""
    top1, top5 = hits(model, batches)
    return percent(top1), percent(top5), len(top1)


def percent(right: Optional[torch.Tensor]) -> Optional[float]:
    """Share of True in ``right``, in %, from the exact count; None for None (a top-5 not measured)."""
    return None if right is None else 100.0 * right.sum().item() / len(right)


def percent_text(value: Optional[float]) -> str:
    """'91.23', or '-' for a figure not measured (top-5 of 5 classes or fewer)."""
    return "-" if value is None else f"{value:.2f}"


def paired_gap(right: torch.Tensor, reference: torch.Tensor) -> Optional[tuple[float, float]]:
    """(top-1 of ``right`` minus top-1 of ``reference``, half-width of its 95% interval), in points.

    The two settings are scored on the same images, so the interval comes from the per-image
    differences (normal approximation of a paired test): on 10,000 images a gap of half a point
    is known to about 0.3 either way. None when the two were not scored on the same number of images.
    """
    if len(right) != len(reference) or len(right) < 2:
        return None
    d = right.double() - reference.double()
    return 100.0 * d.mean().item(), 100.0 * 1.96 * d.std().item() / len(d) ** 0.5


Setting = Union[float, dict]  # a keep rate for EViT, or evit.patch keyword arguments (method=..., ...)


def patch_spec(setting: Setting) -> Optional[dict]:
    """``evit.patch`` arguments for a setting; None for the unpatched model (keep rate 1.0)."""
    if isinstance(setting, dict):
        return dict(setting)
    return None if setting >= 1.0 else {"keep_rate": setting}


def _key(spec: Optional[dict]) -> str:
    return "unpatched" if spec is None else json.dumps(spec, sort_keys=True)


def _label(spec: Optional[dict]) -> str:
    """'unpatched' or 'method=tome, r=4': a setting, for messages."""
    return "unpatched" if spec is None else ", ".join(f"{k}={v}" for k, v in spec.items())


def learned(model: nn.Module) -> bool:
    """True when the model's token reduction learns parameters (DynamicViT): it stays in place."""
    return any(m.learned for m in reductions(model).values())


def apply_setting(model: nn.Module, setting: Setting, locations: Optional[Sequence[int]] = None,
                  images: Optional[torch.Tensor] = None) -> None:
    """Patch ``model`` for ``setting``; a model with a learned reduction only has its keep rate changed.
    Settings the model's checkpoint recorded for that method (EViT's fusion) apply unless ``setting``
    gives its own (:func:`evit.checkpoint.trained_settings`).
    ``images``: sample (training) images for methods that choose their tokens from data (Patch Slimming)."""
    spec = patch_spec(setting)
    if learned(model):
        have = next(m for m in reductions(model).values() if m.learned).name
        if spec is not None and spec.get("method", "evit") != have:
            raise ValueError(f"this model was trained with {have}; it cannot be evaluated with {spec.get('method')}")
        set_keep_rate(model, 1.0 if spec is None else spec.get("keep_rate", 1.0))
    elif spec is None:
        unpatch(model)
    else:
        recorded = trained_settings(model, str(spec.get("method", "evit")))
        patch(model, **{"locations": locations, **recorded, **spec}, images=images)
        if next(iter(reductions(model).values())).needs_images and images is None:
            unpatch(model)
            raise ValueError(f"{spec['method']} chooses its tokens from sample images: give calibration images "
                             "(evit compare uses training images)")


def release(model: nn.Module) -> None:
    """Undo :func:`apply_setting` (a learned reduction stays, at keep rate 1)."""
    set_keep_rate(model, 1.0) if learned(model) else unpatch(model)


@torch.inference_mode()
def speedups(rows: Sequence[tuple[nn.Module, Setting]], batch_size: int = 64, reps: int = 10,
             locations: Optional[Sequence[int]] = None, device: Optional[str] = None
             ) -> list[tuple[float, float]]:
    """Per (model, setting) in ``rows``: (images/s, speed-up over the first model unpatched), measured
    side by side in one run on ``device`` (:func:`evit.models.resolve_device`). Speed depends on the
    architecture, input size and setting, not the weights: each distinct (input size, setting) is
    timed once, on a copy of the first model of that size (the models are left as they are)."""
    steady_allocator()
    dev = resolve_device(device)
    copies: dict[tuple, tuple[nn.Module, torch.Tensor, torch.Tensor]] = {}  # size -> (copy, CPU sample, input)
    for model, _ in rows:
        size = native_input_size(model)
        if size not in copies:  # a copy, patched freely; the sample calibrates methods that need images
            sample = torch.randn(batch_size, *size)
            copies[size] = unpatch(copy.deepcopy(model)).cpu().eval(), sample, sample.to(dev)
    first = native_input_size(rows[0][0])
    keys = [(native_input_size(m), _key(patch_spec(s))) for m, s in rows]
    specs = {(first, "unpatched"): None, **{k: patch_spec(s) for k, (_, s) in zip(keys, rows)}}

    def switch(key: tuple) -> None:  # patched on the CPU, then moved, untimed
        model, sample, _ = copies[key[0]]
        apply_setting(unpatch(model.cpu()), specs[key] or 1.0, locations, images=sample)
        model.to(dev)

    times = time_interleaved({k: (lambda m=copies[k[0]][0], x=copies[k[0]][2]: m(x)) for k in specs}, reps, 1,
                             setup=switch, sync=device_sync(dev))
    base = times[(first, "unpatched")]
    return [(batch_size / sorted(times[k])[len(times[k]) // 2], paired_ratio(base, times[k])) for k in keys]


def sized(batches: Iterable, model: nn.Module) -> Iterator:
    """``batches`` with the images resized (bilinear) to ``model``'s input size where they differ, so
    one data set serves models at different sizes (the native model beside a larger input)."""
    return resize_batches(batches, native_input_size(model)[1:])


def fresh_batches(batches_fn, model: nn.Module) -> Iterable:
    """Fresh batches for ``model``: as it reads images (its input size and preprocessing) from a source that
    prepares them per model (``batches_fn.for_model``, e.g. a folder through timm's transforms), else
    ``batches_fn()``."""
    for_model = getattr(batches_fn, "for_model", None)
    return for_model(model) if for_model is not None else batches_fn()


def sample_images(images, model: nn.Module, setting: Setting) -> Optional[torch.Tensor]:
    """The sample images ``setting`` patches ``model`` with: ``images``, or from a function of the model its own;
    None for a setting whose method chooses nothing from images."""
    spec = patch_spec(setting)
    if spec is None or not method_class(str(spec.get("method", "evit"))).needs_images:
        return None
    return images(model) if callable(images) else images


def evaluate(
    models: dict[str, nn.Module],
    settings: Sequence[tuple[str, Setting]],
    batches_fn,
    locations: Optional[Sequence[int]] = None,
    speed_batch: int = 64,
    speed_reps: int = 10,
    images: Union[torch.Tensor, Callable[[nn.Module], torch.Tensor], None] = None,
    device: Optional[str] = None,
) -> list[dict]:
    """One row per (model name, setting) in ``settings``: top-1, top-5, GMACs, images/s, speed-up, and
    top-1's gap to the first row with its 95% interval (``top1_gap``, ``top1_gap_ci``; same images).

    A setting is a keep rate (EViT; 1.0 is the unpatched model) or ``evit.patch`` arguments such as
    ``{"method": "tome", "r": 4}``. ``batches_fn()`` yields fresh evaluation batches (as each model reads images,
    from a source with ``for_model``: :func:`fresh_batches`), resized to each
    model's input size where they differ (:func:`sized`). Speed is over the first model unpatched,
    timed once per input size and setting (:func:`speedups`). ``images``: calibration images for
    methods that need them (Patch Slimming), at the models' input size; or a function giving a model's own (read
    as it reads images), asked only for the settings that need them.
    ``device``: where the models run (:func:`evit.models.resolve_device`: default the GPU when there
    is one); each model is patched and its GMACs counted on the CPU, then moved there and back.
    """
    from .weights import check_finite

    dev = resolve_device(device)
    for name in dict.fromkeys(n for n, _ in settings):  # before anything runs: NaN weights score plausibly
        check_finite(models[name], f"model {name!r}")
    speed = speedups([(models[n], s) for n, s in settings], speed_batch, speed_reps, locations, dev)
    rows, reference = [], None
    for (name, setting), (ips, up) in zip(settings, speed):
        model = models[name].cpu()
        apply_setting(model, setting, locations, sample_images(images, model, setting))
        macs = count_macs(model) / 1e9
        fusion = next((m.fusion for m in reductions(model).values() if getattr(m, "fuse", False)
                       and hasattr(m, "fusion")), None)  # what EViT ran with: the setting's, the checkpoint's or the default
        what = f"model {name!r} ({_label(patch_spec(setting))})"
        right, right5 = hits(model.to(dev), sized(fresh_batches(batches_fn, model), model), what)
        reference = right if reference is None else reference
        gap, gap_ci = paired_gap(right, reference) or (None, None)
        release(model.cpu())
        spec = patch_spec(setting) or {}
        rows.append(dict(model=name, method=str(spec.get("method", "evit" if spec else "none")),
                         keep_rate=spec.get("keep_rate", 1.0 if not spec else None),
                         settings={**{k: v for k, v in spec.items() if k != "method"},
                                   **({"fusion": fusion} if fusion else {})},
                         top1=percent(right), top5=percent(right5),
                         images=len(right), gmacs=macs, images_per_s=ips, speedup=up,
                         top1_gap=gap, top1_gap_ci=gap_ci))
    return rows


def setting_text(row: dict) -> str:
    """'0.70' for a keep rate, 'r=4' and the like for other settings."""
    if row.get("keep_rate") is not None:
        return f"{row['keep_rate']:.2f}"
    return " ".join(f"{k}={v}" for k, v in row.get("settings", {}).items() if k != "locations") or "-"


def format_rows(rows: list[dict]) -> str:
    """A text table; with a method column when the rows are not all EViT keep rates, and top-1's gap
    to the first row (95% interval) when the rows have it."""
    methods = any(r.get("method", "evit") not in ("evit", "none") for r in rows)
    gaps = len(rows) > 1 and any(r.get("top1_gap") is not None for r in rows[1:])
    head = ["model"] + (["method", "setting"] if methods else ["keep"]) + \
        ["top-1 %", "top-5 %", "images", "GMACs", "img/s", "speed-up"] + (["top-1 vs row 1"] if gaps else [])
    return text_table(head, [[r["model"]] + ([r["method"]] if methods else []) + [setting_text(r)] +
                             [percent_text(r["top1"]), percent_text(r["top5"]), str(r["images"]), f"{r['gmacs']:.4f}",
                              f"{r['images_per_s']:.0f}", f"{r['speedup']:.2f}x"] +
                             ([gap_text(r) if i else "-"] if gaps else []) for i, r in enumerate(rows)])


def gap_text(row: dict) -> str:
    """'-0.53 [-0.86, -0.20]': the gap in points and its 95% interval; '-' where there is none."""
    if row.get("top1_gap") is None:
        return "-"
    gap, half = row["top1_gap"], row["top1_gap_ci"]
    return f"{gap:+.2f} [{gap - half:+.2f}, {gap + half:+.2f}]"
