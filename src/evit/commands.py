"""What each ``evit`` subcommand does, given its parsed arguments: load models and data, call the
library, print the result. Parsing lives in :mod:`evit.cli`."""
from __future__ import annotations

import contextlib
import io
import json
import os
import sys

#: bench's --keep-rates when none are given: this very list (compared by identity) stands for "the method's own"
BENCH_KEEP_RATES = [1.0, 0.7, 0.5]
SHOW_KEEP_RATE, SHOW_R = 0.7, 4  # evit show's settings when none is given


def _fit_budget(args, models):
    """Resize ``models`` to --img-size and solve the keep rate for a budget (None when neither is asked)."""
    from .budget import fit

    return fit(models, args.img_size, args.locations, args.match_macs, args.macs, args.speedup)


def _not_an_input(out: str, option: str, inputs: dict) -> None:
    """Refuse an output path that is a file this command reads ({what: path}): writing would destroy it."""
    for what, path in inputs.items():
        if path and os.path.isfile(out) and os.path.isfile(path) and os.path.samefile(out, path):
            raise ValueError(f"{option} {out} is {what} this command reads: writing there would destroy it; "
                             "give another file name")


def _say_if_untrained(args, label: str) -> None:
    """One line when an accuracy command scores a named model that no weights were given for: its library's
    random initialisation scores chance, which is true but rarely what was meant."""
    if (args.model or args.recipe) and not (args.pretrained or args.checkpoint):
        print(f"evit: no --checkpoint or --pretrained: {label} has random weights (its library's initialisation), "
              "so its accuracy is chance; give trained weights to measure them", file=sys.stderr)


def _say_if_trained_otherwise(models: dict) -> None:
    """One line for each model whose weights record training with a method eval's rows do not run (its keep-rate
    rows are EViT's; a learned method, DynamicViT, stays in place): scored so, they are not what the run validated."""
    from .checkpoint import TRAINED_WITH
    from .registry import method_class

    for label, model in models.items():
        method = (getattr(model, TRAINED_WITH, None) or {}).get("method")
        if method and method != "evit" and not method_class(method).learned:
            print(f"evit eval: {label}'s weights were trained with {method}, but eval's reduced rows run EViT; to score "
                  f"them as trained: evit compare --trained {method}=WEIGHTS --methods {method}", file=sys.stderr)


def _train(args) -> int:
    from .embedded import recipe_path
    from .train import TrainConfig, train

    overrides = {k: getattr(args, k) for k in ("model", "pretrained", "init", "data", "data_root", "download", "epochs",
                                              "max_steps", "batch_size", "lr", "keep_rate", "keep_rate_min", "keep_warmup_epochs",
                                              "keep_warmup_start", "train_subset", "ema_decay", "bf16", "device", "distill", "out",
                                              "save_every", "val_split", "eval_every", "workers", "fusion")}
    if args.recipe:
        cfg = TrainConfig.from_file(str(recipe_path(args.recipe)), **overrides)
    elif args.model:
        cfg = TrainConfig(**{k: v for k, v in overrides.items() if v is not None})
    else:
        raise ValueError("give --recipe (e.g. fashion_mnist_baseline) or --model")
    rank0 = int(os.environ.get("RANK", "0")) == 0
    # under torchrun every process runs the same set-up: its notes (a head resized, files skipped) are said once, by
    # rank 0; another rank's error still reaches the command line's handler, outside this redirect
    with contextlib.nullcontext() if rank0 else contextlib.redirect_stderr(io.StringIO()):
        result = train(cfg, resume=args.resume, progress=not args.no_progress, overwrite=args.overwrite)
    if rank0:  # every process returns; one answer is printed
        print(json.dumps(result))
    return 0


