"""One model, two hosts: a tiny random timm ViT and the transformers model holding the very same weights (converted
here, float64) must give the same outputs, unpatched and under every method evit serves them with, at zero and at a
real reduction, under transformers' "sdpa" and "eager" attention (timm's fused and explicit attention alongside).

Each side is read the way its library reads it: the tokens leaving the last block, the lengths leaving every block,
``evit.token_counts``, and the model's main output (logits, CLIP's pooled or projected embedding, DINOv2's pooled
class token). DINOv2's transformers classifier reads the class token and the mean of the image tokens, which no timm
model does: its reference is computed here from the timm model's tokens, by the definition (the mean over the input
patches, so a token merged from s patches counts s times).

A slip of one host (prefix tokens, norm placement, attention scale, LayerScale, token order, position embeddings,
pooling, eps) shows up as a disagreement.
"""
import copy
import functools
from functools import partial

import pytest
import torch
from torch import nn

import evit
from evit import hosts
from evit.methods.patch_slimming import _mean_attention, carry_back, impact
from evit.patch import reductions

T = pytest.importorskip("transformers")
from timm.models.deit import VisionTransformerDistilled  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

IMPLEMENTATIONS = ("sdpa", "eager")
WIDTH, HEADS, DEPTH, CLASSES = 32, 2, 4, 5
SMALL = dict(embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS, mlp_ratio=2)
HF_SMALL = dict(hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS)

# ---- the pairs: a timm model and the transformers class and config of the same model ------------------------------

#: name -> (timm builder, transformers class, transformers config, how the transformers layers are named)
PAIRS = {
    "vit": (partial(VisionTransformer, img_size=32, patch_size=8, num_classes=CLASSES, **SMALL),
            "ViTForImageClassification",
            partial(T.ViTConfig, image_size=32, patch_size=8, intermediate_size=2 * WIDTH, layer_norm_eps=1e-6,
                    hidden_act="gelu", num_labels=CLASSES, **HF_SMALL), "vit"),
    "deit_distilled": (partial(VisionTransformerDistilled, img_size=32, patch_size=8, num_classes=CLASSES, **SMALL),
                       "DeiTForImageClassificationWithTeacher",
                       partial(T.DeiTConfig, image_size=32, patch_size=8, intermediate_size=2 * WIDTH,
                               layer_norm_eps=1e-6, hidden_act="gelu", num_labels=CLASSES, **HF_SMALL), "vit"),
    # CLIP: pre-norm, eps 1e-5, quick GELU, no patch bias; pooled = post-layernorm of the class token
    "clip": (partial(VisionTransformer, img_size=32, patch_size=8, num_classes=0, pre_norm=True,
                     norm_layer=partial(nn.LayerNorm, eps=1e-5), act_layer="quick_gelu", **SMALL),
             "CLIPVisionModel",
             partial(T.CLIPVisionConfig, image_size=32, patch_size=8, intermediate_size=2 * WIDTH,
                     layer_norm_eps=1e-5, hidden_act="quick_gelu", **HF_SMALL), "clip"),
    "clip_projection": (partial(VisionTransformer, img_size=32, patch_size=8, num_classes=16, pre_norm=True,
                                norm_layer=partial(nn.LayerNorm, eps=1e-5), act_layer="quick_gelu", **SMALL),
                        "CLIPVisionModelWithProjection",
                        partial(T.CLIPVisionConfig, image_size=32, patch_size=8, intermediate_size=2 * WIDTH,
                                layer_norm_eps=1e-5, hidden_act="quick_gelu", projection_dim=16, **HF_SMALL), "clip"),
    # DINOv2: LayerScale, patch 14; with registers timm gives the class token no position embedding (as its
    # DINOv2-with-registers models), transformers adds its first row: that row is zero here
    "dinov2": (partial(VisionTransformer, img_size=56, patch_size=14, num_classes=0, init_values=0.5, **SMALL),
               "Dinov2Model",
               partial(T.Dinov2Config, image_size=56, patch_size=14, mlp_ratio=2, layerscale_value=0.5,
                       layer_norm_eps=1e-6, hidden_act="gelu", **HF_SMALL), "dinov2"),
    "dinov2_classifier": (partial(VisionTransformer, img_size=56, patch_size=14, num_classes=0, init_values=0.5,
                                  **SMALL),
                          "Dinov2ForImageClassification",
                          partial(T.Dinov2Config, image_size=56, patch_size=14, mlp_ratio=2, layerscale_value=0.5,
                                  layer_norm_eps=1e-6, hidden_act="gelu", num_labels=CLASSES, **HF_SMALL), "dinov2"),
    "dinov2_registers": (partial(VisionTransformer, img_size=56, patch_size=14, num_classes=0, init_values=0.5,
                                 reg_tokens=2, no_embed_class=True, **SMALL),
                         "Dinov2WithRegistersModel",
                         partial(T.Dinov2WithRegistersConfig, image_size=56, patch_size=14, mlp_ratio=2,
                                 layerscale_value=0.5, layer_norm_eps=1e-6, hidden_act="gelu", num_register_tokens=2,
                                 **HF_SMALL), "dinov2"),
    "dinov2_registers_classifier": (partial(VisionTransformer, img_size=56, patch_size=14, num_classes=0,
                                            init_values=0.5, reg_tokens=2, no_embed_class=True, **SMALL),
                                    "Dinov2WithRegistersForImageClassification",
                                    partial(T.Dinov2WithRegistersConfig, image_size=56, patch_size=14, mlp_ratio=2,
                                            layerscale_value=0.5, layer_norm_eps=1e-6, hidden_act="gelu",
                                            num_register_tokens=2, num_labels=CLASSES, **HF_SMALL), "dinov2"),
}
#: transformers' names of a layer's parts: norm before attention, attention, its output projection, norm before the
#: MLP, LayerScales (None: none)
LAYER_PARTS = {
    "vit": ("layers", "layernorm_before", "attention", "o_proj", "layernorm_after", None),
    "clip": ("encoder.layers", "layer_norm1", "self_attn", "out_proj", "layer_norm2", None),
    "dinov2": ("encoder.layer", "norm1", "attention", "o_proj", "norm2", ("layer_scale1.lambda1", "layer_scale2.lambda1")),
}

