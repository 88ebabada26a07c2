"""benchmarks/gpu.py, the one prepared GPU run, checked here in its --quick CPU mode: every step runs
and writes its results, so the script is known to work before a GPU is ever lent."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"


def _run(*args, timeout=600):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu") / "results"
    proc = _run("--quick", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "results.json").read_text()), out


def test_every_step_runs_and_is_written(quick):
    results, out = quick
    assert set(results["steps"]) == {"env", "accuracy", "train", "bench", "overhead", "compile", "transformers"}
    assert all(s["ok"] for s in results["steps"].values()), results["steps"]
    assert results["env"]["torch"] and results["env"]["device"] == "cpu"
    report = (out / "report.txt").read_text()
    assert "## bench" in report and "every step ran" in report
    assert (out / "compare.png").stat().st_size > 0


def test_bench_rows_give_speed_against_the_ideal(quick):
    rows = quick[0]["bench"]
    reduced = [r for r in rows if r["variant"] != "unpatched"]
    assert {r["variant"] for r in reduced} == {"evit", "tome"}
    assert {r["model"] for r in rows} == {"vit_tiny", "hf_vit_tiny"}  # timm's and transformers' models alike
    assert {r["dtype"] for r in rows} == {"fp32", "bf16"}
    for r in reduced:
        for key in ("speedup", "ideal_speedup", "of_ideal", "latency_speedup", "latency_of_ideal"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
        assert r["tokens"][-1] < r["tokens"][0]  # it really reduced


def test_compile_rows_cover_eager_and_compiled_at_both_batches(quick):
    rows = quick[0]["compile"]
    assert {(r["batch_size"], r["dtype"], r["backend"], r["variant"]) for r in rows} == {
        (b, d, k, v) for b, d in ((4, "fp32"), (1, "fp32"), (4, "bf16")) for k in ("eager", "compiled")
        for v in ("unpatched", "evit", "ideal")}
    assert all(math.isfinite(r["of_ideal"]) for r in rows if r["variant"] == "evit")


def test_overhead_rows_count_what_each_variant_adds(quick):
    rows = {(r["dtype"], r["batch_size"], r["variant"]): r for r in quick[0]["overhead"]}
    assert set(rows) == {(d, b, v) for d, b in (("fp32", 1), ("bf16", 4)) for v in ("unpatched", "ideal", "evit", "tome")}
    for (d, b, v), r in rows.items():
        assert 0 < r["host_ms"] <= r["wall_ms"] and r["kernels"] is None and r["syncs"] is None  # CPU: no kernels
        # EViT adds its ranking and selection to the ideal's ops; ToMe its matching in every block
        assert rows[(d, b, "unpatched")]["ops"] <= rows[(d, b, "ideal")]["ops"] < rows[(d, b, "evit")]["ops"] < r["ops"] + 1000
    assert rows[("fp32", 1, "tome")]["ops"] > rows[("fp32", 1, "evit")]["ops"]


def test_accuracy_on_the_same_device_changes_no_prediction(quick):
    acc = quick[0]["accuracy"]
    assert [r["keep_rate"] for r in acc["eval"]["rows"]] == [1.0, 0.7, 0.5, 0.7, 0.5]
    assert any(r["method"] == "tome" for r in acc["compare"]["rows"])
    for r in acc["prediction_changes"]:  # CPU against CPU: the check itself must find nothing
        assert r["changed"] == 0 and r["max_abs_logit_diff"] == 0.0, r
        assert 50 < r["top1_cpu"] <= 100
    # each embedded model runs as `evit eval` runs it (the EViT model with the fusion it was trained with)
    from evit import embedded
    from evit.data import TensorLoader
    from evit.evaluate import accuracy, apply_setting

    images, labels = embedded.test_subset()
    n = acc["prediction_changes"][0]["images"]
    for r in acc["prediction_changes"]:
        model = embedded.load_model(r["model"]).eval()
        apply_setting(model, r["keep_rate"])
        top1, _, _ = accuracy(model, TensorLoader(images[:n], labels[:n], 64).batches(0))
        assert r["top1_cpu"] == pytest.approx(top1, abs=1e-6), r


def test_training_is_killed_resumed_and_exact(quick):
    train = quick[0]["train"]
    assert train["killed_exit"] == -9  # a real SIGKILL mid-run
    assert train["loss_falls"], (train["loss_first"], train["loss_last"])
    assert train["resume_exact"] and train["control_two_runs_max_diff"] == 0.0
    assert train["runs"]["resumed"]["step"] == train["steps"]


def test_transformers_rows_cover_every_family_and_implementation(quick):
    rows = quick[0]["transformers"]
    sys.path.insert(0, str(SCRIPT.parent))
    from gpu_transformers import FAMILIES

    assert {(r["model"], r["attn_implementation"]) for r in rows} == {(f, i) for f in FAMILIES for i in ("sdpa", "eager")}
    for r in rows:  # CPU against CPU, and evit at zero reduction against the plain model: nothing may differ
        assert r["unpatched_device_vs_cpu"] == 0.0 and r["evit 0.5 device_vs_cpu"] == 0.0, r
        assert r["tome r=3 device_vs_cpu"] == 0.0 and r["zero_reduction_vs_unpatched"] < 1e-5, r
        assert r["evit 0.5 bf16 finite"] and 0 < r["evit 0.5 bf16_vs_fp32"] < r["evit 0.5 scale"], r


def test_full_mode_without_a_gpu_is_refused_in_one_line(tmp_path):
    proc = _run("--out", str(tmp_path / "r"), timeout=120)
    assert proc.returncode == 2 and "no CUDA" in proc.stderr and "Traceback" not in proc.stderr
