import gzip
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from evit.data import TensorLoader, load_fashion_mnist, write_idx
from evit.embedded import write_test_subset
from evit.evaluate import accuracy
from evit.schedule import drawn_keep_rate, keep_rate_at
from evit.train import TrainConfig, train

TINY = {"img_size": 28, "patch_size": 7, "in_chans": 1, "num_classes": 10, "depth": 2, "embed_dim": 32, "num_heads": 2}


@pytest.fixture(scope="module")
def toy_fashion(tmp_path_factory):
    """Fashion-MNIST-format files cut from the bundled real test subset: 512 to train on, 256 to test."""
    return write_test_subset(tmp_path_factory.mktemp("fmnist"), 512, 256)


def _train_cmd(root, out, *extra):
    return [sys.executable, "-m", "evit.cli", "train", "--model", "vit_tiny_patch16_224", "--data", "fashion-mnist",
            "--data-root", str(root), "--out", str(out), "--batch-size", "32", "--no-progress", *extra]


def _env(**extra):
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **extra}


def _run_train(cmd, **env):
    # model kwargs for the tiny ViT come through a recipe file next to the run
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env(**env))


@pytest.fixture(scope="module")
def tiny_recipe(tmp_path_factory):
    path = tmp_path_factory.mktemp("recipe") / "tiny.json"
    path.write_text(json.dumps({"model": "vit_tiny_patch16_224", "model_kwargs": TINY, "lr": 0.004,
                                "warmup_epochs": 0, "epochs": 12, "label_smoothing": 0.0}))
    return path


def test_keep_rate_schedule():
    assert keep_rate_at(0, 0.7, 0, 100) == 1.0
    assert keep_rate_at(50, 0.7, 0, 100) == pytest.approx(0.85)
    assert keep_rate_at(100, 0.7, 0, 100) == pytest.approx(0.7)
    assert keep_rate_at(500, 0.7, 0, 100) == pytest.approx(0.7)
    assert keep_rate_at(10, 0.7, 20, 100) == 1.0  # before the warm-up starts
    assert keep_rate_at(25, 0.5, 0, 100) == pytest.approx(0.5 + 0.5 * 0.5 * (1 + np.cos(np.pi / 4)))
    assert keep_rate_at(0, 0.6, 0, 0) == 0.6  # no warm-up
    rates = [keep_rate_at(s, 0.5, 0, 40) for s in range(41)]
    assert all(a >= b for a, b in zip(rates, rates[1:])), "warm-up must fall monotonically"


def test_keep_rate_drawn_from_a_range_is_repeatable_and_covers_it():
    draws = [drawn_keep_rate(step, 0.5, 0.7, seed=4) for step in range(2000)]
    assert all(0.5 <= d <= 0.7 for d in draws)
    assert min(draws) < 0.52 and max(draws) > 0.68 and 0.59 < np.mean(draws) < 0.61
    assert draws[123] == drawn_keep_rate(123, 0.5, 0.7, seed=4), "a resumed run must draw the same rate"
    assert draws[:50] != [drawn_keep_rate(s, 0.5, 0.7, seed=5) for s in range(50)]
    with pytest.raises(ValueError, match="keep_rate_min"):
        train(TrainConfig(keep_rate=0.5, keep_rate_min=0.7))


def test_reads_fashion_mnist_files(toy_fashion):
    x, y = load_fashion_mnist("train", str(toy_fashion))
    assert x.shape == (512, 1, 28, 28) and x.dtype == torch.uint8 and y.shape == (512,)
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("train", str(toy_fashion / "nowhere"))
    with pytest.raises(ValueError, match="'train' or 'test'"):
        load_fashion_mnist("val", str(toy_fashion))


def test_truncated_data_file_is_named(tmp_path):
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(10))
    raw = gzip.compress(bytes([0, 0, 8, 3]) + (100).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + b"\x00" * 50)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(raw)
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz is truncated"):
        load_fashion_mnist("test", str(tmp_path))


