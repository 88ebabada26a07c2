"""STViT and Patch Slimming under the one interface."""
import copy

import pytest
import torch

import evit
from evit.attention import cross_attend
from evit.evaluate import apply_setting
from evit.masks import token_sources
from evit.methods import PatchSlimming, STViT
from evit.methods.patch_slimming import carry_back, select
from conftest import input_for, make_model


def _image_count(model):
    return model.patch_embed.num_patches + model.num_prefix_tokens


@pytest.mark.parametrize("method", ["stvit", "patchslimming"])
def test_runs_on_every_variant_with_its_counts_and_equals_unpatched_at_keep_1(variant, method):
    model = make_model(variant)
    x = input_for(model)
    n, p = _image_count(model), model.num_prefix_tokens
    with torch.no_grad():
        ref = model(x)
        evit.patch(model, 1.0, method=method)
        torch.testing.assert_close(model(x), ref)
        evit.patch(model, 0.5, method=method)
        if method == "patchslimming":
            select(model, torch.randn(4, *x.shape[1:]))
        counts = evit.token_counts(model, n)
        out = model.forward_features(x)
    assert out.shape[1] == counts[-1] < n
    if method == "stvit":  # 16 image tokens -> a 3 x 3 grid (round(sqrt(8))), at one block
        assert counts == [n, p + 9] and list(evit.reductions(model)) == [1]
    assert torch.isfinite(out).all()
    assert evit.count_macs(model) < evit.count_macs(evit.unpatch(model))


def test_stvit_semantic_tokens_are_window_means_refined_by_attention():
    model = make_model("deit")  # 64 px, patch 16: a 4 x 4 grid
    evit.patch(model, 0.25, method="stvit", refine=False)  # round(sqrt(4)) = 2: 2 x 2 windows of 2 x 2
    method = evit.reductions(model)[1]
    x = torch.randn(2, 17, 192)
    out = method(x, None)
    grid = x[:, 1:].view(2, 4, 4, 192)
    by_hand = torch.stack([grid[:, r:r + 2, c:c + 2].mean(dim=(1, 2)) for r in (0, 2) for c in (0, 2)], dim=1)
    torch.testing.assert_close(out, torch.cat([x[:, :1], by_hand], dim=1))
    # refinement: the semantic tokens as queries over the image tokens, with the block's own attention
    block = model.blocks[1]
    method.refine = True
    refined = method(x, None)[:, 1:]
    torch.testing.assert_close(refined, by_hand + block.ls1(cross_attend(block.attn, block.norm1(by_hand),
                                                                         block.norm1(x[:, 1:]))))


def test_cross_attend_is_masked_self_attention():
    """Queries attending only to the context = timm's own attention on [queries; context] with a mask."""
    attn = make_model("qk_norm").blocks[0].attn
    q_in, ctx = torch.randn(2, 3, 192), torch.randn(2, 5, 192)
    mask = torch.ones(8, 8, dtype=torch.bool)
    mask[:3, :3] = False  # query rows see the context only
    with torch.no_grad():
        ref = attn(torch.cat([q_in, ctx], dim=1), attn_mask=mask)[:, :3]
        torch.testing.assert_close(cross_attend(attn, q_in, ctx), ref)


def test_patch_slimming_carries_impact_back_by_hand():
    """One prefix token and two image tokens; the last block's class token attends only to token 2,
    the first block's token 2 attends only to token 1."""
    last = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    first = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    impacts = carry_back([first, last], prefix=1)
    torch.testing.assert_close(impacts[1], torch.tensor([1.0, 0.0, 0.0]))  # only the class token's output is read
    torch.testing.assert_close(impacts[0], torch.tensor([0.5, 0.0, 0.5]))  # through the last block: half to token 2
    # then, before the first block, token 2's impact is passed half to token 1
    below = 0.5 * impacts[0] + 0.5 * first.T @ impacts[0]
    assert below[1] > 0 and torch.isclose(below.sum(), torch.tensor(1.0))


