"""Peer methods under the one interface: ToMe, Random drop, Top-K, the ideal."""
import copy

import pytest
import torch

import evit
from evit.attention import Seen, attend
from evit.methods import Ideal, ToMe, TopK
from evit.patch import SizeWeightedNorm
from conftest import input_for, make_model


@pytest.mark.parametrize("method,settings", [("tome", dict(r=0)), ("random", dict(keep_rate=1.0)),
                                             ("dynamicvit", dict(keep_rate=1.0)),
                                             ("topk", dict(keep_rate=1.0))])
def test_zero_reduction_equals_unpatched(variant, method, settings):
    model = make_model(variant)
    x = input_for(model)
    with torch.no_grad():
        ref = model(x)
        evit.patch(model, method=method, **settings)
        assert evit.reductions(model)
        torch.testing.assert_close(model(x), ref)


def test_tome_runs_on_every_variant_with_its_counts(variant):
    model = make_model(variant)
    x = input_for(model)
    n = model.patch_embed.num_patches + model.num_prefix_tokens
    evit.patch(model, method="tome", r=3)
    assert len(evit.reductions(model)) == len(model.blocks)  # every block merges by default
    counts = evit.token_counts(model, n)
    assert counts == [n - 3 * i for i in range(len(model.blocks) + 1)]
    with torch.no_grad():
        out = model.forward_features(x)
    assert out.shape[1] == counts[-1]
    assert torch.isfinite(out).all()


def test_tome_counts_deit_small_schedule():
    model = make_model("deit", depth=12, img_size=224)
    evit.patch(model, method="tome", r=16)
    counts = evit.token_counts(model, 197)
    # 16 per block until fewer than 32 image tokens are left, then half of them
    assert counts == [197, 181, 165, 149, 133, 117, 101, 85, 69, 53, 37, 21, 11]
    evit.patch(model, method="tome", r=[8] * 6 + [0] * 6)
    assert evit.token_counts(model, 197)[-1] == 197 - 48
    # at most half the image tokens merge in one block
    evit.patch(model, method="tome", r=500, locations=[0])
    assert set(evit.token_counts(model, 197)[1:]) == {197 - 98}  # later blocks only carry sizes


def _seen_keys(keys):
    return Seen(keys=torch.tensor(keys, dtype=torch.float32).unsqueeze(0))


def test_tome_matching_and_merging_by_hand():
    """1 class token + 4 image tokens. The sets alternate over the whole sequence: A = positions 0 (the
    class token, never merged), 2, 4; B = 1, 3. Token 4's key points like token 1's, token 2's is
    orthogonal to both B tokens: r=1 merges 4 into 1. Then: prefix, unmerged A (2), B (1+4, 3)."""
    method = ToMe(r=1)
    keys = [[9, 9], [1, 0], [0, 1], [-1, -0.1], [2, 0.1]]
    x = torch.arange(5 * 3, dtype=torch.float32).view(1, 5, 3)
    out = method(x, _seen_keys(keys))
    expected = torch.stack([x[0, 0], x[0, 2], (x[0, 1] + x[0, 4]) / 2, x[0, 3]]).unsqueeze(0)
    torch.testing.assert_close(out, expected)
    assert method.state.size.tolist() == [[1, 1, 2, 1]]
    # the next merge is weighted by size: A = {class, 1+4}, B = {2, 3}; 1+4 goes into 2, counting twice
    out2 = method(out, _seen_keys([[9, 9], [1, 0.05], [1, 0], [0, 1]]))
    assert method.state.size.tolist() == [[1, 3, 1]]
    torch.testing.assert_close(out2, torch.stack([x[0, 0], (x[0, 1] + x[0, 2] + x[0, 4]) / 3, x[0, 3]]).unsqueeze(0))


