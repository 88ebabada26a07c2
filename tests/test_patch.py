import copy

import pytest
import timm
import torch

import evit
from evit.attention import attend
from evit.methods import TokenReduction, TopK
from evit.patch import ReducingBlock
from conftest import input_for, make_model


class PassThrough(TokenReduction):
    """Runs the reducing block's own path (attend, method, MLP) while keeping every token."""

    needs_cls_attn = True

    def output_tokens(self, n_tokens):
        return n_tokens

    def is_identity(self, n_tokens):
        return False

    def forward(self, x, seen):
        assert seen.cls_attn.shape == x.shape[:2]
        return x


def test_keep_one_equals_unpatched(variant):
    model = make_model(variant)
    x = input_for(model)
    with torch.no_grad():
        ref = model(x)
        evit.patch(model, keep_rate=1.0)
        assert evit.reductions(model), "patch placed no reduction"
        torch.testing.assert_close(model(x), ref)


def test_reducing_block_path_equals_timm(variant):
    """Our attention + block forward reproduce timm's exactly, fused and unfused."""
    model = make_model(variant)
    x = input_for(model)
    with torch.no_grad():
        ref = model(x)
        evit.apply(model, {i: PassThrough() for i in range(len(model.blocks))})
        torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)
        for b in model.blocks:
            b.attn.fused_attn = False
        torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch,prefix_first", [(2, 0), (1, 0), (1, 2), (3, 1)])
def test_attend_class_row_is_the_attention_matrix_row(batch, prefix_first):
    """At batch 1 the row is computed from views with cached constants, at other batches from flattened
    copies: both are the mean over heads of the full matrix's first row, its first prefix_first entries +inf."""
    model = make_model("qk_norm")
    attn = model.blocks[0].attn
    x = torch.randn(batch, 17, 192)
    for _ in range(2):  # the second call uses the constants the first made
        with torch.no_grad():
            out, seen = attend(attn, x, cls_attn=True, keys=True, prefix_first=prefix_first)
            B, N, C = x.shape
            q, k, v = attn.qkv(x).reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
            q, k = attn.q_norm(q), attn.k_norm(k)
            full = ((q @ k.transpose(-2, -1)) * attn.head_dim**-0.5).softmax(-1)  # (B, H, N, N)
        row = full[:, :, 0].mean(1)
        row[:, :prefix_first] = torch.inf
        torch.testing.assert_close(seen.cls_attn, row)
        torch.testing.assert_close(seen.keys, k.mean(1))
        torch.testing.assert_close(out, attn(x))


def test_class_row_under_autocast_is_ranked_in_the_softmax_precision():
    """Under autocast the row keeps the softmax's dtype (on a GPU float32, where a product in bfloat16 would
    tie tokens a float32 mean tells apart; on the CPU the softmax of bfloat16 logits stays bfloat16) and its values."""
    model = make_model("deit")
    attn = model.blocks[0].attn
    x = torch.randn(1, 17, 192)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        _, seen = attend(attn, x, cls_attn=True, prefix_first=1)
        q, k = (attn.qkv(x).reshape(1, 17, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4))[:2]
        probs = ((q @ k.transpose(-2, -1)) * attn.head_dim**-0.5)[:, :, 0].softmax(-1)
    row = probs.mean(1)
    row[:, :1] = torch.inf
    assert seen.cls_attn.dtype == probs.dtype
    torch.testing.assert_close(seen.cls_attn, row, atol=2e-2, rtol=2e-2)  # bfloat16 logits, computed twice


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch", [1, 2])
def test_class_row_in_half_precision_is_the_mean_over_heads(dtype, batch):
    """In a half-precision model the row is the softmax's mean over heads as ``mean`` rounds it (as compiled, traced
    and exported models and the authors compute it): a product with weights 1/heads rounded to bfloat16 (1/3, 1/6
    and 1/12 all 0.2% high) rounds a third of the entries the other way, and changes the tokens EViT keeps."""
    model = make_model("deit").to(dtype)
    attn = model.blocks[0].attn
    x = torch.randn(batch, 17, 192, dtype=dtype)
    for _ in range(2):  # the second call with any constants the first made
        with torch.no_grad():
            _, seen = attend(attn, x, cls_attn=True, prefix_first=1)
            q, k = attn.qkv(x).reshape(batch, 17, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)[:2]
            q0 = q[:, :, :1].flatten(0, 1)
            logits = torch.baddbmm(q0[..., :1], q0, k.transpose(-2, -1).flatten(0, 1), beta=0, alpha=attn.scale)
            row = logits.view(batch, attn.num_heads, 17).softmax(-1).mean(1)
        row[:, :1] = torch.inf
        assert torch.equal(seen.cls_attn, row)