def test_patch_slimming_choice_is_nested_static_and_travels_with_the_weights(tmp_path):
    model = make_model("deit", depth=6)
    evit.patch(model, 0.5, method="patchslimming", locations=[1, 3, 4])
    chosen = select(model, torch.randn(8, 3, 64, 64))
    sets = [set(v.tolist()) for v in chosen.values()]
    assert [len(s) for s in sets] == [8, 4, 2]
    assert sets[0] >= sets[1] >= sets[2], "a patch kept deeper must be kept at every shallower block"
    block, sources = token_sources(model, torch.randn(3, 3, 64, 64))[-1]  # the same positions for every image
    assert block == 4 and all(torch.equal(sources[0], s) for s in sources)
    reference = model(torch.ones(1, 3, 64, 64))
    torch.save(model.state_dict(), tmp_path / "w.pt")
    fresh = evit.patch(make_model("deit", depth=6), 0.5, method="patchslimming", locations=[1, 3, 4])
    fresh.load_state_dict(torch.load(tmp_path / "w.pt"))
    torch.testing.assert_close(fresh(torch.ones(1, 3, 64, 64)), reference)


def test_a_saved_patch_slimming_choice_is_used_only_on_the_grid_it_was_made_on():
    """Positions chosen on a 4 x 4 patch grid are other patches on a 6 x 6 one, even where a keep rate keeps as many
    (ceil(0.5 * 16) = ceil(0.2 * 36) = 8): a model at another input size chooses again (it ran the saved rows)."""
    from evit.patch import keep_saved_state

    small = evit.patch(make_model("deit", img_size=64), 0.5, method="patchslimming", locations=[1])
    saved = select(small, torch.randn(4, 3, 64, 64))[1]
    assert evit.reductions(small)[1].made_for.tolist() == [17, 4, 4, 1]  # tokens, grid, blocks
    state = small.state_dict()
    for size, keep, reused in ((64, 0.5, True), (96, 0.2, False)):
        model = evit.patch(make_model("deit", img_size=size), 1.0, method="patchslimming", locations=[1])
        model.load_state_dict({k: v for k, v in state.items() if k != "pos_embed"}, strict=False)
        keep_saved_state(model)
        evit.patch(model, keep, [1], method="patchslimming", images=torch.randn(4, 3, size, size))
        assert torch.equal(evit.reductions(model)[1].index, saved) == reused, (size, keep)


def test_refusals_of_the_new_methods():
    model = make_model("deit")
    with pytest.raises(ValueError, match="once"):
        evit.patch(model, 0.5, method="stvit", locations=[1, 2])
    with pytest.raises(ValueError, match="no fused token"):
        STViT(0.5, fuse=True)
    with pytest.raises(ValueError, match="no fused token"):
        PatchSlimming(0.5, fuse=True)
    evit.patch(model, 0.5, method="patchslimming")
    with pytest.raises(RuntimeError, match="select"):
        model(input_for(model))
    with pytest.raises(ValueError, match="sample images"):
        apply_setting(model, {"method": "patchslimming", "keep_rate": 0.5})


def test_stvit_names_an_input_grid_it_cannot_tell():
    model = evit.patch(make_model("dynamic_img_size"), 0.5, method="stvit")
    method = evit.reductions(model)[1]
    with pytest.raises(ValueError, match="12 tokens are not the model's 4x4 grid nor a square"):
        method(torch.randn(1, 13, 192), None)  # outside a forward: no input to tell the grid by
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 48))  # 4 x 3 patches: the input's own grid
    with pytest.raises(ValueError, match="15 tokens are not the input's 4x3 grid"):
        method(torch.randn(1, 16, 192), None)


def _tiny_hf_vit():
    T = pytest.importorskip("transformers")
    config = T.ViTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, image_size=32, patch_size=8,
                         intermediate_size=64)
    torch.manual_seed(0)
    return T.ViTForImageClassification._from_config(config, attn_implementation="sdpa").eval()


@pytest.mark.parametrize("library", ["timm", "transformers"])
def test_stvit_pools_on_the_grid_of_the_input_not_the_model(library):
    """A model taking any size, run on 2 x 8 or 8 x 2 patches: 16 tokens, as many as its own 4 x 4 grid, but
    the windows must be those of the input's grid (timm's dynamic_img_size; transformers'
    interpolate_pos_encoding=True)."""
    if library == "timm":
        model, patch, run = make_model("dynamic_img_size"), 16, lambda m, x: m(x)
    else:
        model, patch = _tiny_hf_vit(), 8
        run = lambda m, x: m(pixel_values=x, interpolate_pos_encoding=True)  # noqa: E731
    evit.patch(model, 0.25, method="stvit", refine=False)  # a 2 x 2 grid of semantic tokens
    seen = {}
    evit.reductions(model)[1].register_forward_hook(lambda m, args, out: seen.update(x=args[0], out=out))
    for h, w in ((2, 8), (8, 2), (4, 4)):
        with torch.no_grad():
            run(model, torch.randn(2, 3, h * patch, w * patch))
        x = seen["x"]
        image = x[:, 1:].transpose(1, 2).reshape(2, -1, h, w)
        expected = torch.nn.functional.adaptive_avg_pool2d(image, 2).flatten(2).transpose(1, 2)
        torch.testing.assert_close(seen["out"], torch.cat([x[:, :1], expected], dim=1))


