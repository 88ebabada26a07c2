import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from evit.cli import main
from evit.evaluate import accuracy, evaluate, format_rows, paired_gap


class Fixed(torch.nn.Module):
    """Ranks classes by distance from the first pixel's value: a model whose accuracy is known."""

    def forward(self, x):
        return -(torch.arange(10.0)[None] - x[:, 0, 0, 0, None]).abs()


def test_accuracy_counts_top1_and_top5():
    x = torch.zeros(4, 1, 2, 2)
    x[:, 0, 0, 0] = torch.tensor([1, 2, 3, 4])
    y = torch.tensor([1, 2, 1, 0])  # right, right, 2 away (in the top 5), 4 away (not)
    top1, top5, n = accuracy(Fixed(), [(x, y)])
    assert (top1, top5, n) == (50.0, 75.0, 4)


def test_top5_is_not_reported_for_five_classes_or_fewer():
    class FewClasses(torch.nn.Module):
        def __init__(self, n):
            super().__init__()
            self.n = n

        def forward(self, x):
            return Fixed()(x)[:, : self.n]

    x = torch.zeros(4, 1, 2, 2)
    x[:, 0, 0, 0] = torch.tensor([1, 2, 3, 4])
    y = torch.tensor([1, 2, 0, 0])
    top1, top5, n = accuracy(FewClasses(5), [(x, y)])
    assert (top1, top5, n) == (50.0, None, 4)  # every top-5 of 5 classes holds the answer: not a measurement
    assert accuracy(FewClasses(6), [(x, y)])[1] == 50.0  # 6 classes: a real top-5 (both misses ranked 6th)
    row = dict(model="m", keep_rate=0.7, top1=50.0, top5=None, images=4, gmacs=0.01, images_per_s=100, speedup=1.0)
    assert format_rows([row]).splitlines()[-1].split()[2:4] == ["50.00", "-"]


def test_paired_gap_is_the_difference_with_a_paired_interval():
    reference = torch.tensor([True] * 90 + [False] * 10)
    right = reference.clone()
    right[:6] = False  # 6 images lost, 2 gained: -4 points
    right[90:92] = True
    gap, half = paired_gap(right, reference)
    d = right.double() - reference.double()
    assert abs(gap - -4.0) < 1e-9
    assert abs(half - 100 * 1.96 * float(np.std(d.numpy(), ddof=1)) / 10) < 1e-9
    assert paired_gap(reference, reference) == (0.0, 0.0)
    assert paired_gap(right[:50], reference) is None  # not the same images: no paired gap


def test_evaluate_reports_each_rows_gap_to_the_first():
    torch.manual_seed(0)
    x, y = torch.rand(64, 1, 4, 4) * 10, torch.randint(0, 10, (64,))
    x[:, 0, 0, 0] = torch.where(torch.arange(64) < 16, (y + 5) % 10, y).float()  # 16 of 64 wrong

    class Worse(torch.nn.Module):
        def forward(self, x):  # also wrong on rows 16-23 of each batch of 32: 16 more images
            z = x.clone()
            z[16:24, 0, 0, 0] = (z[16:24, 0, 0, 0] + 5) % 10
            return Fixed()(z)

    class Cost(torch.nn.Module):  # evaluate counts MACs and times a forward: give it a real layer
        def __init__(self, inner):
            super().__init__()
            self.inner, self.lin = inner, torch.nn.Linear(1, 1)

        def forward(self, x):
            return self.inner(x)

    rows = evaluate({"a": Cost(Fixed()), "b": Cost(Worse())}, [("a", 1.0), ("b", 1.0)], lambda: [(x[:32], y[:32]), (x[32:], y[32:])],
                    speed_batch=2, speed_reps=1)
    assert [r["top1"] for r in rows] == [75.0, 50.0]
    assert rows[0]["top1_gap"] == 0.0 and rows[1]["top1_gap"] == -25.0 and rows[1]["top1_gap_ci"] > 0
    assert "-25.00 [" in format_rows(rows)


def test_format_rows():
    row = dict(model="m", keep_rate=0.7, top1=91.234, top5=99.5, images=10, gmacs=0.01, images_per_s=100, speedup=1.5)
    table = format_rows([row])
    assert "91.23" in table and "1.50x" in table and "top-1 %" in table


