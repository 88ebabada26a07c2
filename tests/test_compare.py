"""evit compare: every method side by side on the embedded model, a table, JSON and a plot."""
import json

import pytest

from evit.cli import main
from evit.compare import grid


def test_grid_runs_learned_methods_only_on_their_weights():
    settings, skipped = grid(["evit", "dynamicvit", "stvit", "tome"], [1.0, 0.7], [2], trained={"evit": "evit-trained"})
    assert settings[0] == ("baseline", 1.0)
    assert ("baseline", {"method": "evit", "keep_rate": 0.7}) in settings
    assert ("evit-trained", {"method": "evit", "keep_rate": 0.7}) in settings
    assert ("baseline", {"method": "tome", "r": 2}) in settings
    assert [s for m, s in settings if s != 1.0 and s["method"] == "stvit"] == [
        {"method": "stvit", "keep_rate": r} for r in (0.75, 0.5, 0.33, 0.18)]
    assert skipped == ["dynamicvit"] and not any(s != 1.0 and s["method"] == "dynamicvit" for _, s in settings)
    with pytest.raises(ValueError, match="does not know method"):
        grid(["nope"], [0.7], [1])


def test_evit_compare_on_the_embedded_model(tmp_path, capsys):
    plot = tmp_path / "compare.png"
    code = main(["compare", "--methods", "evit", "dynamicvit", "stvit", "patchslimming", "tome", "--keep-rates", "0.5",
                 "--r", "4", "--speed-reps", "1", "--plot", str(plot), "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    rows = out["rows"]
    methods = {r["method"] for r in rows}
    assert methods == {"none", "evit", "dynamicvit", "stvit", "patchslimming", "tome"}
    base = next(r for r in rows if r["method"] == "none")
    assert base["top1"] > 80 and base["images"] == 3000
    for r in rows:
        if r["method"] != "none":
            assert r["gmacs"] < base["gmacs"], r
            assert 10 < r["top1"] <= 100 and r["speedup"] > 0
    trained = {r["model"] for r in rows}
    assert {"evit-trained", "dynamicvit-trained"} <= trained, "the bundled trained weights are compared too"
    assert plot.stat().st_size > 10_000


def test_compare_draws_calibration_images_only_for_a_method_that_uses_them(tmp_path, monkeypatch, capsys):
    """Sample images (and the note on where they come from) only when a compared method chooses tokens from data."""
    import evit.commands

    def refuse(*args, **kwargs):
        raise AssertionError("calibration images drawn for methods that do not use them")

    monkeypatch.setattr(evit.commands, "_calibration_images", refuse)
    assert main(["compare", "--methods", "evit", "tome", "--keep-rates", "0.5", "--r", "4", "--speed-reps", "1",
                 "--batch-size", "1000", "--plot", str(tmp_path / "c"), "--data", "bundled", "--json"]) == 0
    captured = capsys.readouterr()
    assert "Patch Slimming" not in captured.err
    assert json.loads(captured.out)["plot"] == str(tmp_path / "c.png") and (tmp_path / "c.png").is_file()  # as written


def test_trained_weights_for_other_classes_are_refused_naming_the_file(tmp_path, capsys):
    from safetensors.torch import save_file

    from evit import embedded

    model = embedded.load_model("evit")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state["head.weight"], state["head.bias"] = state["head.weight"][:3].clone(), state["head.bias"][:3].clone()
    path = tmp_path / "three_classes.safetensors"
    save_file(state, str(path))
    code = main(["compare", "--methods", "evit", "--keep-rates", "0.7", "--trained", f"evit={path}",
                 "--speed-reps", "1", "--plot", str(tmp_path / "c.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert str(path) in err[0] and "3 outputs and the baseline's 10" in err[0]
    assert not (tmp_path / "c.png").exists()


def test_by_default_methods_that_cannot_serve_the_model_are_skipped_and_named(tmp_path, capsys):
    """A model that averages its image tokens (no class token): the class-token methods are named and skipped,
    the rest compared; asked for by name, such a method is refused."""
    recipe = tmp_path / "avg.json"
    recipe.write_text(json.dumps({"model": "vit_tiny_patch16_224", "model_kwargs": dict(
        img_size=28, patch_size=7, in_chans=1, num_classes=10, depth=2, embed_dim=32, num_heads=2,
        class_token=False, global_pool="avg")}))
    argv = ["compare", "--recipe", str(recipe), "--data", "bundled", "--speed-reps", "1", "--r", "2",
            "--keep-rates", "0.5", "--plot", str(tmp_path / "c.png"), "--json"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    compared = {r["method"] for r in json.loads(out)["rows"]}
    skipped = {line.split()[2] for line in err.splitlines() if " skipped: " in line}
    assert compared == {"none", "tome", "random"} and {"evit", "topk", "stvit", "patchslimming"} <= skipped
    assert main([a for a in argv if a not in ("--r", "2")] + ["--methods", "evit"]) == 2
    assert "evit cannot patch" in capsys.readouterr().err


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_patch_slimmings_saved_choice_is_the_one_its_trained_rows_use(tmp_path, capsys, monkeypatch, suffix):
    """Weights saved from a Patch-Slimming-patched model hold its choice of tokens: compare --trained loads
    it and runs the row at its keep rate with that choice (not one made again from the sample images); at
    another keep rate it chooses again, as on the baseline."""
    import torch
    from safetensors.torch import save_file

    import evit
    from evit import embedded
    from evit.data import TensorLoader, normalize
    from evit.evaluate import accuracy

    model = evit.patch(embedded.load_model("baseline"), 0.5, method="patchslimming",
                       images=normalize(embedded.test_subset()[0][:8]))  # records what the choice is for
    for m in evit.reductions(model).values():  # a choice no calibration would make: the first positions
        m.index = torch.arange({1: 25, 3: 13, 4: 7}[m.block])
    images, labels = (t[:400] for t in embedded.test_subset())  # fewer images: the choice is what is tested
    monkeypatch.setattr(embedded, "test_subset", lambda: (images, labels))
    own_top1 = accuracy(model, TensorLoader(images, labels, 256).batches(0))[0]
    path = tmp_path / f"slimmed{suffix}"
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    code = main(["compare", "--methods", "patchslimming", "--trained", f"patchslimming={path}", "--keep-rates", "0.5",
                 "0.7", "--speed-reps", "1", "--plot", str(tmp_path / "c.png"), "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    top1 = {(r["model"], r["keep_rate"]): r["top1"] for r in json.loads(out)["rows"]}
    assert top1["patchslimming-trained", 0.5] == own_top1 != top1["baseline", 0.5]
    assert top1["patchslimming-trained", 0.7] == top1["baseline", 0.7]  # chosen again: the same weights, same choice
    assert (f"{path} holds Patch Slimming's choice of tokens made at blocks 1, 3, 4 for 50 tokens (7x7 patches), keeping 25, 13, 7 "
            "image tokens:") in err