def test_only_a_patch_that_reads_the_input_size_watches_the_image_entry():
    """Other methods pay nothing per forward: their patch leaves the patch embedding's class as it is."""
    model = make_model("dynamic_img_size")
    plain = type(model.patch_embed)
    evit.patch(model, 0.5, method="evit")
    assert type(model.patch_embed) is plain
    evit.patch(model, 0.5, method="stvit")
    assert type(model.patch_embed) is not plain and model.patch_embed.token_state is evit.reductions(model)[1].state
    copied = copy.deepcopy(model)  # the copy's entry records into the copy's state
    assert copied.patch_embed.token_state is evit.reductions(copied)[1].state is not evit.reductions(model)[1].state
    evit.unpatch(model)
    assert type(model.patch_embed) is plain and not hasattr(model.patch_embed, "token_state")


def test_stvit_follows_a_resize_after_patching():
    from evit.resolution import set_input_size

    model = evit.patch(make_model("deit"), 0.5, method="stvit")
    set_input_size(model, (64, 48))  # 4 x 3 patches
    with torch.no_grad():
        out = model.forward_features(torch.randn(1, 3, 64, 48))
    assert out.shape[1] == evit.token_counts(model, 13)[-1] == 1 + 2 * 2



def _reloaded_with_saved_choice(path):
    """A fresh model that loaded weights saved from a Patch-Slimming-patched one, as the commands load them."""
    from evit.loading import patch_for_weights
    from evit.models import load_checkpoint
    from evit.patch import keep_saved_state

    model = make_model("deit", depth=6)
    patch_for_weights("patchslimming")(model)
    load_checkpoint(model, str(path))
    return keep_saved_state(model)


def _kept(model):
    return {i: m.index.clone() for i, m in evit.reductions(model).items()}


def test_a_saved_patch_slimming_choice_is_used_only_by_the_patch_it_was_made_for(tmp_path):
    """A lower level's choice depends on the levels above it: a choice saved at blocks {1, 2, 3} is not reused by a
    patch at {1, 2} (chosen afresh from the images given, or refused in one line without them), nor at another
    input size; at {1, 2, 3}, keeping as many tokens, it is reused exactly."""
    from evit.resolution import set_input_size

    def chosen(locations, images):
        return _kept(evit.patch(make_model("deit", depth=6), 0.25, locations, method="patchslimming", images=images))

    # sample images for which the test can tell: other images choose otherwise, and block 3 above block 2 shapes
    # block 2's choice (random weights differ between timm versions: such images are found, not assumed)
    for seed in range(50):
        torch.manual_seed(seed)
        made_from, given = torch.randn(8, 3, 64, 64), torch.randn(8, 3, 64, 64)
        saved, fresh, afresh = chosen([1, 2, 3], made_from), chosen([1, 2, 3], given), chosen([1, 2], made_from)
        if any(not torch.equal(fresh[i], saved[i]) for i in saved) and not torch.equal(afresh[2], saved[2]):
            break
    else:
        pytest.fail("no sample images found for which the choice depends on the images and on block 3")
    model = evit.patch(make_model("deit", depth=6), 0.25, [1, 2, 3], method="patchslimming", images=made_from)
    assert all(torch.equal(_kept(model)[i], saved[i]) for i in saved)
    torch.save(model.state_dict(), tmp_path / "w.pt")

    same = evit.patch(_reloaded_with_saved_choice(tmp_path / "w.pt"), 0.25, [1, 2, 3], method="patchslimming",
                      images=given)  # other images: a fresh choice would differ
    assert _kept(same).keys() == saved.keys() and all(torch.equal(_kept(same)[i], saved[i]) for i in saved)
    alone = _kept(evit.patch(_reloaded_with_saved_choice(tmp_path / "w.pt"), 0.25, [1, 2, 3], method="patchslimming"))
    assert all(torch.equal(alone[i], saved[i]) for i in saved)  # no images needed where it fits

    fewer = evit.patch(_reloaded_with_saved_choice(tmp_path / "w.pt"), 0.25, [1, 2], method="patchslimming",
                       images=made_from)  # the images it was made from: only the blocks differ
    assert all(torch.equal(_kept(fewer)[i], afresh[i]) for i in (1, 2))

    reloaded = _reloaded_with_saved_choice(tmp_path / "w.pt")
    with pytest.raises(ValueError, match=r"was made at blocks 1, 2, 3, not at blocks 1, 2, .*give sample images"):
        evit.patch(reloaded, 0.25, [1, 2], method="patchslimming")
    assert not evit.reductions(reloaded)  # refused: not left patched without a choice
    set_input_size(reloaded, 48)
    with pytest.raises(ValueError, match="was made for 17 tokens entering the model, and this model takes 10"):
        evit.patch(reloaded, 0.25, [1, 2, 3], method="patchslimming")
    with pytest.raises(ValueError, match="keeps 4 of the 16 image tokens entering block 1, where keep rate 0.5 keeps 8"):
        evit.patch(_reloaded_with_saved_choice(tmp_path / "w.pt"), 0.5, [1, 2, 3], method="patchslimming")


