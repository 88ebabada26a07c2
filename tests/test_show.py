"""Masks of which patches each stage kept, and the pictures of them."""
import os

import pytest
import torch

import evit
from evit.cli import main
from evit.masks import token_groups, token_sources
from evit.methods import kept_count
from conftest import input_for, make_model


def test_evit_groups_follow_the_counts():
    model = make_model("deit_distilled")  # two prefix tokens
    x = input_for(model, batch=3)
    evit.patch(model, keep_rate=0.5, locations=[1, 2])
    stages = token_groups(model, x)
    counts = evit.token_counts(model, 18)
    assert [s.block for s in stages] == [1, 2]
    assert [s.tokens for s in stages] == counts[1:]
    for stage in stages:
        assert stage.token.shape == (3, 4, 4)
        assert (stage.token >= 0).all(), "EViT fuses, it drops nothing"
        assert stage.size.sum(dim=(1, 2)).ge(16).all()
    # first stage: 8 of 16 patches kept alone, the other 8 in the fused token
    assert ((stages[0].size == 1).sum(dim=(1, 2)) == kept_count(0.5, 16)).all()
    assert ((stages[0].size == 8).sum(dim=(1, 2)) == 8).all()
    # a later stage keeps only patches kept earlier, or the earlier fused group whole
    alone_then = stages[0].size == 1
    assert ((stages[1].size == 1) <= alone_then).all()


def test_topk_drops_and_tome_partitions():
    model = make_model("deit")
    x = input_for(model, batch=2)
    evit.patch(model, method="topk", keep_rate=0.25, locations=[0])
    (stage,) = token_groups(model, x)
    assert ((stage.token < 0).sum(dim=(1, 2)) == 16 - 4).all()
    evit.patch(model, method="tome", r=3)
    stages = token_groups(model, x)
    assert len(stages) == 4
    for s in stages:
        assert (s.token >= 0).all()
        for b in range(2):  # every patch in exactly one token; tokens = distinct groups
            assert len(set(s.token[b].flatten().tolist())) == s.tokens - 1
            sizes = {int(t): int(z) for t, z in zip(s.token[b].flatten(), s.size[b].flatten())}
            assert sum(sizes.values()) == 16


def test_tracking_leaves_outputs_and_state_alone():
    model = make_model("deit")
    x = input_for(model)
    evit.patch(model, keep_rate=0.5)
    with torch.no_grad():
        ref = model(x)
    sources = token_sources(model, x)
    assert all(s.dtype == torch.bool for _, s in sources)
    state = next(iter(evit.reductions(model).values())).state
    assert not state.track and not state.stages
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref)


def test_unpatched_model_refused():
    with pytest.raises(ValueError, match="patch it first"):
        token_sources(make_model("deit"), torch.randn(1, 3, 64, 64))