def test_tome_keeps_unmerged_tokens_in_their_order_and_prefix_tokens_in_front():
    """The best edges rank A's tokens 6, 4, 2; the unmerged ones stay in their original order (2, 4),
    as the authors' code sorts them, and that order decides the next block's sets."""
    keys = [[9, 9], [1, 0], [1, 2], [0, 1], [1, 0.2], [-1, 0], [-1, 0.01]]
    x = torch.randn(1, 7, 3)
    t = x[0]
    out = ToMe(r=1)(x, _seen_keys(keys))
    torch.testing.assert_close(out[0], torch.stack([t[0], t[2], t[4], t[1], t[3], (t[5] + t[6]) / 2]))
    out = ToMe(r=2)(x, _seen_keys(keys))
    torch.testing.assert_close(out[0], torch.stack([t[0], t[2], (t[1] + t[4]) / 2, t[3], (t[5] + t[6]) / 2]))
    # a distillation token (position 1, B's first) neither merges nor receives, and stays second,
    # even where its key is the best partner of every image token
    method = ToMe(r=1)
    method.num_prefix_tokens = 2
    x = torch.randn(1, 6, 3)
    t = x[0]
    out = method(x, _seen_keys([[9, 9], [1, 0], [1, 0], [0, 1], [0.1, 1], [-1, 0]]))
    torch.testing.assert_close(out[0], torch.stack([t[0], t[1], t[2], (t[3] + t[4]) / 2, t[5]]))
    # without prefix tokens (average-pooled models) the unmerged ones stay in score order, as in the
    # authors' code when there is no class token: A = 0, 2, 4 ranked 4, 2, 0
    x = torch.randn(1, 6, 3)
    t = x[0]
    method = ToMe(r=1)
    method.num_prefix_tokens = 0
    out = method(x, _seen_keys([[0, 1], [1, 0], [1, 0.5], [0, -1], [-1, 0.01], [-1, 0]]))
    torch.testing.assert_close(out[0], torch.stack([t[2], t[0], t[1], t[3], (t[4] + t[5]) / 2]))


