"""`evit train` on transformers image classifiers: EViT's keep-rate warm-up and token counts, EMA, the summary,
weights that `evit eval --checkpoint` scores as the run did, a bit-identical resume, DDP, and one-line refusals.
A tiny random ViT on real Fashion-MNIST images (512 to train on, 256 to validate)."""
import json
import os
import signal
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

T = pytest.importorskip("transformers")

import evit.train  # noqa: E402
from evit import hosts, runs  # noqa: E402
from evit.checkpoint import recorded_settings  # noqa: E402
from evit.cli import main  # noqa: E402
from evit.patch import reductions, token_counts  # noqa: E402
from evit.schedule import keep_rate_at  # noqa: E402
from evit.train import TrainConfig, train  # noqa: E402
from test_faults_runs import _env, _same_weights  # noqa: E402
from test_train import toy_fashion  # noqa: E402,F401 - the fixture, shared
from test_transformers import HF_TINY  # noqa: E402

PER_EPOCH = 512 // 32


pytestmark = pytest.mark.usefixtures("one_thread")


def _config(root, out, **changes) -> TrainConfig:
    return TrainConfig(**{**dict(model=HF_TINY, data_root=str(root), out=str(out), batch_size=32, lr=0.004,
                                 warmup_epochs=0, label_smoothing=0.0, epochs=2, keep_rate=0.5, keep_warmup_epochs=1,
                                 save_every=5), **changes})


def test_trains_with_evit_warm_up_and_evaluates_as_the_run_reported(toy_fashion, tmp_path, monkeypatch, capsys):
    """Every step runs at the warm-up's keep rate with the token counts evit predicts for it; the loss falls;
    the EMA weights written load into `evit eval --checkpoint` with the top-1 the run recorded, and record EViT."""
    built, seen = [], []  # the model the run trains; per step: (keep rate, each layer's output length)
    build = evit.train.build_model

    def recording_build(cfg, **options):
        model = build(cfg, **options)
        def length(layer, args, out) -> None:  # of a training forward (validation's runs the EMA copy, in eval)
            if layer.training:
                seen[-1][1].append((out[0] if isinstance(out, tuple) else out).shape[1])

        for layer in hosts.adapter(model).blocks:
            layer.register_forward_hook(length)
        built.append(model)
        return model

    set_keep_rate = evit.train.set_keep_rate
    monkeypatch.setattr(evit.train, "build_model", recording_build)
    monkeypatch.setattr(evit.train, "set_keep_rate", lambda m, k: (seen.append((k, [])), set_keep_rate(m, k)))
    out = tmp_path / "run"
    result = train(_config(toy_fashion, out, epochs=3, ema_decay=0.9), progress=False)
    assert result["step"] == 3 * PER_EPOCH and result["keep_rate"] == 0.5

    model, steps = built[0], seen
    assert len(steps) == 3 * PER_EPOCH and len(reductions(model)) == 3  # patched with EViT where it puts it
    n, layers = hosts.adapter(model).num_tokens(), hosts.adapter(model).blocks
    for step, (keep, lengths) in enumerate(steps):
        assert keep == keep_rate_at(step, 0.5, 0, PER_EPOCH)  # cosine from 1 over the first epoch
        evit.set_keep_rate(model, keep)
        counts = token_counts(model, n)
        after = [counts[sum(i >= j for j in reductions(model))] for i in range(len(layers))]
        assert lengths == after, (step, keep)
    assert steps[0][1] == [50] * 4 and steps[-1][1] == [50, 27, 15, 9]

    rows = (out / "summary.csv").read_text().splitlines()[1:]
    losses = [float(r.split(",")[2]) for r in rows]
    assert len(rows) == 3 and losses[-1] < losses[0] - 0.05, losses
    assert recorded_settings(out / "model.safetensors") == {"method": "evit", "fuse": True, "fusion": "sum",
                                                             "keep_rate": 0.5}
    capsys.readouterr()
    assert main(["eval", "--model", HF_TINY, "--checkpoint", str(out / "model.safetensors"), "--data-root",
                 str(toy_fashion), "--keep-rates", "0.5", "--json"]) == 0
    [row] = json.loads(capsys.readouterr().out)["rows"]
    assert row["images"] == 256 and row["top1"] == pytest.approx(float(rows[-1].split(",")[3]), abs=1e-4)


