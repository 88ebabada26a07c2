"""Every ViT architecture in the installed timm: served (and correct) or refused with a reason.

For each architecture of timm's ViT modules (random weights, depth cut to 2 blocks so that the giant
ones fit; everything else as timm builds it, input size included):
- ``evit.check_model`` refuses it for each method with a TypeError/ValueError naming the reason,
  or lets the method serve it (average-pooled models: ToMe and Random drop only); any other
  exception is a failure;
- served: every method that serves it, at zero reduction, equals the unpatched model (max |diff|), and
  at a real reduction runs, gives finite logits, and the sequence lengths its blocks actually see
  equal ``evit.token_counts``; EViT at keep 0.7 (average-pooled models: ToMe, r=8) gives the same
  logits on timm's fused attention (``F.scaled_dot_product_attention``) as on its explicit attention
  (in float64, so that float32's last-bit differences cannot flip a near-tie in the ranking).
One architecture of each other transformer module is checked for a clear refusal.

    python benchmarks/timm_sweep.py --out docs/timm_sweep.txt

Exits non-zero when any architecture fails. Takes about 30 minutes on a 2-core CPU.
"""
from __future__ import annotations

import argparse
import collections
import sys
import time

import torch

import evit

SERVED_MODULES = ("vision_transformer", "deit", "vision_transformer_hybrid")
REFUSED_MODULES = ("vision_transformer_relpos", "vision_transformer_sam", "eva", "beit", "cait", "naflexvit",
                   "xcit", "crossvit", "pit", "levit", "volo", "tnt", "convit", "twins", "swin_transformer",
                   "hiera", "qwen3_vit", "gemma4_vit", "deepseek_vit", "vitamin", "tiny_vit", "mvitv2")
# method, settings at zero reduction, settings at a real reduction
METHODS = (
    ("evit", {"keep_rate": 1.0}, {"keep_rate": 0.7}),
    ("topk", {"keep_rate": 1.0}, {"keep_rate": 0.7}),
    ("random", {"keep_rate": 1.0, "seed": 0}, {"keep_rate": 0.7, "seed": 0}),
    ("tome", {"r": 0}, {"r": 8}),
    ("stvit", {"keep_rate": 1.0}, {"keep_rate": 0.5}),
    ("patchslimming", {"keep_rate": 1.0}, {"keep_rate": 0.7}),
    ("dynamicvit", {"keep_rate": 1.0}, {"keep_rate": 0.7}),
)
TOLERANCE = 1e-4


def architectures(modules: tuple[str, ...], per_module: int | None = None) -> list[tuple[str, str]]:
    import timm
    from timm.models import model_entrypoint

    found = collections.defaultdict(list)
    for name in timm.list_models():
        module = model_entrypoint(name).__module__.rsplit(".", 1)[-1]
        if module in modules:
            found[module].append(name)
    return [(m, n) for m in modules for n in found[m][:per_module]]


def build(name: str, depth: int, device: str = "cpu") -> torch.nn.Module:
    import timm

    torch.manual_seed(0)
    with torch.device(device):
        try:
            model = timm.create_model(name, pretrained=False, depth=depth)
        except (TypeError, ValueError):  # a constructor without a plain depth argument: as timm builds it
            model = timm.create_model(name, pretrained=False)
    # timm's init leaves LayerScale at 1e-5 and the head at zero: make every path show in the logits
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".gamma") or n.startswith("head"):
                p.normal_(0, 0.2)
    return model.eval()


