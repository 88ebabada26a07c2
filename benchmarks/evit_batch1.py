"""Where EViT's batch-1 time goes beside its ideal, on DeiT-S (random weights), one interleaved run.

Three variants of the same model, switched before each call, timed in rotated order (medians, paired
ratios): EViT at keep 0.7; its ideal (the same token counts cut by slicing); and the ideal that also
computes the class token's attention row (what EViT ranks by), which splits EViT's extra time into
the row and the selection with fusion.

    python benchmarks/evit_batch1.py --reps 300
"""
import argparse
import statistics

import timm
import torch

import evit
from evit.methods import Slice
from evit.patch import apply
from evit.timing import paired_ratio, steady_allocator, time_interleaved


class RowThenSlice(Slice):
    """The ideal's slicing, after computing the class token's attention row as EViT does."""

    needs_cls_attn = True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=300)
    p.add_argument("--keep-rate", type=float, default=0.7)
    args = p.parse_args()
    steady_allocator()
    torch.manual_seed(0)
    model = timm.create_model("deit_small_patch16_224").eval()
    locations = evit.default_locations(len(model.blocks))
    x = torch.randn(1, 3, 224, 224)
    variants = {
        "evit": lambda: evit.patch(model, args.keep_rate),
        "ideal": lambda: evit.patch(model, args.keep_rate, method="slice", fuse=True),
        "ideal + class-token row": lambda: apply(model, {i: RowThenSlice(args.keep_rate, True) for i in locations}),
    }
    with torch.inference_mode():
        times = time_interleaved({k: (lambda: model(x)) for k in variants}, args.reps, 5,
                                 setup=lambda k: variants[k]())
    ideal = statistics.median(times["ideal"])
    for name, t in times.items():
        print(f"{name:<24} {statistics.median(t) * 1e3:7.2f} ms  {1e3 * (statistics.median(t) - ideal):+6.2f} ms  "
              f"ideal's time / this: {paired_ratio(times['ideal'], t):.1%}")


if __name__ == "__main__":
    main()