def test_a_fake_tensor_forward_leaves_later_forwards_real():
    """A forward under FakeTensorMode (shape or memory estimates) or another dispatch mode must not leave fake
    tensors among the constants later real forwards use (they then returned fake tensors, with no values)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from evit.attention import _head_mean_constants

    model = evit.patch(make_model("deit_distilled"), 0.5)
    x = input_for(model, batch=1)
    _head_mean_constants.cache_clear()  # the fake forward is the first to ask for them
    with torch.no_grad():
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake = model(mode.from_tensor(x))
        assert fake.shape == (1, 1000)
        y = model(x)
        assert type(y) is torch.Tensor
        _head_mean_constants.cache_clear()
        torch.testing.assert_close(y, model(x), atol=0, rtol=0)


def reference_evit(model, x, keep_rate, locations, fuse=True, fusion="sum"):
    """A plain, obviously correct EViT forward: explicit attention matrix, sort, the rest weighted by
    the class token's attention (summed, or with ``fusion="mean"`` averaged)."""
    import math

    p = model.num_prefix_tokens
    t = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    for i, blk in enumerate(model.blocks):
        h = blk.norm1(t)
        a = blk.attn
        B, N, C = h.shape
        q, k, v = a.qkv(h).reshape(B, N, 3, a.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = a.q_norm(q), a.k_norm(k)
        probs = ((q @ k.transpose(-2, -1)) * a.head_dim**-0.5).softmax(-1)
        o = (probs @ v).transpose(1, 2).reshape(B, N, C)
        t = t + blk.ls1(a.proj(a.norm(o)))
        if i in locations:
            rows = []
            for b in range(B):
                score = probs[b, :, 0, p:].mean(0)
                n = N - p
                kk = math.ceil(round(keep_rate * n, 6))
                order = torch.argsort(score, descending=True)
                keep, drop = order[:kk], order[kk:]
                parts = [t[b, :p], t[b, p:][keep]]
                if fuse and len(drop):
                    w = score[drop] / (score[drop].sum() if fusion == "mean" else 1.0)
                    parts.append((w[:, None] * t[b, p:][drop]).sum(0, keepdim=True))
                rows.append(torch.cat(parts))
            t = torch.stack(rows)
        t = t + blk.ls2(blk.mlp(blk.norm2(t)))
    return model.forward_head(model.norm(t))


@pytest.mark.parametrize("variant_name", ["deit", "deit_distilled", "dinov2_registers", "deit3_layerscale", "qk_norm"])
@pytest.mark.parametrize("keep_rate,fuse,fusion", [(0.7, True, "sum"), (0.5, True, "mean"), (0.6, False, "sum")])
@pytest.mark.parametrize("batch", [3, 1])  # batch 1 takes views and cached constants
def test_matches_reference(variant_name, keep_rate, fuse, fusion, batch):
    model = make_model(variant_name)
    x = input_for(model, batch=batch)
    locations = (1, 2)
    with torch.no_grad():
        ref = reference_evit(model, x, keep_rate, locations, fuse, fusion)
        evit.patch(model, keep_rate, locations, fuse=fuse, fusion=fusion)
        torch.testing.assert_close(model(x), ref, atol=1e-4, rtol=1e-4)
        off = model(x)
    with torch.enable_grad():  # the training path (no in-place reuse) gives the same result
        torch.testing.assert_close(model(x), ref, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(off, make_model(variant_name)(x), atol=1e-3), "reduction changed nothing"


def _seq_lengths(model, x):
    lengths = []
    hooks = [b.register_forward_hook(lambda m, i, o: lengths.append(o.shape[1])) for b in model.blocks]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return lengths


def test_token_counts_deit_small_geometry():
    model = timm.create_model("deit_tiny_patch16_224").eval()  # DeiT-S token geometry, cheaper width
    evit.patch(model, 0.7)
    assert evit.token_counts(model, 197) == [197, 140, 100, 72]
    lengths = _seq_lengths(model, torch.randn(1, 3, 224, 224))
    assert lengths == [197] * 3 + [140] * 3 + [100] * 3 + [72] * 3
    evit.set_keep_rate(model, 0.5)
    assert evit.token_counts(model, 197) == [197, 100, 52, 28]
    assert _seq_lengths(model, torch.randn(1, 3, 224, 224))[-1] == 28
    evit.patch(model, 0.7, fuse=False)
    assert _seq_lengths(model, torch.randn(1, 3, 224, 224))[-1] == 1 + 68  # 196 -> 138 -> 97 -> 68 image tokens


def test_prefix_tokens_kept_and_counted():
    model = make_model("dinov2_registers")  # 1 class + 4 registers, 16 patches
    evit.patch(model, 0.5, locations=[1])
    lengths = _seq_lengths(model, input_for(model, 1))
    assert lengths == [21, 5 + 8 + 1, 14, 14]


def test_default_locations():
    assert evit.default_locations(12) == (3, 6, 9)
    assert evit.default_locations(24) == (6, 12, 18)
    assert evit.default_locations(6) == (1, 3, 4)
    assert evit.default_locations(2) == (0, 1)


def test_dynamic_img_size():
    model = make_model("dynamic_img_size")
    evit.patch(model, 0.5, locations=[1])
    assert _seq_lengths(model, torch.randn(1, 3, 96, 64))[1:] == [1 + 12 + 1] * 3  # 24 patches -> 12 + fused
    assert _seq_lengths(model, torch.randn(1, 3, 64, 64))[1:] == [1 + 8 + 1] * 3


def test_training_gradients_reach_every_parameter():
    model = make_model("deit3_layerscale", drop_path_rate=0.1, attn_drop_rate=0.1)
    evit.patch(model, 0.5, locations=[1, 2]).train()
    x = input_for(model, 4)
    model(x).logsumexp(-1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"no gradient for {missing}"
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n.startswith("blocks.3.mlp"))


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("method", ["evit", "topk", "dynamicvit"])
def test_trace_at_batch_one_serves_other_batches(method):
    """torch.jit.trace keeps the branches taken while tracing: a trace made at batch 1 must not keep the
    batch-1 token selection."""
    model = evit.patch(make_model("deit"), 0.5, method=method)
    x = input_for(model, batch=3)
    with torch.no_grad():
        traced = torch.jit.trace(model, x[:1], check_trace=False)
        torch.testing.assert_close(traced(x), model(x))


def test_sees_through_torch_compile():
    """Compiling first, then patching, is common; torch.compile's guards recompile when the patch changes the model."""
    model = make_model("deit")
    compiled = torch.compile(model)  # lazy: nothing compiles until it is called
    assert evit.patch(compiled, 0.5) is compiled
    assert sorted(evit.reductions(model)) == [1, 2, 3]
    assert evit.token_counts(compiled, 17) == [17, 10, 7, 5]
    assert evit.count_macs(compiled) == evit.count_macs(model)
    evit.unpatch(compiled)
    assert not evit.reductions(model)


def test_patch_twice_replaces_and_unpatch_restores():
    model = make_model("deit")
    x = input_for(model)
    with torch.no_grad():
        ref = model(x)
    keys = set(model.state_dict())
    evit.patch(model, 0.7)
    evit.patch(model, 0.5, locations=[2])
    assert list(evit.reductions(model)) == [2]
    assert evit.reductions(model)[2].keep_rate == 0.5
    for block in model.blocks:
        assert sum(c is ReducingBlock for c in type(block).__mro__) <= 1
    assert set(model.state_dict()) == keys, "patching must not rename parameters"
    evit.unpatch(model)
    assert not evit.reductions(model)
    assert all(type(b) is timm.models.vision_transformer.Block for b in model.blocks)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref)


def test_topk_is_evit_without_fusion():
    model = make_model("deit")
    x = input_for(model)
    a = evit.patch(copy.deepcopy(model), 0.6, fuse=False)
    b = evit.apply(copy.deepcopy(model), {i: TopK(0.6) for i in evit.default_locations(4)})
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x))