def _eval(args) -> int:
    import copy

    from .evaluate import evaluate, format_rows
    from .loading import load_model
    from .models import resolve_device

    device = resolve_device(args.device)  # a bad --device fails before any model is loaded
    if args.model or args.recipe:
        label, model = load_model(args.model, args.recipe, args.pretrained, args.checkpoint)
        models = {label: model}
        settings = [(label, r) for r in (args.keep_rates or [1.0, 0.7, 0.5])]
    else:
        models = {"baseline": load_model(pretrained=args.pretrained)[1], **_trained_model(args)}
        rates, trained = args.keep_rates or [0.7, 0.5], list(models)[1]
        settings = [("baseline", 1.0)] + [("baseline", r) for r in rates if r < 1] + \
                   [(trained, r) for r in rates if r < 1]
    native = copy.deepcopy(next(iter(models.values()))) if args.img_size else None  # before --img-size resizes
    choice = _fit_budget(args, models.values())
    if choice is not None and choice.keep_rate is not None:  # the solver's rate replaces --keep-rates
        names = list(models)
        settings = [(names[0], 1.0)] + [(n, choice.keep_rate) for n in names if choice.keep_rate < 1]
        if choice.img_size != choice.native_size:  # the first row: what the budget is spent against
            label = f"{names[0]} at {choice.native_size[0]}x{choice.native_size[1]}"
            models, settings = {label: native, **models}, [(label, 1.0)] + settings
    if args.fusion:  # every EViT row fuses this way, whatever the checkpoints recorded
        settings = [(n, {"keep_rate": r, "fusion": args.fusion} if r < 1 else r) for n, r in settings]
    data, batches = _eval_data(args, not (args.model or args.recipe), list(models.values()))
    _say_if_untrained(args, list(models)[0])  # once the data is accepted: a refusal stays one line
    if any(isinstance(r, dict) or r < 1 for _, r in settings):
        _say_if_trained_otherwise(models)
    rows = evaluate(models, settings, batches, args.locations, speed_reps=args.speed_reps, device=str(device))
    return _print_eval(args, rows, data, format_rows, choice)


def _trained_model(args) -> dict:
    """{label: model} beside the embedded baseline: the bundled EViT-trained model, or --checkpoint's
    weights (trained from a bundled recipe: the embedded architecture), built at --img-size when given
    so weights trained at that size load as they are."""
    from .loading import load_model

    label, model = load_model(checkpoint=args.checkpoint, img_size=args.img_size, kind="evit")
    return {label if args.checkpoint else "evit-trained": model.eval()}


def _print_eval(args, rows, data, format_rows, choice=None) -> int:
    import dataclasses

    import torch

    from .models import device_text, resolve_device

    device = resolve_device(args.device)
    if args.json:
        budget = {"budget": dataclasses.asdict(choice)} if choice is not None else {}
        print(json.dumps({"data": data, "device": str(device), "threads": torch.get_num_threads(), **budget,
                          "rows": rows}, indent=2))
    else:
        if choice is not None:
            print(choice.describe())
        print(f"data: {data}; on {device_text(device)}; speed-ups: ratios of medians over the unpatched model, "
              "measured in this run")
        print(format_rows(rows))
    return 0


