"""The ``evit`` command: argument parsing; :mod:`evit.commands` runs each subcommand over the library."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from .methods.evit import FUSIONS


class OneLineParser(argparse.ArgumentParser):
    """argparse reporting a bad argument in one line, what is wrong and where to look, without the usage block
    (subcommands' parsers are of the parser's class, so they report alike)."""

    def error(self, message: str):
        self.exit(2, _bad_arguments(self.prog, message))


def _bad_arguments(prog: str, message: str) -> str:
    return f"{prog}: error: {message} (see '{prog} --help')\n"


def _keep_rate(text: str) -> float:
    from .reduction import check_keep_rate

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


def _positive_float(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not 0 < x < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return x


def _add_budget_args(p: argparse.ArgumentParser, **keep_rates) -> None:
    """--img-size, and --keep-rates beside the budgets that replace it (the solver picks the rate)."""
    p.add_argument("--img-size", type=_positive, help="run at N x N px (position embeddings resampled; "
                                                       "Fashion-MNIST images resized bilinearly)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--keep-rates", type=_keep_rate, nargs="+", **keep_rates)
    g.add_argument("--match-macs", action="store_true",
                   help="keep rate: the largest at which the model costs no more MACs than unpatched at its native size")
    g.add_argument("--macs", type=_positive_float, metavar="G", help="keep rate: the largest within G GMACs")
    g.add_argument("--speedup", type=_positive_float, metavar="S",
                   help="keep rate: the largest within the native MACs / S (a MAC-ratio proxy for speed)")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="timm model name, or hf:TYPE[:key=value,...] / hf:FOLDER / hf:HUB_ID for a "
                   "transformers model (default: the embedded Fashion-MNIST ViT)")
    p.add_argument("--recipe", help="take the model name and its arguments from a recipe")
    p.add_argument("--pretrained", action="store_true", help="load timm's pretrained weights (needs the network or a cache)")
    p.add_argument("--checkpoint", help="load weights from a local .safetensors or torch checkpoint (a state dict, "
                                        "or a training checkpoint with one under 'model')")
    p.add_argument("--locations", type=int, nargs="+", help="0-based blocks that reduce (default: 1/4, 1/2, 3/4 of depth)")


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="timm model name, or hf:TYPE[:key=value,...] / hf:FOLDER / hf:HUB_ID for a "
                   "transformers model; default: the embedded Fashion-MNIST models")
    p.add_argument("--recipe", help="take the model name and its arguments from a recipe")
    p.add_argument("--pretrained", action="store_true")
    p.add_argument("--checkpoint", help="weights (.safetensors or torch file); with compare: the baseline's")
    p.add_argument("--data", help="'bundled' (the embedded subset; default with the embedded models), "
                                  "'fashion-mnist' (full test set) or a folder with val/")
    p.add_argument("--data-root", help="folder with the Fashion-MNIST idx files")
    p.add_argument("--workers", type=int, default=2, help="processes loading a folder's images (default: %(default)s)")
    _add_device_arg(p)


def _add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: the GPU when there is one)")


def build_parser() -> argparse.ArgumentParser:
    from .commands import BENCH_KEEP_RATES, SHOW_KEEP_RATE, SHOW_R
    from .registry import method_class, names

    methods = names()  # every registered method the command line offers (evit.registry)
    parser = OneLineParser(prog="evit", description="Faster Vision Transformers by token reorganisation (EViT).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("bench", help="images/s, batch-1 latency, GMACs and speed-up (with the ideal) per keep rate")
    _add_model_args(p)
    _add_budget_args(p, default=BENCH_KEEP_RATES, help="default: the method's own (EViT: 1.0 0.7 0.5)")
    p.add_argument("--batch-size", type=_positive, default=32)
    p.add_argument("--reps", type=_positive, default=10, help="timed repetitions at --batch-size (default: %(default)s)")
    p.add_argument("--latency-reps", type=_positive, default=30, help="timed repetitions at batch 1 (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=_positive, help="torch threads (default: torch's choice)")
    _add_device_arg(p)
    p.add_argument("--method", default="evit", choices=methods, help="(default: %(default)s)")
    p.add_argument("--r", type=int, nargs="+", help="ToMe: tokens merged per block, one row each (default: 8 13)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--backends", nargs="+", choices=["eager", "compiled", "onnx"],
                   help="instead: batch-1 latency of the unpatched model and EViT at each keep rate below 1 on these "
                        "backends (compiled: torch.compile; onnx: onnxruntime), with --latency-reps and --warmup; "
                        "on the CPU")

    p = sub.add_parser("show", help="pictures of the tokens each reduction stage kept (PNG)")
    p.add_argument("images", nargs="*", help="image files (default: bundled Fashion-MNIST test images)")
    _add_model_args(p)
    p.add_argument("--method", default="evit", choices=methods, help="(default: %(default)s)")
    p.add_argument("--keep-rate", type=_keep_rate, help=f"share of image tokens kept (default: {SHOW_KEEP_RATE})")
    p.add_argument("--r", type=int, help=f"ToMe: tokens merged per block (default: {SHOW_R})")
    p.add_argument("--count", type=_positive, default=4, help="bundled images to show (default: %(default)s)")
    p.add_argument("--out", default="evit_show.png", help="PNG to write (default: %(default)s)")

    p = sub.add_parser("train", help="train or fine-tune a timm ViT or a transformers image classifier with EViT "
                                     "(keep rate warmed up from 1)")
    p.add_argument("--recipe", help="bundled recipe name (fashion_mnist_baseline, ...; see evit/assets/recipes) or JSON file")
    p.add_argument("--model", help="timm model name, or hf:TYPE[:key=value,...] / hf:FOLDER / hf:HUB_ID for a "
                   "transformers image classifier (overrides the recipe)")
    p.add_argument("--pretrained", action="store_true", default=None)
    p.add_argument("--init", help="local weights to start from (fine-tuning; a head trained on other classes is "
                                  "left out: the model's is as wide as the data's classes)")
    p.add_argument("--data", help="'fashion-mnist' or an ImageNet-style folder with train/ and val/")
    p.add_argument("--data-root", help="folder with the Fashion-MNIST idx files (default: Debian's)")
    p.add_argument("--download", action="store_true", default=None, help="download Fashion-MNIST with torchvision")
    p.add_argument("--epochs", type=_positive)
    p.add_argument("--max-steps", type=_positive, help="stop after this many optimizer steps in all")
    p.add_argument("--batch-size", type=_positive)
    p.add_argument("--lr", type=float)
    p.add_argument("--keep-rate", type=_keep_rate, help="target keep rate (< 1 patches the model with EViT)")
    p.add_argument("--keep-rate-min", type=_keep_rate,
                   help="train on keep rates drawn per step from [this, --keep-rate] (one model for the range)")
    p.add_argument("--keep-warmup-epochs", type=float, help="cosine warm-up of the keep rate from 1 (0: none)")
    p.add_argument("--keep-warmup-start", type=float, help="epochs before the keep rate leaves 1")
    p.add_argument("--fusion", choices=FUSIONS, help="EViT's fused token: the authors' attention-weighted 'sum' "
                                                     "(default) or its renormalised 'mean'; recorded in the weights")
    p.add_argument("--distill", metavar="WEIGHTS",
                   help="also match the predictions of the unpatched model with these weights (soft targets)")
    p.add_argument("--train-subset", type=int, help="train on N images (Fashion-MNIST: the first N; a folder: a "
                                                    "seeded draw)")
    p.add_argument("--val-split", type=float, metavar="FRACTION",
                   help="validate on this share of train/ (a seeded draw) instead of val/ or the test set")
    p.add_argument("--eval-every", type=int, metavar="N", help="validate every N steps (default: each epoch end)")
    p.add_argument("--workers", type=int, help="processes loading a folder's images (default: 2; 0: this one)")
    p.add_argument("--ema-decay", type=float)
    p.add_argument("--bf16", action="store_true", default=None, help="autocast to bfloat16")
    _add_device_arg(p)
    p.add_argument("--out", help="run folder: checkpoints, config.json, model.safetensors")
    p.add_argument("--save-every", type=_positive, help="checkpoint every N steps (also at each epoch end)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--overwrite", action="store_true",
                   help="move a run already in --out aside (to OUT.old-<time>) and start afresh")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("eval", help="top-1/top-5 with GMACs, speed-up and top-1 gap to the first row (paired 95%% "
                       "interval) per keep rate (default: the embedded model)")
    _add_eval_args(p)
    _add_budget_args(p, help="default: 1.0 0.7 0.5")
    p.add_argument("--locations", type=int, nargs="+")
    p.add_argument("--fusion", choices=FUSIONS, help="EViT's fused token for every row: 'sum' (the authors') or "
                                                     "'mean' (default: what each checkpoint recorded, else 'sum')")
    p.add_argument("--batch-size", type=_positive, default=256)
    p.add_argument("--speed-reps", type=_positive, default=10)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("compare", help="token-reduction methods side by side: top-1, GMACs, speed-up; table and plot")
    _add_eval_args(p)
    p.add_argument("--methods", nargs="+", choices=methods, metavar="METHOD",
                   help=f"of {', '.join(methods)} (default: all that can serve the model)")
    p.add_argument("--keep-rates", type=_keep_rate, nargs="+",
                   help="instead of each keep-rate method's own (EViT: 0.9 0.8 0.7 0.6 0.5)")
    p.add_argument("--r", type=int, nargs="+", help="ToMe: tokens merged per block (default: 1 2 3 4 5 6)")
    p.add_argument("--trained", nargs="+", default=[], metavar="METHOD=WEIGHTS",
                   help="weights trained with a method (default with the embedded model: the bundled ones)")
    p.add_argument("--batch-size", type=_positive, default=256)
    p.add_argument("--speed-reps", type=_positive, default=10)
    p.add_argument("--plot", default="evit_compare.png", help="PNG to write (default: %(default)s)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("export", help="write the (EViT-patched) model as ONNX and check it with onnxruntime")
    p.add_argument("--onnx", required=True, metavar="FILE", help="ONNX file to write")
    _add_model_args(p)
    p.add_argument("--keep-rate", type=_keep_rate, default=0.7, help="1 exports the unpatched model (default: %(default)s)")
    p.add_argument("--method", choices=[m for m in methods if method_class(m).exports], default="evit",
                   help="topk: drop instead of fuse")
    p.add_argument("--fusion", choices=FUSIONS, help="EViT's fused token: 'sum' (the authors') or 'mean' "
                                                     "(default: what the checkpoint recorded, else 'sum')")
    p.add_argument("--batch-size", type=_positive, default=1, help="batch of the trace and the check (default: %(default)s)")
    p.add_argument("--static-batch", action="store_true", help="fix the batch axis at --batch-size (default: dynamic)")
    p.add_argument("--opset", type=_positive, help="ONNX opset (default: the exporter's)")
    return parser


def _one_line(e: BaseException) -> str:
    """An error's text; the operating system's own ("[Errno 2] No such file or directory: 'x'") as 'x: No such
    file or directory', the path first."""
    if isinstance(e, OSError) and e.errno is not None and e.filename is not None:
        return f"{e.filename}: {e.strerror}" + (f" (and {e.filename2})" if e.filename2 else "")
    return str(e)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .commands import COMMANDS
    from .runs import Interrupted

    try:
        parser = build_parser()
    except RuntimeError as e:  # a method plugin that fails to load (evit.registry)
        print(f"evit: error: {e}", file=sys.stderr)
        return 2
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # named under the subcommand given, whose options are the ones to look up
        parser.exit(2, _bad_arguments(f"evit {args.command}", f"unrecognized arguments: {' '.join(unknown)}"))
    try:
        return COMMANDS[args.command](args)
    except (ValueError, TypeError, RuntimeError, OSError) as e:
        print(f"evit {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except Interrupted as e:  # SIGINT / SIGTERM during training: 130 / 143, as the shell reports a signal
        print(f"evit {args.command}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"evit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
