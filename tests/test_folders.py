"""A user's own folder: 32x32 JPEGs of 10 classes and a model built at img_size 32 through its
model_kwargs (no top-level size). It trains at that size, validates every epoch, is scored by
`evit eval --recipe R --checkpoint W --data DIR`, and a killed, resumed run ends bit-identical."""
import csv
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import evit.train
from evit.cli import main
from evit.train import TrainConfig, make_loaders, train

TINY32 = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2, "num_classes": 10}
RECIPE = {"model": "vit_tiny_patch16_224", "model_kwargs": TINY32, "lr": 0.003, "warmup_epochs": 0, "epochs": 2,
          "batch_size": 32, "label_smoothing": 0.0, "keep_rate": 0.5, "keep_warmup_epochs": 1, "save_every": 5}


@pytest.fixture(scope="module")
def data(jpeg_folder):
    return jpeg_folder(40, 20)  # 400 training images (12 steps of 32 an epoch), 200 to validate on


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    path = tmp_path_factory.mktemp("recipe") / "tiny32.json"
    path.write_text(json.dumps(RECIPE))
    return path


@pytest.fixture(scope="module")
def uninterrupted(data, recipe, tmp_path_factory):
    """A run in this process, loading in it (--workers 0), every batch checked on its way to the model."""
    seen, resize = [], evit.train.resize_images

    def unchanged(x, size):
        seen.append(tuple(x.shape))
        out = resize(x, size)
        assert out is x, f"a {tuple(x.shape)} batch was resized to {size}"
        return out

    out, threads = tmp_path_factory.mktemp("runs") / "full", torch.get_num_threads()
    torch.set_num_threads(1)  # as the killed run's process (OMP_NUM_THREADS=1): the same sums in the same order
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(evit.train, "resize_images", unchanged)
            result = train(TrainConfig.from_file(str(recipe), data=str(data), out=str(out), workers=0), progress=False)
    finally:
        torch.set_num_threads(threads)
    return out, result, seen