def seen_lengths(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Logits, and the input length followed by the output length of each patched block."""
    lengths: dict[int, int] = {}
    hooks = [b.register_forward_hook(lambda mod, args, out, i=i: lengths.__setitem__(i, out.shape[1]))
             for i, b in enumerate(model.blocks)]
    first = model.blocks[0].register_forward_pre_hook(lambda mod, args: lengths.__setitem__(-1, args[0].shape[1]))
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        for h in hooks + [first]:
            h.remove()
    return out, [lengths[-1]] + [lengths[i] for i in sorted(evit.reductions(model))]


def check(name: str, depth: int) -> tuple[str, str]:
    """(status, detail): 'served' (by all methods or by those named), 'refused' or 'FAIL'."""
    try:  # the refusal needs only the structure: no weights (giant models build in no time)
        skeleton = build(name, depth, device="meta")
    except Exception:  # noqa: BLE001 - a constructor that computes on its weights
        skeleton = build(name, depth)
    served, reasons = [], {}
    for method, _, _ in METHODS:
        try:
            evit.check_model(skeleton, method)
            served.append(method)
        except (TypeError, ValueError) as e:
            reasons[method] = str(e).split(": ", 1)[-1]
    if not served:  # ToMe asks least of a model (no class token): its reason holds for every method
        return "refused", reasons["tome"]
    model = build(name, depth)
    cfg = model.pretrained_cfg or {}
    c, h, w = cfg.get("input_size", (3, 224, 224))
    torch.manual_seed(0)
    x = torch.randn(2, c, h, w)
    with torch.no_grad():
        ref = model(x)
    worst, counts = 0.0, {}
    for method, zero, reduced in METHODS:
        if method not in served:
            continue
        images = {"images": x} if method == "patchslimming" else {}
        evit.patch(model, method=method, **zero, **images)
        out, _ = seen_lengths(model, x)
        worst = max(worst, (out - ref).abs().max().item())
        evit.patch(model, method=method, **reduced, **images)
        out, seen = seen_lengths(model, x)
        expected = evit.token_counts(model, seen[0])
        if not torch.isfinite(out).all() or out.shape != ref.shape:
            return "FAIL", f"{method}: logits not finite or of shape {tuple(out.shape)}"
        if seen != expected:
            return "FAIL", f"{method}: blocks saw {seen} tokens, token_counts says {expected}"
        counts[method] = "->".join(map(str, seen))
    # The fused-attention path against timm's explicit one (with ToMe: its proportional-attention bias),
    # in float64: in float32 their last-bit differences can flip a near-tie in the ranking or matching.
    both = dict(keep_rate=0.7) if "evit" in served else dict(method="tome", r=8)
    model, x = model.double(), x.double()
    evit.patch(model, **both)
    fused = seen_lengths(model, x)[0]
    for block in model.blocks:
        block.attn.fused_attn = False
    paths = ((seen_lengths(model, x)[0] - fused).abs().max() / fused.abs().max()).item()  # relative
    evit.unpatch(model)
    lead = "evit 0.7" if "evit" in served else "tome r=8"
    if worst > TOLERANCE or paths > TOLERANCE:
        return "FAIL", f"zero reduction differs from unpatched by {worst:.1e}; fused from unfused by {paths:.1e} (relative)"
    return "served", (f"{'all methods' if len(served) == len(METHODS) else 'by ' + ', '.join(served) + ' only'}; "
                      f"zero reduction max|diff| {worst:.0e}; {lead} fused vs unfused attention {paths:.0e} "
                      f"(relative); tokens {lead}: {counts[lead.split()[0]]}")


def main(argv: list[str] | None = None) -> int:
    import timm

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--only", nargs="*", help="architecture names (default: all)")
    parser.add_argument("--out", help="also write the table here")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    names = architectures(SERVED_MODULES) + architectures(REFUSED_MODULES, per_module=1)
    if args.only:
        names = [(m, n) for m, n in names if n in args.only]
    lines, tally, start = [], collections.Counter(), time.time()
    for module, name in names:
        try:
            status, detail = check(name, args.depth)
        except Exception as e:  # noqa: BLE001 - a crash is what this sweep looks for
            status, detail = "FAIL", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        tally[status] += 1
        line = f"{name:<52} {module:<26} {status:<8} {detail}"
        lines.append(line)
        print(line, flush=True)
    head = (f"timm {timm.__version__}, torch {torch.__version__}, evit {evit.__version__}; random weights, depth "
            f"cut to {args.depth}; {len(names)} architectures in {time.time() - start:.0f} s: "
            + ", ".join(f"{v} {k}" for k, v in sorted(tally.items())))
    print(head)
    if args.out:
        with open(args.out, "w") as f:
            f.write(head + "\n" + "\n".join(lines) + "\n")
    return 1 if tally["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
