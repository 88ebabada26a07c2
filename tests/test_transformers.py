"""transformers' ViTs through evit's transformers host: equal at zero reduction, the predicted counts, EViT
equal to a plain reference, gradients, refusals, MACs and the command line. Tiny configs, random weights."""
import json
import math

import pytest
import torch

import evit
from evit import hosts
from evit.cli import main
from evit.reduction import TokenReduction

T = pytest.importorskip("transformers")

TINY = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, image_size=32, patch_size=8,
            initializer_range=0.2)
CLASSES = {  # class -> (config class, config settings beyond TINY)
    "ViTForImageClassification": (T.ViTConfig, dict(intermediate_size=64)),
    "ViTModel": (T.ViTConfig, dict(intermediate_size=64)),
    "DeiTForImageClassification": (T.DeiTConfig, dict(intermediate_size=64)),
    "DeiTForImageClassificationWithTeacher": (T.DeiTConfig, dict(intermediate_size=64)),
    "CLIPVisionModel": (T.CLIPVisionConfig, dict(intermediate_size=64)),
    "CLIPVisionModelWithProjection": (T.CLIPVisionConfig, dict(intermediate_size=64, projection_dim=16)),
    "Dinov2Model": (T.Dinov2Config, dict(mlp_ratio=2)),
    "Dinov2ForImageClassification": (T.Dinov2Config, dict(mlp_ratio=2, layerscale_value=0.5)),
    "Dinov2WithRegistersModel": (T.Dinov2WithRegistersConfig, dict(mlp_ratio=2, num_register_tokens=2)),
    "Dinov2WithRegistersForImageClassification": (T.Dinov2WithRegistersConfig, dict(mlp_ratio=2, num_register_tokens=2)),
    "SiglipVisionModel": (T.SiglipVisionConfig, dict(intermediate_size=64, vision_use_head=False)),
}
PREFIX = {"DeiTForImageClassification": 2, "DeiTForImageClassificationWithTeacher": 2, "SiglipVisionModel": 0,
          "Dinov2WithRegistersModel": 3, "Dinov2WithRegistersForImageClassification": 3}
CLASS_TOKEN_METHODS = ("evit", "topk", "dynamicvit", "stvit", "patchslimming")
# method -> (settings at zero reduction, settings at a real reduction)
METHODS = {"evit": ({"keep_rate": 1.0}, {"keep_rate": 0.5}), "topk": ({"keep_rate": 1.0}, {"keep_rate": 0.6}),
           "random": ({"keep_rate": 1.0, "seed": 0}, {"keep_rate": 0.5, "seed": 0}), "tome": ({"r": 0}, {"r": 3}),
           "dynamicvit": ({"keep_rate": 1.0}, {"keep_rate": 0.5}), "stvit": ({"keep_rate": 1.0}, {"keep_rate": 0.5}),
           "patchslimming": ({"keep_rate": 1.0}, {"keep_rate": 0.5})}


def served(name):
    return [m for m in METHODS if name != "SiglipVisionModel" or m not in CLASS_TOKEN_METHODS]


def build(name, impl="sdpa", dtype=torch.float32, **settings):
    config_class, extra = CLASSES[name]
    torch.manual_seed(0)
    model = getattr(T, name)._from_config(config_class(**{**TINY, **extra, **settings}), attn_implementation=impl)
    with torch.no_grad():  # transformers starts tokens, biases and some position embeddings at zero: a class
        for n, p in model.named_parameters():  # token of zeros attends uniformly, and EViT's ranking is all ties
            if n.endswith(("bias", "token", "tokens", "embeddings", "class_embedding")) and "norm" not in n:
                p.normal_(0, 0.2)
    return model.to(dtype).eval()


def images(batch=3, dtype=torch.float32):
    torch.manual_seed(1)
    return torch.randn(batch, 3, 32, 32, dtype=dtype)


def patch(model, method, settings, x):
    return evit.patch(model, method=method, **settings, **({"images": x} if method == "patchslimming" else {}))


class PassThrough(TokenReduction):
    """Runs the reducing layer's own path (attention through evit, method, MLP) while keeping every token."""

    needs_cls_attn = needs_keys = True
    needs_class_token = False

    def output_tokens(self, n_tokens):
        return n_tokens

    def is_identity(self, n_tokens):
        return False

    def forward(self, x, seen):
        assert seen.cls_attn.shape == x.shape[:2] and torch.allclose(seen.cls_attn.sum(-1), seen.cls_attn.new_ones(1))
        return x


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("name", list(CLASSES))
def test_zero_reduction_equals_unpatched(name, impl):
    model, x = build(name, impl), images()
    host = hosts.adapter(model)
    assert host.num_prefix_tokens == PREFIX.get(name, 1)
    keys = set(model.state_dict())
    with torch.no_grad():
        ref = host.forward(x)
        evit.apply(model, {i: PassThrough() for i in range(4)})  # evit's own layer path, every layer
        torch.testing.assert_close(host.forward(x), ref, atol=1e-5, rtol=1e-5)
        for method in served(name):
            patch(model, method, METHODS[method][0], x)
            assert evit.reductions(model), method
            torch.testing.assert_close(host.forward(x), ref, atol=1e-5, rtol=1e-5, msg=method)
    assert set(model.state_dict()) - {k for k in model.state_dict() if ".reduction." in k} == keys, \
        "patching must not rename parameters"
    evit.unpatch(model)
    assert not evit.reductions(model) and type(host.blocks[0]).__name__ == host.family.layer


def _lengths(model, x):
    """Input length, then the output length of each patched layer."""
    host, lengths = hosts.adapter(model), {}
    layers = host.blocks
    handles = [layer.register_forward_hook(lambda m, a, out, i=i: lengths.__setitem__(i, out.shape[1]))
               for i, layer in enumerate(layers)]
    handles.append(layers[0].register_forward_pre_hook(lambda m, a: lengths.__setitem__(-1, a[0].shape[1])))
    try:
        with torch.no_grad():
            out = host.forward(x)
    finally:
        for h in handles:
            h.remove()
    return out, [lengths[-1]] + [lengths[i] for i in sorted(evit.reductions(model))]


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("name", list(CLASSES))
def test_reduced_token_counts_are_the_predicted_ones(name, impl):
    model, x = build(name, impl), images()
    n = hosts.adapter(model).num_tokens()
    assert n == PREFIX.get(name, 1) + 16
    for method in served(name):
        patch(model, method, METHODS[method][1], x)
        out, seen = _lengths(model, x)
        assert torch.isfinite(out).all(), method
        assert seen == evit.token_counts(model, n) and seen[-1] < n, (method, seen)