def test_folder_data_reports_corrupt_image_by_path(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(d / f"{i}.png")
    (tmp_path / "val" / "dog" / "broken.png").write_bytes(b"not an image at all")
    recipe = tmp_path / "two_classes.json"
    recipe.write_text(json.dumps({"model": "deit_tiny_patch16_224", "model_kwargs": {"img_size": 32, "num_classes": 2}}))
    proc = subprocess.run(
        [sys.executable, "-m", "evit.cli", "eval", "--recipe", str(recipe), "--data", str(tmp_path),
         "--keep-rates", "1.0", "0.5", "--speed-reps", "1", "--batch-size", "4", "--json"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    named = [line for line in proc.stderr.splitlines() if "broken.png" in line]
    assert len(named) == 1 and "not counted" in named[0], proc.stderr  # named once, by path
    rows = json.loads(proc.stdout)["rows"]
    assert [r["keep_rate"] for r in rows] == [1.0, 0.5]
    # the unreadable file is skipped, nothing scored in its place: the 4 readable images
    assert [r["images"] for r in rows] == [4, 4] and rows[1]["gmacs"] < rows[0]["gmacs"]


def test_missing_folder_split_is_a_clear_error(tmp_path):
    (tmp_path / "train").mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "evit.cli", "eval", "--model", "deit_tiny_patch16_224", "--data", str(tmp_path)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 2
    assert "val does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_eval_resizes_fashion_mnist_to_the_models_input(tmp_path, capsys):
    """A model made for 32 px gets the 28 px images resized, not a deep assertion from timm."""
    import json as _json

    from evit.cli import main

    recipe = tmp_path / "r32.json"
    recipe.write_text(_json.dumps({"model": "vit_tiny_patch16_224", "model_kwargs": {
        "img_size": 32, "patch_size": 4, "in_chans": 1, "num_classes": 10, "depth": 1, "embed_dim": 32,
        "num_heads": 2}}))
    assert main(["eval", "--recipe", str(recipe), "--data", "bundled", "--keep-rates", "1.0", "--speed-reps", "1",
                 "--batch-size", "1000", "--json"]) == 0
    rows = _json.loads(capsys.readouterr().out)["rows"]
    assert rows[0]["images"] == 3000 and rows[0]["gmacs"] > 0


def test_an_rgb_model_on_fashion_mnist_is_refused_in_one_line(tmp_path, capsys):
    """Fashion-MNIST is grayscale: a 3-channel model got torch's conv error ('expected input ... to have 3 channels')."""
    recipe = tmp_path / "rgb.json"
    recipe.write_text(json.dumps({"model": "vit_tiny_patch16_224", "model_kwargs": {
        "img_size": 32, "patch_size": 4, "num_classes": 10, "depth": 1, "embed_dim": 32, "num_heads": 2}}))
    assert main(["eval", "--recipe", str(recipe), "--data", "bundled", "--keep-rates", "1.0", "--speed-reps", "1"]) == 2
    err = capsys.readouterr().err
    assert "takes 3-channel images, but Fashion-MNIST's are grayscale" in err and len(err.strip().splitlines()) == 1


def test_a_folder_given_as_checkpoint_is_named_a_folder(tmp_path, capsys):
    assert main(["eval", "--checkpoint", str(tmp_path), "--keep-rates", "1"]) == 2
    assert f"checkpoint {tmp_path} is a folder, not a weights file" in capsys.readouterr().err


def test_weights_are_read_by_their_bytes_not_their_name(tmp_path, capsys):
    """A torch file named .safetensors and a safetensors file named .pth (a renamed or mislabelled download)
    load as what they are; each was refused before, the first as 'damaged or truncated'."""
    from safetensors.torch import save_file

    from evit import embedded

    state = embedded.load_model().state_dict()
    torch.save(state, tmp_path / "torch.safetensors")
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "safe.pth")
    for name in ("torch.safetensors", "safe.pth"):  # the file's row beside the bundled baseline, both at 0.7
        assert main(["eval", "--checkpoint", str(tmp_path / name), "--keep-rates", "0.7", "--speed-reps", "1",
                     "--json"]) == 0
        rows = json.loads(capsys.readouterr().out)["rows"]
        assert [r["model"] for r in rows] == ["baseline", "baseline", name.split(".")[0]]
        assert rows[2]["top1"] == rows[1]["top1"] and rows[2]["images"] == 3000


def test_a_safetensors_file_whose_header_length_starts_like_a_pickle_is_read_as_safetensors(tmp_path):
    """A safetensors file begins with its header's length: one ending in byte 0x80 (1 in 256 files) starts the file
    as a torch pickle does, and must still be read as safetensors (and its recorded settings with it)."""
    import torch
    from safetensors.torch import save_file

    from evit.checkpoint import recorded_settings
    from evit.weights import read_state

    path = tmp_path / "w.safetensors"
    for pad in range(300):
        save_file({"w": torch.ones(2)}, str(path), metadata={"evit.method": "evit", "x": "y" * pad})
        if path.read_bytes()[:1] == b"\x80":
            break
    assert path.read_bytes()[:1] == b"\x80"
    assert torch.equal(read_state(str(path))["w"], torch.ones(2))
    assert recorded_settings(path) == {"method": "evit"}


def test_any_bytes_named_as_a_torch_file_are_refused_in_one_line(tmp_path):
    """torch's weights-only unpickler raises all kinds of errors on arbitrary bytes (IndexError, KeyError, ...):
    each is a refusal naming the file, never a traceback. Seeded draws, so a failure repeats."""
    import random

    import pytest

    from evit.weights import read_state

    draw = random.Random(0)
    path = tmp_path / "random.pth"
    for _ in range(300):
        head = bytes([0x80, draw.choice([2, 3, 4, 5])])  # a pickle's start, so the unpickler reads on
        path.write_bytes(head + bytes(draw.getrandbits(8) for _ in range(draw.choice([16, 64, 512]))))
        with pytest.raises(ValueError, match="random.pth cannot be read safely"):
            read_state(str(path))


def test_weights_from_another_input_size_are_resampled_and_said(capsys):
    from evit import embedded
    from evit.models import create_model, load_checkpoint, read_checkpoint

    def build(size, **kwargs):
        return create_model("vit_tiny_patch16_224", img_size=size, patch_size=4, in_chans=1, num_classes=10, depth=6,
                            embed_dim=128, num_heads=4, **kwargs)

    model, path = build(36), str(embedded.ASSETS / embedded.WEIGHTS["baseline"])
    state = read_checkpoint(model, path)
    assert state["pos_embed"].shape == model.pos_embed.shape == (1, 82, 128)
    assert capsys.readouterr().err == ""  # said once the weights load, not when they are read
    load_checkpoint(model, path, state=state)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and path in err[0] and "pos_embed (1x50x128) is resampled to this model's (1x82x128)" in err[0]
    load_checkpoint(build(28), path)
    assert capsys.readouterr().err == ""  # at its own size: nothing to say
    with pytest.raises(ValueError, match="does not fit"):
        load_checkpoint(build(36, mlp_ratio=2.0), path)  # resampled, then refused: the refusal alone is said
    assert capsys.readouterr().err == ""


def test_a_named_model_without_weights_is_scored_with_a_note_that_it_is_chance(tmp_path, capsys):
    recipe = tmp_path / "tiny.json"
    recipe.write_text(json.dumps({"model": "vit_tiny_patch16_224", "model_kwargs": dict(
        img_size=28, patch_size=7, in_chans=1, num_classes=10, depth=1, embed_dim=32, num_heads=2)}))
    assert main(["eval", "--recipe", str(recipe), "--data", "bundled", "--keep-rates", "1.0", "--speed-reps", "1"]) == 0
    err = capsys.readouterr().err
    assert "no --checkpoint or --pretrained" in err and "random weights" in err


def test_weights_trained_with_another_method_are_said_to_be_scored_with_evit(tmp_path, capsys):
    """eval's reduced rows run EViT: weights a run trained with STViT (or another method without parameters) were
    scored so without a word, beside the STViT top-1 the run had validated."""
    import timm

    from evit.checkpoint import save_weights

    kwargs = dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, depth=2, embed_dim=32, num_heads=2)
    recipe = tmp_path / "tiny.json"
    recipe.write_text(json.dumps({"model": "vit_tiny_patch16_224", "model_kwargs": kwargs}))
    path = tmp_path / "stvit.safetensors"
    save_weights(timm.create_model("vit_tiny_patch16_224", **kwargs), path, {"method": "stvit", "keep_rate": 0.5})
    argv = ["eval", "--recipe", str(recipe), "--checkpoint", str(path), "--data", "bundled", "--speed-reps", "1"]
    assert main(argv + ["--keep-rates", "0.5"]) == 0
    assert "weights were trained with stvit, but eval's reduced rows run EViT" in capsys.readouterr().err
    assert main(argv + ["--keep-rates", "1.0"]) == 0  # unreduced: nothing to say
    assert "trained with" not in capsys.readouterr().err