def test_interrupted_run_resumes_to_the_same_weights(toy_fashion, tmp_path):
    """SIGINT after step 7 (checkpoints every 5 steps and at it), then --resume: bit-identical to a run that
    was never stopped, EMA and keep-rate warm-up included."""
    cfg = _config(toy_fashion, tmp_path / "full", ema_decay=0.9, max_steps=20)
    train(cfg, progress=False)
    cut = replace(cfg, out=str(tmp_path / "cut"))
    with pytest.raises(runs.Interrupted, match="stopped by SIGINT after step 7"):
        train(cut, progress=False, on_step=lambda step: step == 7 and os.kill(os.getpid(), signal.SIGINT))
    assert json.loads((tmp_path / "cut" / "checkpoints" / "latest.json").read_text())["step"] == 7
    assert train(cut, resume=True, progress=False)["step"] == 20
    assert _same_weights(tmp_path / "cut" / "model.safetensors", tmp_path / "full" / "model.safetensors")
    def rows(run):  # all but the speed column
        return [line.rsplit(",", 1)[0] for line in (tmp_path / run / "summary.csv").read_text().splitlines()]

    assert rows("cut") == rows("full") and len(rows("full")) == 3  # at steps 16 and 20


@pytest.mark.parametrize("family, sizes", [("deit", "intermediate_size=64"), ("dinov2", "mlp_ratio=2")])
def test_deit_and_dinov2_students_learn_from_a_teacher_and_evaluate_as_reported(family, sizes, toy_fashion, tmp_path,
                                                                                capsys):
    """A teacher of the same spec trained first, then an EViT student distilled from it; the student's weights
    score in `evit eval` as its run recorded."""
    spec = HF_TINY.replace("hf:vit:", f"hf:{family}:").replace("intermediate_size=64", sizes)
    teacher = _config(toy_fashion, tmp_path / "teacher", model=spec, keep_rate=1.0, keep_warmup_epochs=0, max_steps=4)
    train(teacher, progress=False)
    student = replace(teacher, out=str(tmp_path / "student"), keep_rate=0.5, distill=str(tmp_path / "teacher" /
                                                                                         "model.safetensors"))
    assert train(student, progress=False)["keep_rate"] == 0.5
    recorded = float((tmp_path / "student" / "summary.csv").read_text().splitlines()[-1].split(",")[3])
    capsys.readouterr()
    assert main(["eval", "--model", spec, "--checkpoint", str(tmp_path / "student" / "model.safetensors"),
                 "--data-root", str(toy_fashion), "--keep-rates", "0.5", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"][0]["top1"] == pytest.approx(recorded, abs=1e-4)


def test_ddp_two_processes_gloo_trains_a_transformers_model(toy_fashion, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29518",
           "-m", "evit.cli", "train", "--model", HF_TINY, "--data-root", str(toy_fashion), "--out",
           str(tmp_path / "ddp"), "--batch-size", "32", "--epochs", "1", "--keep-rate", "0.7", "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    [answer] = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert json.loads(answer)["step"] == 512 // 2 // 32  # each process sees half the data
    assert recorded_settings(tmp_path / "ddp" / "model.safetensors")["keep_rate"] == 0.7


@pytest.mark.parametrize("spec, words", [
    (HF_TINY + ",model_class=ViTModel", "ViTModel has no classification head (it gives embeddings), so it has no "
                                        "logits to train; train ViTForImageClassification"),
    (HF_TINY.replace("hf:vit:", "hf:clip_vision_model:").replace(",num_labels=10", ""),
     "has no classification head (it gives embeddings), so it has no logits to train; evit bench, show and export"),
    (HF_TINY.replace("hf:vit:", "hf:deit:") + ",model_class=DeiTForImageClassificationWithTeacher",
     "DeiTForImageClassificationWithTeacher is inference-only in transformers"),
])
def test_models_it_cannot_train_are_refused_in_one_line(spec, words, toy_fashion, tmp_path, capsys):
    assert main(["train", "--model", spec, "--data-root", str(toy_fashion), "--out", str(tmp_path / "run"),
                 "--max-steps", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_the_logits_are_read_through_the_host_and_a_timm_model_is_called_as_it_is():
    import timm
    from torch import nn

    from test_train import TINY

    vit = timm.create_model("vit_tiny_patch16_224", **TINY)
    assert hosts.forward(vit) is vit  # timm's training step is the model's own call: nothing added to it
    model = evit.train.build_model(TrainConfig(model=HF_TINY))
    wrapper = nn.DataParallel(model)  # as a DDP wrapper: the call goes through it, the output is read by the host
    x = torch.randn(2, 1, 28, 28)
    logits = hosts.forward(wrapper)(x)
    assert logits.shape == (2, 10) and torch.equal(logits, model(pixel_values=x).logits)