# ---- EViT against a plain reference -----------------------------------------------------------------

def _attention(attn, h):
    """Explicit attention of a transformers attention module: (output, probabilities (B, H, N, N))."""
    B, N, _ = h.shape
    split = lambda t: t.view(B, N, attn.config.num_attention_heads, -1).transpose(1, 2)  # noqa: E731
    q, k, v = split(attn.q_proj(h)), split(attn.k_proj(h)), split(attn.v_proj(h))
    probs = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1)
    out = (probs @ v).transpose(1, 2).reshape(B, N, -1)
    return (attn.o_proj if hasattr(attn, "o_proj") else attn.out_proj)(out), probs


def _layer(layer, t):
    """One layer, written out per family: (tokens after the attention residual, probabilities, MLP residual)."""
    if hasattr(layer, "layernorm_before"):  # ViT, DeiT
        a, probs = _attention(layer.attention, layer.layernorm_before(t))
        return t + a, probs, lambda t: t + layer.mlp(layer.layernorm_after(t))
    if hasattr(layer, "layer_norm1"):  # CLIP
        a, probs = _attention(layer.self_attn, layer.layer_norm1(t))
        return t + a, probs, lambda t: t + layer.mlp(layer.layer_norm2(t))
    a, probs = _attention(layer.attention, layer.norm1(t))  # DINOv2
    return t + layer.layer_scale1(a), probs, lambda t: t + layer.layer_scale2(layer.mlp(layer.norm2(t)))


def _head(model, name, t):
    base = model.base_model
    if name.startswith("CLIP"):
        pooled = base.post_layernorm(t[:, 0])
        return model.visual_projection(pooled) if name.endswith("Projection") else pooled
    s = base.layernorm(t)
    if name == "DeiTForImageClassificationWithTeacher":
        return (model.cls_classifier(s[:, 0]) + model.distillation_classifier(s[:, 1])) / 2
    if name.endswith("ForImageClassification") and name.startswith("Dinov2"):
        return model.classifier(torch.cat([s[:, 0], s[:, PREFIX.get(name, 1):].mean(1)], dim=1))
    if name.endswith("ForImageClassification"):
        return model.classifier(s[:, 0])
    return base.pooler(s) if getattr(base, "pooler", None) is not None else s[:, 0]


def reference_evit(model, name, x, keep_rate, locations, fusion="mean"):
    """EViT written plainly: explicit attention matrix, sort, the rest fused into one token: their attention-
    weighted sum (``fusion='sum'``, the paper's) or average (``'mean'``, weights renormalised to sum to one)."""
    base, p = model.base_model, PREFIX.get(name, 1)
    t = base.embeddings(x)
    if name.startswith("CLIP"):
        t = base.pre_layrnorm(t)
    layers = base.encoder.layers if name.startswith("CLIP") else base.encoder.layer if name.startswith("Dinov2") \
        else base.layers
    for i, layer in enumerate(layers):
        t, probs, mlp = _layer(layer, t)
        if i in locations:
            rows = []
            for b in range(t.shape[0]):
                score = probs[b, :, 0, p:].mean(0)
                order = torch.argsort(score, descending=True)
                kk = math.ceil(round(keep_rate * len(score), 6))
                keep, drop = order[:kk], order[kk:]
                w = score[drop] / score[drop].sum() if fusion == "mean" else score[drop]
                rows.append(torch.cat([t[b, :p], t[b, p:][keep], (w[:, None] * t[b, p:][drop]).sum(0, keepdim=True)]))
            t = torch.stack(rows)
        t = mlp(t)
    return _head(model, name, t)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("name", [n for n in CLASSES if n != "SiglipVisionModel"])
def test_evit_equals_the_reference(name, impl):
    model, x = build(name, impl, torch.float64), images(dtype=torch.float64)  # float64: no near-tie flips
    with torch.no_grad():
        unpatched = hosts.adapter(model).forward(x)
        for keep_rate, locations in ((0.5, (1, 2)), (0.7, (0,))):
            evit.patch(model, keep_rate, locations)
            fusion = getattr(evit.reductions(model)[locations[0]], "fusion", "mean")  # the method's own
            ref = reference_evit(model, name, x, keep_rate, locations, fusion)
            # transformers' eager ViT and CLIP attention take the softmax in float32 even in float64
            torch.testing.assert_close(hosts.adapter(model).forward(x), ref, atol=1e-6, rtol=1e-6)
            evit.unpatch(model)
    assert (ref - unpatched).abs().max() > 1e-3, "the reduction changed nothing"


