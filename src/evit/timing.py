"""Timing methodology: warm-up, repetitions interleaved between variants, medians, paired ratios.

Speed is always a ratio measured side by side in one run: every repetition times
each variant once (order rotated), each ratio pairs calls made moments apart, and
the median over repetitions is reported, so load and clock swings of a shared
machine hit every variant alike. Shared by ``evit bench`` and ``evit eval``/``compare``,
with the text table their results print in.
"""
from __future__ import annotations

import statistics
import sys
import time
from typing import Callable, Optional, Sequence

import torch


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    reps: int,
    warmup: int = 1,
    progress: Optional[Callable[[int, int], None]] = None,
    setup: Optional[Callable[[str], None]] = None,
    sync: Optional[Callable[[], object]] = None,
) -> dict[str, list[float]]:
    """Seconds of every timed call of each function, by repetition; calls interleaved, order
    rotated every repetition. ``setup(name)``, if given, runs untimed before each call.
    ``sync()`` waits for queued work (a GPU's): it runs before the clock starts and before it stops.
    """
    sync = sync or (lambda: None)
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(-warmup, reps):
        order = names[rep % len(names):] + names[: rep % len(names)]
        for name in order:
            if setup:
                setup(name)
            sync()
            t0 = time.perf_counter()
            fns[name]()
            sync()
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


def device_sync(device: torch.device) -> Optional[Callable[[], None]]:
    """What :func:`time_interleaved` calls to wait for ``device``: CUDA runs asynchronously."""
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None


def stderr_progress(label: str) -> Callable[[int, int], None]:
    """Progress of repetitions on stderr: one line rewritten in place on a terminal; written to a file or a pipe,
    one plain line when done (a log holds no carriage returns)."""
    def show(done: int, total: int) -> None:
        if not sys.stderr.isatty():
            if done == total:
                print(f"{label}: {done}/{total}", file=sys.stderr, flush=True)
            return
        end = "\n" if done == total else ""
        print(f"\r{label}: {done}/{total}", end=end, file=sys.stderr, flush=True)

    return show


def text_table(head: Sequence[str], cells: Sequence[Sequence[str]]) -> str:
    """Right-aligned columns under a header and a rule."""
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(head)]

    def line(cs: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) for c, w in zip(cs, widths))

    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(c) for c in cells])
