"""Why EViT's small ops cost more inside a forward than in a loop: they run cold.

Inside a forward at batch 1, each reducing block computes the class token's attention row (a few small
ops, evit.attention.class_token_attention) beside the block's attention; the matrix products of the
blocks before have evicted the code and data those ops need. This times, inside real forwards of DeiT-S's shape, the row computed twice in a
row in the first reducing block: the first call pays the cold caches, the second finds them warm.

    python benchmarks/cold_ops.py                     # transformers' ViT in DeiT-S shape (random weights)
    python benchmarks/cold_ops.py --timm              # timm's DeiT-S
    python benchmarks/cold_ops.py --calls             # what one small op costs inside a forward

With ``--calls``, the ideal (keep 0.7, fused, cut by slicing) is timed beside itself with small ops added in each
of its three reducing blocks, interleaved: 5 or 20 adds on a (1, 197) tensor, 20 views, or 20 of a mix of
softmax, topk, index_select and mean; the extra time per forward over the calls added is what each costs there.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import evit
from evit.timing import steady_allocator


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--timm", action="store_true", help="timm's deit_small_patch16_224 instead of transformers' ViT")
    p.add_argument("--forwards", type=int, default=200)
    p.add_argument("--calls", action="store_true", help="time small ops added to the ideal's reducing blocks")
    args = p.parse_args(argv)
    steady_allocator()
    torch.manual_seed(0)
    if args.timm:
        import timm

        model = timm.create_model("deit_small_patch16_224").eval()
    else:
        from evit.models import create_model

        model = create_model("hf:vit:hidden_size=384,num_hidden_layers=12,num_attention_heads=6,"
                             "intermediate_size=1536").eval()
    if args.calls:
        return time_calls(model, args.forwards)
    attention = sys.modules["evit.attention"]
    patch_module = sys.modules["evit.patch"]
    first, second, attend = [], [], attention.attend

    def attend_twice(attn, x, **kwargs):
        if kwargs.get("cls_attn") and x.shape[1] == 197:  # the first reducing block: its row, twice
            view = attention._view(attn)
            q, k, _ = view.project(x)
            for times in (first, second):
                t = time.perf_counter()
                attention.class_token_attention(q, k, view.scale, prefix_first=1)
                times.append(time.perf_counter() - t)
        return attend(attn, x, **kwargs)

    patch_module.attend = attend_twice
    evit.patch(model, 0.7)
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        for _ in range(args.forwards):
            model(x)
    cold, warm = statistics.median(first[5:]) * 1e6, statistics.median(second[5:]) * 1e6
    print(f"{'timm DeiT-S' if args.timm else 'transformers ViT, DeiT-S shape'}, batch 1, {torch.get_num_threads()} "
          f"threads, {args.forwards} forwards: the class token's row in the first reducing block takes {cold:.0f} us "
          f"the first time and {warm:.0f} us right after (median)")
    return 0


def time_calls(model, forwards: int) -> int:
    """Per-call cost of small ops inside a batch-1 forward: the ideal with calls added in its reducing blocks."""
    from evit.methods.slice import Slice
    from evit.timing import time_interleaved

    plain, small, picks = Slice.forward, torch.randn(1, 197), torch.tensor([1, 2])

    def adding(kind: str, n: int):
        def forward(self, x, seen):
            for _ in range(n if kind != "mix" else n // 4):
                if kind == "add":
                    torch.add(small, 1.0)
                elif kind == "view":
                    x.view(x.shape)
                else:
                    small.softmax(-1), small.topk(5, dim=1), small.index_select(1, picks), small.mean(0)
            return plain(self, x, seen)
        return forward

    variants = {"ideal": (plain, 0), "5 adds": (adding("add", 5), 5), "20 adds": (adding("add", 20), 20),
                "20 views": (adding("view", 20), 20), "20 mixed": (adding("mix", 20), 20)}

    def setup(name: str) -> None:
        Slice.forward = variants[name][0]
        evit.patch(model, 0.7, method="slice", fuse=True)

    x = torch.randn(1, 3, 224, 224)
    try:
        with torch.inference_mode():
            times = time_interleaved({k: (lambda: model(x)) for k in variants}, forwards, 5, setup=setup)
    finally:
        Slice.forward = plain
    base = statistics.median(times["ideal"])
    print(f"batch 1, {torch.get_num_threads()} threads, {forwards} forwards each, interleaved; calls added in each of "
          "the 3 reducing blocks of the ideal (keep 0.7)")
    for name, (_, n) in variants.items():
        extra = statistics.median(times[name]) - base
        each = f", {extra / (3 * n) * 1e6:.1f} us a call" if n else ""
        print(f"{name:>9}: {statistics.median(times[name]) * 1e3:.2f} ms a forward, {extra * 1e3:+.2f} ms{each}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