def test_sdpa_stays_fused_no_attention_matrix_is_made():
    """Under sdpa the patched model makes no (B, heads, N, N) tensor (the class row is computed beside the
    kernel); under eager it does (so the check can see one)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Shapes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.square = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.dim() == 4 and t.shape[-1] == t.shape[-2] > 4:
                    self.square.add(tuple(t.shape))
            return out

    for impl in ("sdpa", "eager"):
        model, x = build("DeiTForImageClassificationWithTeacher", impl), images()
        evit.patch(model, 0.5, locations=[0, 2])
        with torch.no_grad(), Shapes() as seen:
            hosts.adapter(model).forward(x)
        assert (not seen.square) if impl == "sdpa" else (3, 2, 18, 18) in seen.square, (impl, seen.square)


@pytest.mark.parametrize("name", list(CLASSES))
def test_gradients_reach_every_parameter_in_training(name):
    dropout = dict(drop_path_rate=0.1) if name.startswith("Dinov2") else \
        dict(attention_dropout=0.1) if name.startswith(("CLIP", "Siglip")) else \
        dict(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    model, x = build(name, **dropout), images(4)
    host = hosts.adapter(model.train())
    host.forward(x).square().mean().backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}  # what the unpatched model trains
    assert len(trained) > 20
    for method in served(name):
        model.zero_grad(set_to_none=True)
        patch(model, method, METHODS[method][1], x).train()
        loss = host.forward(x).square().mean()
        sum(filter(None, (m.aux_loss() for m in evit.reductions(model).values())), loss).backward()  # as train.py
        reached = {n for n, p in model.named_parameters() if p.grad is not None and torch.isfinite(p.grad).all()}
        own = {n for n, _ in model.named_parameters() if ".reduction." in n}  # DynamicViT's predictors
        assert trained | own <= reached, (method, sorted(trained | own - reached))
        evit.unpatch(model)


def test_tome_on_dinov2s_classifier_averages_by_size():
    """Dinov2ForImageClassification reads the class token and the mean of the image tokens: merging two pairs
    of identical tokens changes no logit (proportional attention, size-weighted mean); a plain mean would."""
    from evit.patch import SizeWeightedNorm

    model = build("Dinov2ForImageClassification")
    with torch.no_grad():
        model.dinov2.embeddings.position_embeddings.zero_()  # identical patches stay identical tokens
        x = images(2)
        x[..., :8, 8:16] = x[..., :8, 0:8]  # patch 1 = patch 0, patch 3 = patch 2: neighbours, so opposite sets
        x[..., :8, 24:32] = x[..., :8, 16:24]
        ref = hosts.adapter(model).forward(x)
        evit.patch(model, method="tome", r=2, locations=[0])
        assert evit.token_counts(model, 17) == [17, 15, 15, 15, 15]
        torch.testing.assert_close(hosts.adapter(model).forward(x), ref, atol=1e-5, rtol=1e-5)
        norm = model.dinov2.layernorm
        assert isinstance(norm, SizeWeightedNorm)
        weighted, norm.__class__ = type(norm), torch.nn.LayerNorm  # the plain mean instead
        assert (hosts.adapter(model).forward(x) - ref).abs().max() > 1e-4
        norm.__class__ = weighted
        evit.unpatch(model)
        assert type(model.dinov2.layernorm) is torch.nn.LayerNorm


def test_a_patched_model_pickles_and_copies():
    import copy
    import io

    model, x = build("Dinov2WithRegistersForImageClassification"), images()
    evit.patch(model, method="tome", r=2)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    with torch.no_grad():
        ref = hosts.adapter(model).forward(x)
        for other in (loaded, copy.deepcopy(model)):
            torch.testing.assert_close(hosts.adapter(other).forward(x), ref)
            assert evit.token_counts(other, 19) == evit.token_counts(model, 19) and evit.unpatch(other)


@pytest.mark.parametrize("name", ["ViTForImageClassification", "DeiTForImageClassificationWithTeacher",
                                  "Dinov2ForImageClassification", "Dinov2WithRegistersModel"])
def test_layers_after_a_reduction_take_a_full_length_mask_that_masks_nothing(name, monkeypatch):
    """Inside torch.compile before torch 2.14 (and under export) transformers makes its all-attending mask in
    full, for the full-length sequence, and hands it to every layer: the layers after a reduction drop it."""
    import copy
    import io

    import transformers.masking_utils as masking

    model, x = build(name), images()
    evit.patch(model, 0.5, locations=[1])
    with torch.no_grad():
        ref = hosts.adapter(model).forward(x)
        monkeypatch.setattr(masking, "is_torchdynamo_exporting", lambda: True)  # what torch < 2.14 answers there
        made = masking.create_bidirectional_mask(config=model.config, inputs_embeds=torch.zeros(3, 17, 32),
                                                 attention_mask=None)
        assert made is not None and made.shape[-1] == 17  # the mask really is made in full
        torch.testing.assert_close(hosts.adapter(model).forward(x), ref)
        loaded = torch.load(io.BytesIO((lambda b: (torch.save(model, b), b.getvalue())[1])(io.BytesIO())),
                            weights_only=False)
        for other in (loaded, copy.deepcopy(model)):
            torch.testing.assert_close(hosts.adapter(other).forward(x), ref)
    evit.unpatch(model)
    layer_class = type(hosts.adapter(model).blocks[0])
    assert all(type(b) is layer_class for b in hosts.adapter(model).blocks)


def test_count_macs_counts_the_reduction_and_both_kernels_alike():
    for name in ("DeiTForImageClassificationWithTeacher", "Dinov2WithRegistersForImageClassification"):
        counts = {}
        for impl in ("sdpa", "eager"):
            model = build(name, impl)
            counts[impl, "none"] = evit.count_macs(model)
            evit.patch(model, 0.5)
            counts[impl, "evit"] = evit.count_macs(model)
        assert counts["sdpa", "none"] == counts["eager", "none"] and counts["sdpa", "evit"] == counts["eager", "evit"]
        assert counts["sdpa", "evit"] < 0.8 * counts["sdpa", "none"], counts


# ---- refusals ---------------------------------------------------------------------------------------

def test_refusals_are_clear():
    model, x = build("ViTForImageClassification"), images()
    evit.patch(model, 0.5)
    with pytest.raises(ValueError, match="output_attentions=True is not supported"):
        model(pixel_values=x, output_attentions=True)
    mask = torch.ones(3, 17, dtype=torch.bool)
    mask[:, 5] = False  # (an all-true mask is no mask: transformers drops it)
    with pytest.raises(ValueError, match="attention masks are not supported"):
        model(pixel_values=x, attention_mask=mask)
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        model.train()(pixel_values=x)
    siglip = build("SiglipVisionModel", vision_use_head=True)
    for method in ("evit", "tome", "random"):
        with pytest.raises(ValueError, match="attention-pooling head"):
            evit.patch(siglip, method=method)
    with pytest.raises(ValueError, match="without a class token.*random, tome"):
        evit.patch(build("SiglipVisionModel"), 0.5)
    flex = build("DeiTForImageClassification")
    flex.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="attn_implementation='flex_attention'"):
        evit.patch(flex, 0.5)
    clip_classifier = T.CLIPForImageClassification(T.CLIPConfig(vision_config=dict(TINY, intermediate_size=64)))
    with pytest.raises(TypeError, match="only timm VisionTransformer models .* and transformers' ViT"):
        evit.patch(clip_classifier, 0.5)
    assert not any(evit.reductions(m) for m in (siglip, flex, clip_classifier))


def test_a_transformers_too_old_is_refused_in_one_line(monkeypatch, capsys):
    """5.20 and older lay CLIP and DINOv2 out differently: refused by name, not failed deep inside."""
    model = build("ViTForImageClassification")
    monkeypatch.setattr("transformers.__version__", "5.20.2")
    with pytest.raises(ValueError, match=r"transformers 5\.21 or newer, and this is transformers 5\.20\.2: pip install -U"):
        evit.patch(model, 0.5)
    assert not evit.reductions(model)
    assert main(["bench", "--model", HF_TINY, "--reps", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "transformers 5.21 or newer" in err and len(err.splitlines()) == 1 and "Traceback" not in err


# ---- the command line -------------------------------------------------------------------------------

HF_TINY = "hf:vit:hidden_size=32,num_hidden_layers=4,num_attention_heads=2,intermediate_size=64,image_size=28," \
          "patch_size=4,num_channels=1,num_labels=10"


def test_cli_bench_eval_compare_on_a_transformers_model(tmp_path, capsys):
    assert main(["bench", "--model", HF_TINY, "--keep-rates", "1.0", "0.5", "--batch-size", "2", "--reps", "2",
                 "--latency-reps", "2", "--warmup", "0", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert rows[2]["tokens"] == [50, 27, 15, 9] and rows[2]["gmacs"] < rows[1]["gmacs"] == pytest.approx(rows[0]["gmacs"])
    assert main(["eval", "--model", HF_TINY, "--data", "bundled", "--keep-rates", "1.0", "0.5", "--speed-reps", "1",
                 "--batch-size", "1000", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["keep_rate"] for r in rows] == [1.0, 0.5] and all(r["images"] == 3000 for r in rows)
    assert rows[1]["gmacs"] < rows[0]["gmacs"] and all(0 <= r["top1"] <= 100 for r in rows)
    assert main(["compare", "--model", HF_TINY, "--data", "bundled", "--methods", "tome", "topk", "--keep-rates", "0.5",
                 "--r", "2", "--speed-reps", "1", "--batch-size", "1000", "--plot", str(tmp_path / "c.png"),
                 "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["method"] for r in rows] == ["none", "tome", "topk"]


def test_cli_eval_on_an_image_folder_with_the_models_own_preprocessing(jpeg_folder, capsys):
    root = jpeg_folder(1, 3)  # 10 classes, 3 validation images each
    spec = HF_TINY.replace(",num_channels=1", "").replace("image_size=28,patch_size=4", "image_size=32,patch_size=8")
    assert main(["eval", "--model", spec, "--data", str(root), "--keep-rates", "1.0", "0.5", "--speed-reps", "1",
                 "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["images"] for r in rows] == [30, 30] and rows[1]["gmacs"] < rows[0]["gmacs"]
    model = build("DeiTForImageClassification")
    config = hosts.data_config(model, (3, 48, 48))
    assert config["input_size"] == (3, 48, 48) and config["mean"] == (0.5, 0.5, 0.5) and config["crop_pct"] == 0.875


def test_cli_show_and_export_on_a_transformers_model(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from PIL import Image

    spec = HF_TINY.replace(",num_channels=1", "").replace("image_size=28,patch_size=4", "image_size=32,patch_size=8")
    files = []
    for i in range(2):
        files.append(tmp_path / f"{i}.png")
        Image.fromarray((torch.rand(40, 40, 3) * 255).byte().numpy()).save(files[-1])
    assert main(["show", *map(str, files), "--model", spec, "--out", str(tmp_path / "show.png")]) == 0
    assert (tmp_path / "show.png").stat().st_size > 5_000
    # one reducing layer, unpatched layers after it: they take the mask transformers makes when exporting
    assert main(["export", "--onnx", str(tmp_path / "m.onnx"), "--model", spec, "--keep-rate", "0.5",
                 "--locations", "1"]) == 0
    out = capsys.readouterr().out
    assert "tokens 17->10," in out and "max abs diff" in out


def test_cli_transformers_models_from_a_folder_and_offline(tmp_path, capsys):
    model = build("DeiTForImageClassificationWithTeacher")
    model.save_pretrained(tmp_path)
    assert main(["bench", "--model", f"hf:{tmp_path}", "--pretrained", "--keep-rates", "0.5", "--batch-size", "1",
                 "--reps", "1", "--latency-reps", "1", "--warmup", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"][1]["tokens"] == [18, 11, 8, 6]
    from evit.models import create_model

    loaded, x = create_model(f"hf:{tmp_path}", pretrained=True).eval(), images()
    with torch.no_grad():
        torch.testing.assert_close(hosts.adapter(loaded).forward(x), hosts.adapter(model).forward(x))
    assert main(["bench", "--model", "hf:someone/not-cached-vit"]) == 2
    err = capsys.readouterr().err
    assert "neither a local folder with config.json nor a transformers model type" in err and "Traceback" not in err
    assert main(["bench", "--model", "hf:vit:hidden_size"]) == 2
    assert "key=value" in capsys.readouterr().err
    assert main(["train", "--model", f"hf:{tmp_path}", "--pretrained", "--out", str(tmp_path / "run"),
                 "--max-steps", "1"]) == 2  # trained: ViT/DeiT/DINOv2 classifiers (tests/test_train_transformers.py)
    assert "is inference-only in transformers" in capsys.readouterr().err and not (tmp_path / "run").exists()
    assert main(["bench", "--model", HF_TINY, "--backends", "eager", "--keep-rates", "0.5"]) == 2
    assert "returns an output object" in capsys.readouterr().err
    assert main(["eval", "--model", HF_TINY, "--img-size", "30"]) == 2
    assert "img_size 30x30 is not a multiple of the patch size 4x4" in capsys.readouterr().err


def test_cli_refuses_bad_hf_specs_and_folders_in_one_line(tmp_path, capsys):
    """Settings transformers would reject or silently ignore, classes of another type, weights that would not be
    used, do not fit, lack tensors or hold NaN: each one line, exit 2."""
    tiny = "hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=64,image_size=32,patch_size=8"
    refused = {f"hf:vit:{tiny},hiden_size=3": "has no setting 'hiden_size'",
               f"hf:vit:{tiny},hidden_size=abc": "refuses these settings",
               f"hf:vit:{tiny},patch_size=0": "patch_size must be a whole number of at least 1",
               "hf:vit:hidden_size=33,num_attention_heads=2": "not a multiple of num_attention_heads",
               f"hf:vit:{tiny},model_class=BertModel": "BertModel is not a vit model",
               f"hf:vit:{tiny},model_class=DeiTModel": "DeiTModel is not a vit model",
               f"hf:vit:{tiny},attn_implementation=flash_attention_2": "could not build",
               "hf:": "needs a model type", f"hf:{tmp_path / 'nope'}": "no such folder",
               # transformers builds these: a patch that does not divide the image crops it, a larger one fails late
               f"hf:vit:{tiny},image_size=30": "image_size 30x30 is not a multiple of the patch size 8x8",
               f"hf:vit:{tiny},patch_size=64": "image_size 32x32 is not a multiple of the patch size 64x64",
               f"hf:vit:{tiny},image_size=[32,48,3]": "image_size is one number or [height, width]",
               f"hf:vit:{tiny},num_labels=-3": "at least 1, got -3",  # transformers reads it as 0 labels
               f"hf:{tmp_path / 'bert'}": "is a bert model"}  # not "pass --pretrained", which would not help
    T.BertModel(T.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=64)).save_pretrained(tmp_path / "bert")
    model = build("ViTForImageClassification")
    model.save_pretrained(tmp_path / "weights")
    bad = build("ViTForImageClassification")
    with torch.no_grad():
        bad.classifier.bias[0] = float("nan")
    bad.save_pretrained(tmp_path / "nan")
    T.ViTModel(model.config).save_pretrained(tmp_path / "backbone")
    refused.update({f"hf:{tmp_path / 'weights'}": "pass --pretrained"})
    capsys.readouterr()  # transformers' own progress bars while saving
    for spec, words in refused.items():
        assert main(["bench", "--model", spec, "--reps", "1"]) == 2, spec
        err = capsys.readouterr().err.strip()
        assert words in err and len(err.splitlines()) == 1 and "Traceback" not in err, (spec, err)
    for spec, words in {f"hf:{tmp_path / 'weights'}:hidden_size=64": "sizes do not fit",
                        f"hf:{tmp_path / 'backbone'}:model_class=ViTForImageClassification": "which would start random",
                        f"hf:{tmp_path / 'nan'}": "non-finite", f"hf:vit:{tiny}": "has no weights"}.items():
        assert main(["bench", "--model", spec, "--pretrained", "--reps", "1"]) == 2, spec
        err = capsys.readouterr().err.strip()
        assert words in err and len(err.splitlines()) == 1, (spec, err)
    from evit.models import create_model

    deit = create_model(f"hf:deit:{tiny}")  # transformers starts DeiT's tokens at zero: every token would tie
    assert deit.deit.embeddings.cls_token.abs().sum() > 0 and deit.deit.embeddings.distillation_token.abs().sum() > 0


def test_eval_maps_folder_classes_by_the_models_own_names(jpeg_folder, tmp_path, capsys):
    """A model recording its classes (id2label) is scored by name, not by folder order, and a dataset of other
    classes or another head width is refused."""
    import shutil

    root = tmp_path / "data"
    shutil.copytree(jpeg_folder(1, 3), root)
    for extra in sorted((root / "val" / "c0").iterdir())[1:]:
        extra.unlink()  # c0: 1 image, c9: 3
    config = T.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
                         patch_size=8, num_labels=10, id2label={i: f"c{9 - i}" for i in range(10)})
    model = T.ViTForImageClassification(config)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.arange(10, 0, -1).float())  # always output 0, which is "c9"
    model.save_pretrained(tmp_path / "model")
    capsys.readouterr()
    args = ["--model", f"hf:{tmp_path / 'model'}", "--pretrained", "--keep-rates", "1.0", "--speed-reps", "1", "--json"]
    assert main(["eval", "--data", str(root), *args]) == 0
    row = json.loads(capsys.readouterr().out)["rows"][0]
    assert row["images"] == 28 and row["top1"] == pytest.approx(100 * 3 / 28)  # by folder order it would be 1 / 28
    (root / "val" / "apple").mkdir()
    shutil.copy(next((root / "val" / "c1").iterdir()), root / "val" / "apple" / "a.jpg")
    assert main(["eval", "--data", str(root), *args]) == 2
    assert "bear the names of ViTForImageClassification's id2label ('c0', ...) and some do not ('apple')" in \
        capsys.readouterr().err
    assert main(["eval", "--data", "bundled", *args]) == 2  # ten classes, but not Fashion-MNIST's
    assert "are not Fashion-MNIST's" in capsys.readouterr().err
    assert main(["eval", "--data", "bundled", "--model", "hf:vit:hidden_size=32,num_hidden_layers=2,num_attention_heads=2,"
                 "image_size=28,patch_size=7,num_channels=1,num_labels=3", "--speed-reps", "1"]) == 2
    assert "head has 3 outputs but Fashion-MNIST has 10 classes" in capsys.readouterr().err


def test_names_are_used_only_where_the_folders_bear_them(jpeg_folder, tmp_path, capsys, monkeypatch):
    """Folders named another way (ImageNet's synset ids) keep folder order; names match without case or
    punctuation; a folder mixing both is refused. Weights without a pooler, a checkpoint over a folder with
    weights, a pre-release of the oldest transformers and a model type evit does not serve."""
    from evit import folders
    from evit.models import create_model

    config = T.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         image_size=32, patch_size=8, num_labels=10, id2label={i: f"Class {i}" for i in range(10)})
    model = T.ViTForImageClassification(config)
    root = jpeg_folder(1, 1)  # c0..c9: no folder bears a name of the model's
    assert folders.model_class_names([model], root / "val") is None
    renamed = tmp_path / "val"
    for i in range(10):
        (renamed / f"CLASS_{9 - i}").mkdir(parents=True)
    names, source = folders.model_class_names([model], renamed)
    assert names == [f"CLASS_{i}" for i in range(10)] and "id2label" in source
    (renamed / "c3").mkdir()
    with pytest.raises(ValueError, match="some class folders bear the names of .* and some do not"):
        folders.model_class_names([model], renamed)
    fashion = T.ViTConfig(num_labels=10, id2label=dict(enumerate(["T - shirt / top", "Trouser", "Pullover", "Dress", "Coat",
                                                                  "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"])))
    folders.check_fashion_mnist_heads([T.ViTForImageClassification(T.ViTConfig(**{**config.to_dict(), **{
        "id2label": fashion.id2label, "label2id": fashion.label2id, "num_channels": 1}}))])  # HF datasets' spelling

    backbone = T.ViTModel(T.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                      image_size=32, patch_size=8), add_pooling_layer=False)
    backbone.save_pretrained(tmp_path / "no_pooler")
    loaded = create_model(f"hf:{tmp_path / 'no_pooler'}", pretrained=True)
    assert loaded.pooler is None and hosts.adapter(loaded).pooling == "sequence"
    model.save_pretrained(tmp_path / "classifier")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "ck.safetensors"))
    with_checkpoint = create_model(f"hf:{tmp_path / 'classifier'}", checkpoint=str(tmp_path / "ck.safetensors"))
    torch.testing.assert_close(with_checkpoint.classifier.weight, model.classifier.weight)
    capsys.readouterr()
    monkeypatch.setattr("transformers.__version__", "5.21.0.dev0")
    evit.patch(build("ViTForImageClassification"), 0.5)  # a source build of the oldest served release
    assert main(["bench", "--model", "hf:swin", "--reps", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "is a swin model" in err and "clip_vision_model" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_a_two_tower_models_image_tower_is_served(kind, tmp_path, capsys):
    """A whole CLIP or SigLIP model saved as it comes (image and text towers): its image tower is built, CLIP's with
    its projection, and gives the whole model's image features; settings given apply to the tower."""
    from evit.models import create_model

    towers = dict(text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                                   vocab_size=99, bos_token_id=0, eos_token_id=1),
                  vision_config=dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=37,
                                     image_size=32, patch_size=8))
    if kind == "clip":
        whole = T.CLIPModel(T.CLIPConfig(**towers, projection_dim=24)).eval()
    else:
        whole = T.SiglipModel(T.SiglipConfig(**towers)).eval()
    whole.save_pretrained(tmp_path / kind)
    tower = create_model(f"hf:{tmp_path / kind}", pretrained=True).eval()
    assert type(tower).__name__ == {"clip": "CLIPVisionModelWithProjection", "siglip": "SiglipVisionModel"}[kind]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = whole.get_image_features(pixel_values=x)
        features = features if torch.is_tensor(features) else features.pooler_output
        out = tower(pixel_values=x)
        torch.testing.assert_close(out.image_embeds if kind == "clip" else out.pooler_output, features)
    if kind == "clip":
        evit.patch(tower, 0.5)
        assert evit.token_counts(tower, 17) == [17, 10, 7, 5]
        assert main(["bench", "--model", f"hf:{tmp_path / kind}", "--pretrained", "--keep-rates", "0.5", "--reps", "1",
                     "--latency-reps", "1", "--batch-size", "2"]) == 0
    assert main(["bench", "--model", f"hf:{tmp_path / kind}", "--reps", "1"]) == 2  # its weights need --pretrained
    assert "--pretrained" in capsys.readouterr().err
    assert main(["eval", "--model", f"hf:{tmp_path / kind}", "--pretrained"]) == 2  # no head: no accuracy
    assert "no classification head (it gives embeddings)" in capsys.readouterr().err
    assert main(["eval", "--model", f"{HF_TINY},model_class=ViTModel"]) == 2
    assert "load the weights as ViTForImageClassification" in capsys.readouterr().err
    wider = create_model(f"hf:{kind}:hidden_size=48,num_hidden_layers=2,num_attention_heads=3,intermediate_size=64")
    assert wider.config.hidden_size == 48 and len(hosts.adapter(wider).blocks) == 2


