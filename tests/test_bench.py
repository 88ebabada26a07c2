import json
import subprocess
import sys

import pytest
import torch

import evit
from evit.bench import bench, format_table, paired_ratio, time_interleaved
from evit.cli import main
from conftest import make_model


def test_time_interleaved_rotates_order_and_takes_medians():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = time_interleaved(fns, reps=3, warmup=1)
    assert set(times) == {"a", "b", "c"} and all(len(t) == 3 and min(t) >= 0 for t in times.values())
    assert calls == list("cab") + list("abc") + list("bca") + list("cab")  # warm-up, then 3 rotations


def test_time_interleaved_waits_for_the_device_around_each_timed_call():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "ab"}
    time_interleaved(fns, reps=2, warmup=1, sync=lambda: calls.append("sync"))
    # warm-up (b a), then a b, b a: each call between two waits, so queued work is inside the clock
    assert calls == [c for name in "baabba" for c in ("sync", name, "sync")]


def test_paired_ratio_cancels_common_swings():
    base = [1.0, 2.0, 1.0, 2.0, 1.0]
    twice_as_fast = [0.5, 1.0, 0.5, 1.0, 0.5]
    assert paired_ratio(base, twice_as_fast) == 2.0
    assert paired_ratio([1, 1, 1], [2, 0.5, 1]) == 1.0  # the median, not the mean


def test_bench_rows_are_consistent():
    model = make_model("deit")
    rows = bench(model, keep_rates=(1.0, 0.5), batch_size=2, reps=2, latency_reps=2, warmup=0, progress=False)
    base, full, half = rows
    assert base["variant"] == "unpatched" and base["keep_rate"] is None
    assert full["tokens"] == [17, 17, 17, 17] and full["gmacs"] == pytest.approx(base["gmacs"])
    assert half["tokens"] == [17, 10, 7, 5] and half["gmacs"] < full["gmacs"]
    for r in (full, half):
        # ratios of times: positive and finite (their size depends on a shared CPU's timing, so no bound on it)
        for key in ("speedup", "ideal_speedup", "of_ideal", "latency_of_ideal"):
            assert 0 < r[key] < float("inf"), key
    table = format_table(rows, 2)
    assert "of ideal" in table and "17->10->7->5" in table


def test_cli_bench_json(capsys):
    rc = main(["bench", "--model", "deit_tiny_patch16_224", "--keep-rates", "0.7", "--batch-size", "1",
               "--reps", "2", "--latency-reps", "1", "--warmup", "0", "--json"])
    assert rc == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert "\r" not in captured.err and "throughput (batch 1): 2/2" in captured.err  # not a terminal: plain lines
    assert out["rows"][1]["tokens"] == [197, 140, 100, 72]
    assert out["rows"][1]["gmacs"] < 0.7 * out["rows"][0]["gmacs"]


