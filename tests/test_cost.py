import pytest
import timm

import evit
from conftest import make_model

PAPER_GMACS = {1.0: 4.6, 0.9: 4.0, 0.8: 3.5, 0.7: 3.0, 0.6: 2.6, 0.5: 2.3}  # EViT Table, DeiT-S


def test_deit_small_macs_match_the_paper():
    model = timm.create_model("deit_small_patch16_224").eval()
    got = {}
    for keep_rate in PAPER_GMACS:
        evit.patch(model, keep_rate)
        got[keep_rate] = round(evit.count_macs(model) / 1e9, 1)
    assert got == PAPER_GMACS


def test_unpatched_macs_include_attention():
    """The fused attention kernel must be counted (torch's counter misses it on CPU)."""
    model = make_model("deit", depth=1)
    n, c = 17, 192
    linear = n * (3 * c * c + c * c + 2 * 4 * c * c)
    attention = 2 * n * n * c
    patch_embed = 16 * 3 * 16 * 16 * c
    head = c * 1000
    assert evit.count_macs(model, (3, 64, 64)) == linear + attention + patch_embed + head


def test_count_macs_rejects_bad_input_size():
    with pytest.raises(ValueError, match="input_size"):
        evit.count_macs(make_model("deit"), (64, 64))


def test_hybrid_vit_input_is_its_image_channels():
    """A hybrid ResNet-ViT's patch projection takes the backbone's features; its input is still an RGB image."""
    model = timm.create_model("vit_tiny_r_s16_p8_224", depth=1, img_size=64).eval()
    assert evit.cost.native_input_size(model) == (3, 64, 64)
    evit.patch(model, 0.5, locations=[0])
    assert evit.count_macs(model) > 0


def test_count_macs_refuses_an_input_the_model_does_not_take():
    model = make_model("deit")  # 64 x 64, 3 channels
    with pytest.raises(ValueError, match="takes 64x64 inputs, not 96x96: call evit.resolution.set_input_size"):
        evit.count_macs(model, (3, 96, 96))
    with pytest.raises(ValueError, match="takes 3-channel images, not 1-channel"):
        evit.count_macs(model, (1, 64, 64))
    assert evit.count_macs(make_model("dynamic_img_size"), (3, 96, 96)) > evit.count_macs(model)