@pytest.mark.parametrize("spec", ["vit", "dinov2", "deit:model_class=DeiTForImageClassificationWithTeacher"])
def test_a_save_pretrained_file_loads_as_a_checkpoint(spec, tmp_path):
    """``save_pretrained`` writes transformers' saved layout (``attention.attention.query``), not the modules' names;
    given as ``--checkpoint`` it loads as ``from_pretrained`` would load it: the same outputs as the saved model."""
    from evit.models import create_model, load_checkpoint

    name, _, extra = spec.partition(":")
    settings = "hidden_size=32,num_hidden_layers=2,num_attention_heads=2,image_size=32,patch_size=8"
    full = f"hf:{name}:{settings}" + (f",{extra}" if extra else "")
    torch.manual_seed(0)
    saved = create_model(full).eval()
    saved.save_pretrained(tmp_path / "run")
    from safetensors.torch import load_file

    assert set(load_file(str(tmp_path / "run" / "model.safetensors"))) != set(saved.state_dict())  # another layout
    torch.manual_seed(1)
    model = create_model(full).eval()
    x = torch.randn(2, 3, 32, 32)
    assert not torch.allclose(hosts.adapter(model).forward(x), hosts.adapter(saved).forward(x))
    load_checkpoint(model, str(tmp_path / "run" / "model.safetensors"))
    torch.testing.assert_close(hosts.adapter(model).forward(x), hosts.adapter(saved).forward(x))
    other = create_model(f"hf:{name}:{settings.replace('hidden_size=32', 'hidden_size=48')}")
    with pytest.raises(ValueError, match="does not fit this model"):
        load_checkpoint(other, str(tmp_path / "run" / "model.safetensors"))


