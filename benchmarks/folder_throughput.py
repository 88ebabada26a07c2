"""Folder-training throughput at 32 px: before the fix against after, same machine, one run.

Before: a folder was read at the input size of the model's *pretrained config* (224 px: timm's
random-resized crop to 224, tensors of 224 x 224) and every batch shrunk to the model's 32 px
afterwards (bilinear). After: timm's transform is made for the size the model was built at (32 px),
so nothing is made at 224 and nothing is shrunk. Both paths use the same loader, the same images
and the same model and training step, so the ratio is the cost of the 224 px detour.

The two are interleaved (old, new, new, old, ...), each after a warm-up pass; the figures are medians
over rounds, and the speed-up is the median of the per-round ratios. Images per second are given
per second of wall time and per second of this process's CPU time: on a machine shared with other
work the wall-clock figures swing with the load, the CPU-time ones much less (one thread, loading
in this process, so every cycle spent is counted). Not a test: run it by hand.

    PYTHONPATH=src python benchmarks/folder_throughput.py --rounds 5 --batches 4
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image

from evit.budget import resize_images
from evit.embedded import test_subset
from evit.folders import class_list, read_split
from evit.images import split_loader

TINY32 = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2, "num_classes": 10}


def write_folder(root: Path, per_class: int) -> Path:
    """train/ of 32x32 RGB JPEGs from the bundled Fashion-MNIST images, ``per_class`` of each class."""
    images, labels = test_subset()
    images, labels = images[:, 0].numpy(), labels.numpy()
    for c in range(10):
        folder = root / "train" / f"c{c}"
        folder.mkdir(parents=True)
        for i in np.flatnonzero(labels == c)[:per_class]:
            Image.fromarray(images[i]).resize((32, 32), Image.BILINEAR).convert("RGB").save(folder / f"{i}.jpg")
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", type=int, default=6, help="training steps timed per path and round")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0, help="loader processes (the same for both paths)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", **TINY32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with tempfile.TemporaryDirectory() as tmp:
        root = write_folder(Path(tmp), per_class=args.batch_size * args.batches // 10 + 1)
        names, source = class_list(root, 10)
        split = read_split(root / "train", names, source)
        pretrained = tuple(model.pretrained_cfg["input_size"])  # (3, 224, 224): what the old path read at
        loaders = {"before (224 px, shrunk)": split_loader(split, model, args.batch_size, True, pretrained,
                                                            workers=args.workers),
                   "after (32 px)": split_loader(split, model, args.batch_size, True, workers=args.workers)}

        def one_pass(loader, epoch: int) -> tuple[float, float]:
            """(images per wall second, per CPU second) over ``args.batches`` training steps (load, resize
            when needed, forward, backward, update)."""
            seen, start, cpu = 0, time.perf_counter(), time.process_time()
            for step, (x, y) in enumerate(loader.batches(epoch)):
                x = resize_images(x, 32)
                loss = torch.nn.functional.cross_entropy(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                seen += len(x)
                if step + 1 == args.batches:
                    break
            return seen / (time.perf_counter() - start), seen / (time.process_time() - cpu)

        names_ = list(loaders)
        for name in names_:  # warm-up
            one_pass(loaders[name], 0)
        rates = {name: [] for name in names_}
        for r in range(args.rounds):
            for name in (names_ if r % 2 == 0 else names_[::-1]):
                rates[name].append(one_pass(loaders[name], r + 1))
    print(f"folder training at 32 px: vit_tiny_patch16_224 {TINY32}, batch {args.batch_size}, "
          f"{args.batches} steps x {args.rounds} rounds (interleaved, after a warm-up), workers {args.workers}, "
          f"{torch.get_num_threads()} threads")
    for i, clock in enumerate(("wall", "CPU")):
        ratios = [a[i] / b[i] for a, b in zip(rates[names_[1]], rates[names_[0]])]
        for name in names_:
            values = [v[i] for v in rates[name]]
            print(f"  {clock:4s} {name:24s} median {statistics.median(values):7.0f} img/s  "
                  f"(rounds: {', '.join(f'{v:.0f}' for v in values)})")
        print(f"  {clock:4s} speed-up after/before: median of per-round ratios {statistics.median(ratios):.2f}x "
              f"(range {min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()