def test_proportional_attention_is_duplicated_tokens():
    """A token of size 2 attends and is attended to exactly like two copies of it."""
    model = make_model("qk_norm")
    attn = model.blocks[0].attn
    torch.manual_seed(0)
    x = torch.randn(1, 6, 192)
    dup = torch.cat([x, x[:, 4:5]], dim=1)  # token 4 twice
    size = torch.tensor([[1.0, 1, 1, 1, 2, 1]])
    with torch.no_grad():
        ref, ref_seen = attend(attn, dup, cls_attn=True)
        out, seen = attend(attn, x, cls_attn=True, bias=size.log()[:, None, None, :])
    torch.testing.assert_close(out, ref[:, :6], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(seen.cls_attn[:, 4], ref_seen.cls_attn[:, 4] + ref_seen.cls_attn[:, 6])


def test_tome_gradients_reach_every_parameter():
    model = make_model("deit3_layerscale").train()
    evit.patch(model, method="tome", r=4)
    model(input_for(model)).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not missing, missing


def test_random_drop_same_counts_as_topk_and_repeatable():
    model = make_model("deit")
    x = input_for(model)
    evit.patch(model, method="topk", keep_rate=0.5)
    topk_counts = evit.token_counts(model, 17)
    evit.patch(model, method="random", keep_rate=0.5, seed=3)
    assert evit.token_counts(model, 17) == topk_counts
    with torch.no_grad():
        a = model(x)
        evit.patch(model, method="random", keep_rate=0.5, seed=3)
        b = model(x)
        evit.patch(model, method="random", keep_rate=0.5, seed=4)
        c = model(x)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def test_ideal_has_the_methods_counts():
    model = make_model("deit", depth=12, img_size=224)
    evit.patch(model, method="tome", r=[10, 12] * 6)
    counts = evit.token_counts(model, 197)
    evit.apply(model, {i: Ideal(m) for i, m in evit.reductions(model).items()})
    assert evit.token_counts(model, 197) == counts
    with torch.no_grad():
        assert model.forward_features(torch.randn(1, 3, 224, 224)).shape[1] == counts[-1]


def test_numpy_settings_are_numbers():
    """Settings computed with numpy (a sweep's np.linspace, a schedule's np.arange) are its scalars, not Python's."""
    import numpy as np

    model = make_model("deit")
    evit.patch(model, np.float32(0.5))
    assert evit.token_counts(model, 17) == [17, 10, 7, 5]  # 8 of 16 image tokens + the fused one, ...
    evit.patch(model, method="tome", r=list(np.full(4, 2)))
    assert evit.token_counts(model, 17) == [17, 15, 13, 11, 9]


def test_refusals():
    model = make_model("deit")
    with pytest.raises(ValueError, match="unknown token-reduction method"):
        evit.patch(model, method="nope")
    with pytest.raises(ValueError, match="r must be"):
        evit.patch(model, method="tome", r=-1)
    with pytest.raises(ValueError, match="schedule has 2 entries"):
        evit.patch(model, method="tome", r=[1, 2])
    with pytest.raises(ValueError, match="TopK drops"):
        TopK(0.5, fuse=True)
    with pytest.raises(TypeError, match="settings"):
        evit.patch(model, method="evit", r=3)
    with pytest.raises(TypeError, match="method must be"):
        evit.patch(model, method=int)
    assert not evit.reductions(model), "a refused patch left blocks patched"


def test_attend_keep_mask_is_attention_on_the_kept_tokens():
    """A hard 0/1 keep mask gives, for kept queries, exactly attention over the kept tokens only."""
    model = make_model("qk_norm")
    attn = model.blocks[0].attn
    torch.manual_seed(0)
    x = torch.randn(2, 7, 192)
    keep = torch.tensor([[1.0, 1, 0, 1, 0, 1, 1], [1.0, 0, 1, 1, 1, 0, 0]])
    with torch.no_grad():
        full, _ = attend(attn, x)
        masked_ones, _ = attend(attn, x, keep=torch.ones(2, 7))
        torch.testing.assert_close(masked_ones, full, atol=1e-5, rtol=1e-5)
        masked, _ = attend(attn, x, keep=keep)
        for b in range(2):
            idx = keep[b].nonzero().squeeze(1)
            sub, _ = attend(attn, x[b:b + 1, idx])
            torch.testing.assert_close(masked[b:b + 1, idx], sub, atol=1e-5, rtol=1e-5)


def test_dynamicvit_trains_through_masks_and_infers_by_topk():
    model = make_model("deit").train()
    evit.patch(model, method="dynamicvit", keep_rate=0.5, locations=[1, 2])
    methods = evit.reductions(model)
    assert set(methods) == {1, 2, 3}, "blocks after the first decision must see the mask"
    x = input_for(model)
    out = model(x)
    state = methods[1].state
    assert state.keep.shape == (2, 17) and set(state.keep.unique().tolist()) <= {0.0, 1.0}
    assert (state.keep[:, 0] == 1).all(), "the class token is always kept"
    aux = [m.aux_loss() for m in methods.values() if m.aux_loss() is not None]
    assert len(aux) == 2
    (out.sum() + sum(aux)).backward()
    predictor_grads = [p.grad for n, p in model.named_parameters() if "predictor" in n]
    assert predictor_grads and all(g is not None and g.abs().sum() > 0 for g in predictor_grads[-2:])
    model.eval()
    with torch.no_grad():
        assert model.forward_features(x).shape[1] == evit.token_counts(model, 17)[-1] == 1 + 4


def test_dynamicvit_predictor_follows_the_model_dtype():
    model = make_model("deit").to(torch.bfloat16)
    evit.patch(model, method="dynamicvit", keep_rate=0.5)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        out = model(input_for(model).to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_dynamicvit_weights_round_trip(tmp_path):
    from safetensors.torch import save_file

    from evit.models import load_checkpoint

    model = make_model("deit")
    evit.patch(model, method="dynamicvit", keep_rate=0.5)
    path = tmp_path / "dvit.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    fresh = make_model("deit")
    with pytest.raises(ValueError, match="patch the model with that method first.*evit compare --trained METHOD=FILE"):
        load_checkpoint(fresh, str(path))
    evit.patch(fresh, method="dynamicvit", keep_rate=0.5)
    load_checkpoint(fresh, str(path))
    x = input_for(model)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))


