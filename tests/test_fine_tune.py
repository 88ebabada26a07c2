"""A user's own classes: `evit train --model NAME --data FOLDER` sizes the head to the folder's classes,
`--init` / `--pretrained` weights trained on other classes load without their head, and the commands that
read a run's weights (`eval`, `show`, `export`, ...) build the model with the head those weights have."""
import json
import shutil

import pytest
import timm
import torch
from safetensors.torch import load_file

import evit.train
from evit import hosts
from evit.cli import main
from evit.loading import load_model
from evit.train import TrainConfig

TINY = {"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2}
NAME = "vit_tiny_patch16_224"


@pytest.fixture(scope="module")
def three_classes(jpeg_folder):
    """An image folder of 3 classes (c0..c2), 6 training and 4 validation images each."""
    root = jpeg_folder(6, 4)
    for split in ("train", "val"):
        for c in range(3, 10):
            shutil.rmtree(root / split / f"c{c}")
    return root


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    """The tiny architecture without a class count: the data decides it."""
    path = tmp_path_factory.mktemp("recipe") / "tiny.json"
    path.write_text(json.dumps({"model": NAME, "model_kwargs": TINY}))
    return path


def _weights(tmp_path, classes: int, seed: int = 3) -> tuple:
    """A torch file of the tiny architecture with a head of ``classes`` outputs (as a checkpoint trained on
    ImageNet would come), and its state."""
    torch.manual_seed(seed)
    state = timm.create_model(NAME, num_classes=classes, **TINY).state_dict()
    path = tmp_path / f"init{classes}.pth"
    torch.save({"model": state}, path)
    return path, state


def test_the_head_is_as_wide_as_the_datas_classes(three_classes, recipe):
    cfg = TrainConfig.from_file(str(recipe), data=str(three_classes), workers=0)
    assert hosts.head_outputs(evit.train.build_model(cfg)) == 3
    assert hosts.head_outputs(evit.train.build_model(TrainConfig.from_file(str(recipe)))) == 10  # Fashion-MNIST's


def test_init_weights_for_other_classes_load_without_their_head(three_classes, recipe, tmp_path, capsys):
    path, state = _weights(tmp_path, classes=7)
    cfg = TrainConfig.from_file(str(recipe), data=str(three_classes), init=str(path), workers=0)
    model = evit.train.build_model(cfg)
    own = model.state_dict()
    assert own["head.weight"].shape == (3, 32)
    loaded = [k for k in state if not k.startswith("head.")]
    assert loaded and all(torch.equal(own[k], state[k]) for k in loaded)  # every other tensor is the file's
    assert not torch.equal(own["head.weight"][:3], state["head.weight"][:3])
    err = capsys.readouterr().err
    assert f"the head of {path} has 7 outputs and the model's 3: the rest loads, the head starts untrained" in err


def test_weights_of_another_width_beyond_the_head_are_still_refused(three_classes, tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "wide.pth"
    torch.save(timm.create_model(NAME, num_classes=7, **{**TINY, "embed_dim": 64}).state_dict(), path)
    with pytest.raises(ValueError, match="does not fit"):
        load_model(NAME, checkpoint=str(path), model_kwargs=dict(TINY, num_classes=3), fresh_head=True)


def test_a_run_on_three_classes_is_evaluated_and_shown_with_its_own_head(three_classes, recipe, tmp_path, capsys):
    """From the command line: weights of 1000 classes fine-tuned on a folder of 3, then read back; the recipe
    gives the architecture only (no class count anywhere)."""
    path, _ = _weights(tmp_path, classes=1000)
    out, arch = tmp_path / "run", ["--recipe", str(recipe)]
    assert main(["train", *arch, "--init", str(path), "--data", str(three_classes), "--out", str(out),
                 "--max-steps", "2", "--batch-size", "6", "--keep-rate", "0.7", "--workers", "0", "--no-progress"]) == 0
    assert "has 1000 outputs and the model's 3" in capsys.readouterr().err
    weights = str(out / "model.safetensors")
    assert load_file(weights)["head.weight"].shape[0] == 3
    assert hosts.head_outputs(load_model(recipe=str(recipe), checkpoint=weights)[1]) == 3
    assert main(["eval", *arch, "--checkpoint", weights, "--data", str(three_classes), "--keep-rates", "0.7",
                 "--speed-reps", "1", "--json"]) == 0, capsys.readouterr().err
    [row] = json.loads(capsys.readouterr().out)["rows"]
    assert row["images"] == 12
    image = next((three_classes / "val" / "c0").iterdir())
    assert main(["show", str(image), *arch, "--checkpoint", weights, "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").stat().st_size > 0


def test_a_teacher_for_other_classes_is_refused_in_one_line(three_classes, recipe, tmp_path, capsys):
    teacher, _ = _weights(tmp_path, classes=7)
    assert main(["train", "--recipe", str(recipe), "--data", str(three_classes), "--distill", str(teacher),
                 "--out", str(tmp_path / "run"), "--max-steps", "1", "--batch-size", "6", "--workers", "0",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--distill: the teacher" in err and "has 7 outputs but the data 3 classes" in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_a_transformers_folder_for_other_classes_is_fine_tuned_on_the_datas(three_classes, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                    image_size=32, patch_size=8, num_labels=7)
    torch.manual_seed(0)
    saved = transformers.ViTForImageClassification(config)
    saved.save_pretrained(tmp_path / "vit7")
    spec = f"hf:{tmp_path / 'vit7'}"
    cfg = TrainConfig(model=spec, pretrained=True, data=str(three_classes), workers=0)
    model = evit.train.build_model(cfg)
    assert hosts.head_outputs(model) == 3 and model.classifier.out_features == 3
    own, theirs = model.state_dict(), saved.state_dict()
    assert torch.equal(own["vit.embeddings.cls_token"], theirs["vit.embeddings.cls_token"])  # the rest is the folder's
    assert "hold a head for other classes; the model's head (3 outputs) starts untrained" in capsys.readouterr().err
    with pytest.raises(ValueError, match="do not fit the model's config .* beyond its head"):
        evit.train.build_model(TrainConfig(model=spec + ":intermediate_size=32", pretrained=True, data=str(three_classes)))
