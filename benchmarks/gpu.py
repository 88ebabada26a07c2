"""The whole GPU check in one prepared run: speed against the ideal, accuracy, training, environment.

GPU time is scarce (a lent machine, minutes at a time), so everything evit wants to know from a GPU
runs from this one command and lands as text and JSON in one folder:

- **env**: GPU name, driver, CUDA, torch / timm / evit versions;
- **bench**: ``evit.bench`` on DeiT-S and DeiT-B (random weights) at batch 64 and 256 (and batch 1
  for latency), float32 and bfloat16 autocast: EViT at keep 0.9 / 0.7 / 0.5 and ToMe at r = 8, 13,
  each with images/s, latency, speed-up and its share of the ideal speed-up (the same token counts
  cut by slicing, measured in the same interleaved run);
- **overhead**: why a variant falls short of its ideal (``gpu_overhead.py``): host and device time,
  ATen ops, GPU kernels and host-device syncs per forward, at batch 1 and in bfloat16;
- **compile**: ``torch.compile`` of the unpatched model, EViT at keep 0.7 and its ideal beside eager
  (batch 64; with CUDA graphs, ``mode="reduce-overhead"``, at batch 1 and at batch 64 in bfloat16);
- **accuracy**: ``evit eval`` and ``evit compare`` on the embedded model on the device, and the
  embedded models' predictions on the device against the CPU's: how many images change their
  prediction, and how close to a tie they were on the CPU;
- **train**: a short ``evit train`` (bf16) on the device, killed mid-run and resumed: does the
  loss fall, and do the resumed weights equal an uninterrupted run's (with a second uninterrupted
  run as the control for the device's own run-to-run determinism);
- **transformers**: Hugging Face transformers ViTs (``gpu_transformers.py``) on the device against the
  CPU, unpatched, at zero reduction and reduced, sdpa and eager; their speed comes from **bench** with
  ``--models hf_vit_small hf_vit_base`` (transformers' ViT in DeiT-S shape, and ViT-B/16).

Every step is timed and guarded: a step that fails is recorded with its error and the rest still
run; ``results.json`` and ``report.txt`` are rewritten after each step, so a run stopped at its time
limit still leaves what it measured. Steps that would start past ``--budget-s`` are skipped and say so.

    python benchmarks/gpu.py --out results/gpu          # on a machine with a CUDA GPU (about 7 minutes)
    python benchmarks/gpu.py --quick --out /tmp/gpu     # the same steps on the CPU in seconds (CI tests it)
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Optional

import torch

import evit
import evit.models
from evit import embedded, hosts
from evit.bench import bench, device_sync, paired_ratio, patch_ideal, time_interleaved
from evit.evaluate import apply_setting
from evit.models import resolve_device
from gpu_overhead import overhead_step  # beside this script
from gpu_transformers import transformers_step

#: what each mode measures: (timm name, extra kwargs) or an ``hf:`` spec per model, batch sizes, keep rates,
#: ToMe's r, repetitions; the full run's default models are its first two
FULL = dict(models={"deit_small": ("deit_small_patch16_224", {}), "deit_base": ("deit_base_patch16_224", {}),
                    "hf_vit_small": "hf:vit:hidden_size=384,num_hidden_layers=12,num_attention_heads=6,"
                                    "intermediate_size=1536",
                    "hf_vit_base": "hf:vit"},
            batches=(64, 256), keep_rates=(0.9, 0.7, 0.5), tome_r=(8, 13), reps=10, latency_reps=30, warmup=3,
            compile_backend="inductor", train_steps=300, train_images=2500, test_images=500, check_images=3000,
            overhead=(("fp32", 1), ("bf16", 64), ("bf16", 256)))
QUICK = dict(models={"vit_tiny": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=4)),
                     "hf_vit_tiny": "hf:vit:hidden_size=64,num_hidden_layers=4,num_attention_heads=2,"
                                    "intermediate_size=128,image_size=32,patch_size=8"},
             batches=(4,), keep_rates=(0.7,), tome_r=(2,), reps=2, latency_reps=2, warmup=1,
             compile_backend="eager", train_steps=12, train_images=256, test_images=256, check_images=256,
             overhead=(("fp32", 1), ("bf16", 4)))
TRAIN_MODEL = {"img_size": 28, "patch_size": 4, "in_chans": 1, "num_classes": 10, "depth": 4, "embed_dim": 64,
               "num_heads": 2}


class Run:
    """Results of the steps so far, written out after each step."""

    def __init__(self, out: Path, budget_s: float) -> None:
        self.out, self.budget_s, self.t0 = out, budget_s, time.perf_counter()
        self.results: dict = {"steps": {}}
        self.report: list[str] = []

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def step(self, name: str, fn, *args) -> None:
        if self.elapsed() > self.budget_s:
            self.results["steps"][name] = {"ok": False, "skipped": f"time budget of {self.budget_s:.0f} s spent"}
            self.say(f"## {name}: skipped (time budget of {self.budget_s:.0f} s spent)")
            return self.write()
        self.say(f"## {name}")
        t = time.perf_counter()
        try:
            self.results[name] = fn(self, *args)
            self.results["steps"][name] = {"ok": True, "seconds": round(time.perf_counter() - t, 1)}
        except Exception as e:  # noqa: BLE001 - recorded; the other steps still run
            self.results["steps"][name] = {"ok": False, "seconds": round(time.perf_counter() - t, 1),
                                           "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            self.say(f"FAILED: {type(e).__name__}: {e}")
        self.write()

    def say(self, text: str) -> None:
        print(text, flush=True)
        self.report.append(text)

    def write(self) -> None:
        self.results["seconds"] = round(self.elapsed(), 1)
        (self.out / "results.json").write_text(json.dumps(self.results, indent=2, default=str))
        (self.out / "report.txt").write_text("\n".join(self.report) + "\n")


def autocast(device: torch.device, dtype: str):
    return torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()


def env_step(run: Run, device: torch.device) -> dict:
    import timm

    info = {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
            "evit": evit.__version__, "device": str(device), "cpu_threads": torch.get_num_threads(),
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.TimeoutExpired) as e:
            info["driver"] = f"unknown ({e})"
    run.say(json.dumps(info))
    return info


def _model(spec) -> torch.nn.Module:
    """A model of ``FULL``/``QUICK`` with random weights: timm's, or transformers' by ``hf:`` spec."""
    import timm

    torch.manual_seed(0)
    if isinstance(spec, str):
        return evit.models.transformers_model(spec.removeprefix("hf:")).eval()
    name, kwargs = spec
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def bench_step(run: Run, device: torch.device, cfg: dict) -> list[dict]:
    """EViT and ToMe against their ideal, per model, dtype and batch size; batch-1 latency with the first batch."""
    rows = []
    for label, spec in cfg["models"].items():
        model = _model(spec)
        for dtype in ("fp32", "bf16"):
            for method, settings in (("evit", {"keep_rates": cfg["keep_rates"]}), ("tome", {"r_values": cfg["tome_r"]})):
                for j, bs in enumerate(cfg["batches"]):
                    with autocast(device, dtype):
                        got = bench(model, batch_size=bs, reps=cfg["reps"], warmup=cfg["warmup"],
                                    latency_reps=cfg["latency_reps"] if j == 0 else 1, progress=False,
                                    method=method, device=str(device), **settings)
                    for r in got:
                        r.update(model=label, dtype=dtype, batch_size=bs, latency_measured=j == 0)
                        rows.append(r)
                    run.say(_bench_lines(got, label, dtype, bs, j == 0))
                    run.write()
        del model
    return rows


def _bench_lines(rows: list[dict], label: str, dtype: str, bs: int, latency: bool) -> str:
    out = []
    for r in rows:
        setting = "unpatched" if r["variant"] == "unpatched" else (
            f"{r['variant']} keep {r['keep_rate']}" if r.get("r") is None else f"{r['variant']} r={r['r']}")
        text = f"{label} {dtype} b{bs} {setting:<16} {r['images_per_s']:9.1f} img/s"
        if r["variant"] != "unpatched":
            text += f"  speed-up {r['speedup']:.2f}x (ideal {r['ideal_speedup']:.2f}x, {r['of_ideal']:.1%} of it)"
            if latency:
                text += f"  b1 {r['latency_ms']:.2f} ms {r['latency_speedup']:.2f}x ({r['latency_of_ideal']:.1%} of ideal)"
        out.append(text)
    return "\n".join(out)


def compile_step(run: Run, device: torch.device, cfg: dict) -> list[dict]:
    """Eager and ``torch.compile`` of the unpatched model, EViT at keep 0.7 and its ideal, timed interleaved:
    at the first batch size, plain and (bfloat16) with CUDA graphs; at batch 1 with CUDA graphs."""
    spec = next(iter(cfg["models"].values()))
    base = _model(spec).to(device)
    size = hosts.adapter(base).input_size
    keep = 0.7
    variants = {"unpatched": lambda m: evit.unpatch(m), "evit": lambda m: evit.patch(m, keep),
                "ideal": lambda m: (patch_ideal(m, {"method": "evit", "keep_rate": keep}), m)[1]}
    rows = []
    b0 = cfg["batches"][0]
    for bs, mode, dtype in ((b0, None, "fp32"), (1, "reduce-overhead", "fp32"), (b0, "reduce-overhead", "bf16")):
        torch._dynamo.reset()  # each configuration compiles afresh (the compiled variants share one forward's cache)
        x = torch.randn(bs, *size, device=device)
        fns = {}
        with autocast(device, dtype):
            for name, switch in variants.items():
                eager = switch(copy.deepcopy(base))
                fns[f"eager/{name}"] = lambda m=eager: m(x)
                options = {"mode": mode} if (mode and cfg["compile_backend"] == "inductor") else {}
                compiled = torch.compile(eager, backend=cfg["compile_backend"], fullgraph=True, dynamic=False, **options)
                t = time.perf_counter()
                with torch.inference_mode():
                    for _ in range(3):  # compiles, then records the CUDA graph
                        compiled(x)
                run.say(f"compiled {name} at batch {bs} {dtype} in {time.perf_counter() - t:.1f} s")
                fns[f"compiled/{name}"] = lambda m=compiled: m(x)
            with torch.inference_mode():
                times = time_interleaved(fns, cfg["reps"] * 2, cfg["warmup"], sync=device_sync(device))
        base_t = times["eager/unpatched"]
        for name, t in times.items():
            backend, variant = name.split("/")
            row = dict(batch_size=bs, dtype=dtype, backend=backend, variant=variant,
                       mode=mode if backend == "compiled" else None,
                       images_per_s=bs / statistics.median(t), speedup_over_eager_unpatched=paired_ratio(base_t, t),
                       speedup_over_own_unpatched=paired_ratio(times[f"{backend}/unpatched"], t))
            if variant == "evit":
                row["of_ideal"] = paired_ratio(times[f"{backend}/ideal"], t)
            rows.append(row)
            run.say(f"b{bs} {dtype} {name:<20} {row['images_per_s']:9.1f} img/s  {row['speedup_over_own_unpatched']:.2f}x own "
                    f"unpatched" + (f", {row['of_ideal']:.1%} of ideal" if "of_ideal" in row else ""))
    return rows


def _cli(*args: str, env: Optional[dict] = None, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "evit.cli", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
    if proc.returncode != 0:
        raise RuntimeError(f"evit {args[0]} exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    return proc


def prediction_changes(device: torch.device, count: int) -> list[dict]:
    """The embedded models on ``count`` bundled test images, on the CPU and on ``device``: images whose
    predicted class differs, the largest logit difference, and the CPU's top-1 / top-2 margin of the
    changed images (a change at a near-tie is a kernel's rounding, not a wrong model)."""
    images, labels = embedded.test_subset()
    x, labels = embedded_inputs(images[:count]), labels[:count]
    rows = []
    for kind, rates in (("baseline", (1.0, 0.7, 0.5)), ("evit", (0.7, 0.5))):
        model = embedded.load_model(kind).eval()
        for rate in rates:
            apply_setting(model, rate)  # as `evit eval` runs it: the EViT model with the fusion it was trained with
            logits = {}
            for dev in (torch.device("cpu"), device):
                with torch.inference_mode():
                    logits[dev.type] = torch.cat([model.to(dev)(b.to(dev)).float().cpu() for b in x.split(500)])
            cpu, other = logits["cpu"], logits[device.type]
            changed = cpu.argmax(1) != other.argmax(1)
            top2 = cpu.topk(2, dim=1).values
            margins = (top2[:, 0] - top2[:, 1])[changed]
            rows.append(dict(model=kind, keep_rate=rate, images=len(labels), changed=int(changed.sum()),
                             top1_cpu=float((cpu.argmax(1) == labels).float().mean() * 100),
                             top1_device=float((other.argmax(1) == labels).float().mean() * 100),
                             max_abs_logit_diff=float((cpu - other).abs().max()),
                             max_cpu_margin_of_changed=float(margins.max()) if len(margins) else None,
                             median_cpu_margin_all=float((top2[:, 0] - top2[:, 1]).median())))
            evit.unpatch(model.cpu())
    return rows


def embedded_inputs(images: torch.Tensor) -> torch.Tensor:
    from evit.data import normalize

    return normalize(images)


def accuracy_step(run: Run, device: torch.device, cfg: dict, data_args: list[str]) -> dict:
    out = {}
    proc = _cli("eval", "--device", str(device), "--json", "--speed-reps", str(cfg["reps"]), *data_args)
    out["eval"] = json.loads(proc.stdout)
    for r in out["eval"]["rows"]:
        run.say(f"eval {r['model']:<14} keep {r['keep_rate']:.2f} top-1 {r['top1']:.2f}  {r['speedup']:.2f}x")
    plot = run.out / "compare.png"
    compare_args = ["--methods", "evit", "tome", "--keep-rates", "0.7", "--r", "2"] if cfg is QUICK else []
    proc = _cli("compare", "--device", str(device), "--json", "--speed-reps", str(cfg["reps"]), "--plot", str(plot),
                *compare_args, *data_args)
    out["compare"] = json.loads(proc.stdout)
    for r in out["compare"]["rows"]:
        run.say(f"compare {r['series']:<26} {r['setting_text']:>8} top-1 {r['top1']:.2f}  {r['speedup']:.2f}x")
    out["prediction_changes"] = prediction_changes(device, cfg["check_images"])
    for r in out["prediction_changes"]:
        run.say(f"{r['model']} keep {r['keep_rate']}: {r['changed']} of {r['images']} predictions differ from the "
                f"CPU's (max |logit diff| {r['max_abs_logit_diff']:.2e}; CPU margin of those at most "
                f"{r['max_cpu_margin_of_changed']})")
    return out


def _train_args(root: Path, recipe: Path, out: Path, device: torch.device, steps: int) -> list[str]:
    return ["train", "--recipe", str(recipe), "--data", "fashion-mnist", "--data-root", str(root), "--out", str(out),
            "--device", str(device), "--bf16", "--max-steps", str(steps), "--save-every", str(max(1, steps // 6)),
            "--no-progress"]


def train_step(run: Run, device: torch.device, cfg: dict, root: Path) -> dict:
    """Two uninterrupted runs (the control) and one killed at half way and resumed, same seed."""
    from safetensors.torch import load_file

    steps = cfg["train_steps"]
    # one thread each on the CPU check: the tiny model's bf16 kernels slow down badly when threads contend
    env = {"OMP_NUM_THREADS": "1"} if device.type == "cpu" else {}
    recipe = run.out.parent / f".{run.out.name}_train_recipe.json"
    recipe.write_text(json.dumps({"model": "vit_tiny_patch16_224", "model_kwargs": TRAIN_MODEL, "epochs": 100,
                                  "batch_size": 64, "lr": 2e-3, "warmup_epochs": 0.2, "keep_rate": 0.7,
                                  "keep_warmup_epochs": 1, "label_smoothing": 0.0}))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        results = {}
        for name in ("a", "b"):
            proc = _cli(*_train_args(root, recipe, tmp / name, device, steps), env=env)
            results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        kill = [sys.executable, str(Path(__file__).resolve().parents[1] / "tests" / "signal_at_step.py"), "SIGKILL",
                str(steps // 2)]  # a real SIGKILL at half way, sent through evit.train.train's on_step hook
        killed = subprocess.run([*kill, *_train_args(root, recipe, tmp / "k", device, steps)],
                                capture_output=True, text=True, timeout=600,
                                env={**os.environ, "HF_HUB_OFFLINE": "1", **env})
        proc = _cli(*_train_args(root, recipe, tmp / "k", device, steps), "--resume", env=env)
        results["resumed"] = json.loads(proc.stdout.strip().splitlines()[-1])
        weights = {n: load_file(str(tmp / n / "model.safetensors")) for n in ("a", "b", "k")}

        def max_diff(p: str, q: str) -> float:
            return max(float((weights[p][k].float() - weights[q][k].float()).abs().max()) for k in weights[p])

        first, last = _losses(tmp / "a")
        out = dict(steps=steps, killed_exit=killed.returncode, killed_at=steps // 2, loss_first=first,
                   loss_last=last, loss_falls=first is not None and last < first,
                   resumed_vs_uninterrupted_max_diff=max_diff("a", "k"), control_two_runs_max_diff=max_diff("a", "b"),
                   runs=results)
    recipe.unlink()
    out["resume_exact"] = out["resumed_vs_uninterrupted_max_diff"] == 0.0
    run.say(f"train {steps} steps bf16: training loss {first} in the first logged epoch, {last} in the last; killed at step {steps // 2} "
            f"(exit {killed.returncode}) and resumed: max |weight diff| to an uninterrupted run "
            f"{out['resumed_vs_uninterrupted_max_diff']:.3g} (two uninterrupted runs: "
            f"{out['control_two_runs_max_diff']:.3g})")
    return out


def _losses(run_dir: Path) -> tuple:
    """The training loss of the run's first and last rows of summary.csv (None, None without rows)."""
    import csv

    with (run_dir / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    return (float(rows[0]["train_loss"]), float(rows[-1]["train_loss"])) if rows else (None, None)


#: the steps, in the order they run by default
STEPS = ("env", "accuracy", "train", "bench", "overhead", "compile", "transformers")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="results/gpu", help="folder for results.json, report.txt and compare.png")
    p.add_argument("--quick", action="store_true", help="tiny models and few repetitions on the CPU: checks the script")
    p.add_argument("--device", help="default: cuda (cpu with --quick)")
    p.add_argument("--budget-s", type=float, default=450.0, help="steps that would start after this are skipped")
    p.add_argument("--steps", nargs="+", default=list(STEPS), choices=STEPS)
    p.add_argument("--models", nargs="+", help=f"of the full run's {', '.join(FULL['models'])} (default: the first "
                   "two); overhead and compile use the first")
    args = p.parse_args(argv)
    try:
        device = resolve_device(args.device or ("cpu" if args.quick else "cuda"))
    except ValueError as e:
        print(f"benchmarks/gpu.py: {e}", file=sys.stderr)
        return 2
    if device.type != "cuda" and not args.quick:
        print("benchmarks/gpu.py: no CUDA device; run with --quick for the CPU check", file=sys.stderr)
        return 2
    cfg = QUICK if args.quick else FULL
    if args.models and not args.quick:
        unknown = set(args.models) - set(FULL["models"])
        if unknown:
            print(f"benchmarks/gpu.py: unknown model {', '.join(sorted(unknown))}; the full run has "
                  f"{', '.join(FULL['models'])}", file=sys.stderr)
            return 2
        cfg = {**FULL, "models": {m: FULL["models"][m] for m in args.models}}
    elif not args.quick:
        cfg = {**FULL, "models": dict(list(FULL["models"].items())[:2])}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run = Run(out, args.budget_s)
    run.results.update(mode="quick" if args.quick else "full", command=" ".join(sys.argv))
    signal.signal(signal.SIGTERM, lambda *_: (run.write(), sys.exit(143)))  # a time limit still leaves the results
    with tempfile.TemporaryDirectory() as tmp:
        root = embedded.write_test_subset(Path(tmp), cfg["train_images"], cfg["test_images"])
        data_args = ["--data", "fashion-mnist", "--data-root", str(root)] if args.quick else []
        steps = {"env": (env_step, device), "accuracy": (accuracy_step, device, cfg, data_args),
                 "train": (train_step, device, cfg, root), "bench": (bench_step, device, cfg),
                 "compile": (compile_step, device, cfg), "overhead": (overhead_step, device, cfg, _model, autocast),
                 "transformers": (transformers_step, device, cfg)}
        for name in args.steps:
            fn, *rest = steps[name]
            run.step(name, fn, *rest)
    failed = [n for n, s in run.results["steps"].items() if not s["ok"]]
    run.say(f"done in {run.elapsed():.0f} s; " + (f"failed or skipped: {', '.join(failed)}" if failed else "every step ran"))
    run.write()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