def _average_pooled_model():
    """An average-pooled ViT without class token (as vit_*_gap, AIMv2), 4 x 4 patches, no position embedding:
    identical patches stay identical tokens through every block."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_medium_patch16_gap_256", pretrained=False, img_size=64, depth=3, embed_dim=64,
                              num_heads=2).eval()
    with torch.no_grad():
        model.pos_embed.zero_()
        model.head.weight.normal_(0, 0.2)
    assert model.num_prefix_tokens == 0 and model.global_pool == "avg"
    return model


def test_tome_on_an_average_pooled_model_pools_by_size():
    """Merging two pairs of identical tokens changes nothing: proportional attention and a size-weighted
    mean make the 14 remaining tokens act exactly as the 16 did. A plain mean of the 14 would not."""
    model = _average_pooled_model()
    torch.manual_seed(1)
    x = torch.randn(2, 3, 64, 64)
    x[..., :16, 16:32] = x[..., :16, 0:16]  # patch 1 = patch 0 (A token 0, B token 0)
    x[..., :16, 48:64] = x[..., :16, 32:48]  # patch 3 = patch 2 (A token 1, B token 1)
    with torch.no_grad():
        ref = model(x)
        evit.patch(model, method="tome", r=2, locations=[0])
        assert evit.token_counts(model, 16) == [16, 14, 14, 14]  # later blocks carry the sizes
        torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(copy.deepcopy(model)(x), ref, atol=1e-5, rtol=1e-5)  # as EMA copies it
        weighted, model.norm.__class__ = type(model.norm), torch.nn.Identity  # the plain mean instead
        assert (model(x) - ref).abs().max() > 1e-3
        model.norm.__class__ = weighted
        evit.unpatch(model)
        torch.testing.assert_close(model(x), ref)
        assert not isinstance(model.norm, SizeWeightedNorm) and not hasattr(model.norm, "token_state")


def test_average_pooled_models_take_only_methods_without_class_token():
    model = _average_pooled_model()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        evit.patch(model, method="random", keep_rate=0.5, seed=0)
        assert evit.token_counts(model, 16) == [16, 8, 4, 2] and model(x).shape == ref.shape
        assert not isinstance(model.norm, SizeWeightedNorm)  # nothing merged: the plain mean is right
        evit.patch(model, method="tome", r=0)
        torch.testing.assert_close(model(x), ref)
    evit.unpatch(model)
    for method in ("evit", "topk", "stvit", "dynamicvit", "patchslimming"):
        with pytest.raises(ValueError, match="global_pool='avg' without a class token.*random, tome"):
            evit.patch(model, method=method)
    assert not evit.reductions(model), "a refused patch leaves the model as it was"


@pytest.mark.parametrize("batch", [0, 1, 3])
@pytest.mark.parametrize("offset", [0, 1, 2])
def test_select_tokens_takes_each_images_own_tokens(batch, offset):
    """The CPU's index_select (flat over the batch when B > 1) picks x[b, offset + index[b]]; off the CPU
    (here the meta device) the gather path gives the same shape."""
    from evit.methods.base import select_tokens

    torch.manual_seed(batch * 10 + offset)
    x, index = torch.randn(batch, 10, 4), torch.randint(0, 10 - offset, (batch, 5))
    expected = torch.stack([x[b, offset + index[b]] for b in range(batch)]) if batch else torch.empty(0, 5, 4)
    assert torch.equal(select_tokens(x, index, offset), expected)
    assert select_tokens(x.to("meta"), index.to("meta"), offset).shape == expected.shape


def test_a_method_that_would_not_carry_an_earlier_merge_or_mask_is_refused():
    """After ToMe (token sizes) or DynamicViT (a training mask), a method that carries neither would break the
    next block (a size or mask of the old length): refused in one line when placed; before them it is served."""
    from evit.methods import EViT
    from evit.methods.dynamicvit import DynamicViT

    model = evit.patch(make_model("deit"), 0.7)
    before = evit.reductions(model)
    for earlier, what in ((ToMe(r=2), "token sizes"), (DynamicViT(0.5), "training mask")):
        with pytest.raises(ValueError, match=f"cannot place EViT in block 2 after {type(earlier).__name__} in block 1.*{what}"):
            evit.apply(model, {1: earlier, 2: EViT(0.5)})
        assert evit.reductions(model) == before, "a refused patch leaves the model as it was"
    evit.apply(model, {1: EViT(0.5), 2: ToMe(r=2)})
    model.train()
    out = model(input_for(model))
    assert torch.isfinite(out).all() and evit.token_counts(model, 17)[1:3] == [10, 8]
