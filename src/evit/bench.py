"""Timing methodology: warm-up, repetitions interleaved between variants, medians, ratios.

Speed is always a ratio measured side by side in one run: every repetition times
each variant once (order rotated), each ratio pairs calls made moments apart, and
the median over repetitions is reported, so load and clock swings of a shared
machine hit every variant alike. Each keep rate is measured twice:
as EViT, and as the *ideal*, the same token counts cut by plain slicing
(:class:`evit.methods.Slice`), the limit of any implementation.
"""
from __future__ import annotations

import statistics
import sys
import time
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from .cost import count_macs, native_input_size
from .methods import EViT, Slice
from .patch import check_model, patch, token_counts, unpatch


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    reps: int,
    warmup: int = 1,
    progress: Optional[Callable[[int, int], None]] = None,
    setup: Optional[Callable[[str], None]] = None,
) -> dict[str, list[float]]:
    """Seconds of every timed call of each function, by repetition; calls interleaved, order
    rotated every repetition. ``setup(name)``, if given, runs untimed before each call.
    """
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(-warmup, reps):
        order = names[rep % len(names):] + names[: rep % len(names)]
        for name in order:
            if setup:
                setup(name)
            t0 = time.perf_counter()
            fns[name]()
            if rep >= 0:
                times[name].append(time.perf_counter() - t0)
        if progress and rep >= 0:
            progress(rep + 1, reps)
    return times


def paired_ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """Median over repetitions of num[i] / den[i]: each ratio pairs calls made moments apart, so
    slow swings of a shared machine's speed cancel out instead of adding noise."""
    return statistics.median(a / b for a, b in zip(num, den))


def steady_allocator() -> bool:
    """Keep freed memory in the process (glibc): without this, every large activation is a fresh
    mmap whose pages the kernel zeroes on first touch, which costs a quarter of a ViT forward on
    CPU and varies from call to call. Applies to every variant alike. True if applied."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))
    except (OSError, AttributeError):
        return False


def _stderr_progress(label: str) -> Callable[[int, int], None]:
    def show(done: int, total: int) -> None:
        end = "\n" if done == total else ""
        print(f"\r{label}: {done}/{total}", end=end, file=sys.stderr, flush=True)

    return show


@torch.inference_mode()
def bench(
    model: nn.Module,
    keep_rates: Sequence[float] = (1.0, 0.7, 0.5),
    batch_size: int = 32,
    reps: int = 10,
    latency_reps: int = 30,
    warmup: int = 2,
    locations: Optional[Sequence[int]] = None,
    input_size: Optional[Sequence[int]] = None,
    progress: bool = True,
) -> list[dict]:
    """Measure the unpatched model and, per keep rate, EViT and its ideal. One row per keep rate.

    ``model`` must be unpatched; it is patched and unpatched in turn and returned unpatched.
    """
    if batch_size < 1 or reps < 1 or latency_reps < 1:
        raise ValueError("batch_size, reps and latency_reps must be at least 1")
    check_model(model)
    model = model.eval()
    steady_allocator()
    input_size = tuple(input_size or native_input_size(model))
    # Every variant is the same model object with its patch switched in before each call: the
    # weights sit at the same addresses for all, so copies' memory layout cannot bias the ratios.
    variants: dict[str, Callable[[], object]] = {"unpatched": lambda: unpatch(model)}
    for r in keep_rates:
        variants[f"evit@{r}"] = lambda r=r: patch(model, r, locations, method=EViT)
        variants[f"ideal@{r}"] = lambda r=r: patch(model, r, locations, method=Slice)

    results, macs, counts = {}, {}, {}
    n_tokens = model.patch_embed.num_patches + model.num_prefix_tokens
    for name, switch in variants.items():
        switch()
        macs[name], counts[name] = count_macs(model, input_size), token_counts(model, n_tokens)
    for label, bs, n in (("throughput", batch_size, reps), ("latency", 1, latency_reps)):
        x = torch.randn(bs, *input_size)
        results[label] = time_interleaved(
            {name: (lambda: model(x)) for name in variants}, n, warmup,
            _stderr_progress(f"{label} (batch {bs})") if progress else None,
            setup=lambda name: variants[name](),
        )
    unpatch(model)

    med = statistics.median
    T, L = results["throughput"], results["latency"]
    rows = [dict(variant="unpatched", keep_rate=None, gmacs=macs["unpatched"] / 1e9,
                 images_per_s=batch_size / med(T["unpatched"]), latency_ms=med(L["unpatched"]) * 1e3)]
    for r in keep_rates:
        e, i = f"evit@{r}", f"ideal@{r}"
        rows.append(dict(
            variant="evit", keep_rate=r, tokens=counts[e], gmacs=macs[e] / 1e9,
            images_per_s=batch_size / med(T[e]), speedup=paired_ratio(T["unpatched"], T[e]),
            ideal_speedup=paired_ratio(T["unpatched"], T[i]), of_ideal=paired_ratio(T[i], T[e]),
            latency_ms=med(L[e]) * 1e3, latency_speedup=paired_ratio(L["unpatched"], L[e]),
            latency_ideal_speedup=paired_ratio(L["unpatched"], L[i]), latency_of_ideal=paired_ratio(L[i], L[e]),
        ))
    return rows


def text_table(head: Sequence[str], cells: Sequence[Sequence[str]]) -> str:
    """Right-aligned columns under a header and a rule."""
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(head)]

    def line(cs: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) for c, w in zip(cs, widths))

    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(c) for c in cells])


def format_table(rows: list[dict], batch_size: int) -> str:
    head = ["variant", "keep", "tokens", "GMACs", f"img/s@{batch_size}", "speed-up", "ideal", "of ideal",
            "lat@1 ms", "speed-up@1", "ideal@1", "of ideal@1"]

    def f(r: dict, key: str, fmt: str, suffix: str = "") -> str:
        return format(r[key], fmt) + suffix if r.get(key) is not None else "-"

    cells = [[r["variant"], f(r, "keep_rate", ".2f"), "->".join(map(str, r.get("tokens", []))) or "-",
              f(r, "gmacs", ".2f"), f(r, "images_per_s", ".1f"), f(r, "speedup", ".2f", "x"),
              f(r, "ideal_speedup", ".2f"), f(r, "of_ideal", ".1%"), f(r, "latency_ms", ".1f"),
              f(r, "latency_speedup", ".2f"), f(r, "latency_ideal_speedup", ".2f"), f(r, "latency_of_ideal", ".1%")]
             for r in rows]
    return text_table(head, cells)