# ---- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,kwargs,error,words",
    [
        ("vit_medium_patch16_gap_256", dict(img_size=64, depth=2, embed_dim=64, num_heads=2), ValueError, "global_pool='avg'"),
        ("vit_base_patch16_siglip_224", dict(img_size=64, depth=2, embed_dim=64, num_heads=2), ValueError, "map"),
        ("swin_tiny_patch4_window7_224", dict(depths=(1, 1, 1, 1), embed_dim=32), TypeError, "Swin"),
        ("eva02_tiny_patch14_224", dict(depth=2), TypeError, "only timm VisionTransformer"),
        ("convnext_atto", dict(), TypeError, "only timm VisionTransformer"),
    ],
)
def test_refuses_models_it_cannot_serve(name, kwargs, error, words):
    model = timm.create_model(name, pretrained=False, **kwargs)
    with pytest.raises(error, match=words):
        evit.patch(model)
    assert not evit.reductions(model)


def test_unpooled_model_refused_without_a_contradiction():
    """global_pool='': the head reads every token. ToMe needs no class token, so the line must not ask for one."""
    model = make_model("deit", global_pool="")
    with pytest.raises(ValueError, match="global_pool=''; ToMe serves models that classify from the class token or"):
        evit.patch(model, method="tome")


def test_refuses_other_block_types():
    from timm.models.vision_transformer import ParallelScalingBlock

    model = timm.create_model("deit_tiny_patch16_224", img_size=64, depth=2, block_fn=ParallelScalingBlock)
    with pytest.raises(TypeError, match="ParallelScalingBlock"):
        evit.patch(model)
    assert not evit.reductions(model)