@pytest.mark.parametrize("method,setting", [("evit", ["--keep-rate", "0.5"]), ("tome", ["--r", "2"])])
def test_evit_show_writes_a_png(tmp_path, method, setting, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "tokens.png"
    assert main(["show", "--method", method, *setting, "--count", "2", "--out", str(out)]) == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert "wrote" in capsys.readouterr().out
    assert main(["show", "--method", method, *setting, "--count", "1", "--out", str(tmp_path / "plain")]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'plain.png'}" and (tmp_path / "plain.png").is_file()


@pytest.mark.parametrize("method,other", [("evit", ["--r", "2"]), ("tome", ["--keep-rate", "0.5"])])
def test_evit_show_refuses_a_setting_the_method_does_not_take(tmp_path, method, other, capsys):
    assert main(["show", "--method", method, *other, "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"{other[0]} sets" in err and f"which {method} does not take" in err
    assert not (tmp_path / "x.png").exists()


def test_evit_show_bad_inputs(tmp_path, capsys):
    bad = tmp_path / "not_an_image.png"
    bad.write_text("hello")
    assert main(["show", str(bad), "--out", str(tmp_path / "x.png")]) == 2
    assert "cannot read image" in capsys.readouterr().err
    assert main(["show", "--out", str(tmp_path / "missing" / "x.png")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_evit_show_refuses_a_pipe_or_a_folder_instead_of_waiting_on_it(tmp_path, capsys):
    """Reading a named pipe waits for a writer that never comes: it is refused before it is opened."""
    pipe = tmp_path / "pipe.png"
    os.mkfifo(pipe)
    assert main(["show", str(pipe), "--out", str(tmp_path / "x.png")]) == 2
    assert "pipe.png: it is not a regular file (a pipe, socket or device)" in capsys.readouterr().err
    assert main(["show", str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
    assert "it is a folder; give an image file" in capsys.readouterr().err


@pytest.mark.parametrize("channels", [1, 3])
def test_evit_show_runs_a_model_at_its_own_size_and_channels(tmp_path, channels, capsys):
    """A user's model built at 48 px (and grayscale): the image is cut at 48 px in the model's channels, not at
    the 224 px RGB of the architecture's pretrained config (timm's assertion, exit 1, before)."""
    pytest.importorskip("matplotlib")
    import json

    from PIL import Image

    recipe, image, out = tmp_path / "r.json", tmp_path / "a.png", tmp_path / "tokens.png"
    recipe.write_text(json.dumps({"model": "vit_tiny_patch16_224", "model_kwargs": {
        "img_size": 48, "depth": 2, "embed_dim": 32, "num_heads": 2, "num_classes": 3, "in_chans": channels}}))
    Image.new("RGB", (60, 40), (200, 30, 90)).save(image)
    assert main(["show", "--recipe", str(recipe), str(image), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "wrote" in capsys.readouterr().out
    assert main(["show", "--recipe", str(recipe), "--out", str(out)]) == 2  # the bundled images are the embedded model's
    assert "give image files to show with --recipe" in capsys.readouterr().err


def test_evit_show_refuses_to_write_over_an_image_it_shows(tmp_path, capsys):
    from PIL import Image

    image = tmp_path / "mine.png"
    Image.new("L", (28, 28), 128).save(image)
    before = image.read_bytes()
    assert main(["show", str(image), "--out", str(image)]) == 2
    assert "is an image this command reads" in capsys.readouterr().err and image.read_bytes() == before
    assert main(["show", str(image), "--out", str(tmp_path / "mine")]) == 2  # matplotlib would write mine.png
    assert "is an image this command reads" in capsys.readouterr().err and image.read_bytes() == before


def test_evit_show_runs_patch_slimming_with_the_choice_its_file_holds(tmp_path, capsys, monkeypatch):
    """Weights saved from a Patch-Slimming-patched model hold its choice of tokens: show uses it at the keep rate
    it was made for (as compare --trained does), where before it refused the file."""
    from safetensors.torch import save_file

    import evit
    import evit.show
    from evit import embedded
    from evit.data import normalize

    model = evit.patch(embedded.load_model("baseline"), 0.5, method="patchslimming",
                       images=normalize(embedded.test_subset()[0][:8]))  # records what the choice is for
    chosen = {1: torch.arange(0, 50, 2), 3: torch.arange(13), 4: torch.arange(6, 13)}  # no calibration's choice
    for m in evit.reductions(model).values():
        m.index = chosen[m.block]
    path = tmp_path / "slimmed.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    shown = {}
    monkeypatch.setattr(evit.show, "show", lambda model, *a, **k: shown.update(model=model) or tmp_path / "x.png")
    assert main(["show", "--method", "patchslimming", "--keep-rate", "0.5", "--checkpoint", str(path),
                 "--out", str(tmp_path / "s.png")]) == 0, capsys.readouterr().err
    assert (f"{path} holds Patch Slimming's choice of tokens made at blocks 1, 3, 4 for 50 tokens (7x7 patches), keeping 25, 13, 7 "
            "image tokens:") in capsys.readouterr().err
    used = {i: m.index for i, m in evit.reductions(shown["model"]).items()}
    assert used.keys() == chosen.keys() and all(torch.equal(used[i], chosen[i]) for i in chosen)