@pytest.mark.parametrize("name", ["ViTForImageClassification", "DeiTForImageClassificationWithTeacher",
                                  "CLIPVisionModelWithProjection", "SiglipVisionModel", "Dinov2ForImageClassification",
                                  "Dinov2WithRegistersModel"])
def test_a_model_resized_gives_what_transformers_interpolation_gives(name, capsys):
    """``set_input_size`` resamples the position embeddings once, with the family's own interpolation: the
    resized model equals transformers' ``interpolate_pos_encoding=True`` at that size (DINOv2 interpolates at
    every call: equal to the model as it is), patched and counted at the new token count."""
    from evit.resolution import set_input_size

    reference, model = build(name), build(name)
    set_input_size(model, 48)
    host = hosts.adapter(model)
    assert host.input_size == (3, 48, 48) and host.num_tokens() == 36 + host.num_prefix_tokens
    x = torch.randn(2, 3, 48, 48)
    kwargs = {} if name.startswith("Dinov2") else {"interpolate_pos_encoding": True}
    with torch.no_grad():
        expected = reference(pixel_values=x, **kwargs)
        key = next(k for k in ("logits", "image_embeds", "pooler_output", "last_hidden_state")
                   if getattr(expected, k, None) is not None)
        torch.testing.assert_close(host.forward(x), getattr(expected, key), atol=1e-6, rtol=1e-6)
        if name != "SiglipVisionModel":
            evit.patch(model, 0.5)
            n = host.num_tokens()
            assert evit.token_counts(model, n)[1] == host.num_prefix_tokens + 18 + 1
            assert torch.isfinite(host.forward(x)).all()
            assert evit.count_macs(model) < evit.count_macs(reference) * (36 / 16)
    with pytest.raises(ValueError, match="not a multiple of the patch size 8x8"):
        set_input_size(model, 50)
    if name.startswith(("CLIP", "Siglip")):
        with pytest.raises(ValueError, match="square inputs only"):
            set_input_size(model, (48, 40))
    else:
        set_input_size(model, (48, 40))
        assert host.input_size == (3, 48, 40) and host.forward(torch.randn(1, 3, 48, 40)).shape[0] == 1