@pytest.mark.parametrize("keep_rate", [0, 1.5, -0.2])
def test_refuses_bad_keep_rate(keep_rate):
    with pytest.raises(ValueError, match="keep_rate must be in"):
        evit.patch(make_model("deit"), keep_rate)


def test_refuses_non_numeric_keep_rate():
    with pytest.raises(TypeError, match="^keep_rate must be a number"):  # not a complaint about other settings
        evit.patch(make_model("deit"), "0.7")
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        evit.set_keep_rate(evit.patch(make_model("deit")), 2.0)


def test_locations_from_a_generator():
    model = evit.patch(make_model("deit"), 0.7, (i for i in (1, 2)))
    assert sorted(evit.reductions(model)) == [1, 2]


@pytest.mark.parametrize("locations", [[4], [-1], []])
def test_refuses_locations_outside_depth(locations):
    model = make_model("deit")
    with pytest.raises(ValueError, match="4 blocks"):
        evit.patch(model, 0.7, locations)
    assert not evit.reductions(model)


def test_fusion_is_one_of_two():
    model = make_model("deit")
    with pytest.raises(ValueError, match="'sum', 'mean'"):
        evit.patch(model, 0.7, fusion="avg")
    with pytest.raises(TypeError, match="settings"):
        evit.patch(model, 0.7, method="topk", fusion="sum")  # Top-K fuses nothing
    assert not evit.reductions(model)
    evit.patch(model, 0.7, fusion="mean")
    assert "fusion='mean'" in repr(evit.reductions(model)[1])


def test_set_keep_rate_needs_a_patch():
    with pytest.raises(ValueError, match="evit.patch"):
        evit.set_keep_rate(make_model("deit"), 0.5)
    with pytest.raises(ValueError, match=r"ToMe, which is set by r, not a keep rate.*method='tome', r=\.\.\."):
        evit.set_keep_rate(evit.patch(make_model("deit"), method="tome", r=2), 0.5)  # patched, by another setting


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_methods_take_the_mode_of_the_model_they_are_patched_into(mode):
    """A new method module starts in training mode; placed in an eval model it must not run its training path
    (DynamicViT's Gumbel sampling, nothing removed) whenever gradients are on."""
    model = make_model("deit").train(mode == "train")
    evit.patch(model, 0.5, method="dynamicvit")
    assert {m.training for m in evit.reductions(model).values()} == {mode == "train"}
    if mode == "eval":
        x = input_for(model)
        with torch.no_grad():
            ref = model(x)
        torch.testing.assert_close(model(x), ref)  # grad enabled: the same eval forward