@pytest.mark.parametrize("argv, says", [
    (["bench", "--keep-rates", "1.5"], "evit bench: error: argument --keep-rates: keep_rate must be in (0, 1]"),
    (["eval", "--batch-size", "abc"], "evit eval: error: argument --batch-size: expected a positive integer"),
    (["show", "--no-such-option"], "evit show: error: unrecognized arguments: --no-such-option"),
    ([], "evit: error: the following arguments are required: command"),
    (["benchh"], "evit: error: argument command: invalid choice: 'benchh'"),
])
def test_bad_arguments_get_one_line(capsys, argv, says):
    """argparse's usage block is not printed: one line says what is wrong and which help to read."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(says), err
    assert err.rstrip().endswith("--help')")


def test_cli_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--keep-rates", "1.5"])
    assert e.value.code == 2
    assert "keep_rate must be in (0, 1]" in capsys.readouterr().err
    assert main(["bench", "--model", "not_a_model_xyz"]) == 2
    assert "unknown timm model 'not_a_model_xyz'" in capsys.readouterr().err
    assert main(["bench", "--model", "convnext_atto", "--reps", "1"]) == 2
    assert "only timm VisionTransformer" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer on a machine without a GPU")
def test_cli_device_is_checked_before_any_work(capsys):
    for command in (["bench"], ["eval"], ["compare"]):
        assert main(command + ["--device", "cuda"]) == 2
        err = capsys.readouterr().err
        assert f"evit {command[0]}: error: device 'cuda': this torch sees no CUDA GPU; use --device cpu" in err
    assert main(["eval", "--device", "gpu0"]) == 2
    assert "use 'cpu', 'cuda' or 'cuda:N'" in capsys.readouterr().err
    assert main(["bench", "--backends", "eager", "--device", "cuda:0"]) == 2
    assert "--backends times batch-1 latency on the CPU only" in capsys.readouterr().err


def test_cli_bench_says_where_it_ran(capsys):
    rc = main(["bench", "--model", "deit_tiny_patch16_224", "--keep-rates", "0.5", "--batch-size", "1", "--reps", "1",
               "--latency-reps", "1", "--warmup", "0", "--threads", "1", "--device", "cpu"])
    assert rc == 0
    assert "deit_tiny_patch16_224, batch 1, cpu, 1 threads; speed-ups" in capsys.readouterr().out


def test_pretrained_offline_fails_fast_and_clearly():
    proc = subprocess.run(
        [sys.executable, "-m", "evit.cli", "bench", "--model", "deit_tiny_patch16_224", "--pretrained"],
        capture_output=True, text=True, timeout=120, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 2
    assert "cannot load pretrained weights for deit_tiny_patch16_224" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bench_tome_against_its_ideal():
    model = make_model("deit")
    rows = bench(model, batch_size=2, reps=1, latency_reps=1, warmup=0, progress=False, method="tome", r_values=[2])
    (row,) = rows[1:]
    assert row["variant"] == "tome" and row["r"] == 2 and row["keep_rate"] is None
    assert row["tokens"] == [17, 15, 13, 11, 9] and row["gmacs"] < rows[0]["gmacs"]
    assert row["of_ideal"] > 0 and row["latency_of_ideal"] > 0
    assert not evit.reductions(model), "bench left the model patched"


def test_an_operating_system_error_is_one_line_with_its_path_first():
    from evit.cli import _one_line

    assert _one_line(FileNotFoundError(2, "No such file or directory", "/proc/x")) == "/proc/x: No such file or directory"
    assert _one_line(ValueError("evit's own words")) == "evit's own words"


def test_bench_takes_a_patch_slimming_file_and_its_choice_where_it_fits(tmp_path, capsys, monkeypatch):
    """As show and compare --trained do, bench loads weights saved from a Patch-Slimming-patched model (it refused
    them) and runs with their choice at the setting it was made for; at another keep rate it chooses again."""
    from safetensors.torch import save_file

    from evit import embedded
    from evit.data import normalize
    from evit.methods import patch_slimming

    model = evit.patch(embedded.load_model("baseline"), 0.5, method="patchslimming",
                       images=normalize(embedded.test_subset()[0][:8]))
    path = tmp_path / "slimmed.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    chose, select = [], patch_slimming.select
    monkeypatch.setattr(patch_slimming, "select", lambda *a, **k: chose.append(1) or select(*a, **k))
    argv = ["bench", "--method", "patchslimming", "--checkpoint", str(path), "--batch-size", "2", "--reps", "1",
            "--latency-reps", "1", "--warmup", "0", "--json", "--keep-rates"]
    assert main(argv + ["0.5"]) == 0
    assert f"evit bench: {path} holds Patch Slimming's choice of tokens made at blocks 1, 3, 4" in capsys.readouterr().err
    assert not chose  # the file's choice, every time bench switches to it
    assert main(argv + ["0.7"]) == 0 and chose  # another keep rate: chosen again (from bench's sample)
