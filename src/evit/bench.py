"""``evit bench``: a method's speed beside its ideal, on one model, in one interleaved run.

Speed is always a ratio measured side by side in one run (:mod:`evit.timing`). Each
setting is measured twice: as the method, and as the *ideal*, the same token counts cut
by plain slicing (:class:`evit.methods.Ideal`), the limit of any implementation.
"""
from __future__ import annotations

import statistics
import sys
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

from .cost import count_macs, native_input_size
from .methods import EViT, Ideal
from .models import resolve_device
from .patch import apply, check_model, patch, reductions, token_counts, unpatch
from .registry import method_class
from .timing import device_sync, paired_ratio, stderr_progress, steady_allocator, text_table, time_interleaved


def _settings(method: str, keep_rates: Optional[Sequence[float]], r_values: Optional[Sequence[int]]) -> list[dict]:
    """``evit.patch`` arguments per measured setting: keep rates, or merge counts (ToMe's ``r``), as the
    method's registered setting; its ``bench_grid`` when none are given."""
    cls = method_class(method)
    values = {"keep_rate": keep_rates, "r": r_values}[cls.setting] or cls.bench_grid
    return [{"method": method, cls.setting: v} for v in values]


def patch_ideal(model: nn.Module, spec: dict, locations: Optional[Sequence[int]] = None,
                images: Optional[torch.Tensor] = None) -> None:
    """Patch ``model`` with the ideal of ``spec``: that method's token counts, cut by slicing (``images``: sample
    images for a method that chooses from them, as :func:`evit.patch` takes)."""
    patch(model, **{"locations": locations, **spec}, images=images)
    apply(model, {i: Ideal(m) for i, m in reductions(model).items()})


@torch.inference_mode()
def bench(
    model: nn.Module,
    keep_rates: Optional[Sequence[float]] = None,
    batch_size: int = 32,
    reps: int = 10,
    latency_reps: int = 30,
    warmup: int = 2,
    locations: Optional[Sequence[int]] = None,
    input_size: Optional[Sequence[int]] = None,
    progress: bool = True,
    method: str = "evit",
    r_values: Optional[Sequence[int]] = None,
    device: Optional[str] = None,
) -> list[dict]:
    """Measure the unpatched model and, per setting, ``method`` and its ideal. One row per setting.

    Settings are ``keep_rates``, or for a method set by ``r`` (ToMe) the merge counts ``r_values``;
    by default the method's registered ``bench_grid`` (EViT: 1.0, 0.7, 0.5). ``model`` must be
    unpatched; it is patched and unpatched in turn and returned unpatched. ``device``: where to
    time (:func:`evit.models.resolve_device`: default the GPU when there is one); GMACs are counted
    on the CPU first, so they do not depend on the device's attention kernel.
    """
    if batch_size < 1 or reps < 1 or latency_reps < 1:
        raise ValueError("batch_size, reps and latency_reps must be at least 1")
    host = check_model(model, method)
    original = next(model.parameters()).device
    model = model.eval().cpu()
    steady_allocator()
    input_size = tuple(input_size or native_input_size(model))
    settings = _settings(method, keep_rates, r_values)
    # Every variant is the same model object with its patch switched in before each call: the
    # weights sit at the same addresses for all, so copies' memory layout cannot bias the ratios.
    variants: dict[str, Callable[[], object]] = {"unpatched": lambda: unpatch(model)}
    sample = torch.randn(4, *input_size)  # for methods that choose tokens from images: speed does not care which
    for j, spec in enumerate(settings):
        variants[f"method@{j}"] = lambda spec=spec: patch(model, **{"locations": locations, **spec}, images=sample)
        variants[f"ideal@{j}"] = lambda spec=spec: patch_ideal(model, spec, locations, sample)

    results, macs, counts = {}, {}, {}
    n_tokens = host.num_tokens(input_size[1:])
    for name, switch in variants.items():
        switch()
        macs[name], counts[name] = count_macs(model, input_size), token_counts(model, n_tokens)
    dev = resolve_device(device)
    if method_class(method).needs_images:  # patched on the CPU (Patch Slimming calibrates on the CPU sample), then moved
        def setup(name: str) -> None:
            model.cpu(), variants[name](), model.to(dev)
    else:  # patching only swaps classes: done in place on the device, with no copy of the weights each call
        model.to(dev)

        def setup(name: str) -> None:
            variants[name]()
    for label, bs, n in (("throughput", batch_size, reps), ("latency", 1, latency_reps)):
        x = torch.randn(bs, *input_size, device=dev)
        results[label] = time_interleaved(
            {name: (lambda: model(x)) for name in variants}, n, warmup,
            stderr_progress(f"{label} (batch {bs})") if progress else None, setup=setup, sync=device_sync(dev),
        )
    unpatch(model).to(original)

    med = statistics.median
    T, L = results["throughput"], results["latency"]
    rows = [dict(variant="unpatched", keep_rate=None, gmacs=macs["unpatched"] / 1e9,
                 images_per_s=batch_size / med(T["unpatched"]), latency_ms=med(L["unpatched"]) * 1e3)]
    for j, spec in enumerate(settings):
        e, i = f"method@{j}", f"ideal@{j}"
        rows.append(dict(
            variant=method, keep_rate=spec.get("keep_rate"), r=spec.get("r"), tokens=counts[e],
            gmacs=macs[e] / 1e9,
            images_per_s=batch_size / med(T[e]), speedup=paired_ratio(T["unpatched"], T[e]),
            ideal_speedup=paired_ratio(T["unpatched"], T[i]), of_ideal=paired_ratio(T[i], T[e]),
            latency_ms=med(L[e]) * 1e3, latency_speedup=paired_ratio(L["unpatched"], L[e]),
            latency_ideal_speedup=paired_ratio(L["unpatched"], L[i]), latency_of_ideal=paired_ratio(L[i], L[e]),
        ))
    return rows