def _rows(run):
    with open(run / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_images_come_in_at_the_models_own_size(data, recipe, uninterrupted):
    out, result, seen = uninterrupted
    assert result["step"] == 24 and len(seen) == 24
    assert {shape[1:] for shape in seen} == {(3, 32, 32)}  # decoded and cropped at 32, never resized after
    cfg = TrainConfig.from_file(str(recipe), data=str(data), workers=0)
    model = evit.train.build_model(cfg)
    loader, val, names = make_loaders(cfg, model)
    crop = loader.dataset.transform.transforms[0]
    assert tuple(crop.size) == (32, 32), crop  # timm's transform made for 32 px, not 224
    assert next(val.batches(0))[0].shape == (32, 3, 32, 32)
    assert names == [f"c{i}" for i in range(10)]
    assert json.loads((out / "config.json").read_text())["class_names"] == names


def test_summary_and_best_checkpoint(uninterrupted):
    out, _, _ = uninterrupted
    rows = _rows(out)
    assert [(r["epoch"], r["step"]) for r in rows] == [("1", "12"), ("2", "24")]
    assert all(0 <= float(r["val_top1"]) <= float(r["val_top5"]) <= 100 for r in rows)
    assert float(rows[-1]["keep_rate"]) == 0.5 and float(rows[0]["lr"]) > float(rows[1]["lr"])
    best = max(rows, key=lambda r: float(r["val_top1"]))
    assert (out / "best.safetensors").is_file()
    if best is rows[-1]:  # the best is the last: the same weights
        assert (out / "best.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_eval_scores_the_folder_by_the_runs_classes(data, recipe, uninterrupted, tmp_path, capsys):
    out, _, _ = uninterrupted
    args = ["eval", "--recipe", str(recipe), "--checkpoint", str(out / "model.safetensors"), "--keep-rates", "1",
            "0.5", "--speed-reps", "1", "--workers", "0", "--json"]
    assert main(args + ["--data", str(data)]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["images"] for r in rows] == [200, 200]
    # the last validation ran at keep 0.5 on the same images with the same weights
    assert rows[1]["top1"] == pytest.approx(float(_rows(out)[-1]["val_top1"]), abs=1e-4)
    shutil.copytree(data / "val", tmp_path / "val")  # no train/: the classes come from the run's config.json
    assert main(args + ["--data", str(tmp_path)]) == 0
    assert [r["top1"] for r in json.loads(capsys.readouterr().out)["rows"]] == [r["top1"] for r in rows]


def test_killed_and_resumed_run_ends_bit_identical(data, recipe, uninterrupted, tmp_path):
    full, _, _ = uninterrupted
    cut = tmp_path / "cut"
    cmd = [sys.executable, "-m", "evit.cli", "train", "--recipe", str(recipe), "--data", str(data), "--out", str(cut)]
    # no library's deprecation warning before the progress lines (timm 1.0.16 warns on import)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore::FutureWarning"}
    kill = [sys.executable, str(Path(__file__).with_name("signal_at_step.py")), "SIGKILL", "17"]  # a real SIGKILL
    killed = subprocess.run(kill + cmd[3:] + ["--workers", "2"], capture_output=True, text=True, timeout=300, env=env)
    assert killed.returncode == -9, "the run was meant to be killed"
    assert json.loads((cut / "checkpoints" / "latest.json").read_text())["step"] == 15
    resumed = subprocess.run(cmd + ["--workers", "1", "--resume"], capture_output=True, text=True, timeout=300, env=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "\r" not in resumed.stderr  # to a file: plain lines, one per validation
    assert [l for l in resumed.stderr.splitlines() if l.startswith("epoch ")] == [resumed.stderr.splitlines()[0]]
    for name in ("model.safetensors", "best.safetensors"):
        a, b = load_file(str(full / name)), load_file(str(cut / name))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f"{name}: {k} differs after resume")
    a, b = ([{k: v for k, v in row.items() if k != "img_per_s"} for row in _rows(run)] for run in (full, cut))
    assert a == b and len(b) == 2  # one row per epoch, none twice


@pytest.mark.parametrize("named", [False, True], ids=["c0..c9", "class names, alphabetical"])
def test_embedded_model_scores_its_own_images_in_a_folder_as_in_the_bundle(named, tmp_path, capsys):
    """The bundled test images as 28 px PNGs in val/: the embedded baseline scores them exactly as the
    bundled tensors (its Fashion-MNIST normalisation, uncropped; not vit_tiny's mean 0.5 and 0.9 crop), and
    folders named by class ('Ankle boot', 'Bag', ... in natural order) are labelled by name, not by position."""
    import numpy as np
    from PIL import Image

    from evit import embedded
    from evit.data import FASHION_MNIST_CLASSES, normalize

    images, labels = embedded.test_subset()
    chosen = torch.cat([torch.nonzero(labels == c)[:6, 0] for c in range(10)])
    for i in chosen.tolist():
        c = int(labels[i])
        folder = tmp_path / "val" / (FASHION_MNIST_CLASSES[c].replace("/", "_") if named else f"c{c}")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i, 0].numpy().astype(np.uint8)).save(folder / f"{i}.png")
    with torch.no_grad():
        expected = (embedded.load_model()(normalize(images[chosen])).argmax(-1) == labels[chosen]).float().mean()
    assert main(["eval", "--data", str(tmp_path), "--keep-rates", "1", "--speed-reps", "1", "--workers", "0",
                 "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["rows"][0]
    assert row["images"] == 60 and row["top1"] == pytest.approx(100 * expected.item(), abs=1e-4)


def test_a_16_bit_image_reads_as_its_8_bit_self_and_a_32_bit_one_out_of_range_is_named(tmp_path):
    """PIL's own conversion clips 16-bit pixels at 255 (a white picture, scored silently)."""
    import numpy as np
    from PIL import Image

    from evit.images import open_image

    pixels = np.arange(28 * 28, dtype=np.uint16).reshape(28, 28) % 256
    Image.fromarray(pixels.astype(np.uint8)).save(tmp_path / "eight.png")
    Image.fromarray(pixels * 257).save(tmp_path / "sixteen.png")
    assert Image.open(tmp_path / "sixteen.png").mode == "I;16"
    for mode in ("L", "RGB"):
        assert np.array_equal(np.asarray(open_image(str(tmp_path / "sixteen.png"), mode)),
                              np.asarray(open_image(str(tmp_path / "eight.png"), mode)))
    Image.fromarray(np.full((4, 4), 70000, np.int32)).save(tmp_path / "wide.tiff")
    with pytest.raises(ValueError, match="pixels span 70000..70000, not 0..255"):
        open_image(str(tmp_path / "wide.tiff"), "L")
    Image.fromarray((pixels / 255).astype(np.float32)).save(tmp_path / "unit.tiff")  # 0..1: black if read as 0..255
    with pytest.raises(ValueError, match="F pixels span 0..1, not 0..255"):
        open_image(str(tmp_path / "unit.tiff"), "L")
    Image.fromarray(pixels.astype(np.float32)).save(tmp_path / "float.tiff")  # floats on 0..255 read as they are
    assert np.array_equal(np.asarray(open_image(str(tmp_path / "float.tiff"), "L")), pixels)


def test_images_pil_reads_beyond_png_and_jpeg_are_counted_and_other_files_named(tmp_path, capsys):
    """BMP, GIF, TIFF and WebP files are read (timm's list has PNG and JPEG only): the same images in those
    formats score exactly as the bundled tensors; a file that is no image is named in one warning, not counted."""
    import numpy as np
    from PIL import Image

    from evit import embedded
    from evit.data import normalize

    images, labels = embedded.test_subset()
    chosen = torch.cat([torch.nonzero(labels == c)[:4, 0] for c in range(10)])
    formats = [(".bmp", {}), (".gif", {}), (".tif", {}), (".webp", {"lossless": True}), (".png", {})]
    for n, i in enumerate(chosen.tolist()):
        folder = tmp_path / "val" / f"c{int(labels[i])}"
        folder.mkdir(parents=True, exist_ok=True)
        suffix, options = formats[n % len(formats)]
        Image.fromarray(images[i, 0].numpy().astype(np.uint8)).save(folder / f"{i}{suffix}", **options)
    (tmp_path / "val" / "c3" / "notes.txt").write_text("not an image")
    with torch.no_grad():
        expected = (embedded.load_model()(normalize(images[chosen])).argmax(-1) == labels[chosen]).float().mean()
    assert main(["eval", "--data", str(tmp_path), "--keep-rates", "1", "--speed-reps", "1", "--workers", "0",
                 "--json"]) == 0
    captured = capsys.readouterr()
    row = json.loads(captured.out)["rows"][0]
    assert row["images"] == 40 and row["top1"] == pytest.approx(100 * expected.item(), abs=1e-4)
    warnings = [line for line in captured.err.splitlines() if "not an image evit reads" in line]
    assert len(warnings) == 1 and "1 file in class folders is" in warnings[0] and ".txt" in warnings[0]


def test_a_folder_given_relative_resumes_from_another_working_directory(data, recipe, tmp_path, monkeypatch):
    """config.json records the folder's absolute path: the same folder, named from elsewhere, resumes; another
    folder of the same relative name does not."""
    out = tmp_path / "run"
    monkeypatch.chdir(data.parent)
    cfg = TrainConfig.from_file(str(recipe), data=data.name, out=str(out), workers=0, max_steps=1)
    train(cfg, progress=False)
    assert json.loads((out / "config.json").read_text())["data"] == str(data)
    monkeypatch.chdir(tmp_path)
    train(replace(cfg, data=str(data), max_steps=2), resume=True, progress=False)
    (tmp_path / data.name).mkdir()  # the same relative name, here: another folder
    with pytest.raises(ValueError, match="was started with data"):
        train(replace(cfg, max_steps=3), resume=True, progress=False)


def test_each_model_compared_on_a_folder_reads_it_its_own_way(data):
    """Models evaluated together on one folder (compare's baseline beside trained files) each get the folder read
    their own way: a file may record the mean and std it was trained with, and a model fed another's would be
    scored on images it was not trained to see."""
    import timm

    from evit import hosts
    from evit.evaluate import fresh_batches
    from evit.folders import eval_batches
    from evit.images import image_transform, open_image

    plain = timm.create_model("vit_tiny_patch16_224", **TINY32)
    recorded = timm.create_model("vit_tiny_patch16_224", **TINY32)
    hosts.adapter(recorded).record_preprocessing(mean=(0.2, 0.3, 0.4), std=(0.5, 0.6, 0.7), crop_pct=1.0,
                                                 interpolation="bilinear")
    batches = eval_batches(data, [plain, recorded], batch_size=4, workers=0)
    first = batches.split.samples[0][0]
    seen = []
    for model in (plain, recorded, plain):  # each asked for in turn, as evaluate asks
        images, _ = next(iter(fresh_batches(batches, model)))
        transform, mode = image_transform(model, (3, 32, 32), train=False)
        assert torch.equal(images[0], transform(open_image(first, mode)))
        seen.append(images[0])
    assert not torch.equal(seen[0], seen[1]) and torch.equal(seen[0], seen[2])  # two readings, each its own


def test_compare_chooses_patch_slimmings_tokens_from_images_read_as_the_patched_model_reads_them(
        data, recipe, tmp_path, monkeypatch, capsys):
    """On a folder, Patch Slimming's sample images (the first evaluation batch) are read as the model being patched
    reads images: a trained file that records another mean and std chooses from images normalised its way, not the
    baseline's."""
    import timm
    from safetensors.torch import save_file

    from evit import hosts
    from evit.checkpoint import PREPROCESSING_KEY
    from evit.evaluate import fresh_batches
    from evit.folders import eval_batches
    from evit.methods import patch_slimming

    reading = dict(mean=[0.2, 0.3, 0.4], std=[0.5, 0.6, 0.7], crop_pct=1.0, interpolation="bilinear")
    torch.manual_seed(0)
    trained = timm.create_model("vit_tiny_patch16_224", **TINY32)
    path = tmp_path / "own_reading.safetensors"
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(path),
              metadata={PREPROCESSING_KEY: json.dumps(reading)})
    hosts.adapter(trained).record_preprocessing(**{k: tuple(v) if isinstance(v, list) else v for k, v in reading.items()})
    plain = timm.create_model("vit_tiny_patch16_224", **TINY32)
    first = {name: next(iter(fresh_batches(eval_batches(data, [m], 16, workers=0), m)))[0]
             for name, m in (("plain", plain), ("own", trained))}
    assert not torch.equal(first["plain"], first["own"])  # the two readings differ

    chosen_from, select = [], patch_slimming.select
    monkeypatch.setattr(patch_slimming, "select", lambda model, images, *a, **k: chosen_from.append(
        (tuple(hosts.data_config(model)["mean"]), images)) or select(model, images, *a, **k))
    assert main(["compare", "--recipe", str(recipe), "--data", str(data), "--workers", "0", "--batch-size", "16",
                 "--methods", "patchslimming", "--keep-rates", "0.5", "--trained", f"patchslimming={path}",
                 "--speed-reps", "1", "--plot", str(tmp_path / "c.png"), "--json"]) == 0, capsys.readouterr().err
    own = [images for mean, images in chosen_from if mean == tuple(reading["mean"])]
    plain_rows = [images for mean, images in chosen_from if mean != tuple(reading["mean"]) and len(images) == 16]
    assert own and all(torch.equal(images, first["own"]) for images in own)
    assert plain_rows and all(torch.equal(images, first["plain"]) for images in plain_rows)


@pytest.mark.parametrize("names", ["c0", [0, 1], ["c0", "c0"], {"a": 1}, True, ["c0", ""]])
def test_a_damaged_class_list_in_a_run_config_is_named(names, tmp_path):
    """A run's config.json whose class_names is not a list of distinct names was read as one: a string as its
    letters, a dict as its keys (refused as a head of another width), ints or true as a Python error's text."""
    from evit.folders import run_class_names

    (tmp_path / "config.json").write_text(json.dumps({"model": "vit_tiny_patch16_224", "class_names": names}))
    with pytest.raises(ValueError, match=r"config.json: its class_names is damaged"):
        run_class_names(str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"model": "vit_tiny_patch16_224", "class_names": ["b", "a"]}))
    assert run_class_names(str(tmp_path / "model.safetensors"))[0] == ["b", "a"]
