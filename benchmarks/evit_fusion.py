"""EViT's two fusions side by side on the embedded models: top-1 on the bundled test images, paired.

For the baseline (EViT off the shelf) and the EViT-trained model (trained with fusion="mean") at
keep 0.7 and 0.5: top-1 with the authors' attention-weighted sum and with the renormalised mean, and
the paired difference with its 95% interval (both are scored on the same images). Accuracy only:
the two fusions cost the same (one division apart).

    python benchmarks/evit_fusion.py
"""
from __future__ import annotations

import evit
from evit import embedded
from evit.data import TensorLoader
from evit.evaluate import hits, paired_gap, percent


def main() -> None:
    images, labels = embedded.test_subset()
    loader = TensorLoader(images, labels, 256)
    print(f"embedded Fashion-MNIST models, bundled test subset ({len(labels)} images); top-1 %")
    print(f"{'model':>13}  keep    sum   mean  sum - mean (95%)")
    for kind, label in (("baseline", "baseline"), ("evit", "evit-trained")):
        model = embedded.load_model(kind)
        for rate in (0.7, 0.5):
            right = {}
            for fusion in ("sum", "mean"):
                evit.patch(model, rate, fusion=fusion)
                right[fusion] = hits(model, loader.batches(0))[0]
            gap, half = paired_gap(right["sum"], right["mean"])
            print(f"{label:>13}  {rate:.2f}  {percent(right['sum']):.2f}  {percent(right['mean']):.2f}  "
                  f"{gap:+.2f} [{gap - half:+.2f}, {gap + half:+.2f}]")
        evit.unpatch(model)


if __name__ == "__main__":
    main()
