"""The ``evit`` command: argument parsing only; the work is done by the library."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence


def _keep_rate(text: str) -> float:
    try:
        r = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"keep rate must be a number in (0, 1], got {text!r}") from None
    if not 0.0 < r <= 1.0:
        raise argparse.ArgumentTypeError(f"keep rate must be in (0, 1], got {r}")
    return r


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {n}")
    return n


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="deit_small_patch16_224", help="timm model name (default: %(default)s)")
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
    return parser


def _bench(args) -> int:
    import torch

    from .bench import bench, format_table
    from .models import create_model

    if args.threads:
        torch.set_num_threads(args.threads)
    model = create_model(args.model, pretrained=args.pretrained, checkpoint=args.checkpoint)
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
        return {"bench": _bench}[args.command](args)
    except (ValueError, TypeError, RuntimeError, FileNotFoundError) as e:
        print(f"evit {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