def test_a_patched_model_runs_from_two_threads_at_once():
    """The state the reducing blocks share lives within one forward, per thread: a second thread's forward
    starting while the first is between blocks (held there here) does not change the first's token sizes."""
    import threading

    model = evit.patch(make_model("deit"), method="tome", r=6)
    xa, xb = input_for(model, 2), input_for(model, 3) * 0.5
    with torch.no_grad():
        ref_a, ref_b = model(xa), model(xb)
    b_done, out = threading.Event(), {}

    def hold_a(module, args, output):  # after block 1 of thread A's forward, wait for B's whole forward
        if threading.current_thread().name == "a":
            b_done.wait(10)

    handle = evit.hosts.find(model).blocks[1].register_forward_hook(hold_a)

    def run(name, x):
        with torch.no_grad():
            out[name] = model(x)
        if name == "b":
            b_done.set()

    threads = [threading.Thread(target=run, args=("a", xa), name="a"), threading.Thread(target=run, args=("b", xb))]
    threads[0].start()
    threads[1].start()
    for t in threads:
        t.join(20)
    handle.remove()
    torch.testing.assert_close(out["b"], ref_b)
    torch.testing.assert_close(out["a"], ref_a)


def test_attention_mask_refused_clearly():
    model = evit.patch(make_model("deit"), 0.5)
    x = input_for(model)
    with pytest.raises(ValueError, match="attention masks"):
        model(x, attn_mask=torch.zeros(1, 1, 17, 17))


def test_patch_defaults_to_the_fusion_the_weights_recorded():
    """A model loaded from weights that record EViT's fusion runs with it unless the call says otherwise;
    the embedded EViT model (trained with "mean") patched by hand runs as `evit eval` runs it."""
    from evit import embedded
    from evit.evaluate import apply_setting
    from evit.reduction import TRAINED_WITH

    def fusions(model):
        return {(m.fusion, m.fuse) for m in evit.reductions(model).values()}

    model = make_model("deit")
    assert fusions(evit.patch(model, 0.7)) == {("sum", True)}  # nothing recorded: the authors' sum
    setattr(model, TRAINED_WITH, {"method": "evit", "fusion": "mean", "fuse": True, "keep_rate": 0.5})
    assert fusions(evit.patch(model, 0.7)) == {("mean", True)}
    assert fusions(evit.patch(model, 0.7, fusion="sum")) == {("sum", True)}  # the call's own setting wins
    assert {m.keep_rate for m in evit.reductions(model).values()} == {0.7}  # the recorded keep rate is not applied
    assert fusions(evit.patch(model, 0.7, fuse=False)) == {("mean", False)}
    evit.patch(model, 0.7, method="topk")  # recorded for another method: ignored (TopK refuses fusion)
    setattr(model, TRAINED_WITH, {"method": "evit", "fuse": False})
    assert fusions(evit.patch(model, 0.7)) == {("sum", False)}

    trained = embedded.load_model("evit").eval()
    x = torch.randn(4, 1, 28, 28)
    with torch.inference_mode():
        apply_setting(trained, 0.7)
        expected = trained(x)
        evit.unpatch(trained)
        evit.patch(trained, 0.7)
        got = trained(x)
    assert fusions(trained) == {("mean", True)} and torch.equal(got, expected)


def test_arguments_a_method_does_not_take_or_cannot_mean_are_refused():
    """ToMe is set by r: a keep rate would be ignored and run r=8 silently; 'no' is not a fuse setting; 2.5
    tokens give counts of no sequence."""
    import timm

    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=4, embed_dim=32, num_heads=2)
    with pytest.raises(ValueError, match=r"ToMe is set by r, not by a keep rate \(got keep_rate=0.5\)"):
        evit.patch(model, 0.5, method="tome")
    assert evit.token_counts(evit.patch(model, 1.0, method="tome", r=2), 17) == [17, 15, 13, 11, 9]
    assert evit.token_counts(evit.patch(model, method="tome", r=2), 17) == [17, 15, 13, 11, 9]
    assert evit.token_counts(evit.patch(model), 17)[-1] < 17  # EViT's default keep rate (0.7) still applies
    for bad in ("no", 1, 0.0):
        with pytest.raises(TypeError, match=f"fuse must be True or False, got {bad!r}"):
            evit.patch(model, 0.5, fuse=bad)
    import numpy as np

    assert evit.token_counts(evit.patch(model, 0.5, fuse=np.False_), 17) == evit.token_counts(
        evit.patch(model, 0.5, fuse=False), 17)  # numpy's booleans are booleans
    for bad, error in ((2.5, TypeError), (True, TypeError), (0, ValueError)):
        with pytest.raises(error, match="n_tokens"):
            evit.token_counts(model, bad)
