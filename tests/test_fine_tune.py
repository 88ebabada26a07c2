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
    assert main(["export", *arch, "--checkpoint", weights, "--onnx", str(tmp_path / "m.onnx")]) == 0
    assert main(["bench", *arch, "--checkpoint", weights, "--keep-rates", "0.7", "--batch-size", "2", "--reps", "1",
                 "--latency-reps", "1", "--warmup", "0"]) == 0, capsys.readouterr().err


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


DISTILLED = "deit_tiny_distilled_patch16_224"


def test_a_distilled_deit_is_fine_tuned_with_both_heads_and_heads_that_disagree_are_refused(three_classes, tmp_path,
                                                                                            capsys):
    torch.manual_seed(0)
    state = timm.create_model(DISTILLED, num_classes=1000, **TINY).state_dict()
    torch.save({"model": state}, tmp_path / "d1000.pth")
    model = evit.train.build_model(TrainConfig(model=DISTILLED, model_kwargs=TINY, init=str(tmp_path / "d1000.pth"),
                                               data=str(three_classes), workers=0))
    own = model.state_dict()
    assert own["head.weight"].shape == own["head_dist.weight"].shape == (3, 32)
    assert torch.equal(own["dist_token"], state["dist_token"])
    assert "has 1000 outputs and the model's 3" in capsys.readouterr().err
    odd = dict(state, **{"head_dist.weight": torch.zeros(3, 32), "head_dist.bias": torch.zeros(3)})
    torch.save(odd, tmp_path / "odd.pth")  # a head for 1000 classes beside a distillation head for 3
    with pytest.raises(ValueError, match=r"holds heads of different widths \(head 1000 outputs, head_dist 3 outputs\)"):
        load_model(DISTILLED, checkpoint=str(tmp_path / "odd.pth"), model_kwargs=TINY)


def test_a_feature_extractors_weights_are_fine_tuned_with_a_new_head_and_not_evaluated(three_classes, recipe,
                                                                                        tmp_path, capsys):
    torch.manual_seed(0)
    state = timm.create_model(NAME, num_classes=0, **TINY).state_dict()  # head: Identity, no tensors
    path = tmp_path / "features.pth"
    torch.save(state, path)
    model = evit.train.build_model(TrainConfig(model=NAME, model_kwargs=TINY, init=str(path), data=str(three_classes),
                                               workers=0))
    assert hosts.head_outputs(model) == 3 and torch.equal(model.state_dict()["cls_token"], state["cls_token"])
    said = capsys.readouterr().err
    assert f"{path} holds no classification head (a feature extractor's weights): the rest loads" in said
    assert main(["eval", "--recipe", str(recipe), "--checkpoint", str(path), "--data", str(three_classes)]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds no classification head" in err and f"evit train --init {path}" in err and len(err.splitlines()) == 1


def test_weights_that_do_not_fit_say_nothing_about_a_head_loading(three_classes, tmp_path, capsys):
    """Refused weights of another width are not first announced as loading ('the rest loads')."""
    torch.manual_seed(0)
    path = tmp_path / "wide.pth"
    torch.save(timm.create_model(NAME, num_classes=7, **{**TINY, "embed_dim": 64}).state_dict(), path)
    with pytest.raises(ValueError, match="does not fit"):
        load_model(NAME, checkpoint=str(path), model_kwargs=dict(TINY, num_classes=3), fresh_head=True)
    assert "the rest loads" not in capsys.readouterr().err


def test_a_plain_vits_weights_for_a_distilled_deit_name_what_differs(tmp_path):
    """timm's position-embedding filter fails on the other prefix-token count (a reshape): the keys are named."""
    torch.manual_seed(0)
    path = tmp_path / "vit.pth"
    torch.save(timm.create_model(NAME, num_classes=3, **TINY).state_dict(), path)
    differ = r"pos_embed \(checkpoint \[1, 17, 32\], model \[1, 18, 32\]\).*; missing dist_token"
    with pytest.raises(ValueError, match=differ):
        load_model(DISTILLED, checkpoint=str(path), model_kwargs=TINY)


@pytest.mark.parametrize("classes", [1, 0])
def test_a_folder_of_fewer_than_two_classes_is_refused_for_training(three_classes, tmp_path, classes):
    root = tmp_path / "few"
    for split in ("train", "val"):
        (root / split).mkdir(parents=True)
        for c in range(classes):
            shutil.copytree(three_classes / split / f"c{c}", root / split / f"c{c}")
    with pytest.raises(ValueError, match=f"train has {classes} class(es)?; a classifier learns 2 or more"):
        evit.train.build_model(TrainConfig(model=NAME, model_kwargs=TINY, data=str(root), workers=0))


def test_a_class_count_the_settings_give_is_overridden_by_the_datas_and_said(three_classes, capsys):
    model = evit.train.build_model(TrainConfig(model=NAME, model_kwargs=dict(TINY, num_classes=5),
                                               data=str(three_classes), workers=0))
    assert hosts.head_outputs(model) == 3
    assert "the model's num_classes=5 is not the data's 3 classes: the head is built with 3" in capsys.readouterr().err
    evit.train.build_model(TrainConfig(model=NAME, model_kwargs=dict(TINY, num_classes=3), data=str(three_classes)))
    assert "num_classes" not in capsys.readouterr().err  # as the data says: nothing to say


HF_TINY = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32,
               patch_size=8)
