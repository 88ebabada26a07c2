import copy
import json
import re
import sys

import onnx
import pytest
import torch

import evit
from evit.bench import latency_backends
from evit.cli import main
from evit.data import FASHION_MNIST_CLASSES, FASHION_MNIST_MEAN, FASHION_MNIST_STD
from evit.export import _sort_stable, compile_model, export_onnx, graph_breaks, onnx_runner
from conftest import input_for, make_model


def _tiny(**patch_kwargs) -> torch.nn.Module:
    """Depth 2, width 48, reducing in block 0 (in the last block it could not change the class token's
    output): inductor and the ONNX exporter take seconds per block."""
    return evit.patch(make_model("deit", depth=2, embed_dim=48, num_heads=2), locations=[0], **patch_kwargs)


def test_onnx_parity_evit_with_prefix_tokens_and_dynamic_batch(tmp_path):
    # 5 prefix tokens (class + 4 registers): the exported graph must keep them in front, in order
    model = evit.patch(make_model("dinov2_registers", depth=2), 0.7)
    assert evit.token_counts(model, 21) == [21, 18, 16]
    path = export_onnx(model, tmp_path / "evit.onnx")
    proto = onnx.load(str(path))
    assert "TopK" in {node.op_type for node in proto.graph.node}
    props = {p.key: json.loads(p.value) for p in proto.metadata_props}  # how it reads images, for whoever runs it
    config = evit.hosts.data_config(model)
    assert props["evit_preprocessing"] == {"input_size": [3, 56, 56], "mean": list(config["mean"]),
                                           "std": list(config["std"]), "crop_pct": config["crop_pct"],
                                           "interpolation": config["interpolation"]}
    assert "evit_class_names" not in props  # a timm model built without names records none
    run = onnx_runner(path)
    for batch in (1, 3):  # traced at 2: the batch axis is dynamic
        x = input_for(model, batch)
        with torch.no_grad():
            ref = model(x)
        out = run(x)
        assert out.shape == ref.shape and ref.shape[0] == batch
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


def test_onnx_parity_topk_static_batch():
    model = _tiny(keep_rate=0.7, method="topk")
    assert evit.token_counts(model, 17) == [17, 13]
    run = onnx_runner(model, batch_size=2, dynamic_batch=False)  # exported on the fly, loaded from memory
    assert run.session.get_inputs()[0].shape == [2, 3, 64, 64]
    x = input_for(model, 2)
    with torch.no_grad():
        ref = model(x)
        assert not torch.allclose(evit.unpatch(copy.deepcopy(model))(x), ref, atol=1e-3)  # the drop matters
    torch.testing.assert_close(run(x), ref, atol=1e-4, rtol=0)


def test_stable_sort_translation_is_stable(tmp_path):
    class Sorter(torch.nn.Module):
        def forward(self, x):
            return x.sort(dim=1, descending=True, stable=True).indices

    x = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0, 1.0]])
    path = tmp_path / "sort.onnx"
    torch.onnx.export(Sorter().eval(), (x,), str(path), dynamo=True, verbose=False,
                      custom_translation_table={torch.ops.aten.sort.stable: _sort_stable})
    assert onnx_runner(path)(x).tolist() == [[1, 2, 4, 0, 5, 3]]  # ties in input order


def test_compile_has_no_graph_breaks_and_matches_eager():
    model = evit.patch(make_model("deit", depth=2), 0.7)  # blocks 0 and 1: block 1 ranks a fused token
    assert graph_breaks(model, input_for(model, 2)) == []

    class Breaks(torch.nn.Module):  # the check itself can fail
        def forward(self, x):
            x = x + 1
            torch._dynamo.graph_break()
            return x * 2

    assert graph_breaks(Breaks(), torch.ones(2)) != []

    tiny = _tiny(keep_rate=0.5)
    x = input_for(tiny, 2)
    compiled = compile_model(tiny)  # fullgraph=True: a graph break would raise here
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), tiny(x), atol=1e-4, rtol=1e-4)


def test_bf16_on_cpu_runs_and_agrees_loosely_with_fp32():
    model = evit.patch(make_model("deit_distilled"), 0.7)
    x = input_for(model, 8)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = model(x)
        cast = copy.deepcopy(model).to(torch.bfloat16)(x.to(torch.bfloat16))
    for out in (autocast, cast):
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
        assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max()
        assert (out.float().argmax(1) == ref.argmax(1)).float().mean() >= 0.75


