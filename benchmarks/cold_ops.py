"""Why EViT's small ops cost more inside a forward than in a loop: they run cold.

Inside a forward at batch 1, each reducing block computes the class token's attention row (three small
ops) right after the block's attention; the matrix products of the blocks before have evicted the code
and data those ops need. This times, inside real forwards of DeiT-S's shape, the row computed twice in a
row in the first reducing block: the first call pays the cold caches, the second finds them warm.

    python benchmarks/cold_ops.py                     # transformers' ViT in DeiT-S shape (random weights)
    python benchmarks/cold_ops.py --timm              # timm's DeiT-S
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
    attention = sys.modules["evit.attention"]
    patch_module = sys.modules["evit.patch"]
    first, second, attend = [], [], attention.attend

    def attend_twice(attn, x, **kwargs):
        if kwargs.get("cls_attn") and x.shape[1] == 197:  # the first reducing block: its row, twice
            view = attention._view(attn)
            q, k, _ = view.project(x)
            for times in (first, second):
                t = time.perf_counter()
                q0, kt = q[:, :, :1].flatten(0, 1), k.transpose(-2, -1).flatten(0, 1)
                row = torch.baddbmm(q0[..., :1], q0, kt, beta=0, alpha=view.scale).view(1, q.shape[1], -1)
                row.softmax(dim=-1).mean(dim=1)
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


if __name__ == "__main__":
    sys.exit(main())
