"""The ``evit`` command: argument parsing only; the work is done by the library."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence


def _keep_rate(text: str) -> float:
    from .methods.base import check_keep_rate

    try:
        return check_keep_rate(float(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e) if "keep_rate" in str(e) else f"keep rate must be a number, got {text!r}")


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {n}")
    return n


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="timm model name (default: the embedded Fashion-MNIST ViT)")
    p.add_argument("--pretrained", action="store_true", help="load timm's pretrained weights (needs the network or a cache)")
    p.add_argument("--checkpoint", help="load weights from a local .safetensors or torch checkpoint")
    p.add_argument("--locations", type=int, nargs="+", help="0-based blocks that reduce (default: 1/4, 1/2, 3/4 of depth)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evit", description="Faster Vision Transformers by token reorganisation (EViT).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("bench", help="images/s, batch-1 latency, GMACs and speed-up (with the ideal) per keep rate")
    _add_model_args(p)
    p.add_argument("--keep-rates", type=_keep_rate, nargs="+", default=[1.0, 0.7, 0.5])
    p.add_argument("--batch-size", type=_positive, default=32)
    p.add_argument("--reps", type=_positive, default=10, help="timed repetitions at --batch-size (default: %(default)s)")
    p.add_argument("--latency-reps", type=_positive, default=30, help="timed repetitions at batch 1 (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=_positive, help="torch threads (default: torch's choice)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")

    p = sub.add_parser("train", help="train or fine-tune a timm ViT with EViT (keep rate warmed up from 1)")
    p.add_argument("--recipe", help="bundled recipe name (fashion_mnist_baseline, fashion_mnist_evit07) or JSON file")
    p.add_argument("--model", help="timm model name (overrides the recipe)")
    p.add_argument("--pretrained", action="store_true", default=None)
    p.add_argument("--init", help="local weights to start from (fine-tuning)")
    p.add_argument("--data", help="'fashion-mnist' or an ImageNet-style folder with train/ and val/")
    p.add_argument("--data-root", help="folder with the Fashion-MNIST idx files (default: Debian's)")
    p.add_argument("--download", action="store_true", default=None, help="download Fashion-MNIST with torchvision")
    p.add_argument("--epochs", type=_positive)
    p.add_argument("--max-steps", type=_positive, help="stop after this many optimizer steps in all")
    p.add_argument("--batch-size", type=_positive)
    p.add_argument("--lr", type=float)
    p.add_argument("--keep-rate", type=_keep_rate, help="target keep rate (< 1 patches the model with EViT)")
    p.add_argument("--keep-warmup-epochs", type=float, help="cosine warm-up of the keep rate from 1 (0: none)")
    p.add_argument("--keep-warmup-start", type=float, help="epochs before the keep rate leaves 1")
    p.add_argument("--train-subset", type=_positive, help="use only the first N training images")
    p.add_argument("--ema-decay", type=float)
    p.add_argument("--out", help="run folder: checkpoints, config.json, model.safetensors")
    p.add_argument("--save-every", type=_positive, help="checkpoint every N steps (also at each epoch end)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("eval", help="top-1/top-5 with GMACs and speed-up per keep rate (default: the embedded model)")
    p.add_argument("--model", help="timm model name; default: the embedded Fashion-MNIST models")
    p.add_argument("--recipe", help="take the model name and its arguments from a recipe")
    p.add_argument("--pretrained", action="store_true")
    p.add_argument("--checkpoint", help="weights to evaluate (.safetensors or torch file)")
    p.add_argument("--data", help="'fashion-mnist' (full test set), 'bundled' (the embedded subset) or a folder with val/")
    p.add_argument("--data-root", help="folder with the Fashion-MNIST idx files")
    p.add_argument("--keep-rates", type=_keep_rate, nargs="+", help="default: 1.0 0.7 0.5")
    p.add_argument("--locations", type=int, nargs="+")
    p.add_argument("--batch-size", type=_positive, default=256)
    p.add_argument("--speed-reps", type=_positive, default=10)
    p.add_argument("--json", action="store_true")
    return parser


def _train(args) -> int:
    from .embedded import recipe_path
    from .train import TrainConfig, train

    overrides = {k: getattr(args, k) for k in ("model", "pretrained", "init", "data", "data_root", "download", "epochs",
                                              "max_steps", "batch_size", "lr", "keep_rate", "keep_warmup_epochs",
                                              "keep_warmup_start", "train_subset", "ema_decay", "out", "save_every")}
    if args.recipe:
        cfg = TrainConfig.from_file(str(recipe_path(args.recipe)), **overrides)
    elif args.model:
        cfg = TrainConfig(**{k: v for k, v in overrides.items() if v is not None})
    else:
        raise ValueError("give --recipe (e.g. fashion_mnist_baseline) or --model")
    result = train(cfg, resume=args.resume, progress=not args.no_progress)
    print(json.dumps(result))
    return 0


def _eval(args) -> int:
    from . import embedded
    from .data import TensorLoader, load_fashion_mnist
    from .evaluate import evaluate, format_rows
    from .models import create_model

    if args.model or args.recipe:
        name, kwargs = args.model, {}
        if args.recipe:
            recipe = json.loads(embedded.recipe_path(args.recipe).read_text())
            name, kwargs = args.model or recipe["model"], recipe.get("model_kwargs", {})
        label = name.split("/")[-1]
        models = {label: create_model(name, pretrained=args.pretrained, checkpoint=args.checkpoint, **kwargs)}
        settings = [(label, r) for r in (args.keep_rates or [1.0, 0.7, 0.5])]
    else:
        models = {"baseline": embedded.load_model("baseline"), "evit-finetuned": embedded.load_model("evit")}
        rates = args.keep_rates or [0.7, 0.5]
        settings = [("baseline", 1.0)] + [("baseline", r) for r in rates if r < 1] + \
                   [("evit-finetuned", r) for r in rates if r < 1]
    data = args.data or ("bundled" if not (args.model or args.recipe) else "fashion-mnist")
    if data == "bundled":
        images, labels = embedded.test_subset()
    elif data == "fashion-mnist":
        images, labels = load_fashion_mnist("test", args.data_root)
    else:
        from types import SimpleNamespace

        from .folders import folder_loaders

        cfg = SimpleNamespace(data=data, model=args.model, model_kwargs={}, batch_size=args.batch_size)
        val = folder_loaders(cfg)[1]
        rows = evaluate(models, settings, lambda: val.batches(0), args.locations, speed_reps=args.speed_reps)
        return _print_eval(args, rows, data, format_rows)
    loader = TensorLoader(images, labels, args.batch_size)
    rows = evaluate(models, settings, lambda: loader.batches(0), args.locations, speed_reps=args.speed_reps)
    return _print_eval(args, rows, data, format_rows)


def _print_eval(args, rows, data, format_rows) -> int:
    import torch

    if args.json:
        print(json.dumps({"data": data, "threads": torch.get_num_threads(), "rows": rows}, indent=2))
    else:
        print(f"data: {data}; speed-ups: ratios of medians over the unpatched model, measured in this run")
        print(format_rows(rows))
    return 0


def _bench(args) -> int:
    import torch

    from .bench import bench, format_table
    from .models import create_model

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model:
        model = create_model(args.model, pretrained=args.pretrained, checkpoint=args.checkpoint)
    else:
        from . import embedded

        model, args.model = embedded.load_model("baseline"), "embedded Fashion-MNIST ViT"
    rows = bench(model, args.keep_rates, args.batch_size, args.reps, args.latency_reps, args.warmup, args.locations)
    if args.json:
        print(json.dumps({"model": args.model, "batch_size": args.batch_size, "threads": torch.get_num_threads(),
                          "rows": rows}, indent=2))
    else:
        print(f"{args.model}, batch {args.batch_size}, {torch.get_num_threads()} threads; speed-ups are ratios of "
              f"medians over the unpatched model measured in this run")
        print(format_table(rows, args.batch_size))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"bench": _bench, "train": _train, "eval": _eval}[args.command](args)
    except (ValueError, TypeError, RuntimeError, FileNotFoundError) as e:
        print(f"evit {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