def test_cli_higher_resolution_at_the_same_cost_on_a_transformers_model(capsys):
    """``--img-size`` with ``--match-macs``: the resized transformers model, at the keep rate that costs what the
    model costs at its own size (the paper's higher resolution at equal cost)."""
    spec = "hf:vit:hidden_size=32,num_hidden_layers=8,num_attention_heads=2,image_size=32,patch_size=8,intermediate_size=64"
    assert main(["bench", "--model", spec, "--img-size", "40", "--match-macs", "--reps", "1", "--latency-reps", "1",
                 "--batch-size", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    budget, row = out["budget"], out["rows"][1]
    assert budget["img_size"] == [40, 40] and budget["native_size"] == [32, 32]
    assert row["tokens"][0] == 26 and row["gmacs"] <= budget["native_gmacs"] < out["rows"][0]["gmacs"]


def test_weights_trained_on_fashion_mnist_tensors_read_a_folder_as_they_were_trained(tmp_path):
    """A transformers model whose weights file records Fashion-MNIST's tensors reads images with their mean, std
    and whole frame, and names its classes by them (a folder of its images is then labelled by name)."""
    from evit.checkpoint import TRAINED_ON, save_weights
    from evit.data import FASHION_MNIST_CLASSES, FASHION_MNIST_MEAN
    from evit.models import create_model, load_checkpoint

    model = create_model(f"{HF_TINY}")
    assert hosts.data_config(model)["mean"] != (FASHION_MNIST_MEAN,) and hosts.class_names(model) is None
    setattr(model, TRAINED_ON, "fashion-mnist")
    save_weights(model, tmp_path / "w.safetensors")
    loaded = create_model(f"{HF_TINY}")
    load_checkpoint(loaded, str(tmp_path / "w.safetensors"))
    seen = hosts.data_config(loaded)
    assert (seen["mean"], seen["crop_pct"], seen["interpolation"]) == ((FASHION_MNIST_MEAN,), 1.0, "bilinear")
    assert hosts.class_names(loaded) == list(FASHION_MNIST_CLASSES)


def pil_processor(family):
    """transformers' image processor of ``family`` on PIL (its default in newer releases resizes with torchvision, which
    rounds differently from PIL, which evit's transform uses, by up to one level of 255)."""
    return getattr(T, f"{family}ImageProcessorPil", None) or getattr(T, f"{family}ImageProcessor")


def test_a_folders_image_processor_settings_are_applied_as_transformers_applies_them(tmp_path):
    """``preprocessor_config.json``: no normalisation, no or another rescaling, a number for every channel's mean,
    the resampling filter and the crop give the pixels transformers' processor gives; a file it would refuse, or
    that is not settings, is refused naming it. Without a file, ViT resizes bilinearly, as its processor does."""
    import numpy as np
    from PIL import Image

    from evit.images import image_transform
    from evit.models import create_model

    build("ViTForImageClassification").save_pretrained(tmp_path / "vit")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8))
    base = dict(image_processor_type="ViTImageProcessor", size={"height": 32, "width": 32}, image_mean=[0.2, 0.3, 0.4],
                image_std=[0.5, 0.6, 0.7])
    settings = {"default": {}, "no normalising": dict(base, do_normalize=False),
                "no rescaling": dict(base, do_rescale=False), "a number": dict(base, image_mean=0.4, image_std=0.3),
                "bicubic": dict(base, resample=3, rescale_factor=1 / 127.5)}
    for label, given in settings.items():
        (tmp_path / "vit" / "preprocessor_config.json").write_text(json.dumps(given))
        model = create_model(f"hf:{tmp_path / 'vit'}", pretrained=True)
        transform, mode = image_transform(model, (3, 32, 32), train=False)
        processor = pil_processor("ViT")(**{"size": 32, **{k: v for k, v in given.items() if k != "image_processor_type"}})
        expected = torch.as_tensor(processor(image, return_tensors="np")["pixel_values"][0])
        torch.testing.assert_close(transform(image.convert(mode)), expected, atol=1e-4, rtol=1e-5, msg=label)
    # without a file: each family's processor (CLIP's resizes by the shorter side, then crops)
    for name, processor in {"DeiTForImageClassification": pil_processor("DeiT")(size=36, crop_size=32),
                            "CLIPVisionModel": pil_processor("CLIP")(size=32, crop_size=32)}.items():
        transform, mode = image_transform(build(name), (3, 32, 32), train=False)
        expected = torch.as_tensor(processor(image, return_tensors="np")["pixel_values"][0])
        torch.testing.assert_close(transform(image.convert(mode)), expected, atol=1e-4, rtol=1e-5, msg=name)
    for text, words in {json.dumps(dict(base, image_mean=[0.5] * 4)): "image_mean must be a finite number or a list of 3",
                        # NaN was refused as non-finite logits, not naming the file; an infinite std blanked a channel
                        json.dumps(dict(base, image_mean=[float("nan"), 0.5, 0.5])): "image_mean must be a finite",
                        json.dumps(dict(base, image_std=[float("inf"), 0.5, 0.5])): "image_std must be a finite",
                        json.dumps(dict(base, resample=9)): "resample 9 is not one of PIL's filters",
                        # sizes transformers refuses were read as none: the images went uncropped or unresized
                        json.dumps(dict(base, size="big")): "size must be a positive whole number of pixels",
                        json.dumps(dict(base, size={"height": 0, "width": 32})): "size must be a positive whole",
                        json.dumps(dict(base, do_center_crop=True, crop_size=0)): "crop_size must be a positive whole",
                        "[1, 2]": "holds a JSON list, not image-processor settings", "{oops": "cannot be read as JSON"}.items():
        (tmp_path / "vit" / "preprocessor_config.json").write_text(text)
        model = create_model(f"hf:{tmp_path / 'vit'}", pretrained=True)
        with pytest.raises(ValueError, match=words) as refused:
            hosts.data_config(model)
        assert "preprocessor_config.json" in str(refused.value) and len(str(refused.value).splitlines()) == 1


