"""Bad inputs and faults, one case each: every one ends in one clear line (exit 2, or 130/143 for a
signal) or its documented recovery, and no file of an earlier run changes.

Runs that lose nothing (an existing --out, locks, a read-only or full disk, SIGINT/SIGTERM, a diverging
loss), checkpoints (damaged, foreign, mismatched or non-finite files, --pretrained without a model,
DeiT-style training checkpoints) and the library's edge cases (empty batches, locations, wrappers,
warm-ups, pickling). Commands run in this process through ``evit.cli.main`` where that is the same code
path (an uncaught exception fails the test as a traceback would); signals, kills, a read-only mount
and a file-size limit run in a child process.
"""
import argparse
import copy
import hashlib
import io
import json
import os
import pickle
import resource
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import evit
from evit.cli import main
from evit.evaluate import evaluate
from evit.schedule import keep_rate_at
from evit.train import TrainConfig
from test_train import TINY, toy_fashion  # noqa: F401 - the fixture, shared

HELPER = Path(__file__).with_name("signal_at_step.py")
RUN_ARGS = ("--batch-size", "32", "--no-progress", "--save-every", "5")


# ----------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def recipe(toy_fashion):
    """A tiny ViT trained with EViT on real Fashion-MNIST images (512: 16 steps an epoch; 256 to test)."""
    path = toy_fashion / "tiny.json"
    path.write_text(json.dumps({"model": "vit_tiny_patch16_224", "model_kwargs": TINY, "lr": 0.004, "epochs": 2,
                                "warmup_epochs": 0, "label_smoothing": 0.0, "keep_rate": 0.5,
                                "keep_warmup_epochs": 1, "data_root": str(toy_fashion)}))
    return path


def _train(recipe, out, *extra) -> list[str]:
    return ["train", "--recipe", str(recipe), "--out", str(out), *RUN_ARGS, *extra]


@pytest.fixture(scope="module")
def prior(recipe, tmp_path_factory):
    """A complete earlier run (32 steps), trained once on one thread (as the child processes are)."""
    out = tmp_path_factory.mktemp("prior") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(_train(recipe, out)) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _same_weights(a: Path, b: Path) -> bool:
    """The same tensors, bit for bit, and the same recorded settings (the safetensors header lists the
    metadata in no fixed order, so the files' bytes may differ)."""
    from safetensors import safe_open

    wa, wb = load_file(str(a)), load_file(str(b))
    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        same_metadata = fa.metadata() == fb.metadata()
    return same_metadata and wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture
def run(prior, tmp_path):
    """A copy of the earlier run, and its files' hashes, to check that a case changed none of them."""
    out = tmp_path / "run"
    shutil.copytree(prior, out)
    return out, _hashes(out)


def _one_line(err: str, code: int, returned: int, pattern: str) -> None:
    assert returned == code, err
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line.startswith("evit ")]
    assert len(lines) == 1, err
    import re

    assert re.search(pattern, lines[0]), lines[0]


def _env(**extra):
    src = str(Path(evit.__file__).parents[1])
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]), **extra}


def _child(args, preexec_fn=None, wrap=()):
    return subprocess.run([*wrap, sys.executable, *args], capture_output=True, text=True, timeout=300, env=_env(),
                          preexec_fn=preexec_fn)


# ------------------------------------------------------------------- runs and checkpoints: refused