def test_a_saved_patch_slimming_choice_is_kept_only_at_the_blocks_it_was_made_for():
    """A block's saved choice is of the tokens the blocks before it kept: patched at a subset of its blocks, the
    same count kept (8 of 16 then 4 of 8 at blocks 1, 2; 4 of 16 at block 2 alone) names other patches, so the
    choice is made again there; at the same blocks and keep rate the saved one is kept."""
    from evit.patch import keep_saved_state

    model = make_model("deit")
    images = torch.randn(8, 3, 64, 64)
    evit.patch(model, 0.5, locations=(1, 2), method="patchslimming")
    select(model, images)
    saved = {i: m.index.clone() for i, m in evit.reductions(model).items()}
    keep_saved_state(model)
    evit.patch(model, 0.25, locations=(2,), method="patchslimming", images=images)
    fresh = evit.patch(make_model("deit"), 0.25, locations=(2,), method="patchslimming", images=images)
    assert torch.equal(evit.reductions(model)[2].index, evit.reductions(fresh)[2].index)
    evit.patch(model, 0.5, locations=(1, 2), method="patchslimming", images=torch.randn(8, 3, 64, 64))
    assert all(torch.equal(m.index, saved[i]) for i, m in evit.reductions(model).items())


def test_a_saved_patch_slimming_choice_is_not_used_on_another_grid_of_as_many_patches(tmp_path):
    """Positions name patches on the grid they were chosen on: on a 2x3 grid and on a 3x2 one, as many tokens enter
    the model, but position 2 is another patch; the saved choice is refused there (without images) and chosen
    afresh (with them), and still reused on its own grid."""
    from evit.resolution import set_input_size

    torch.manual_seed(0)
    model = evit.patch(make_model("deit", img_size=(32, 48)), 0.5, [1, 2], method="patchslimming",
                       images=torch.randn(4, 3, 32, 48))
    saved = _kept(model)
    torch.save(model.state_dict(), tmp_path / "w.pt")

    def reloaded():
        from evit.loading import patch_for_weights
        from evit.models import load_checkpoint
        from evit.patch import keep_saved_state

        again = make_model("deit", img_size=(32, 48))
        patch_for_weights("patchslimming")(again)
        load_checkpoint(again, str(tmp_path / "w.pt"))
        return keep_saved_state(again)

    same = _kept(evit.patch(reloaded(), 0.5, [1, 2], method="patchslimming"))
    assert all(torch.equal(same[i], saved[i]) for i in saved)
    turned = set_input_size(reloaded(), (48, 32))
    with pytest.raises(ValueError, match="was made on 2x3 patches, and this model.s are 3x2"):
        evit.patch(turned, 0.5, [1, 2], method="patchslimming")
    images = torch.randn(4, 3, 48, 32)
    afresh = _kept(evit.patch(turned, 0.5, [1, 2], method="patchslimming", images=images))
    fresh = _kept(evit.patch(set_input_size(make_model("deit", img_size=(32, 48)), (48, 32)), 0.5, [1, 2],
                             method="patchslimming", images=images))
    assert all(torch.equal(afresh[i], fresh[i]) for i in fresh)