def test_fashion_mnist_is_refused_for_a_model_taking_three_channels(tmp_path, capsys):
    """Its tensors are grayscale: a 3-channel model is refused in one line before any work, not failed inside."""
    spec = HF_TINY.replace(",num_channels=1", "")
    for command in (["eval", "--model", spec, "--data", "bundled"],
                    ["train", "--model", spec, "--data", "fashion-mnist", "--out", str(tmp_path / "run")]):
        assert main(command) == 2
        err = capsys.readouterr().err.strip()
        assert "takes 3-channel images, but Fashion-MNIST's are grayscale" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_one_number_for_size_is_read_as_the_folders_processor_reads_it(tmp_path):
    """Older processors save ``size`` as one number (openai's CLIP folders do): CLIP's and DINOv2's (Bit's) processors
    read it as the shorter side, ViT's as both sides; without a class named, as the family resizes."""
    import numpy as np
    from PIL import Image

    from evit.images import image_transform
    from evit.models import create_model

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8))
    cases = {"CLIPVisionModel": ("CLIP", dict(feature_extractor_type="CLIPFeatureExtractor")),
             "ViTForImageClassification": ("ViT", dict(image_processor_type="ViTImageProcessor")),
             "Dinov2ForImageClassification": ("Bit", {})}
    for name, (processor, named) in cases.items():
        build(name).save_pretrained(tmp_path / name)
        given = dict(size=32, crop_size=32, do_center_crop=processor != "ViT", image_mean=[0.2, 0.3, 0.4],
                     image_std=[0.5, 0.6, 0.7], resample=3)
        (tmp_path / name / "preprocessor_config.json").write_text(json.dumps({**given, **named}))
        transform, mode = image_transform(create_model(f"hf:{tmp_path / name}", pretrained=True), (3, 32, 32), False)
        expected = torch.as_tensor(pil_processor(processor)(**given)(image, return_tensors="np")["pixel_values"][0])
        torch.testing.assert_close(transform(image.convert(mode)), expected, atol=1e-4, rtol=1e-5, msg=name)