def format_table(rows: list[dict], batch_size: int) -> str:
    head = ["variant", "setting", "tokens", "GMACs", f"img/s@{batch_size}", "speed-up", "ideal", "of ideal",
            "lat@1 ms", "speed-up@1", "ideal@1", "of ideal@1"]

    def f(r: dict, key: str, fmt: str, suffix: str = "") -> str:
        return format(r[key], fmt) + suffix if r.get(key) is not None else "-"

    cells = [[r["variant"], f(r, "keep_rate", ".2f") if r.get("r") is None else f"r={r['r']}", "->".join(map(str, r.get("tokens", []))) or "-",
              f(r, "gmacs", ".2f"), f(r, "images_per_s", ".1f"), f(r, "speedup", ".2f", "x"),
              f(r, "ideal_speedup", ".2f"), f(r, "of_ideal", ".1%"), f(r, "latency_ms", ".1f"),
              f(r, "latency_speedup", ".2f"), f(r, "latency_ideal_speedup", ".2f"), f(r, "latency_of_ideal", ".1%")]
             for r in rows]
    return text_table(head, cells)


#: what :func:`latency_backends` can run a model on
BACKENDS = ("eager", "compiled", "onnx")


def latency_backends(
    model: nn.Module,
    keep_rates: Union[float, Sequence[float]] = 0.7,
    reps: int = 30,
    warmup: int = 3,
    backends: Sequence[str] = BACKENDS,
    locations: Optional[Sequence[int]] = None,
    input_size: Optional[Sequence[int]] = None,
    progress: bool = True,
) -> list[dict]:
    """Batch-1 latency of the unpatched model and of EViT at each keep rate, on each backend:
    eager PyTorch, ``torch.compile`` (:func:`evit.export.compile_model`) and onnxruntime
    (:func:`evit.export.onnx_runner`). One row per (backend, variant).

    Same methodology as :func:`bench`: every variant is timed once per repetition, order
    rotated, medians and paired ratios reported. Eager variants share ``model``, switched
    by patching before each call; compiled and ONNX variants need their own copy each (a
    compiled graph or an onnxruntime session holds its own weights), built and warmed up
    before timing, so compile and export time is not counted; onnxruntime sessions run without
    spinning threads, which would slow the variant after them. ``speedup`` is over eager
    unpatched (or the first backend's unpatched), ``backend_speedup`` over the unpatched model
    on the same backend; ``max_abs_diff`` compares each output with eager PyTorch's.
    ``model`` must be unpatched; it is returned unpatched.
    """
    import copy

    from .export import compile_model, onnx_runner

    rates = [keep_rates] if isinstance(keep_rates, (int, float)) else list(keep_rates)
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown or not backends:
        raise ValueError(f"backends must be some of {', '.join(BACKENDS)}, got {list(backends)}")
    if reps < 1 or warmup < 0:
        raise ValueError("reps must be at least 1 and warmup at least 0")
    host = check_model(model)
    if not host.returns_tensor:
        raise ValueError(f"--backends compares timm models' outputs across backends; {host.name} ({host.library}) "
                         "returns an output object: time it with evit bench without --backends")
    model = unpatch(model).eval()
    steady_allocator()
    input_size = tuple(input_size or native_input_size(model))
    x = torch.randn(1, *input_size)
    kinds: dict[str, Optional[float]] = {"unpatched": None, **{f"evit@{r}": r for r in rates}}

    def switch(m: nn.Module, r: Optional[float]) -> nn.Module:
        return unpatch(m) if r is None else patch(m, r, locations, method=EViT)

    say = (lambda text: print(text, file=sys.stderr, flush=True)) if progress else (lambda text: None)
    fns: dict[str, Callable[[], object]] = {}
    setups: dict[str, Callable[[], object]] = {}
    counts, reference, outputs = {}, {}, {}
    n_tokens = host.num_tokens(input_size[1:])
    for kind, r in kinds.items():
        with torch.inference_mode():
            reference[kind] = switch(model, r)(x)
        counts[kind] = token_counts(model, n_tokens)
    for backend in backends:
        for kind, r in kinds.items():
            name = f"{backend}/{kind}"
            if backend == "eager":
                fns[name], setups[name] = (lambda: model(x)), (lambda r=r: switch(model, r))
                continue
            own = switch(copy.deepcopy(unpatch(model)), r)
            if backend == "compiled":
                say(f"compiling {kind} ...")
                fns[name] = (lambda f=compile_model(own): f(x))
            else:
                say(f"exporting {kind} to ONNX ...")
                # no spinning: idle onnxruntime workers busy-wait after a run and would take the
                # cores of whichever variant runs next (measured on DeiT-S, 2 cores: eager 137 ms
                # instead of 87, and each session slowing the other)
                runner = onnx_runner(own, spinning=False, input_size=input_size, dynamic_batch=False)
                fns[name] = (lambda f=runner: f(x))
            with torch.inference_mode():
                outputs[name] = fns[name]()  # compiles / warms the session, untimed
    with torch.inference_mode():
        times = time_interleaved(fns, reps, warmup, stderr_progress("latency (batch 1)") if progress else None,
                                 setup=lambda name: setups.get(name, lambda: None)())
    unpatch(model)

    base = "eager/unpatched" if "eager" in backends else f"{backends[0]}/unpatched"
    rows = []
    for name, t in times.items():
        backend, kind = name.split("/")
        out = outputs.get(name)
        rows.append(dict(
            backend=backend, variant="unpatched" if kinds[kind] is None else "evit", keep_rate=kinds[kind],
            tokens=counts[kind], latency_ms=statistics.median(t) * 1e3, speedup=paired_ratio(times[base], t),
            backend_speedup=paired_ratio(times[f"{backend}/unpatched"], t),
            max_abs_diff=None if out is None else (out.float() - reference[kind].float()).abs().max().item(),
        ))
    return rows


def format_backends_table(rows: list[dict]) -> str:
    head = ["backend", "variant", "keep", "tokens", "lat@1 ms", "speed-up", "vs own unpatched", "max |diff|"]

    def f(r: dict, key: str, fmt: str, suffix: str = "") -> str:
        return format(r[key], fmt) + suffix if r.get(key) is not None else "-"

    cells = [[r["backend"], r["variant"], f(r, "keep_rate", ".2f"), "->".join(map(str, r["tokens"])),
              f(r, "latency_ms", ".2f"), f(r, "speedup", ".2f", "x"), f(r, "backend_speedup", ".2f", "x"),
              f(r, "max_abs_diff", ".1e")] for r in rows]
    return text_table(head, cells)