# method -> (settings at zero reduction, settings at a real reduction); blocks 1 and 2 reduce (STViT's one: 1), so
# block 0 runs before any reduction and block 3 after, as its host's own layer or evit's (after a merge or a mask)
METHODS = {"evit": ({"keep_rate": 1.0}, {"keep_rate": 0.5}), "topk": ({"keep_rate": 1.0}, {"keep_rate": 0.6}),
           "random": ({"keep_rate": 1.0, "seed": 3}, {"keep_rate": 0.5, "seed": 3}), "tome": ({"r": 0}, {"r": 3}),
           "dynamicvit": ({"keep_rate": 1.0}, {"keep_rate": 0.5}), "stvit": ({"keep_rate": 1.0}, {"keep_rate": 0.5}),
           "patchslimming": ({"keep_rate": 1.0}, {"keep_rate": 0.5})}
LOCATIONS = {"stvit": (1,)}  # the others: (1, 2)
TOLERANCE = 1e-9  # float64: the two libraries' kernels differ in summation order only


@pytest.fixture(autouse=True)
def float64_softmax(monkeypatch):
    """transformers' eager attention of ViT, DeiT and CLIP takes its softmax in float32 (an upcast meant for half
    precision; in float64 it rounds the probabilities to float32, 1e-7 apart from timm's, which no slip of evit's
    could be told from). Here a float64 softmax stays float64, so both hosts are held to float64's exactness. Only
    ``torch.nn.functional.softmax`` asked for float32 of a float64 tensor is changed: evit and timm do not call it so."""
    softmax = torch.nn.functional.softmax

    def in_float64(input, dim=None, _stacklevel=3, dtype=None):
        if input.dtype == torch.float64 and dtype == torch.float32:
            dtype = None
        return softmax(input, dim=dim, _stacklevel=_stacklevel, dtype=dtype)

    monkeypatch.setattr(torch.nn.functional, "softmax", in_float64)


