"""The embedded default: bundled weights and test images reproduce the README's figures."""
import re
from pathlib import Path


from evit import embedded
from evit.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_rows(marker: str) -> dict:
    text = README.read_text()
    block = text.split(marker, 1)[1].split("```", 2)[1]
    rows = {}
    for line in block.splitlines():
        m = re.match(r"\s*(\S+)\s+(\d\.\d\d)\s+(\d+\.\d\d)\s+(\d+\.\d\d)\s+(\d+)\s", line)
        if m:
            rows[(m.group(1), float(m.group(2)))] = (float(m.group(3)), int(m.group(5)))
    return rows


def test_bundled_assets_are_small_and_licensed():
    for name in (*embedded.WEIGHTS.values(), embedded.TEST_SUBSET, "FASHION_MNIST_LICENSE"):
        path = embedded.ASSETS / name
        assert path.is_file(), f"{name} is not bundled"
        assert path.stat().st_size < 4_000_000
    x, y = embedded.test_subset()
    assert x.shape == (3000, 1, 28, 28) and int(y.max()) == 9


def test_eval_on_bundled_subset_reproduces_readme(capsys):
    expected = _readme_rows("<!-- evit eval: bundled subset -->")
    assert len(expected) == 5, "the README table of the bundled evaluation was not found"
    assert main(["eval", "--json", "--speed-reps", "1"]) == 0
    import json

    rows = json.loads(capsys.readouterr().out)["rows"]
    got = {(r["model"], r["keep_rate"]): (round(r["top1"], 2), r["images"]) for r in rows}
    assert got == expected
    # off the shelf EViT fuses as the authors do; the EViT-trained model as it was trained (its metadata)
    fusions = {(r["model"], r["keep_rate"]): r["settings"].get("fusion") for r in rows if r["keep_rate"] < 1}
    assert fusions == {("baseline", 0.7): "sum", ("baseline", 0.5): "sum",
                       ("evit-trained", 0.7): "mean", ("evit-trained", 0.5): "mean"}


def test_bench_defaults_to_the_embedded_model(capsys):
    assert main(["bench", "--keep-rates", "0.7", "--batch-size", "4", "--reps", "1", "--latency-reps", "1",
                 "--warmup", "0", "--json"]) == 0
    import json

    out = json.loads(capsys.readouterr().out)
    assert out["model"] == "embedded Fashion-MNIST ViT"
    assert out["rows"][1]["tokens"][0] == 50 and out["rows"][1]["gmacs"] < out["rows"][0]["gmacs"]


def test_bundled_recipes_form_complete_chains():
    """Every recipe that starts from (or learns from) a run's weights names a run another bundled recipe makes."""
    import json

    from evit.embedded import RECIPES
    from evit.train import TrainConfig

    recipes = {f.stem: json.loads(f.read_text()) for f in RECIPES.glob("*.json")}
    made = {f"{r['out']}/model.safetensors" for r in recipes.values()}
    for name, r in recipes.items():
        TrainConfig.from_file(str(RECIPES / f"{name}.json"))  # every key is one evit train knows
        for key in ("init", "distill"):
            if r.get(key, "").startswith("runs/"):
                assert r[key] in made, f"recipe {name}: {key} {r[key]} is made by no bundled recipe"
    assert {"fashion_mnist_baseline", "fashion_mnist_baseline_cont", "fashion_mnist_evit",
            "fashion_mnist_evit_cont"} <= set(recipes)