HF_SPEC = "hf:vit:" + ",".join(f"{k}={v}" for k, v in HF_TINY.items())


def test_transformers_files_for_other_classes_or_none_are_fine_tuned_with_the_rest_loaded(three_classes, tmp_path,
                                                                                           capsys):
    """``--init`` of a ``save_pretrained`` file (transformers' saved layout, converted on loading) whose head is for
    1000 classes, or a base model's (no head): the rest is the file's; such a base file is not evaluated."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    saved = transformers.ViTForImageClassification(transformers.ViTConfig(**HF_TINY, num_labels=1000))
    saved.save_pretrained(tmp_path / "vit1000")
    base = transformers.ViTModel(saved.config)
    base.save_pretrained(tmp_path / "base")
    for folder, source, said in (("vit1000", saved.vit, "has 1000 outputs and the model's 3"),
                                 ("base", base, "holds no classification head")):
        init = tmp_path / folder / "model.safetensors"
        model = evit.train.build_model(TrainConfig(model=HF_SPEC, init=str(init), data=str(three_classes), workers=0))
        assert model.classifier.out_features == 3 and said in capsys.readouterr().err
        drawn = "embeddings.patch_embeddings.projection.weight"
        assert torch.equal(model.vit.state_dict()[drawn], source.state_dict()[drawn])
    with pytest.raises(ValueError, match="holds no classification head"):
        load_model(HF_SPEC, checkpoint=str(tmp_path / "base" / "model.safetensors"))


def test_weights_trained_on_fashion_mnist_fine_tuned_for_other_classes_keep_their_reading_not_their_names(
        three_classes, tmp_path):
    """A transformers or timm file trained on Fashion-MNIST's tensors, fine-tuned onto 3 classes: the model reads
    images as the file was trained to (its mean and std), but its fresh head is not named by Fashion-MNIST's 10
    classes (transformers would then count 10 labels on a head of 3, and the run was refused)."""
    pytest.importorskip("transformers")
    from evit import hosts
    from evit.checkpoint import TRAINED_ON, save_weights
    from evit.data import FASHION_MNIST_MEAN

    for spec, kwargs, classes in ((HF_SPEC + ",num_channels=1", {"num_labels": 10}, "num_labels"),
                                  (NAME, dict(TINY, num_classes=10, in_chans=1), "num_classes")):  # FM's 1 channel
        _, trained = load_model(spec, model_kwargs=kwargs)
        setattr(trained, TRAINED_ON, "fashion-mnist")
        save_weights(trained, tmp_path / "fashion.safetensors")
        _, model = load_model(spec, model_kwargs={**kwargs, classes: 3}, checkpoint=str(tmp_path / "fashion.safetensors"),
                              fresh_head=True)
        assert hosts.head_outputs(model) == 3 and hosts.class_names(model) is None, spec
        assert hosts.data_config(model)["mean"] == (FASHION_MNIST_MEAN,), spec


def test_a_teacher_models_folder_is_fine_tuned_as_deit_without_its_heads(three_classes, tmp_path, capfd):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    teacher = transformers.DeiTForImageClassificationWithTeacher(transformers.DeiTConfig(**HF_TINY, num_labels=1000))
    teacher.save_pretrained(tmp_path / "teacher")
    capfd.readouterr()
    spec = f"hf:{tmp_path / 'teacher'}:model_class=DeiTForImageClassification"
    model = evit.train.build_model(TrainConfig(model=spec, pretrained=True, data=str(three_classes), workers=0))
    assert type(model).__name__ == "DeiTForImageClassification" and model.classifier.out_features == 3
    assert torch.equal(model.deit.embeddings.cls_token, teacher.deit.embeddings.cls_token)
    err = capfd.readouterr().err
    assert "hold no DeiTForImageClassification head; the model's head (3 outputs) starts untrained" in err
    assert "incompatible" not in err  # transformers' own warning about num_labels and id2label: said by evit instead


def test_a_runs_weights_under_the_wrong_model_point_to_the_runs_config(three_classes, recipe, tmp_path, capsys):
    """A run's config.json records its architecture: the refusal says so, and the command it gives works."""
    out = tmp_path / "run"
    assert main(["train", "--recipe", str(recipe), "--data", str(three_classes), "--out", str(out), "--max-steps", "1",
                 "--batch-size", "6", "--workers", "0", "--no-progress"]) == 0
    weights, config = str(out / "model.safetensors"), out / "config.json"
    capsys.readouterr()
    assert main(["eval", "--model", NAME, "--checkpoint", weights, "--data", str(three_classes)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"(the run's {config} records its model and model_kwargs: build it from them with "
                        f"--recipe {config})") and len(err.splitlines()) == 1, err
    assert main(["eval", "--recipe", str(config), "--checkpoint", weights, "--data", str(three_classes),
                 "--keep-rates", "0.7", "--speed-reps", "1"]) == 0, capsys.readouterr().err


def test_pretrained_weights_for_other_classes_are_refused_outside_fine_tuning(three_classes, tmp_path, capsys):
    """Only `evit train` starts a head afresh: eval, show, bench or export of `--pretrained` weights built for
    another class count would score an untrained head, and are refused; train says what it left out."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    transformers.ViTForImageClassification(transformers.ViTConfig(**HF_TINY, num_labels=7)).save_pretrained(
        tmp_path / "vit7")
    path, _ = _weights(tmp_path, classes=1000)  # timm's pretrained weights, given as a local file
    timm_kwargs = dict(TINY, pretrained_cfg_overlay={"file": str(path)})
    deit = "deit_tiny_patch16_224"  # its pretrained weights are a torch file (older timm reads vit_tiny's as .npz)
    for name, kwargs, refused in ((f"hf:{tmp_path / 'vit7'}:num_labels=3", {}, "give the settings the weights were"),
                                  (deit, dict(timm_kwargs, num_classes=3), "have a head for 1000 classes, and the "
                                                                           "model asks for 3")):
        with pytest.raises(ValueError, match=refused):
            load_model(name, pretrained=True, model_kwargs=kwargs)
    capsys.readouterr()
    model = evit.train.build_model(TrainConfig(model=deit, model_kwargs=timm_kwargs, pretrained=True,
                                               data=str(three_classes), workers=0))
    assert hosts.head_outputs(model) == 3
    assert f"the pretrained head of {deit} has 1000 outputs and the model's 3" in capsys.readouterr().err


def test_a_transformers_folders_config_is_not_offered_as_a_recipe(tmp_path):
    """Beside a transformers folder's weights lies its own config.json (no evit "model"): --recipe cannot read it."""
    transformers = pytest.importorskip("transformers")
    transformers.ViTForImageClassification(transformers.ViTConfig(**HF_TINY, num_labels=3)).save_pretrained(
        tmp_path / "vit3")
    with pytest.raises(ValueError, match="does not fit") as refused:
        load_model(NAME, checkpoint=str(tmp_path / "vit3" / "model.safetensors"), model_kwargs=TINY)
    assert "--recipe" not in str(refused.value)
