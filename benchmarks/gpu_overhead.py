"""Why a patched model falls short of its ideal on a GPU: host time, kernel launches and syncs per forward.

A GPU forward is either device-bound (the kernels take longer than Python takes to queue them) or
host-bound (the GPU waits for the next launch). Token reduction removes device work only, so in the
host-bound regime (small batches; bfloat16, which makes the kernels fast) every op a method adds costs
its host time in full. :func:`overhead_step` measures, for the unpatched model, EViT, its ideal and ToMe,
side by side:

- ``host_ms``: time for ``model(x)`` to return, the GPU idle at the start (queueing only, no wait);
- ``wall_ms``: time until the GPU has finished (synchronised);
- ``host_bound``: the queueing took at least 90% of the wall time;
- ``ops``: ATen ops per forward (each one Python-to-C++ dispatch), ``kernels``: GPU kernels per forward
  (PyTorch's profiler), ``syncs``: the host-device synchronisations a forward makes
  (``torch.cuda.set_sync_debug_mode``; none is expected).

Used by ``benchmarks/gpu.py`` (step ``overhead``); its ``--quick`` mode runs it on the CPU, where
``kernels`` and ``syncs`` are not measured.
"""
from __future__ import annotations

import statistics
import time
import warnings

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import evit
from evit import hosts
from evit.bench import patch_ideal

KEEP = 0.7


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def _kernels(model, x) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        model(x)
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def _syncs(model, x) -> list[str]:
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            model(x)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    found = {str(w.message).splitlines()[0][:160] for w in caught}
    return sorted(m for m in found if "synchroniz" in m.lower() and "prototype feature" not in m)  # not the mode's own notice


def overhead_step(run, device: torch.device, cfg: dict, model_fn, autocast) -> list[dict]:
    """Per (dtype, batch size) of ``cfg['overhead']``: the four variants' host and wall time, ops, kernels, syncs."""
    model = model_fn(next(iter(cfg["models"].values()))).to(device)
    size = hosts.adapter(model).input_size
    r = max(cfg["tome_r"])
    variants = {"unpatched": lambda: evit.unpatch(model), "ideal": lambda: patch_ideal(model, {"method": "evit", "keep_rate": KEEP}),
                "evit": lambda: evit.patch(model, KEEP), "tome": lambda: evit.patch(model, method="tome", r=r)}
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    rows = []
    for dtype, bs in cfg["overhead"]:
        x = torch.randn(bs, *size, device=device)
        host: dict[str, list[float]] = {k: [] for k in variants}
        wall: dict[str, list[float]] = {k: [] for k in variants}
        with torch.inference_mode(), autocast(device, dtype):
            for rep in range(-cfg["warmup"], cfg["reps"] * 2):
                for name in variants:
                    variants[name]()
                    sync()
                    t0 = time.perf_counter()
                    model(x)
                    t1 = time.perf_counter()
                    sync()
                    t2 = time.perf_counter()
                    if rep >= 0:
                        host[name].append(t1 - t0)
                        wall[name].append(t2 - t0)
            for name, switch in variants.items():
                switch()
                with _CountOps() as counter:
                    model(x)
                h, w = statistics.median(host[name]) * 1e3, statistics.median(wall[name]) * 1e3
                row = dict(dtype=dtype, batch_size=bs, variant=name, host_ms=h, wall_ms=w, host_bound=h >= 0.9 * w,
                           ops=counter.count, kernels=_kernels(model, x) if cuda else None,
                           syncs=_syncs(model, x) if cuda else None)
                rows.append(row)
                run.say(f"{dtype} b{bs} {name:<10} host {h:7.2f} ms  wall {w:7.2f} ms  "
                        f"{'host-bound' if row['host_bound'] else 'device-bound':<12}  {row['ops']:4d} ops"
                        + (f"  {row['kernels']:4d} kernels  syncs: {', '.join(row['syncs']) or 'none'}" if cuda else ""))
        evit.unpatch(model)
    return rows