def test_training_learns_with_evit(toy_fashion, tiny_recipe, tmp_path):
    out = tmp_path / "run"
    proc = _run_train(_train_cmd(toy_fashion, out, "--recipe", str(tiny_recipe), "--keep-rate", "0.5",
                                 "--keep-warmup-epochs", "1", "--fusion", "mean", "--epochs", "20"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["step"] == 20 * 16 and result["keep_rate"] == pytest.approx(0.5)

    import timm

    import evit
    from evit.checkpoint import latest, recorded_settings
    from evit.data import normalize
    from evit.evaluate import apply_setting
    from evit.models import create_model

    # the weights, and every checkpoint, record how they were trained; the run's config too
    trained_with = {"method": "evit", "fuse": True, "fusion": "mean", "keep_rate": 0.5}
    assert recorded_settings(out / "model.safetensors") == trained_with
    assert recorded_settings(latest(out / "checkpoints")["weights"]) == trained_with
    assert recorded_settings(out / "best.safetensors") == trained_with
    assert json.loads((out / "config.json").read_text())["fusion"] == "mean"
    loaded = create_model("vit_tiny_patch16_224", checkpoint=str(out / "model.safetensors"), **TINY)
    # trained on Fashion-MNIST's tensors, recorded so: a folder of its images is read as they were, labelled by name
    from evit import hosts
    from evit.checkpoint import recorded_data
    from evit.data import FASHION_MNIST_CLASSES, FASHION_MNIST_MEAN, FASHION_MNIST_STD

    assert recorded_data(out / "model.safetensors") == "fashion-mnist" == recorded_data(out / "best.safetensors")
    seen = hosts.data_config(loaded)
    assert (seen["mean"], seen["std"], seen["crop_pct"]) == ((FASHION_MNIST_MEAN,), (FASHION_MNIST_STD,), 1.0)
    assert hosts.class_names(loaded) == list(FASHION_MNIST_CLASSES)
    plain = create_model("vit_tiny_patch16_224", **TINY)
    assert hosts.data_config(plain)["mean"] != seen["mean"] and hosts.class_names(plain) is None
    apply_setting(loaded, 0.5)  # evaluated as trained: the recorded fusion, unless a setting says otherwise
    assert {m.fusion for m in evit.reductions(loaded).values()} == {"mean"}
    apply_setting(loaded, {"keep_rate": 0.5, "fusion": "sum"})
    assert {m.fusion for m in evit.reductions(loaded).values()} == {"sum"}

    torch.manual_seed(0)  # as `evit train` seeds it (recipe seed 0): the weights the run started from
    model = evit.patch(timm.create_model("vit_tiny_patch16_224", **TINY), 0.5, fusion="mean").eval()  # as trained
    x, y = load_fashion_mnist("test", str(toy_fashion))

    def held_out_loss():
        with torch.no_grad():
            return torch.nn.functional.cross_entropy(model(normalize(x)), y).item()

    loss_before, (acc_before, _, _) = held_out_loss(), accuracy(model, TensorLoader(x, y, 64).batches(0))
    model.load_state_dict(load_file(str(out / "model.safetensors")))
    loss_after, (acc_after, _, n) = held_out_loss(), accuracy(model, TensorLoader(x, y, 64).batches(0))
    assert n == 256
    assert loss_after < loss_before - 0.3, (loss_before, loss_after)
    assert acc_after > acc_before + 15, (acc_before, acc_after)


def test_resume_after_kill_matches_uninterrupted_run(toy_fashion, tiny_recipe, tmp_path):
    common = ("--recipe", str(tiny_recipe), "--keep-rate", "0.5", "--keep-warmup-epochs", "2", "--save-every", "5",
              "--max-steps", "30")
    full = _run_train(_train_cmd(toy_fashion, tmp_path / "full", *common))
    assert full.returncode == 0, full.stderr[-2000:]

    killed = _run_train([sys.executable, str(Path(__file__).with_name("signal_at_step.py")), "SIGKILL", "23",
                         *_train_cmd(toy_fashion, tmp_path / "cut", *common)[3:]])
    assert killed.returncode == -9, "the run was meant to be killed (SIGKILL)"
    latest = json.loads((tmp_path / "cut" / "checkpoints" / "latest.json").read_text())
    assert latest["step"] == 20  # the last checkpoint before the kill
    assert not list((tmp_path / "cut" / "checkpoints").glob("*.tmp"))

    resumed = _run_train(_train_cmd(toy_fashion, tmp_path / "cut", *common, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = json.loads(full.stdout.splitlines()[-1]), json.loads(resumed.stdout.splitlines()[-1])
    assert a["step"] == b["step"] == 30 and a["keep_rate"] == b["keep_rate"] < 1.0 and a["loss"] == b["loss"]
    wa, wb = load_file(str(tmp_path / "full" / "model.safetensors")), load_file(str(tmp_path / "cut" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0, msg=f"{k} differs after resume")


def test_resume_without_checkpoint_is_a_clear_error(toy_fashion, tiny_recipe, tmp_path):
    proc = _run_train(_train_cmd(toy_fashion, tmp_path / "none", "--recipe", str(tiny_recipe), "--resume"))
    assert proc.returncode == 2 and "no checkpoint in" in proc.stderr and "Traceback" not in proc.stderr


def test_ddp_two_processes_gloo(toy_fashion, tiny_recipe, tmp_path):
    recipe = tmp_path / "five_classes.json"  # a head of 5 for 10 classes: every process notes it; one says so
    recipe.write_text(json.dumps({**json.loads(tiny_recipe.read_text()), "model_kwargs": {**TINY, "num_classes": 5}}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "evit.cli", *_train_cmd(toy_fashion, tmp_path / "ddp", "--recipe", str(recipe),
                                          "--epochs", "1", "--keep-rate", "0.7")[3:]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    notes = [line for line in proc.stderr.splitlines() if "num_classes=5 is not the data's 10 classes" in line]
    assert len(notes) == 1, proc.stderr[-3000:]  # said by rank 0 alone
    answers = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    assert len(answers) == 1 and answers[0].count("{") == 1, proc.stdout  # rank 0 alone prints the result
    result = json.loads(answers[0])
    assert result["step"] == 512 // 2 // 32  # each process sees half the data
    assert (tmp_path / "ddp" / "model.safetensors").is_file()


def test_distillation_pulls_the_reduced_student_towards_its_teacher(toy_fashion, tmp_path):
    import timm
    from safetensors.torch import save_file

    import evit
    from evit.data import normalize

    torch.manual_seed(3)
    teacher = timm.create_model("vit_tiny_patch16_224", **TINY).eval()
    with torch.no_grad():
        teacher.head.weight.normal_(0, 1.0)  # confident, label-blind predictions: far from what labels teach
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(tmp_path / "teacher.safetensors"))
    x = normalize(load_fashion_mnist("test", str(toy_fashion))[0])

    def gap_after(distill):
        out = tmp_path / ("with" if distill else "without")
        train(TrainConfig(model="vit_tiny_patch16_224", model_kwargs=TINY, data_root=str(toy_fashion), epochs=2,
                          batch_size=32, lr=0.003, warmup_epochs=0, keep_rate=0.5, distill=distill, distill_weight=2.0,
                          seed=1, out=str(out)), progress=False)
        student = evit.patch(timm.create_model("vit_tiny_patch16_224", **TINY), 0.5).eval()
        student.load_state_dict(load_file(str(out / "model.safetensors")))
        with torch.no_grad():
            return torch.nn.functional.kl_div(student(x).log_softmax(-1), teacher(x).log_softmax(-1),
                                              log_target=True, reduction="batchmean").item()

    with_teacher, without = gap_after(str(tmp_path / "teacher.safetensors")), gap_after(None)
    assert with_teacher < 0.5 * without, (with_teacher, without)
    with pytest.raises(FileNotFoundError, match="teacher weights"):
        train(TrainConfig(model="vit_tiny_patch16_224", model_kwargs=TINY, data_root=str(toy_fashion),
                          distill=str(tmp_path / "none.safetensors"), out=str(tmp_path / "x")))


def test_saved_weights_get_the_mode_of_a_plain_file(tmp_path):
    from evit.checkpoint import save_weights

    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    save_weights(torch.nn.Linear(2, 2), tmp_path / "w.safetensors")
    assert (tmp_path / "w.safetensors").stat().st_mode == plain.stat().st_mode
    assert load_file(str(tmp_path / "w.safetensors"))["weight"].shape == (2, 2)


def test_recorded_settings_of_weights_configs_and_older_runs(tmp_path):
    """Weights record their training settings; a run's model.safetensors from before they were recorded
    is read from its config.json, where no fusion means evit's only fusion then, the renormalised mean."""
    from dataclasses import asdict

    from evit.checkpoint import config_settings, recorded_settings, save_weights

    model = torch.nn.Linear(2, 2)
    save_weights(model, tmp_path / "plain.safetensors")
    assert recorded_settings(tmp_path / "plain.safetensors") == {}
    assert config_settings(asdict(TrainConfig())) == {}  # trained unpatched: nothing to record
    assert config_settings(asdict(TrainConfig(keep_rate=0.7))) == {
        "method": "evit", "fuse": True, "fusion": "sum", "keep_rate": 0.7, "keep_rate_min": None, "locations": None}
    assert config_settings({"method": "tome", "method_settings": {"r": [4, 2]}, "keep_rate": 1.0})["r"] == [4, 2]
    save_weights(model, tmp_path / "w.safetensors", {"method": "evit", "fuse": False, "locations": [1, 2]})
    assert recorded_settings(tmp_path / "w.safetensors") == {"method": "evit", "fuse": False, "locations": [1, 2]}
    run = tmp_path / "old_run"
    run.mkdir()
    save_weights(model, run / "model.safetensors")
    old = {k: v for k, v in asdict(TrainConfig(keep_rate=0.7)).items() if k != "fusion"}
    (run / "config.json").write_text(json.dumps(old))
    assert recorded_settings(run / "model.safetensors")["fusion"] == "mean"
    (run / "config.json").write_text(json.dumps(asdict(TrainConfig(keep_rate=0.7))))
    assert recorded_settings(run / "model.safetensors")["fusion"] == "sum"
    assert recorded_settings(tmp_path / "weights.pth") == {}  # the authors' .pth files record nothing


def test_device_is_chosen_and_checked(monkeypatch):
    from evit.models import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device(None) == torch.device("cpu")
        with pytest.raises(ValueError, match="sees no CUDA GPU; use --device cpu"):
            resolve_device("cuda")
    else:
        monkeypatch.setenv("LOCAL_RANK", "0")
        assert resolve_device(None) == torch.device("cuda:0")
    with pytest.raises(ValueError, match="use 'cpu', 'cuda' or 'cuda:N'"):
        resolve_device("gpu0")


def test_unknown_device_is_a_clear_error(toy_fashion, tiny_recipe, tmp_path):
    proc = _run_train(_train_cmd(toy_fashion, tmp_path / "dev", "--recipe", str(tiny_recipe), "--device", "gpu0"))
    assert proc.returncode == 2 and "device 'gpu0'" in proc.stderr and "Traceback" not in proc.stderr


def test_val_split_holds_out_training_images_and_validates_each_epoch(toy_fashion, tmp_path):
    from evit.data import held_out

    kept, held = held_out(512, 0.25, seed=3)
    assert len(held) == 128 and len(kept) == 384 and not set(kept.tolist()) & set(held.tolist())
    assert torch.equal(held, held_out(512, 0.25, seed=3)[1]) and not torch.equal(held, held_out(512, 0.25, seed=4)[1])
    out = tmp_path / "split"
    train(TrainConfig(model="vit_tiny_patch16_224", model_kwargs=TINY, data_root=str(toy_fashion), epochs=2,
                      batch_size=32, warmup_epochs=0, val_split=0.25, seed=3, out=str(out)), progress=False)
    rows = (out / "summary.csv").read_text().splitlines()
    assert rows[0] == "epoch,step,train_loss,val_top1,val_top5,lr,keep_rate,img_per_s"
    assert [r.split(",")[:2] for r in rows[1:]] == [["1", "12"], ["2", "24"]]  # 384 / 32 steps an epoch
    config = json.loads((out / "config.json").read_text())
    assert config["val_split"] == 0.25 and config["class_names"][0] == "T-shirt/top"


def test_fashion_mnist_is_resized_to_a_model_built_at_another_size(toy_fashion, tmp_path):
    """A 32 px model on Fashion-MNIST's 28 px tensors: training and validation batches at the model's size (both
    failed with timm's 'Input height (28) doesn't match model (32)' traceback); an RGB model is refused in one line."""
    kwargs = {**TINY, "img_size": 32, "patch_size": 4}
    cfg = TrainConfig(model="vit_tiny_patch16_224", model_kwargs=kwargs, data_root=str(toy_fashion), batch_size=32,
                      warmup_epochs=0, max_steps=2, eval_every=1, out=str(tmp_path / "r32"))
    assert train(cfg, progress=False)["step"] == 2
    assert len((tmp_path / "r32" / "summary.csv").read_text().splitlines()) == 3  # a validation row at each step
    with pytest.raises(ValueError, match="takes 3-channel images, but Fashion-MNIST's are grayscale"):
        train(replace(cfg, model_kwargs={**kwargs, "in_chans": 3}, out=str(tmp_path / "rgb")), progress=False)