def randomize(model: nn.Module) -> nn.Module:
    """Weights that make every path matter: timm starts LayerScale near zero and tokens at 1e-6, which would leave
    the class token's attention all but uniform (EViT's ranking nearly all ties)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2 and not name.endswith(("_token", "pos_embed")):
                p.normal_(0.0, p[0].numel() ** -0.5)  # weights: unit gain
            elif name.endswith(".gamma"):
                p.normal_(0.5, 0.2)  # LayerScale
            elif "norm" in name and name.endswith("weight"):
                p.normal_(1.0, 0.2)
            else:
                p.normal_(0.0, 0.5)  # biases, tokens, position embeddings
    return model


def converted(timm_model: nn.Module, hf_model: nn.Module, layout: str) -> dict:
    """``timm_model``'s weights under ``hf_model``'s names (qkv split into q, k, v)."""
    src = timm_model.state_dict()
    keys = list(hf_model.state_dict())
    base = next(k for k in keys if ".embeddings." in f".{k}").split("embeddings.")[0]  # 'vit.', 'vision_model.', ''
    layers, norm1, attn, out, norm2, scales = LAYER_PARTS[layout]
    dst = {}
    if layout == "clip":
        dst |= {"embeddings.class_embedding": src["cls_token"].flatten(),
                "embeddings.patch_embedding.weight": src["patch_embed.proj.weight"],
                "embeddings.position_embedding.weight": src["pos_embed"][0],
                "pre_layrnorm.weight": src["norm_pre.weight"], "pre_layrnorm.bias": src["norm_pre.bias"],
                "post_layernorm.weight": src["norm.weight"], "post_layernorm.bias": src["norm.bias"]}
    else:
        pos = src["pos_embed"]
        if timm_model.no_embed_class:  # transformers adds a position embedding to the class token: zero here
            pos = torch.cat([pos.new_zeros(1, 1, pos.shape[-1]), pos], dim=1)
        dst |= {"embeddings.cls_token": src["cls_token"], "embeddings.position_embeddings": pos,
                "embeddings.patch_embeddings.projection.weight": src["patch_embed.proj.weight"],
                "embeddings.patch_embeddings.projection.bias": src["patch_embed.proj.bias"],
                "layernorm.weight": src["norm.weight"], "layernorm.bias": src["norm.bias"]}
        if "dist_token" in src:
            dst["embeddings.distillation_token"] = src["dist_token"]
        if "reg_token" in src:
            dst["embeddings.register_tokens"] = src["reg_token"]
        if any(k.endswith("embeddings.mask_token") for k in keys):  # masked image modelling only: unused
            dst["embeddings.mask_token"] = torch.zeros_like(hf_model.state_dict()[f"{base}embeddings.mask_token"])
    for i in range(DEPTH):
        t, h = f"blocks.{i}.", f"{layers}.{i}."
        q, k, v = src[t + "attn.qkv.weight"].chunk(3)
        qb, kb, vb = src[t + "attn.qkv.bias"].chunk(3)
        dst |= {h + f"{attn}.q_proj.weight": q, h + f"{attn}.k_proj.weight": k, h + f"{attn}.v_proj.weight": v,
                h + f"{attn}.q_proj.bias": qb, h + f"{attn}.k_proj.bias": kb, h + f"{attn}.v_proj.bias": vb,
                h + f"{attn}.{out}.weight": src[t + "attn.proj.weight"], h + f"{attn}.{out}.bias": src[t + "attn.proj.bias"],
                h + f"{norm1}.weight": src[t + "norm1.weight"], h + f"{norm1}.bias": src[t + "norm1.bias"],
                h + f"{norm2}.weight": src[t + "norm2.weight"], h + f"{norm2}.bias": src[t + "norm2.bias"],
                **{h + f"mlp.{fc}.{w}": src[t + f"mlp.{fc}.{w}"] for fc in ("fc1", "fc2") for w in ("weight", "bias")}}
        if scales:
            dst |= {h + scales[0]: src[t + "ls1.gamma"], h + scales[1]: src[t + "ls2.gamma"]}
    dst = {base + k: v for k, v in dst.items()}
    heads = {"classifier": "head", "cls_classifier": "head", "distillation_classifier": "head_dist",
             "visual_projection": "head"}
    for name, timm_name in heads.items():
        for w in ("weight", "bias"):
            if f"{name}.{w}" in keys and f"{timm_name}.{w}" in src:
                dst[f"{name}.{w}"] = src[f"{timm_name}.{w}"]
    return dst


@functools.lru_cache(maxsize=None)
def built(pair: str, impl: str) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(timm model, transformers model, the reference's head for a classifier timm has no head for, else None),
    float64, eval; timm's attention fused exactly when transformers' is."""
    make_timm, hf_class, make_config, layout = PAIRS[pair]
    timm_model = randomize(make_timm()).double().eval()
    if pair == "clip_projection":  # CLIP's projection has no bias
        timm_model.head.bias.data.zero_()
    for block in timm_model.blocks:
        block.attn.fused_attn = impl == "sdpa"
    hf_model = getattr(T, hf_class)._from_config(make_config(), attn_implementation=impl).double().eval()
    head = None
    if "classifier" in pair and "dinov2" in pair:  # class token and image mean: a head of twice the width
        torch.manual_seed(1)
        head = nn.Linear(2 * WIDTH, CLASSES).double()
    state = converted(timm_model, hf_model, layout)
    if head is not None:
        state |= {"classifier.weight": head.weight.data, "classifier.bias": head.bias.data}
    missing, unexpected = hf_model.load_state_dict(state, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return timm_model, hf_model, head


def fresh(pair: str, impl: str):
    timm_model, hf_model, head = built(pair, impl)
    return copy.deepcopy(timm_model), copy.deepcopy(hf_model), head


def images(pair: str, count: int = 3) -> torch.Tensor:
    size = PAIRS[pair][0].keywords["img_size"]
    torch.manual_seed(2)
    return torch.randn(count, 3, size, size, dtype=torch.float64)


def run(model: nn.Module, x: torch.Tensor, head: nn.Module = None, grad: bool = False) -> dict:
    """One forward of ``model`` (either host): its main output, the tokens leaving its last block and the sequence
    length leaving each block. ``head``: the reference's class-token-and-mean head, computed from a timm model's
    tokens (its final norm, then the mean over the input patches the image tokens stand for)."""
    host = hosts.adapter(model)
    lengths, last = [], []

    def hook(module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        lengths.append(out.shape[1])
        last[:] = [out]

    handles = [b.register_forward_hook(hook) for b in host.blocks]
    try:
        with torch.set_grad_enabled(grad):
            main = hosts.forward(model)(x)
            if head is not None:
                tokens, p = model.norm(last[0]), host.num_prefix_tokens
                state = next(iter(reductions(model).values())).state if reductions(model) else None
                merged = state is not None and state.size is not None
                size = state.size[:, p:, None].to(tokens.dtype) if merged else torch.ones_like(tokens[:, p:, :1])
                mean = (tokens[:, p:] * size).sum(dim=1) / size.sum(dim=1)
                main = head(torch.cat([tokens[:, 0], mean], dim=-1))
    finally:
        for h in handles:
            h.remove()
    return {"output": main, "tokens": last[0], "lengths": lengths}


def patch_both(timm_model, hf_model, method, settings, x):
    locations = LOCATIONS.get(method, (1, 2))
    for model in (timm_model, hf_model):
        evit.patch(model, method=method, locations=locations, **settings,
                   **({"images": x} if method == "patchslimming" else {}))
    if method == "patchslimming" and hosts.adapter(hf_model).pooling != hosts.adapter(timm_model).pooling:
        # DINOv2's classifier reads the image tokens' mean too, which no timm model does, so it chooses its own
        # tokens (test_patch_slimming_carries_back_from_what_each_head_reads): the timm model takes its choice
        ours = reductions(hf_model)
        for i, m in reductions(timm_model).items():
            m.index = ours[i].index.clone()
    if method == "dynamicvit":  # the predictors start random: the transformers model gets the timm model's
        ours = reductions(hf_model)
        for i, m in reductions(timm_model).items():
            if getattr(m, "predictor", None) is not None:
                ours[i].predictor.load_state_dict(m.predictor.state_dict())


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in ("output", "tokens"))


def compare(pair: str, impl: str, method=None, settings=None) -> tuple[float, dict, dict, nn.Module, nn.Module]:
    """(max |difference| of the outputs and last tokens, timm's run, transformers' run, the two models)."""
    timm_model, hf_model, head = fresh(pair, impl)
    x = images(pair)
    if method is not None:
        patch_both(timm_model, hf_model, method, settings, x)
    ours, theirs = run(timm_model, x, head), run(hf_model, x)
    return max_diff(ours, theirs), ours, theirs, timm_model, hf_model


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("pair", list(PAIRS))
def test_the_converted_models_agree_unpatched(pair, impl):
    diff, ours, theirs, *_ = compare(pair, impl)
    assert ours["output"].shape == theirs["output"].shape and ours["lengths"] == theirs["lengths"]
    assert diff < TOLERANCE, f"{pair} ({impl}): the unpatched models differ by {diff:.3g}"


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("pair", list(PAIRS))
def test_every_method_gives_the_same_on_both_hosts(pair, method, impl):
    timm_model = built(pair, impl)[0]
    n = hosts.adapter(timm_model).num_tokens()
    for reduced, settings in enumerate(METHODS[method]):
        diff, ours, theirs, t_model, h_model = compare(pair, impl, method, settings)
        # the same lengths leave every block, and each host predicts them alike
        assert ours["lengths"] == theirs["lengths"], (settings, ours["lengths"], theirs["lengths"])
        counts = evit.token_counts(t_model, n)
        assert counts == evit.token_counts(h_model, hosts.adapter(h_model).num_tokens())
        assert counts[1:] == [ours["lengths"][i] for i in sorted(reductions(t_model))]
        assert (ours["lengths"][-1] < n) == bool(reduced), (settings, ours["lengths"])
        assert diff < TOLERANCE, f"{pair} {method} {settings} ({impl}): the hosts differ by {diff:.3g}"


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("pair", list(PAIRS))
def test_training_gives_the_same_on_both_hosts(pair, impl):
    """DynamicViT in training (nothing removed: its Gumbel draws, the same on both, mask every later block's
    attention) and EViT's gradients to the images: the hosts' training paths agree too."""
    x = images(pair)
    for method in ("dynamicvit", "evit"):
        timm_model, hf_model, head = fresh(pair, impl)
        patch_both(timm_model, hf_model, method, {"keep_rate": 0.5}, x)
        runs = []
        for model, reference in ((timm_model, head), (hf_model, None)):
            model.train()
            pixels = x.clone().requires_grad_(True)
            torch.manual_seed(5)
            out = run(model, pixels, reference, grad=True)["output"]
            out.square().sum().backward()
            aux = [float(loss.detach()) for m in reductions(model).values() if (loss := m.aux_loss()) is not None]
            keep = next(iter(reductions(model).values())).state.keep
            assert method != "dynamicvit" or (keep == 0).any()  # some tokens are masked out of later attention
            runs.append((out.detach(), pixels.grad, aux))
        (out_t, grad_t, aux_t), (out_h, grad_h, aux_h) = runs
        assert (out_t - out_h).abs().max() < TOLERANCE, f"{pair} {method} in training ({impl})"
        assert (grad_t - grad_h).abs().max() < TOLERANCE * grad_t.abs().max(), f"{pair} {method}: gradients ({impl})"
        assert len(aux_t) == len(aux_h) == (2 if method == "dynamicvit" else 0)
        assert all(abs(a - b) < TOLERANCE for a, b in zip(aux_t, aux_h))


@pytest.mark.parametrize("pair", list(PAIRS))
def test_patch_slimming_carries_back_from_what_each_head_reads(pair):
    """Patch Slimming weighs each token by its impact on what the head reads: the class token, the distillation
    token where a head reads it (timm's distilled DeiT, transformers' DeiT with teacher), never the registers, and
    the image tokens' mean for DINOv2's transformers classifier. Both hosts carry back alike from the same reading."""
    timm_model, hf_model, _ = fresh(pair, "sdpa")
    x = images(pair)
    found = []
    for model in (timm_model, hf_model):
        evit.patch(model, method="patchslimming", keep_rate=0.5, locations=(1, 2))
        found.append(impact(model, x))
    (ours, theirs), p = found, hosts.adapter(hf_model).num_prefix_tokens
    read = 2 if pair == "deit_distilled" else 1
    expected = torch.zeros(len(ours[-1]))
    expected[:read] = 1 / read
    torch.testing.assert_close(ours[-1], expected, rtol=0, atol=0)  # timm's: no head reads the image tokens' mean
    if "classifier" in pair:  # the class token and the image tokens' mean, alike; the registers not at all
        expected = torch.zeros(len(ours[-1]))
        expected[0], expected[p:] = 0.5, 0.5 / (len(expected) - p)
        ours = carry_back(_mean_attention(timm_model, x, 64), 1, p)
    torch.testing.assert_close(theirs[-1], expected, rtol=0, atol=0)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)  # maps are averaged in float32


def test_deits_classifier_reads_its_class_token_only():
    """transformers' DeiTForImageClassification reads the class token alone (its teacher model both tokens)."""
    config = PAIRS["deit_distilled"][2]()
    model = T.DeiTForImageClassification._from_config(config, attn_implementation="sdpa").double().eval()
    assert hosts.adapter(model).num_prefix_tokens == 2 and hosts.adapter(model).read_prefix_tokens == 1
    evit.patch(model, method="patchslimming", keep_rate=0.5, locations=(1, 2))
    last = impact(model, images("deit_distilled"))[-1]
    assert last[0] == 1 and not last[1:].any()
