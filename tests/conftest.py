import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing downloads in tests

import pytest  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402

# The timm ViT variants evit serves, shrunk (depth 4, small inputs) so the suite stays fast.
VARIANTS = {
    "deit": ("deit_tiny_patch16_224", dict(img_size=64)),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", dict(img_size=64)),
    "deit3_layerscale": ("deit3_small_patch16_224", dict(img_size=64, embed_dim=96, num_heads=3)),
    "dinov2_registers": ("vit_small_patch14_reg4_dinov2", dict(img_size=56, embed_dim=96, num_heads=3)),
    "clip_prenorm": ("vit_base_patch16_clip_224", dict(img_size=64, embed_dim=96, num_heads=3)),
    "qk_norm": ("deit_tiny_patch16_224", dict(img_size=64, qk_norm=True)),
    "dynamic_img_size": ("deit_tiny_patch16_224", dict(img_size=64, dynamic_img_size=True)),
}


def make_model(variant: str, depth: int = 4, **extra) -> torch.nn.Module:
    name, kwargs = VARIANTS[variant]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, depth=depth, **{**kwargs, **extra})
    # random init leaves LayerScale at 1e-5 and heads at zero: make every path matter
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".gamma") or n.startswith("head"):
                p.normal_(0, 0.2)
    return model.eval()


def input_for(model: torch.nn.Module, batch: int = 2) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(batch, *model.pretrained_cfg["input_size"][:1], *model.patch_embed.img_size)


@pytest.fixture
def one_thread():
    """Runs on one thread, as the child processes of the timm runs' tests do: tiny models run quickest so on
    shared cores. (A module uses it with ``pytestmark = pytest.mark.usefixtures("one_thread")``.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=list(VARIANTS))
def variant(request):
    return request.param


@pytest.fixture(scope="session")
def jpeg_folder(tmp_path_factory):
    """A function writing an ImageNet-style folder of 32x32 RGB JPEGs cut from the bundled Fashion-MNIST
    test images (10 classes c0..c9): ``train_per_class`` and ``val_per_class`` images of each class."""
    import numpy as np
    from PIL import Image

    from evit.embedded import test_subset

    images, labels = test_subset()
    images, labels = images[:, 0].numpy(), labels.numpy()

    def write(train_per_class: int, val_per_class: int):
        root = tmp_path_factory.mktemp("jpegs")
        for c in range(10):
            idx = np.flatnonzero(labels == c)
            for split, chosen in (("train", idx[:train_per_class]),
                                  ("val", idx[train_per_class:train_per_class + val_per_class])):
                folder = root / split / f"c{c}"
                folder.mkdir(parents=True)
                for i in chosen:
                    Image.fromarray(images[i]).resize((32, 32), Image.BILINEAR).convert("RGB").save(
                        folder / f"{i:04d}.jpg", quality=90)
        return root

    return write