def test_cli_export_writes_onnx_and_reports_parity(tmp_path, capsys):
    path = tmp_path / "embedded.onnx"
    assert main(["export", "--onnx", str(path), "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    proto = onnx.load(str(path))
    assert path.is_file() and proto.graph.input[0].name == "images"
    assert "tokens 50->37->28->21" in out  # the embedded ViT (49 patches, depth 6) at keep 0.7
    props = {p.key: json.loads(p.value) for p in proto.metadata_props}
    # the embedded model reads Fashion-MNIST's tensors, and knows its classes
    assert props["evit_class_names"] == list(FASHION_MNIST_CLASSES)
    assert props["evit_preprocessing"]["input_size"] == [1, 28, 28]
    assert props["evit_preprocessing"]["mean"] == pytest.approx([FASHION_MNIST_MEAN])
    assert props["evit_preprocessing"]["std"] == pytest.approx([FASHION_MNIST_STD])
    diff = float(re.search(r"max abs diff (\S+)", out).group(1))
    assert 0 <= diff < 1e-4


def test_cli_bench_backends_eager(capsys):
    rc = main(["bench", "--backends", "eager", "--keep-rates", "1.0", "0.7", "--latency-reps", "2", "--warmup", "0",
               "--json"])
    assert rc == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [(r["backend"], r["variant"], r["keep_rate"]) for r in rows] == [("eager", "unpatched", None),
                                                                            ("eager", "evit", 0.7)]
    assert rows[1]["tokens"] == [50, 37, 28, 21] and rows[0]["speedup"] == 1.0


def test_latency_backends_onnx_rows_agree_with_eager():
    model = evit.unpatch(_tiny())
    rows = latency_backends(model, 0.5, reps=2, warmup=0, backends=("eager", "onnx"), locations=[0], progress=False)
    assert [(r["backend"], r["variant"]) for r in rows] == [
        ("eager", "unpatched"), ("eager", "evit"), ("onnx", "unpatched"), ("onnx", "evit")]
    assert all(r["latency_ms"] > 0 and r["speedup"] > 0 for r in rows)
    assert rows[3]["tokens"] == [17, 10] and rows[3]["max_abs_diff"] < 1e-4 and rows[2]["max_abs_diff"] < 1e-4
    assert not evit.reductions(model)  # handed back unpatched
    with pytest.raises(ValueError, match="backends must be some of"):
        latency_backends(model, 0.5, backends=("tensorrt",))


def test_export_errors_are_clear(tmp_path, monkeypatch, capsys):
    model = make_model("deit")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_onnx(model, tmp_path / "missing" / "m.onnx")
    with pytest.raises(TypeError, match="only timm VisionTransformer"):
        export_onnx(torch.nn.Linear(2, 2), tmp_path / "linear.onnx")
    with pytest.raises(ValueError, match="input_size"):
        export_onnx(model, tmp_path / "m.onnx", input_size=(3, 64))
    with pytest.raises(ValueError, match="opset must be at least 18"):
        export_onnx(model, tmp_path / "m.onnx", opset=13)
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if not installed
    with pytest.raises(RuntimeError, match=r"needs onnxscript.*pip install 'evit\[export\]'"):
        export_onnx(model, tmp_path / "m.onnx")
    assert not any(tmp_path.iterdir())
    assert main(["export", "--onnx", str(tmp_path / "missing" / "m.onnx")]) == 2
    assert "evit export: error: cannot write" in capsys.readouterr().err


def test_export_refuses_to_write_over_its_own_checkpoint(tmp_path, capsys):
    """`--onnx W --checkpoint W` (or a link to W) would replace the user's weights with the ONNX file."""
    from evit import embedded

    weights = tmp_path / "w.pt"
    torch.save(embedded.load_model().state_dict(), weights)
    before = weights.read_bytes()
    (tmp_path / "link.pt").symlink_to(weights)
    for target in (weights, tmp_path / "link.pt"):
        assert main(["export", "--onnx", str(target), "--checkpoint", str(weights)]) == 2
        assert "is the checkpoint this command reads" in capsys.readouterr().err
    assert weights.read_bytes() == before