def test_the_centre_crop_is_placed_as_transformers_places_it(tmp_path):
    """Resized by the shorter side, an image's odd margin is split as the processors split it (half, rounded down;
    torchvision's CenterCrop rounds 5.5 to 6): DINOv2's defaults against its saved processor, and a CLIP folder's."""
    import numpy as np
    from PIL import Image

    from evit.images import image_transform
    from evit.models import create_model

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8))  # 36 x 43: 11 over
    imagenet = dict(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    build("CLIPVisionModel").save_pretrained(tmp_path / "clip")
    (tmp_path / "clip" / "preprocessor_config.json").write_text(json.dumps(dict(
        image_processor_type="CLIPImageProcessor", size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32},
        do_center_crop=True)))
    for model, processor in {build("Dinov2ForImageClassification"): pil_processor("Bit")(
                                 size={"shortest_edge": 36}, crop_size=32, **imagenet),
                             create_model(f"hf:{tmp_path / 'clip'}", pretrained=True): pil_processor("CLIP")(
                                 size={"shortest_edge": 36}, crop_size=32)}.items():
        transform, mode = image_transform(model, (3, 32, 32), train=False)
        expected = torch.as_tensor(processor(image, return_tensors="np")["pixel_values"][0])
        torch.testing.assert_close(transform(image.convert(mode)), expected, atol=1e-4, rtol=1e-5,
                                   msg=type(model).__name__)


def test_settings_a_folders_file_leaves_out_are_its_processor_classes(tmp_path):
    """A hand-written ``preprocessor_config.json`` naming its processor class: what it leaves out (here CLIP's
    centre crop, Bit's CLIP mean and std for a DINOv2) is the class's default, as transformers builds it."""
    import numpy as np
    from PIL import Image

    from evit.images import image_transform
    from evit.models import create_model

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8))
    given = dict(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32})
    for name, processor in {"CLIPVisionModel": "CLIP", "Dinov2ForImageClassification": "Bit"}.items():
        build(name).save_pretrained(tmp_path / name)
        (tmp_path / name / "preprocessor_config.json").write_text(json.dumps(
            dict(given, image_processor_type=f"{processor}ImageProcessor")))
        transform, mode = image_transform(create_model(f"hf:{tmp_path / name}", pretrained=True), (3, 32, 32), False)
        expected = torch.as_tensor(pil_processor(processor)(**given)(image, return_tensors="np")["pixel_values"][0])
        torch.testing.assert_close(transform(image.convert(mode)), expected, atol=1e-4, rtol=1e-5, msg=name)


def test_a_dinov2_folder_runs_at_the_size_its_image_processor_gives(tmp_path):
    """DINOv2's config says its pretraining size (518 on the Hub), its processor crops to 224, and transformers runs
    it at what the processor gives: so does evit (counting, benchmarking, reading folders)."""
    from evit.models import create_model

    config = T.Dinov2Config(**{**TINY, "num_hidden_layers": 2, "image_size": 56, "patch_size": 14}, num_labels=3)
    T.Dinov2ForImageClassification(config).save_pretrained(tmp_path / "dino")
    spec = f"hf:{tmp_path / 'dino'}"
    assert hosts.find(create_model(spec, pretrained=True)).input_size == (3, 56, 56)  # no processor settings
    T.BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28}).save_pretrained(tmp_path / "dino")
    model = create_model(spec, pretrained=True)
    assert hosts.find(model).input_size == (3, 28, 28)
    assert evit.count_macs(model) < evit.count_macs(model, (3, 56, 56))
    vit = T.ViTForImageClassification(T.ViTConfig(**TINY, num_labels=3))  # takes one size: left at its own
    vit.save_pretrained(tmp_path / "vit")
    T.ViTImageProcessor(size={"height": 24, "width": 24}).save_pretrained(tmp_path / "vit")
    assert hosts.find(create_model(f"hf:{tmp_path / 'vit'}", pretrained=True)).input_size == (3, 32, 32)