def _bench(args) -> int:
    import torch

    from .bench import bench, format_table
    from .loading import keep_saved_choice, load_model, patch_for_weights
    from .models import device_text, resolve_device
    from .registry import check_settings_apply, method_class

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device if args.backends is None else "cpu")  # a bad --device fails first
    keep_rate_options = (("--keep-rates", args.keep_rates is not BENCH_KEEP_RATES), ("--macs", args.macs),
                         ("--speedup", args.speedup), ("--match-macs", args.match_macs))
    keep_rate_given = next((option for option, given in keep_rate_options if given), "")
    check_settings_apply([args.method], {"keep_rate": keep_rate_given, "r": "--r" if args.r else ""})
    args.model, model = load_model(args.model, args.recipe, args.pretrained, args.checkpoint,
                                   before_weights=patch_for_weights(args.method))
    model = keep_saved_choice(model, args.method, args.checkpoint, "evit bench")  # as show and compare --trained
    choice = _fit_budget(args, [model])
    rates = [choice.keep_rate] if choice is not None and choice.keep_rate is not None else \
        None if args.keep_rates is BENCH_KEEP_RATES else args.keep_rates  # None: the method's own bench_grid
    if args.backends:
        if args.device not in (None, "cpu"):
            raise ValueError("--backends times batch-1 latency on the CPU only; leave out --device")
        return _bench_backends(args, model, [r for r in rates or method_class("evit").bench_grid if r < 1])
    rows = bench(model, rates, args.batch_size, args.reps, args.latency_reps, args.warmup, args.locations,
                 method=args.method, r_values=args.r, device=str(device))
    if args.json:
        import dataclasses

        budget = {"budget": dataclasses.asdict(choice)} if choice is not None else {}
        print(json.dumps({"model": args.model, "batch_size": args.batch_size, "device": str(device),
                          "threads": torch.get_num_threads(), **budget, "rows": rows}, indent=2))
    else:
        if choice is not None:
            print(choice.describe())
        print(f"{args.model}, batch {args.batch_size}, {device_text(device)}; speed-ups are ratios of "
              f"medians over the unpatched model measured in this run")
        print(format_table(rows, args.batch_size))
    return 0


def _bench_backends(args, model, rates) -> int:
    import torch

    from .bench import format_backends_table, latency_backends

    if not rates:
        raise ValueError("--backends compares the unpatched model with EViT: give a keep rate below 1")
    rows = latency_backends(model, rates, args.latency_reps, args.warmup, args.backends, args.locations)
    if args.json:
        print(json.dumps({"model": args.model, "batch_size": 1, "threads": torch.get_num_threads(), "rows": rows},
                         indent=2))
    else:
        print(f"{args.model}, batch 1, {torch.get_num_threads()} threads; speed-ups are ratios of medians, "
              "paired per repetition, measured in this run")
        print(format_backends_table(rows))
    return 0


def _export(args) -> int:
    """Export, then run the file with onnxruntime beside PyTorch on a random batch: a file that
    disagrees is reported as a failure (exit 1), not silently written."""
    import torch

    from . import hosts
    from .checkpoint import trained_settings
    from .cost import native_input_size
    from .export import export_onnx, onnx_runner
    from .loading import load_model
    from .patch import patch, token_counts

    _not_an_input(args.onnx, "--onnx", {"the checkpoint": args.checkpoint})
    label, model = load_model(args.model, args.recipe, args.pretrained, args.checkpoint,
                              kind="evit" if args.keep_rate < 1 else "baseline")
    if args.checkpoint:
        label = f"{label} from {args.checkpoint}"
    model.eval()
    settings = trained_settings(model, args.method)  # e.g. the fusion the weights were trained with
    if args.fusion:
        if args.method != "evit":
            raise ValueError(f"--fusion is EViT's choice of fused token; --method {args.method} has none")
        settings["fusion"] = args.fusion
    if args.keep_rate < 1:
        patch(model, args.keep_rate, args.locations, method=args.method, **settings)
    path = export_onnx(model, args.onnx, batch_size=args.batch_size, opset=args.opset,
                       dynamic_batch=not args.static_batch)
    x = torch.randn(args.batch_size, *native_input_size(model))
    with torch.inference_mode():
        diff = (onnx_runner(path)(x) - hosts.adapter(model).forward(x)).abs().max().item()
    tokens = token_counts(model, hosts.adapter(model).num_tokens())
    print(f"onnxruntime vs PyTorch on a random batch of {args.batch_size}: max abs diff {diff:.2e}")
    if not diff <= 1e-3:
        for written in (path, path.with_name(path.name + ".data")):  # not kept: it is not the model asked for
            written.unlink(missing_ok=True)
        print(f"evit export: error: the ONNX model disagrees with PyTorch (max abs diff {diff:.2e} > 1e-3); "
              f"{path} was not kept", file=sys.stderr)
        return 1
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB): {label}, keep rate {args.keep_rate} "
          f"({args.method if args.keep_rate < 1 else 'unpatched'}), "
          f"tokens {'->'.join(map(str, tokens))}, input (batch, {', '.join(map(str, x.shape[1:]))}), "
          f"batch {args.batch_size if args.static_batch else 'dynamic'}")
    return 0