@pytest.fixture(scope="module")
def bad_files(prior, tmp_path_factory):
    """Damaged, foreign and mismatched weight files beside the earlier run's good ones."""
    d = tmp_path_factory.mktemp("bad")
    good = load_file(str(prior / "model.safetensors"))
    raw = (prior / "model.safetensors").read_bytes()
    (d / "empty.safetensors").write_bytes(b"")
    (d / "truncated.safetensors").write_bytes(raw[: len(raw) // 2])
    (d / "random.safetensors").write_bytes(os.urandom(4096))
    (d / "random.pth").write_bytes(os.urandom(4096))
    torch.save([torch.zeros(3)], d / "list.pth")
    torch.save(timm.create_model("vit_tiny_patch16_224", **TINY), d / "whole_model.pth")
    wider = timm.create_model("vit_tiny_patch16_224", **{**TINY, "embed_dim": 48})
    save_file({k: v.contiguous() for k, v in wider.state_dict().items()}, str(d / "shapes.safetensors"))
    keys = dict(good)
    del keys["head.bias"]
    keys["extra.weight"] = torch.zeros(2)
    save_file(keys, str(d / "keys.safetensors"))
    for name, key, value in (("nan", "blocks.1.mlp.fc1.weight", float("nan")), ("inf", "head.bias", float("inf"))):
        state = {k: v.clone() for k, v in good.items()}
        state[key].view(-1)[3] = value
        save_file(state, str(d / f"{name}.safetensors"))
    huge = dict(good, **{"head.weight": torch.full_like(good["head.weight"], 3e38)})  # finite, but logits overflow
    save_file(huge, str(d / "huge.safetensors"))
    torch.save({"model": good, "hook": _RunsCode(d / "ran")}, d / "code.pth")
    return d


class _RunsCode:
    """Unpickled, it would create the file ``marker``: a checkpoint that runs code when loaded unsafely."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _recipe_with(recipe, folder, **values):
    """``recipe`` with ``values`` added, written in ``folder``."""
    path = folder / f"with_{'_'.join(values)}.json"
    path.write_text(json.dumps({**json.loads(recipe.read_text()), **values}))
    return path


def _eval(recipe, checkpoint):
    return ["eval", "--recipe", str(recipe), "--checkpoint", str(checkpoint), "--data", "fashion-mnist",
            "--data-root", str(recipe.parent), "--keep-rates", "1.0", "--speed-reps", "1"]


REFUSED = {  # name: (argv from (recipe, run folder, bad files, tmp), exit code, what the one line says)
    "existing_out_refused": (lambda r, run, b, t: _train(r, run), 2,
                             r"already holds a run \(config.json, checkpoints, model.safetensors, best.safetensors, "
                             r"summary.csv\); use --resume "
                             r"to continue it or --overwrite to move it aside"),
    "resume_and_overwrite_together": (lambda r, run, b, t: _train(r, run, "--resume", "--overwrite"), 2,
                                      r"give --resume .* or --overwrite .*, not both"),
    "out_is_a_file": (lambda r, run, b, t: _train(r, run / "config.json"), 2, r"config.json is a file, not a folder"),
    "out_under_a_file": (lambda r, run, b, t: _train(r, run / "config.json" / "sub"), 2,
                         r"--out \S+config.json/sub lies under \S+config.json, a file, not a folder"),
    **{f"{cmd[0]}_output_under_a_file": (lambda r, run, b, t, cmd=cmd: [*cmd[:2], str(run / "config.json" / cmd[2])], 2,
                                         rf"cannot write \S+config.json/{cmd[2]}: \S+config.json is a file, not a folder")
       for cmd in (["show", "--out", "x.png"], ["export", "--onnx", "x.onnx"],
                   ["compare", "--plot", "x.png"])},
    "non_finite_loss_lr_1e6": (lambda r, run, b, t: _train(r, t / "diverged", "--lr", "1e6"), 2,
                               r"the loss is nan at step \d+: training diverged \(lower --lr\); the diverged "
                               r"weights were not saved"),
    "resume_with_other_options": (lambda r, run, b, t: _train(r, run, "--resume", "--epochs", "3", "--fusion", "mean"),
                                  2, r"--resume: the run in .*run was started with epochs 2 \(now 3\), fusion 'sum' "
                                     r"\(now 'mean'\): resume it with the options it was started with"),
    "resume_past_max_steps": (lambda r, run, b, t: _train(r, run, "--resume", "--max-steps", "5"), 2,
                              r"--resume: the run in .*run is at step 32, past --max-steps 5: give --max-steps 32 or "
                              r"more \(or none, to finish its 32 steps\)"),
    "data_size_not_the_models": (lambda r, run, b, t: _train(_recipe_with(r, t, img_size=35), t / "s"), 2,
                                 r"the recipe's img_size 35 is not the size vit_tiny_patch16_224 is built at \(28x28\): "
                                 r"build it at 35 too \(img_size in model_kwargs"),
    "zero_lr": (lambda r, run, b, t: _train(r, t / "z", "--lr", "0"), 2, r"--lr must be a positive number, got 0.0"),
    "ema_decay_of_one": (lambda r, run, b, t: _train(r, t / "e", "--ema-decay", "1"), 2,
                         r"--ema-decay must lie in \[0, 1\) .*got 1.0"),
    "keep_warmup_beyond_the_run": (lambda r, run, b, t: _train(r, t / "k", "--keep-warmup-start", "1.5"), 2,
                                   r"the keep-rate warm-up ends after epoch 2.5 .* beyond the run's 2 epochs"),
    "negative_keep_warmup": (lambda r, run, b, t: _train(r, t / "w", "--keep-warmup-epochs", "-1"), 2,
                             r"keep_warmup_epochs \(--keep-warmup-epochs\) must be a number of epochs >= 0, got -1"),
    "empty_safetensors": (lambda r, run, b, t: _eval(r, b / "empty.safetensors"), 2,
                          r"empty.safetensors is not a readable safetensors file \(0 bytes: .*header too small"),
    "truncated_safetensors": (lambda r, run, b, t: _eval(r, b / "truncated.safetensors"), 2,
                              r"truncated.safetensors is not a readable safetensors file .*damaged or truncated"),
    "random_safetensors": (lambda r, run, b, t: _eval(r, b / "random.safetensors"), 2,
                           r"random.safetensors is not a readable safetensors file"),
    "random_pth": (lambda r, run, b, t: _eval(r, b / "random.pth"), 2,
                   r"random.pth cannot be read safely: it is not a torch checkpoint \((?!.*weights_only).*\); save"),
    "pth_holding_code": (lambda r, run, b, t: _eval(r, b / "code.pth"), 2,
                         r"code.pth cannot be read safely: it holds pickled Python objects \((posix|nt).system\)"),
    "pth_holding_a_list": (lambda r, run, b, t: _eval(r, b / "list.pth"), 2,
                           r"list.pth holds a list, not a state dict"),
    "pth_holding_a_whole_model": (lambda r, run, b, t: _eval(r, b / "whole_model.pth"), 2,
                                  r"holds pickled Python objects \(timm.models.vision_transformer.VisionTransformer\)"),
    "mismatched_shapes": (lambda r, run, b, t: _eval(r, b / "shapes.safetensors"), 2,
                          r"does not fit this model \(vit_tiny_patch16_224\): shapes differ for blocks.0.attn.proj.bias"
                          r" \(checkpoint \[48\], model \[32\]\), .* and \d+ more"),
    "missing_and_unexpected_keys": (lambda r, run, b, t: _eval(r, b / "keys.safetensors"), 2,
                                    r"missing head.bias; unexpected extra.weight$"),
    "nan_weights_refused": (lambda r, run, b, t: _eval(r, b / "nan.safetensors"), 2,
                            r"nan.safetensors holds non-finite weights: blocks.1.mlp.fc1.weight \(1 of 4096 values"),
    "inf_weights_refused": (lambda r, run, b, t: _eval(r, b / "inf.safetensors"), 2,
                            r"inf.safetensors holds non-finite weights: head.bias \(1 of 10 values NaN or inf\)"),
    "non_finite_logits_reported": (lambda r, run, b, t: _eval(r, b / "huge.safetensors"), 2,
                                   r"model 'vit_tiny_patch16_224' \(unpatched\) gave non-finite logits \(NaN or inf\) "
                                   r"for 256 of 256 images; not scored"),
    "checkpoint_is_a_run_folder": (lambda r, run, b, t: _eval(r, run), 2,
                                   r"run is a folder, not a weights file: give a file in it \(an evit run's: "
                                   r".*run/model.safetensors\)"),
    "init_from_a_training_state": (lambda r, run, b, t: _train(r, t / "i", "--init",
                                                                str(run / "checkpoints" / "step00000032.pt")), 2,
                                   r"step00000032.pt is an evit run's training state \(optimizer, random generators\), "
                                   r"not weights: give .*step00000032.safetensors beside it"),
    "missing_checkpoint_file": (lambda r, run, b, t: _eval(r, b / "nothere.pth"), 2, r"nothere.pth does not exist"),
    **{f"pretrained_without_model_{cmd[0]}": (lambda r, run, b, t, cmd=cmd: [*cmd, "--pretrained"], 2,
                                              r"--pretrained needs --model")
       for cmd in (["bench"], ["show"], ["compare"], ["eval"], ["export", "--onnx", "x.onnx"])},
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_with_one_line_and_no_earlier_file_changed(case, recipe, run, bad_files, tmp_path, capsys,
                                                           monkeypatch):
    out, before = run
    monkeypatch.chdir(tmp_path)
    argv, code, pattern = REFUSED[case]
    returned = main(argv(recipe, out, bad_files, tmp_path))
    _one_line(capsys.readouterr().err, code, returned, pattern)
    assert _hashes(out) == before
    assert not (tmp_path / "diverged" / "model.safetensors").exists()  # NaN weights are never written
    assert not (bad_files / "ran").exists()  # no file ran code


def test_lock_of_a_live_process_keeps_a_second_run_out(recipe, run, capsys):
    out, before = run
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        (out / ".lock").write_text(f"{sleeper.pid} {socket.gethostname()}\n")
        returned = main(_train(recipe, out, "--resume"))
    finally:
        sleeper.kill()
        sleeper.wait()
    _one_line(capsys.readouterr().err, 2, returned, rf"is in use by process {sleeper.pid} \(lock .*\.lock\)")
    assert _hashes(out) == {**before, ".lock": _hashes(out)[".lock"]}


def test_latest_json_naming_a_missing_file_is_a_clear_error(recipe, run, capsys):
    out, _ = run
    latest = json.loads((out / "checkpoints" / "latest.json").read_text())
    (out / "checkpoints" / latest["weights"]).unlink()
    before = _hashes(out)
    returned = main(_train(recipe, out, "--resume"))
    _one_line(capsys.readouterr().err, 2, returned, rf"latest.json names {latest['weights']}, which is missing")
    assert _hashes(out) == before


def test_a_training_state_that_would_run_code_is_never_unpickled(recipe, run, capsys):
    """A run folder from elsewhere is resumed with ``weights_only``: its checkpoints' code never runs."""
    out, _ = run
    marker = out.parent / "ran"
    for state in (out / "checkpoints").glob("*.pt"):
        torch.save({"optimizer": {}, "scheduler": {}, "rng": {}, "step": 0, "hook": _RunsCode(marker)}, state)
    returned = main(_train(recipe, out, "--resume"))
    _one_line(capsys.readouterr().err, 2, returned, r"step00000032.pt cannot be read .*no earlier checkpoint .* can be "
                                                    r"read: start afresh with --overwrite")
    assert not marker.exists()


def test_resume_maps_a_folder_by_the_class_names_the_run_began_with(jpeg_folder, tmp_path, capsys):
    """A class folder renamed between start and resume would permute the labels mid-run: refused."""
    data, out = jpeg_folder(2, 1), tmp_path / "run"
    recipe = tmp_path / "folder.json"
    recipe.write_text(json.dumps({"model": "vit_tiny_patch16_224", "model_kwargs": {**TINY, "img_size": 32, "in_chans": 3},
                                  "epochs": 1, "warmup_epochs": 0, "workers": 0}))
    argv = ["train", "--recipe", str(recipe), "--data", str(data), "--out", str(out), "--batch-size", "4",
            "--no-progress"]
    assert main([*argv, "--max-steps", "2"]) == 0
    for split in ("train", "val"):
        (data / split / "c0").rename(data / split / "a0")  # now first in folder order
    capsys.readouterr()
    returned = main([*argv, "--resume"])
    _one_line(capsys.readouterr().err, 2, returned, r"class 'a0' is not one of the 10 classes")


# -------------------------------------------------------------------------- runs: recoveries

def _in_process_resume(recipe, out) -> int:
    """``evit train --resume`` on one thread, as the earlier run was trained (bit-identical weights)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main(_train(recipe, out, "--resume"))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("damaged", ["pt", "safetensors"])
def test_damaged_newest_checkpoint_resumes_from_the_one_before(damaged, recipe, prior, run, capsys):
    out, _ = run
    newest = out / "checkpoints" / f"step00000032.{damaged}"
    newest.write_bytes(newest.read_bytes()[:1000])  # a copy cut short
    (out / "model.safetensors").unlink()
    assert _in_process_resume(recipe, out) == 0
    err = capsys.readouterr().err
    assert f"{newest} " in err and "resuming from the checkpoint before it (step 30)" in err, err
    assert _same_weights(out / "model.safetensors", prior / "model.safetensors")  # steps 31 and 32 again, exactly


def test_run_stopped_before_its_first_checkpoint_resumes_from_the_start(recipe, prior, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(prior / "config.json", out)  # all a run killed before its first checkpoint leaves
    assert _in_process_resume(recipe, out) == 0
    assert "stopped before its first checkpoint; starting it again from step 0" in capsys.readouterr().err
    assert _same_weights(out / "model.safetensors", prior / "model.safetensors")



def test_a_run_trained_by_other_processes_is_resumed_only_by_as_many(recipe, run, capsys):
    """Each process's share of the data, and so the steps per epoch, depend on the process count: a run
    checkpointed by 2 processes resumed by 1 would silently differ from the one asked for."""
    out, hashes = run
    (out / "model.safetensors").unlink()
    state_file = out / "checkpoints" / "step00000032.pt"
    state = torch.load(state_file, weights_only=False)
    assert state["processes"] == 1  # recorded by the run
    torch.save({**state, "processes": 2}, state_file)
    returned = _in_process_resume(recipe, out)
    _one_line(capsys.readouterr().err, 2, returned, r"was trained by 2 processes and this is 1: resume it with 2 "
                                                    r"\(torchrun --nproc_per_node 2\)")
    assert not (out / "model.safetensors").exists()


def test_a_finished_run_whose_checkpoints_are_gone_is_not_started_again(recipe, run, capsys):
    """Only a run that never checkpointed starts again on --resume; one that finished keeps its weights."""
    out, hashes = run
    shutil.rmtree(out / "checkpoints")
    returned = _in_process_resume(recipe, out)
    _one_line(capsys.readouterr().err, 2, returned, r"no checkpoint in .*but the run finished")
    assert _hashes(out) == {k: v for k, v in hashes.items() if not k.startswith("checkpoints")}


def test_overwrite_moves_the_earlier_run_aside(recipe, run, capsys):
    out, before = run
    assert main(_train(recipe, out, "--overwrite", "--max-steps", "2")) == 0
    err = capsys.readouterr().err
    moved = [p for p in out.parent.iterdir() if p.name.startswith("run.old-")]
    assert len(moved) == 1 and f"moved the earlier run in {out} to {moved[0]}" in err
    assert _hashes(moved[0]) == before  # every file of the earlier run, unchanged, beside the new one
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["step"] == 2
    assert not (out / ".lock").exists() and not (moved[0] / ".lock").exists()


def test_stale_lock_of_a_dead_process_is_taken_over(recipe, prior, run, capsys):
    out, before = run
    dead = subprocess.Popen(["true"])
    dead.wait()
    (out / ".lock").write_text(f"{dead.pid} {socket.gethostname()}\n")
    (out / "model.safetensors").unlink()  # as a killed run leaves it
    assert main(_train(recipe, out, "--resume")) == 0  # resumes at its last checkpoint, the last step
    assert "Traceback" not in capsys.readouterr().err and not (out / ".lock").exists()
    assert _same_weights(out / "model.safetensors", prior / "model.safetensors")  # written again, from that checkpoint
    checkpoints = lambda h: {k: v for k, v in h.items() if k.startswith("checkpoints")}  # noqa: E731
    assert checkpoints(_hashes(out)) == checkpoints(before)


@pytest.mark.parametrize("name, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_signal_mid_run_ends_cleanly_and_resume_matches(name, code, recipe, prior, tmp_path):
    out = tmp_path / "cut"
    cut = _child([str(HELPER), name, "7", *_train(recipe, out)])
    _one_line(cut.stderr, code, cut.returncode,
              rf"stopped by {name} after step 7; the last complete checkpoint \(step 7\) in .* is intact: "
              r"resume with --resume")
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["step"] == 7
    assert not (out / ".lock").exists() and not list(out.rglob("*.tmp"))
    assert sorted(p.name for p in (out / "checkpoints").glob("*.pt")) == ["step00000005.pt", "step00000007.pt"]
    resumed = _child(["-m", "evit.cli", *_train(recipe, out, "--resume")])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _same_weights(out / "model.safetensors", prior / "model.safetensors")  # bit-identical to uninterrupted


def test_resume_needs_not_the_weights_the_run_started_from(recipe, prior, tmp_path):
    """The checkpoint holds everything: a run started with --init resumes exactly after that file is gone."""
    init = tmp_path / "start.safetensors"
    shutil.copy(prior / "model.safetensors", init)
    steps = ("--init", str(init), "--max-steps", "10")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the child process trains
    try:
        assert main(_train(recipe, tmp_path / "whole", *steps)) == 0
    finally:
        torch.set_num_threads(threads)
    out = tmp_path / "cut"
    cut = _child([str(HELPER), "SIGINT", "7", *_train(recipe, out, *steps)])
    assert cut.returncode == 130, cut.stderr[-2000:]
    init.unlink()  # moved or deleted after the start
    resumed = _child(["-m", "evit.cli", *_train(recipe, out, "--resume", *steps)])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _same_weights(out / "model.safetensors", tmp_path / "whole" / "model.safetensors")


def _unshare_works() -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def test_read_only_out_ends_cleanly(recipe, run):
    """A really read-only --out: root ignores chmod, so the folder is bind-mounted read-only in a private
    mount namespace (``unshare -rm``); without user namespaces and as another user, chmod does it."""
    out, before = run
    cmd = ["-m", "evit.cli", *_train(recipe, out, "--resume")]
    if _unshare_works():
        script = (f"mount --bind '{out}' '{out}' && mount -o remount,bind,ro '{out}' && "
                  f"exec '{sys.executable}' " + " ".join(f"'{a}'" for a in cmd))
        proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=300,
                              env=_env())
    elif os.geteuid() != 0:
        out.chmod(0o555)
        try:
            proc = _child(cmd)
        finally:
            out.chmod(0o755)
    else:
        pytest.skip("root without user namespaces: no way to make a folder read-only here")
    _one_line(proc.stderr, 2, proc.returncode,
              r"cannot write .*run/\.lock: (Read-only file system|Permission denied); the last complete checkpoint "
              r"\(step 32\) in .* is intact: resume with --resume once the disk takes writes")
    assert _hashes(out) == before


def test_full_disk_ends_cleanly_with_the_last_checkpoint_intact(recipe, run):
    """A disk that refuses to grow a file: RLIMIT_FSIZE makes the kernel fail writes past 20 kB (EFBIG),
    as a full disk fails them with ENOSPC. The run, killed after its checkpoint at step 30, resumes there and
    its first checkpoint (step 31 with --save-every 1) fails."""
    out, _ = run
    for f in (out / "checkpoints").glob("step00000032.*"):
        f.unlink()
    (out / "checkpoints" / "latest.json").write_text(json.dumps(
        {"step": 30, "weights": "step00000030.safetensors", "state": "step00000030.pt"}))
    before = _hashes(out)

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    proc = _child(["-m", "evit.cli", *_train(recipe, out, "--resume", "--save-every", "1")], preexec_fn=limit)
    _one_line(proc.stderr, 2, proc.returncode,
              r"cannot write .*step00000031.safetensors: File too large; the last complete checkpoint \(step 30\)")
    after = _hashes(out)
    assert {k: after[k] for k in before if k != "config.json"} == \
           {k: v for k, v in before.items() if k != "config.json"}  # config.json: rewritten with --save-every 1
    assert not list(out.rglob("*.tmp")) and not (out / ".lock").exists()
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["step"] == 30


def test_checkpoint_pruning_keeps_what_latest_names(tmp_path):
    """An earlier run's step files that sort later are not this run's to delete, and never what latest.json names."""
    from evit import checkpoint

    model = torch.nn.Linear(2, 2)
    d = tmp_path / "checkpoints"
    for step in (900, 1000):  # left by another run
        checkpoint.save(d, step, model, {})
    for step in (5, 10, 15):
        checkpoint.save(d, step, model, {})
    found = checkpoint.latest(d)
    assert found["step"] == 15 and found["weights"].is_file() and found["state"].is_file()
    assert sorted(p.name for p in d.glob("*.pt")) == [f"step{s:08d}.pt" for s in (10, 15, 900, 1000)]
    nan = torch.nn.Linear(2, 2)
    with torch.no_grad():
        nan.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"refusing to write .*: the weights hold NaN or inf \(weight"):
        checkpoint.save_weights(nan, tmp_path / "w.safetensors")
    assert not (tmp_path / "w.safetensors").exists() and not list(tmp_path.glob("*.tmp"))


# --------------------------------------------------------------------------- DeiT-style checkpoints

def test_deit_style_pth_evaluates_with_weights_only_safety(tmp_path, jpeg_folder, capsys):
    """{'model', 'optimizer', 'epoch', 'args': Namespace} as DeiT's and the official EViT's training saves it,
    read with weights_only (Namespace allowed as data): it scores exactly as the same weights in safetensors."""
    kwargs = {"img_size": 32, "depth": 2, "num_classes": 10}
    recipe = tmp_path / "deit.json"
    recipe.write_text(json.dumps({"model": "deit_tiny_patch16_224", "model_kwargs": kwargs}))
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", **kwargs)
    args = argparse.Namespace(model="deit_tiny_patch16_224", lr=5e-4, input_size=32, drop_path=0.1, data_path="/x",
                              repeated_aug=True, resume="", mixup=0.8)
    optimizer = torch.optim.AdamW(model.parameters())
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 299, "args": args},
               tmp_path / "checkpoint.pth")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "same.safetensors"))
    data = jpeg_folder(1, 2)
    rows = {}
    for name in ("checkpoint.pth", "same.safetensors"):
        argv = ["eval", "--model", "deit_tiny_patch16_224", "--recipe", str(recipe), "--checkpoint",
                str(tmp_path / name), "--data", str(data), "--keep-rates", "0.5", "--speed-reps", "1", "--json"]
        assert main(argv) == 0, capsys.readouterr().err
        rows[name] = [(r["top1"], r["top5"], r["images"]) for r in json.loads(capsys.readouterr().out)["rows"]]
    assert rows["checkpoint.pth"] == rows["same.safetensors"] and rows["checkpoint.pth"][0][2] == 20


# ------------------------------------------------------------------------------- library edge cases

def _tiny_vit(**extra):
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, depth=4, num_classes=10,
                             **extra).eval()


METHOD_SETTINGS = {"evit": {"keep_rate": 0.5}, "topk": {"keep_rate": 0.5}, "random": {"keep_rate": 0.5},
                   "tome": {"r": 2}, "dynamicvit": {"keep_rate": 0.5}, "stvit": {"keep_rate": 0.5},
                   "patchslimming": {"keep_rate": 0.5}}


@pytest.mark.parametrize("method", list(METHOD_SETTINGS))
def test_empty_batch_gives_an_empty_result(method):
    model = _tiny_vit()
    evit.patch(model, method=method, images=torch.randn(4, 3, 32, 32), **METHOD_SETTINGS[method])
    with torch.no_grad():
        out = model(torch.randn(0, 3, 32, 32))
        full = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (0, 10) and full.shape == (2, 10)


@pytest.mark.parametrize("locations", [[3.5], ["1"], [True, 2]], ids=["float", "string", "bool"])
def test_non_integer_locations_are_refused(locations):
    with pytest.raises(TypeError, match="locations must be block indices"):
        evit.patch(_tiny_vit(), 0.5, locations)


@pytest.mark.parametrize("wrapper", ["DataParallel", "DistributedDataParallel"])
def test_keep_rate_and_unpatch_see_through_wrappers(wrapper, tmp_path):
    import torch.distributed as dist

    model = evit.patch(_tiny_vit(), 0.7)
    if wrapper == "DistributedDataParallel":  # a real one: a gloo group of one process
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1)
    try:
        wrapped = getattr(torch.nn.parallel, wrapper)(model)
        before = evit.token_counts(model, 17)
        evit.set_keep_rate(wrapped, 0.5)
        assert [m.keep_rate for m in evit.reductions(wrapped).values()] == [0.5, 0.5, 0.5]
        assert evit.token_counts(wrapped, 17) == evit.token_counts(model, 17) != before
        with torch.no_grad():
            assert wrapped(torch.randn(2, 3, 32, 32)).shape == (2, 10)
        assert evit.unpatch(wrapped) is wrapped and not evit.reductions(model)
        assert evit.patch(wrapped, 0.5) is wrapped and len(evit.reductions(model)) == 3
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.parametrize("name", ["warmup_epochs", "keep_warmup_start", "keep_warmup_epochs"])
def test_negative_warmups_are_refused(name):
    with pytest.raises(ValueError, match=rf"{name} .* must be a number of epochs >= 0, got -1"):
        TrainConfig(**{name: -1})
    with pytest.raises(ValueError, match="warm-up lengths must be >= 0"):
        keep_rate_at(3, 0.5, 0 if name == "keep_warmup_epochs" else -1, -10 if name == "keep_warmup_epochs" else 5)


def test_warmups_longer_than_the_run_are_refused():
    with pytest.raises(ValueError, match=r"warmup_epochs 3 is longer than the run's 2 epochs"):
        TrainConfig(epochs=2, warmup_epochs=3)
    TrainConfig(epochs=2, warmup_epochs=2, keep_rate=0.5, keep_warmup_start=1, keep_warmup_epochs=1)  # ends on time


@pytest.mark.parametrize("layout", ["module", "compiled_ddp", "model_ema", "state_dict_ema", "safetensors_module"])
def test_state_dict_layouts_of_other_trainers_load_as_the_plain_one(layout, tmp_path):
    """DataParallel / DDP's 'module.', torch.compile's '_orig_mod.', an EMA copy stored alone (DeiT: model_ema,
    timm: state_dict_ema): the same weights as the plain state dict."""
    from evit.weights import read_state

    plain = _tiny_vit().state_dict()
    path = tmp_path / ("w.safetensors" if layout.startswith("safetensors") else "w.pth")
    wrapped = {"module": {f"module.{k}": v for k, v in plain.items()},
               "compiled_ddp": {f"_orig_mod.module.{k}": v for k, v in plain.items()},
               "model_ema": {"model_ema": plain, "epoch": 3}, "state_dict_ema": {"state_dict_ema": plain},
               "safetensors_module": {f"module.{k}": v.contiguous() for k, v in plain.items()}}[layout]
    save_file(wrapped, str(path)) if path.suffix == ".safetensors" else torch.save(wrapped, path)
    read = read_state(str(path))
    assert sorted(read) == sorted(plain) and all(torch.equal(read[k], plain[k]) for k in plain)


@pytest.mark.parametrize("how", ["torch.save", "pickle", "deepcopy"])
@pytest.mark.parametrize("method", ["evit", "tome", "random"])
def test_patched_model_pickles_and_loads_back_patched(how, method):
    model = _tiny_vit(global_pool="avg" if method == "tome" else "token")
    evit.patch(model, method=method, **METHOD_SETTINGS[method])
    if how == "torch.save":
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        other = torch.load(buffer, weights_only=False)  # a whole module is code: its owner's own file
    elif how == "pickle":
        other = pickle.loads(pickle.dumps(model))
    else:
        other = copy.deepcopy(model)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ours, theirs = model(x), other(x)  # Random drop: both generators at the same state
    assert torch.equal(ours, theirs)
    assert [type(m).__name__ for m in evit.reductions(other).values()] == \
           [type(m).__name__ for m in evit.reductions(model).values()]
    evit.unpatch(other)
    assert not evit.reductions(other) and type(other.blocks[1]) is timm.models.vision_transformer.Block


def test_non_finite_weights_are_refused_before_evaluation():
    model = _tiny_vit()
    with torch.no_grad():
        model.blocks[2].attn.proj.weight[1, 1] = float("inf")
    batches = lambda: iter([(torch.randn(4, 3, 32, 32), torch.zeros(4, dtype=torch.long))])  # noqa: E731
    with pytest.raises(ValueError, match=r"model 'm' holds non-finite weights: blocks.2.attn.proj.weight \(1 of"):
        evaluate({"m": model}, [("m", 1.0)], batches, speed_reps=1)


@pytest.fixture(scope="module")
def gray_folder(tmp_path_factory):
    """An ImageNet-style folder of 28 px grayscale PNGs cut from the bundled Fashion-MNIST test images."""
    from PIL import Image

    from evit.embedded import test_subset

    images, labels = test_subset()
    root = tmp_path_factory.mktemp("gray")
    for c in range(10):
        chosen = (labels == c).nonzero().flatten().tolist()
        for split, part in (("train", chosen[:8]), ("val", chosen[8:12])):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in part:
                Image.fromarray(images[i, 0].numpy()).save(root / split / f"c{c}" / f"{i:04d}.png")
    return root


def test_a_folder_run_from_fashion_mnist_weights_keeps_their_reading(recipe, prior, gray_folder, tmp_path, capsys):
    """Weights trained on Fashion-MNIST's tensors read a folder as those were read (their mean, std, whole
    image): a run fine-tuning them on a folder trains so, records it in every weights file it writes (so
    `evit eval` scores the final weights as the run validated them), and resumes so once the file it started
    from is gone."""
    from safetensors import safe_open

    from evit.data import FASHION_MNIST_MEAN

    init = tmp_path / "fashion.safetensors"
    shutil.copy(prior / "model.safetensors", init)
    steps = ("--init", str(init), "--data", str(gray_folder), "--workers", "0", "--max-steps", "8", "--epochs", "1",
             "--save-every", "3")
    folder_recipe = tmp_path / "folder.json"
    folder_recipe.write_text(json.dumps({**json.loads(recipe.read_text()), "batch_size": 8}))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the child process trains
    try:
        assert main(_train(folder_recipe, tmp_path / "whole", *steps, "--batch-size", "8")) == 0
        final = tmp_path / "whole" / "model.safetensors"
        with safe_open(str(final), "pt") as f:
            reading = json.loads(f.metadata()["evit_preprocessing"])
        assert reading["mean"] == [FASHION_MNIST_MEAN] and reading["crop_pct"] == 1.0
        capsys.readouterr()
        assert main(["eval", "--recipe", str(folder_recipe), "--checkpoint", str(final), "--data", str(gray_folder),
                     "--keep-rates", "0.5", "--workers", "0", "--json"]) == 0
        scored = json.loads(capsys.readouterr().out)
    finally:
        torch.set_num_threads(threads)
    validated = [line.split(",") for line in (tmp_path / "whole" / "summary.csv").read_text().splitlines()]
    last = dict(zip(validated[0], validated[-1]))
    top1 = [row["top1"] for row in scored["rows"] if row.get("keep_rate") == 0.5]
    assert top1 and abs(top1[0] - float(last["val_top1"])) < 1e-6, (top1, last)

    out = tmp_path / "cut"
    cut = _child([str(HELPER), "SIGINT", "5", *_train(folder_recipe, out, *steps, "--batch-size", "8")])
    assert cut.returncode == 130, cut.stderr[-2000:]
    older = tmp_path / "older"  # checkpoints written before weights recorded their reading: the starting file's
    shutil.copytree(out, older)
    for weights in (older / "checkpoints").glob("*.safetensors"):
        tensors = load_file(str(weights))
        with safe_open(str(weights), "pt") as f:
            kept = {k: v for k, v in f.metadata().items() if k != "evit_preprocessing"}
        save_file(tensors, str(weights), metadata=kept)
    resumed = _child(["-m", "evit.cli", *_train(folder_recipe, older, "--resume", *steps, "--batch-size", "8")])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _same_weights(older / "model.safetensors", final)
    gone = tmp_path / "gone"
    shutil.copytree(out, gone)
    with safe_open(str(init), "pt") as f:  # another file at the starting path: its record is not the run's
        other = {**f.metadata(), "evit_preprocessing": json.dumps(
            {"mean": [0.9], "std": [0.1], "crop_pct": 0.5, "interpolation": "nearest"})}
    save_file(load_file(str(init)), str(init), metadata={k: v for k, v in other.items() if k != "evit_data"})
    resumed = _child(["-m", "evit.cli", *_train(folder_recipe, out, "--resume", *steps, "--batch-size", "8")])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _same_weights(out / "model.safetensors", final)
    init.unlink()  # moved or deleted after the start
    resumed = _child(["-m", "evit.cli", *_train(folder_recipe, gone, "--resume", *steps, "--batch-size", "8")])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _same_weights(gone / "model.safetensors", final)


@pytest.mark.parametrize("reading", [
    '{"mean": [0.5], "std": [0.5], "crop_pct": 1.0, "interpolation": "foo"}',  # was timm's KeyError traceback
    '{"mean": "123", "std": [0.5], "crop_pct": 1.0, "interpolation": "bilinear"}',  # was read as (1, 2, 3)
    '{"mean": [], "std": [], "crop_pct": 1.0, "interpolation": "bilinear"}',  # was the architecture's mean
    '{"mean": [0.5, 0.5], "std": [0.5, 0.5], "crop_pct": 1.0, "interpolation": "bilinear"}',  # was averaged
    '{"mean": [0.5], "std": [0.0], "crop_pct": 1.0, "interpolation": "bilinear"}',
    '{"mean": [NaN], "std": [0.5], "crop_pct": 1.0, "interpolation": "bilinear"}',
    '{"mean": [0.5], "std": [0.5], "crop_pct": -1, "interpolation": "bilinear"}',
    '{not json',
    '{"mean": [true], "std": [true], "crop_pct": true, "interpolation": "bilinear"}',  # was read as 1.0
    '{"mean": ["0.5"], "std": [0.5], "crop_pct": "1", "interpolation": "bilinear"}',  # strings were read as numbers
    '{"mean": [0.5], "std": [0.5], "crop_pct": 1.0, "interpolation": "bilinear", "crop_mode": "squash"}',  # ignored
    '{"mean": [0.1, 0.5, 0.9], "std": [0.5, 0.5, 0.5], "crop_pct": 1.0, "interpolation": "bilinear"}',  # 1 channel
])
def test_a_damaged_record_of_how_weights_see_images_is_named(reading, recipe, prior, tmp_path, capsys):
    """A weights file's ``evit_preprocessing`` that is not a reading timm's transforms can apply is refused in one
    line naming the file, not a traceback deep in the transforms nor a reading other than the one recorded."""
    from safetensors import safe_open

    path = tmp_path / "recorded.safetensors"
    with safe_open(str(prior / "model.safetensors"), "pt") as f:
        metadata = {k: v for k, v in f.metadata().items() if k != "evit_data"}
    save_file(load_file(str(prior / "model.safetensors")), str(path), metadata={**metadata, "evit_preprocessing": reading})
    returned = main(_eval(recipe, path))
    _one_line(capsys.readouterr().err, 2, returned, f"{path}: its 'evit_preprocessing' metadata is damaged")


@pytest.mark.parametrize("data", ["cifar10", ""])
def test_weights_recording_data_evit_does_not_know_are_refused(data, recipe, prior, tmp_path, capsys):
    """An ``evit_data`` other than Fashion-MNIST says nothing evit can read images by: refused naming the file, not
    read as the model's own (it was, silently)."""
    path = tmp_path / "recorded.safetensors"
    save_file(load_file(str(prior / "model.safetensors")), str(path), metadata={"evit_data": data})
    returned = main(_eval(recipe, path))
    _one_line(capsys.readouterr().err, 2, returned, f"{path}: its 'evit_data' metadata is damaged")


def test_a_resume_takes_the_reading_its_checkpoint_records_not_the_file_now_at_init(prior, tmp_path, capsys):
    """A run started from plain weights records so (``evit_preprocessing`` null) in its checkpoints: resumed after
    another file took the --init path, it keeps its own reading; checkpoints from before that record fall back to
    the file at --init, and say so when it is gone."""
    import timm

    from evit import checkpoint as ckpt
    from evit import hosts
    from evit.train import read_images_as_the_run_began

    model = timm.create_model("vit_tiny_patch16_224", **TINY)
    own = hosts.data_config(model)["mean"]
    ckpt.save(tmp_path / "run" / "checkpoints", 3, model, {"optimizer": {}, "scheduler": {}})
    recorded = timm.create_model("vit_tiny_patch16_224", **TINY)
    hosts.adapter(recorded).record_preprocessing(mean=(0.9,), std=(0.1,), crop_pct=0.5, interpolation="nearest")
    ckpt.save_weights(recorded, tmp_path / "now_at_init.safetensors")
    cfg = TrainConfig(model="vit_tiny_patch16_224", model_kwargs=TINY, init=str(tmp_path / "now_at_init.safetensors"),
                      out=str(tmp_path / "run"))
    fresh = timm.create_model("vit_tiny_patch16_224", **TINY)
    read_images_as_the_run_began(fresh, cfg)
    assert hosts.data_config(fresh)["mean"] == own  # the run's own record: null
    header = tmp_path / "run" / "checkpoints" / "step00000003.safetensors"
    save_file(load_file(str(header)), str(header), metadata={})  # as written before evit recorded it
    read_images_as_the_run_began(fresh, cfg)
    assert hosts.data_config(fresh)["mean"] == (0.9,)  # then the starting file's, while it is there
    (tmp_path / "now_at_init.safetensors").unlink()
    read_images_as_the_run_began(timm.create_model("vit_tiny_patch16_224", **TINY), cfg)
    assert "predate evit's record of how weights see images" in capsys.readouterr().err


def test_a_resume_keeps_the_starting_weights_its_run_recorded(tmp_path):
    """A resume need not name the weights the run started from (they are not read again): config.json, rewritten
    from the resumed options, keeps naming them, so a later resume of a run whose checkpoints predate evit's record
    of how weights see images still reads them as that file does; a config.json that is not an object is one line
    (a plain check, not an assert, which python -O strips)."""
    from dataclasses import asdict

    from evit.train_setup import check_resume

    started = TrainConfig(model="vit_tiny_patch16_224", model_kwargs=TINY, init=str(tmp_path / "start.safetensors"),
                          out=str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(asdict(started)))
    resumed = check_resume(TrainConfig(model="vit_tiny_patch16_224", model_kwargs=TINY, out=str(tmp_path)), tmp_path)
    assert resumed.init == started.init and resumed.pretrained is False
    moved = check_resume(TrainConfig(model="vit_tiny_patch16_224", model_kwargs=TINY, out=str(tmp_path),
                                     init=str(tmp_path / "moved.safetensors")), tmp_path)
    assert moved.init == str(tmp_path / "moved.safetensors")  # given again: the option given wins
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"config.json is damaged \(a JSON list\)"):
        check_resume(TrainConfig(model="vit_tiny_patch16_224", out=str(tmp_path)), tmp_path)


def test_a_fashion_mnist_record_on_a_model_of_other_channels_or_classes_is_refused(tmp_path):
    """Weights saying they were trained on Fashion-MNIST's tensors (1 channel, 10 classes) that load into a model of
    3 channels, or 3 classes, were read with Fashion-MNIST's mean and std (and a transformers head was given 10
    names for 3 outputs): refused, naming the file."""
    import timm

    from evit.models import load_checkpoint

    for kwargs in (dict(TINY, in_chans=3), dict(TINY, num_classes=3)):
        model = timm.create_model("vit_tiny_patch16_224", **kwargs)
        path = tmp_path / "recorded.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
                  metadata={"evit_data": "fashion-mnist"})
        with pytest.raises(ValueError, match="'evit_data' metadata is damaged or not for this model"):
            load_checkpoint(model, str(path))
