"""Bad data and data options, one parametrized case each. Every case ends either in a clear refusal
(exit 2, one line naming the problem, no run folder made) or in the documented recovery (a file that
cannot be read is skipped, named by path and not counted; a class missing from val/ is scored by
name), and no file of an earlier run changes."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch

from evit.cli import main
from evit.train import TrainConfig, train

TINY = {"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2, "num_classes": 10}
VAL_IMAGES = 40  # 4 per class


@pytest.fixture(scope="module")
def pristine(jpeg_folder):
    return jpeg_folder(6, 4)


@pytest.fixture(scope="module")
def recipes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("recipes")
    base = {"model": "vit_tiny_patch16_224", "model_kwargs": TINY, "epochs": 1, "batch_size": 16, "warmup_epochs": 0}
    variants = {"tiny": {}, "head7": {"model_kwargs": {**TINY, "num_classes": 7}},
                "chans4": {"model_kwargs": {**TINY, "in_chans": 4}},
                "named": {"class_names": [f"c{i}" for i in range(9)] + ["shoe"]}}
    for name, change in variants.items():
        (folder / f"{name}.json").write_text(json.dumps({**base, **change}))
    return folder


@pytest.fixture(scope="module")
def earlier(pristine, recipes, tmp_path_factory):
    """A finished run whose files no case may change."""
    out = tmp_path_factory.mktemp("earlier") / "run"
    train(TrainConfig.from_file(str(recipes / "tiny.json"), data=str(pristine), out=str(out), workers=0), progress=False)
    return out


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file()}


@dataclass
class Ctx:
    data: Path
    tmp: Path
    recipes: Path
    earlier: Path

    def image(self, split: str, cls: str) -> Path:
        return sorted((self.data / split / cls).glob("*.jpg"))[0]

    def train(self, *extra, recipe="tiny", data=None) -> list:
        return ["train", "--recipe", str(self.recipes / f"{recipe}.json"), "--data", str(data or self.data),
                "--out", str(self.tmp / "new"), "--workers", "0", "--no-progress", *extra]

    def eval(self, *extra, recipe="tiny", checkpoint=True, data=None) -> list:
        weights = ["--checkpoint", str(self.earlier / "model.safetensors")] if checkpoint else []
        return ["eval", "--recipe", str(self.recipes / f"{recipe}.json"), *weights, "--data", str(data or self.data),
                "--keep-rates", "1", "--speed-reps", "1", "--workers", "0", "--json", *extra]


def _a_file(ctx):
    (ctx.tmp / "a_file").write_text("not a folder")
    return ctx.tmp / "a_file"


def _empty(ctx, split):
    for f in (ctx.data / split).rglob("*.jpg"):
        f.unlink()


def _loose(ctx, split):
    shutil.copy(ctx.image(split, "c0"), ctx.data / split / "loose.jpg")


def _val_only(ctx, drop: Optional[str] = None):
    root = ctx.tmp / "val_only"
    shutil.copytree(ctx.data / "val", root / "val")
    if drop:
        shutil.rmtree(root / "val" / drop)
    return root


def _unknown_class(ctx):
    (ctx.data / "val" / "zebra").mkdir()
    shutil.copy(ctx.image("val", "c0"), ctx.data / "val" / "zebra" / "z.jpg")


def then(_, argv: list) -> list:
    """``argv``, after the set-up step written before it (whatever that step returns)."""
    return argv


@dataclass
class Refused:
    """Exit 2 with one line matching ``says``."""

    command: Callable[[Ctx], list]
    says: str


REFUSED = {
    "val_class_unknown": Refused(lambda c: then(_unknown_class(c), c.eval()), r"val/zebra: class 'zebra' is not one of the 10"),
    "val_class_renamed": Refused(lambda c: then((c.data / "val" / "c3").rename(c.data / "val" / "c3_renamed"), c.eval()),
                                 r"class 'c3_renamed' is not one of the 10 classes of the run config"),
    "train_class_not_in_recipe_names": Refused(lambda c: c.train(recipe="named"),
                                               r"train/c9: class 'c9' is not one of the 10 classes of the recipe"),
    "head_width_eval": Refused(lambda c: c.eval(recipe="head7", checkpoint=False),
                               r"head has 7 outputs but \S+/train has 10 classes"),
    "input_channels_4": Refused(lambda c: c.train(recipe="chans4"), r"takes 4 input channels"),
    "image_directly_in_train": Refused(lambda c: then(_loose(c, "train"), c.train()),
                                       r"train/loose.jpg lies directly in \S+/train, not in a class sub-folder"),
    "image_directly_in_val": Refused(lambda c: then(_loose(c, "val"), c.eval()), r"val/loose.jpg lies directly in"),
    "empty_train": Refused(lambda c: then(_empty(c, "train"), c.train()), r"/train holds no images"),
    "empty_val": Refused(lambda c: then(_empty(c, "val"), c.eval()), r"/val holds no images"),
    "no_val_folder_train": Refused(lambda c: then(shutil.rmtree(c.data / "val"), c.train()), r"/val does not exist"),
    "val_only_cannot_match": Refused(lambda c: c.eval(checkpoint=False, data=_val_only(c, drop="c5")),
                                     r"val has 9 class folders but the model has 10 outputs"),
    "val_split_zero": Refused(lambda c: c.train("--val-split", "0"), r"--val-split must lie strictly between 0 and 1"),
    "val_split_above_one": Refused(lambda c: c.train("--val-split", "1.5"), r"--val-split must lie strictly between"),
    "val_split_leaves_nothing": Refused(lambda c: c.train("--val-split", "0.001"),
                                        r"--val-split 0.001 of 60 training images leaves no image to validate on"),
    "train_subset_too_large": Refused(lambda c: c.train("--train-subset", "1000"),
                                      r"--train-subset 1000 asks for more images than the 60 in \S+/train"),
    "train_subset_zero": Refused(lambda c: c.train("--train-subset", "0"), r"--train-subset must be a positive count"),
    "eval_every_zero": Refused(lambda c: c.train("--eval-every", "0"), r"--eval-every must be a positive number"),
    "eval_every_negative": Refused(lambda c: c.train("--eval-every", "-3"), r"--eval-every .* got -3"),
    "workers_negative_train": Refused(lambda c: c.train("--workers", "-1"), r"--workers must be 0 .* got -1"),
    "workers_negative_eval": Refused(lambda c: c.eval("--workers", "-1"), r"--workers must be 0 .* got -1"),
    "data_is_a_file_train": Refused(lambda c: c.train(data=_a_file(c)), r"a_file is a file, not a folder"),
    "data_is_a_file_eval": Refused(lambda c: c.eval(data=_a_file(c)), r"a_file is a file, not a folder"),
    "data_missing_train": Refused(lambda c: c.train(data=c.tmp / "nowhere"), r"nowhere does not exist"),
    "data_missing_eval": Refused(lambda c: c.eval(data=c.tmp / "nowhere"), r"nowhere does not exist"),
}


@pytest.fixture
def ctx(pristine, recipes, earlier, tmp_path):
    shutil.copytree(pristine, tmp_path / "data")
    return Ctx(tmp_path / "data", tmp_path, recipes, earlier)


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused(case, ctx, capsys):
    before = _snapshot(ctx.earlier)
    argv = REFUSED[case].command(ctx)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith(f"evit {argv[0]}: error: ")
    import re

    assert re.search(REFUSED[case].says, err), err
    assert not (ctx.tmp / "new").exists(), "a refused run must not make its folder"
    assert _snapshot(ctx.earlier) == before


def _named_once(err: str, named: str, why: str) -> None:
    lines = [line for line in err.splitlines() if named in line]
    assert len(lines) == 1 and why in lines[0] and "not counted" in lines[0], err


def _scored(err: str, out: str, named: Optional[str], images: int, why: str) -> dict:
    """The eval rows, each scoring ``images`` images; ``named`` (a skipped file) named once, for ``why``."""
    rows = json.loads(out)["rows"]
    assert rows and [r["images"] for r in rows] == [images] * len(rows)
    if named is not None:
        _named_once(err, named, why)
    return rows[0]


def _extra(ctx, cls, name, content=None, link=None, fifo=False):
    """A file added to val/``cls`` (so 40 readable images stay)."""
    path = ctx.data / "val" / cls / name
    if fifo:
        os.mkfifo(path)
    elif link is not None:
        path.symlink_to(link)
    else:
        path.write_bytes(content)
    return path


def _truncated(ctx):
    """The first val/c0 image cut short (its header intact), renamed so its warning is easy to find."""
    path = ctx.image("val", "c0")
    (ctx.data / "val" / "c0" / "truncated.jpg").write_bytes(path.read_bytes()[:200])
    path.unlink()
    return ctx.eval()


def _trained_past(ctx, err, out):
    """The unreadable training image is named once (not once per epoch) and the run finishes."""
    _named_once(err, "bad.jpg", "cannot read it")
    assert (ctx.tmp / "new" / "model.safetensors").is_file() and (ctx.tmp / "new" / "summary.csv").is_file()


@dataclass
class Recovered:
    """Exit 0; ``check(ctx, stderr, stdout)`` asserts the documented recovery."""

    command: Callable[[Ctx], list]
    check: Callable


def _by_name(ctx, err, out):
    """val/ without c3, the embedded model: scored by class name, as the same images are in the full val/."""
    from evit import embedded
    from evit.evaluate import hits, percent
    from evit.folders import eval_batches

    top1 = _scored(err, out, None, VAL_IMAGES - 4, "")["top1"]
    model = embedded.load_model("baseline")
    full = eval_batches(ctx.tmp / "full", [model], 64, workers=0)
    right, _ = hits(model, full())
    labels = torch.tensor([label for _, label in full.split.samples])
    assert top1 == pytest.approx(percent(right[labels != 3]), abs=1e-9)
    assert top1 > 50, "the embedded model knows these images: labels shifted by a missing class would score ~10%"


def _missing_class(ctx):
    shutil.copytree(ctx.data, ctx.tmp / "full")
    shutil.rmtree(ctx.data / "val" / "c3")
    return ["eval", "--data", str(ctx.data), "--keep-rates", "1", "--speed-reps", "1", "--workers", "0", "--json"]


RECOVERED = {
    "val_class_missing_scored_by_name": Recovered(_missing_class, _by_name),
    "val_only_uses_the_runs_class_names": Recovered(
        lambda c: c.eval(data=_val_only(c, drop="c5")),
        lambda c, err, out: _scored(err, out, None, VAL_IMAGES - 4, "")),
    "truncated_jpeg": Recovered(_truncated,
                                lambda c, err, out: _scored(err, out, "truncated.jpg", VAL_IMAGES - 1, "cannot read it")),
    "zero_byte_file": Recovered(lambda c: then(_extra(c, "c1", "empty.jpg", b""), c.eval()),
                                lambda c, err, out: _scored(err, out, "empty.jpg", VAL_IMAGES, "cannot read it")),
    "not_an_image": Recovered(lambda c: then(_extra(c, "c1", "text.png", b"hello, not a PNG"), c.eval()),
                              lambda c, err, out: _scored(err, out, "text.png", VAL_IMAGES, "cannot read it")),
    "broken_symlink": Recovered(lambda c: then(_extra(c, "c2", "gone.jpg", link=c.tmp / "nothing.jpg"), c.eval()),
                                lambda c, err, out: _scored(err, out, "gone.jpg", VAL_IMAGES, "not a regular file")),
    "hidden_folder_ignored": Recovered(
        lambda c: then(shutil.copytree(c.data / "val" / "c0", c.data / "val" / ".ipynb_checkpoints"), c.eval()),
        lambda c, err, out: _scored(err, out, None, VAL_IMAGES, "")),
    "unreadable_training_image": Recovered(
        lambda c: then((c.data / "train" / "c0" / "bad.jpg").write_bytes(b"\xff\xd8 broken"), c.train("--epochs", "2")),
        _trained_past),
}


@pytest.mark.parametrize("case", list(RECOVERED))
def test_recovered(case, ctx, capsys):
    before = _snapshot(ctx.earlier)
    assert main(RECOVERED[case].command(ctx)) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    RECOVERED[case].check(ctx, captured.err, captured.out)
    assert _snapshot(ctx.earlier) == before


def test_named_pipe_is_skipped_not_waited_on(ctx):
    """A named pipe named like an image, read by worker processes: skipped and named, in bounded time."""
    before = _snapshot(ctx.earlier)
    _extra(ctx, "c4", "pipe.jpg", fifo=True)
    argv = ctx.eval("--workers", "2")  # the last --workers counts: loading in worker processes
    proc = subprocess.run([sys.executable, "-m", "evit.cli", *argv], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    _scored(proc.stderr, proc.stdout, "pipe.jpg", VAL_IMAGES, "not a regular file")
    assert _snapshot(ctx.earlier) == before