def _show(args) -> int:
    from . import embedded
    from .data import FASHION_MNIST_CLASSES
    from .evaluate import apply_setting
    from .loading import keep_saved_choice, load_model, patch_for_weights
    from .registry import check_settings_apply, method_class
    from .show import fashion_images, figure_path, load_images, show

    _not_an_input(str(figure_path(args.out)), "--out",
                  {"the checkpoint": args.checkpoint, **{"an image": p for p in args.images}})
    class_names = None
    kind = args.method if args.method in embedded.WEIGHTS else "baseline"  # bundled weights trained with it
    model = load_model(args.model, args.recipe, args.pretrained, args.checkpoint, kind=kind,
                       before_weights=patch_for_weights(args.method))[1].eval()
    model = keep_saved_choice(model, args.method, args.checkpoint, "evit show")
    if args.model or args.recipe:
        if not args.images:
            given = "--model" if args.model else "--recipe"
            raise ValueError(f"give image files to show with {given} (the bundled images are Fashion-MNIST, for the "
                             "embedded model)")
        images, display = load_images(args.images, model)
    else:  # the embedded architecture (its bundled weights or --checkpoint's)
        class_names = FASHION_MNIST_CLASSES
        images, display = fashion_images(args.images, args.count)
    check_settings_apply([args.method], {"keep_rate": "--keep-rate" if args.keep_rate is not None else "",
                                         "r": "--r" if args.r is not None else ""})  # it would be ignored
    setting = method_class(args.method).setting
    given = {"r": args.r, "keep_rate": args.keep_rate}[setting]
    settings = {setting: given if given is not None else {"r": SHOW_R, "keep_rate": SHOW_KEEP_RATE}[setting]}
    # a learned method keeps its weights; Patch Slimming chooses its (static) tokens from the images shown
    apply_setting(model, {"method": args.method, **settings}, args.locations, images=images)
    path = show(model, images, display, args.out, class_names)
    print(f"wrote {path}")
    return 0


def _serving_methods(model) -> list[str]:
    """The command line's methods that can serve ``model`` (compare's default); each other one is named, with why."""
    from .patch import check_model
    from .registry import names

    serving = []
    for method in names():
        try:
            check_model(model, method)
            serving.append(method)
        except (TypeError, ValueError) as e:  # e.g. a class-token method on a model that averages its tokens
            print(f"evit compare: {method} skipped: {e}", file=sys.stderr)
    return serving


def _eval_data(args, embedded_default: bool, models):
    """(data label, function giving fresh (images, labels) batches) for eval and compare. Fashion-MNIST
    comes at 28 px (evaluation resizes it to each model's input size); a folder's val/ is read through
    timm's transforms at each model's own input size, its classes matched by name to the class list of
    the checkpoint's run (its config.json) or of the folder's train/."""
    from pathlib import Path

    from . import embedded
    from .data import TensorLoader, load_fashion_mnist

    from .folders import check_fashion_mnist_heads, eval_batches, run_class_names
    from .images import check_workers

    check_workers(args.workers)
    data = args.data or ("bundled" if embedded_default else "fashion-mnist")
    if data in ("bundled", "fashion-mnist"):
        check_fashion_mnist_heads(models)  # classes and channels
        images, labels = embedded.test_subset() if data == "bundled" else load_fashion_mnist("test", args.data_root)
        loader = TensorLoader(images, labels, args.batch_size)
        return data, lambda: loader.batches(0)
    return data, eval_batches(Path(data), models, args.batch_size, args.workers, run_class_names(args.checkpoint))


def _calibration_images(data: str, batches, count: int = 512):
    """Sample images for methods that choose tokens from data (Patch Slimming): a function giving them for a model,
    at its input size and as it reads images (each model's reading of a folder may differ). Fashion-MNIST training
    images when the evaluation is on Fashion-MNIST and they are installed, else the first evaluation batch."""
    from functools import lru_cache

    from .cost import native_input_size
    from .evaluate import fresh_batches, sized
    from .resolution import resize_images

    images = None
    if data in ("bundled", "fashion-mnist"):
        from .data import load_fashion_mnist, normalize

        try:
            images = normalize(load_fashion_mnist("train")[0][:count])  # tensors every model reads alike
        except (FileNotFoundError, ValueError, OSError):
            pass
    if images is None:
        print("evit compare: Patch Slimming chooses its tokens from the first evaluation batch "
              "(no separate training images here)", file=sys.stderr)

    @lru_cache(maxsize=None)  # one read per model, for all its rows
    def for_model(model):
        if images is not None:
            return resize_images(images, native_input_size(model)[1:])
        return next(iter(sized(fresh_batches(batches, model), model)))[0]
    return for_model


def _compare(args) -> int:
    import torch

    from . import embedded
    from .compare import compare, grid, load_trained, plot
    from .evaluate import format_rows
    from .loading import architecture, load_model
    from .models import device_text, resolve_device
    from .registry import method_class
    from .outputs import check_file_destination
    from .show import figure_path

    device = resolve_device(args.device)  # a bad --device fails before any model is loaded
    _not_an_input(str(figure_path(args.plot)), "--plot", {"the checkpoint": args.checkpoint,
                                        **{"a --trained file": t.partition("=")[2] for t in args.trained}})
    check_file_destination(figure_path(args.plot), args.plot)  # before the evaluation, not after it
    default = not (args.model or args.recipe)
    models = {"baseline": load_model(args.model, args.recipe, args.pretrained, args.checkpoint)[1]}
    name, kwargs = architecture(args.model, args.recipe)
    trained = {m: embedded.ASSETS / w for m, w in embedded.WEIGHTS.items()
               if m != "baseline" and default and (embedded.ASSETS / w).is_file()}
    for item in args.trained:
        method, _, path = item.partition("=")
        if not path:
            raise ValueError(f"--trained takes METHOD=WEIGHTS, got {item!r}")
        trained[method] = path
    models.update(load_trained(name, kwargs, trained, models["baseline"]))
    methods = args.methods or _serving_methods(models["baseline"])
    settings, skipped = grid(methods, args.keep_rates, args.r, {m: f"{m}-trained" for m in trained})
    for method in skipped:
        print(f"evit compare: {method} needs training; skipped. Train it with `evit train` (e.g. --recipe "
              f"fashion_mnist_dynamicvit07) and pass --trained {method}=WEIGHTS", file=sys.stderr)
    data, batches = _eval_data(args, default, list(models.values()))
    _say_if_untrained(args, "the baseline")
    needs_images = any(method_class(s["method"]).needs_images for _, s in settings if isinstance(s, dict))
    rows = compare(models, settings, batches, speed_reps=args.speed_reps,
                   images=_calibration_images(data, batches) if needs_images else None,
                   device=str(device))
    path = plot(rows, args.plot, title=f"{'embedded Fashion-MNIST ViT' if default else name} on {data}")
    if args.json:
        print(json.dumps({"data": data, "device": str(device), "threads": torch.get_num_threads(), "plot": str(path),
                          "rows": rows}, indent=2))
    else:
        print(f"data: {data}; on {device_text(device)}; speed-ups: ratios of medians over the unpatched model, "
              "measured in this run")
        print(format_rows(rows))
        print(f"plot: {path}")
    return 0


COMMANDS = {"bench": _bench, "train": _train, "eval": _eval, "show": _show, "export": _export,
            "compare": _compare}
