"""Everything evit knows about Hugging Face transformers' Vision Transformers (transformers 5).

Served, built from their configs or loaded from a local folder:

==========================================  =========================  ==========================
class                                       prefix tokens              output read from
==========================================  =========================  ==========================
ViTModel, ViTForImageClassification         class                      class token (or sequence)
DeiTModel, DeiTForImageClassification       class, distillation        class token
DeiTForImageClassificationWithTeacher       class, distillation        both tokens
CLIPVisionModel(WithProjection)             class                      class token
Dinov2Model                                 class                      class token
Dinov2ForImageClassification                class                      class token and image mean
Dinov2WithRegistersModel / ...Classif.      class, registers           as DINOv2
SiglipVisionModel (vision_use_head=False)   none                       the sequence
==========================================  =========================  ==========================

under ``attn_implementation`` "sdpa" (evit keeps the fused kernel and computes the class
token's attention row beside it) or "eager". Refused, with the reason: other attention
implementations, SigLIP's attention-pooling head, ``output_attentions`` and attention masks
on a patched layer, gradient checkpointing in training. A patched layer keeps its own
submodules (``layernorm_before``, ``attention.q_proj``, ..., ``mlp``); only its class changes.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from .base import AttentionView, BlockView, Host, base_class, check_patch_multiple
from .transformers_preprocessing import saved_preprocessing

IMPLEMENTATIONS = ("sdpa", "eager")
#: the oldest transformers whose model classes are laid out as this file reads them (5.20 and older name
#: CLIP's and DINOv2's parts differently); pyproject's extra asks for it too
OLDEST = "5.21"


def check_version() -> None:
    """Refuse, in one line, a transformers older than :data:`OLDEST` (its models would fail deep inside)."""
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__).release < Version(OLDEST).release:  # 5.21.0.dev0 is 5.21 here
        raise ValueError(f"evit serves transformers {OLDEST} or newer, and this is transformers {transformers.__version__}: "
                         f"pip install -U 'transformers>={OLDEST}'")


class HFAttention(AttentionView):
    """Attention with separate q/k/v projections and an output projection (ViT/DeiT/DINOv2: ``o_proj``,
    ``scaling``; CLIP/SigLIP: ``out_proj``, ``scale``)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__(module)
        self.num_heads = module.config.num_attention_heads
        self.head_dim = module.head_dim
        self.scale = module.scaling if hasattr(module, "scaling") else module.scale
        self.sdpa_scale = self.scale  # transformers passes its scale to the kernel
        self._out = module.o_proj if hasattr(module, "o_proj") else module.out_proj

    @property
    def fused(self) -> bool:
        return self.module.config._attn_implementation == "sdpa"

    @property
    def dropout_p(self) -> float:
        m = self.module
        return (m.attention_dropout if hasattr(m, "attention_dropout") else m.dropout) if m.training else 0.0

    def queries(self, x: Tensor) -> Tensor:
        return self.heads(self.module.q_proj(x), self.num_heads)

    def keys_values(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.heads(self.module.k_proj(x), self.num_heads), self.heads(self.module.v_proj(x), self.num_heads)

    def finish(self, out: Tensor, x: Tensor) -> Tensor:
        return self._out(out)


def pair(value) -> tuple[int, int]:
    """A config's size (``image_size``, ``patch_size``): one number for both sides, or (height, width)."""
    return (value, value) if isinstance(value, int) else tuple(value)


def _masks_nothing(mask: Tensor) -> bool:
    """True for an attention mask that lets every token attend to every token (all true, or an additive mask
    of zeros). While exporting, its values cannot be read: a mask then is taken to be the one evit's own
    export gives (:meth:`TransformersHost.forward`), which masks nothing."""
    if torch.compiler.is_exporting():
        return True
    return bool(mask.all()) if mask.dtype == torch.bool else not bool(mask.any())


class MaskFollower(nn.Module):
    """Mixin for a transformers layer after a token-reducing one, left as it is otherwise.

    Its model makes one attention mask for the full-length sequence and hands it to every layer. Mostly that
    mask is None (it masks nothing), but where transformers cannot look at it, it is made in full: inside
    ``torch.compile`` before torch 2.14, and under ``torch.export``. A layer after a reduction gets a shorter
    sequence, and the mask is dropped by its length alone (no value read, no graph break): the reducing layer
    before has already refused one that masks anything."""

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        if attention_mask is not None and attention_mask.shape[-1] != hidden_states.shape[1]:
            attention_mask = None
        return super().forward(hidden_states, attention_mask, **kwargs)


class HFLayer(BlockView):
    """A transformers encoder layer called as ``layer(hidden_states, attention_mask, **kwargs)``."""

    attention_name = "attention"

    def arguments(self, args: tuple, kwargs: dict) -> tuple[Tensor, tuple, dict]:
        x = args[0] if args else kwargs["hidden_states"]
        mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
        layer = self.block
        config = getattr(layer, self.attention_name).config
        if (mask is not None and not _masks_nothing(mask)) or kwargs.get("head_mask") is not None:
            raise ValueError("evit: attention masks are not supported in a token-reducing layer (the mask would not "
                             "follow the shortened sequence); call the model without attention_mask / head_mask")
        if kwargs.get("output_attentions") or getattr(config, "output_attentions", False):
            raise ValueError("evit: output_attentions=True is not supported on a token-reducing layer (evit computes the "
                             "class token's attention row beside the fused kernel, never the full matrix); call the "
                             "model without it, or evit.unpatch(model) first")
        if layer.gradient_checkpointing and layer.training and torch.is_grad_enabled():
            raise ValueError("evit: gradient checkpointing is not supported on a token-reducing layer (its replay would "
                             "reduce again); disable it (model.activation_checkpointing_disable())")
        kwargs = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "attention_mask")}
        return x, (x, None), kwargs  # the mask masks nothing: the layer's own forward runs without it

    @property
    def attention(self) -> HFAttention:
        return HFAttention(getattr(self.block, self.attention_name))


class ViTLayerView(HFLayer):
    """ViT and DeiT: ``x + dropout(attention(layernorm_before(x)))``, then ``x + dropout(mlp(layernorm_after(x)))``."""

    def attention_norm(self, x: Tensor) -> Tensor:
        return self.block.layernorm_before(x)

    def attention_residual(self, x: Tensor, out: Tensor) -> Tensor:
        return x + self.block.dropout(out)

    def mlp_residual(self, x: Tensor) -> Tensor:
        return x + self.block.dropout(self.block.mlp(self.block.layernorm_after(x)))


class CLIPLayerView(HFLayer):
    """CLIP and SigLIP: ``x + self_attn(layer_norm1(x))``, then ``x + mlp(layer_norm2(x))``."""

    attention_name = "self_attn"

    def attention_norm(self, x: Tensor) -> Tensor:
        return self.block.layer_norm1(x)

    def attention_residual(self, x: Tensor, out: Tensor) -> Tensor:
        return x + out

    def mlp_residual(self, x: Tensor) -> Tensor:
        return x + self.block.mlp(self.block.layer_norm2(x))


class Dinov2LayerView(HFLayer):
    """DINOv2 (with registers): ``x + drop_path(layer_scale1(attention(norm1(x))))``, then the same around the MLP."""

    def attention_norm(self, x: Tensor) -> Tensor:
        return self.block.norm1(x)

    def attention_scale(self, out: Tensor) -> Tensor:
        return self.block.layer_scale1(out)

    def attention_residual(self, x: Tensor, out: Tensor) -> Tensor:
        return x + self.block.drop_path(self.block.layer_scale1(out))

    def mlp_residual(self, x: Tensor) -> Tensor:
        b = self.block
        return x + b.drop_path(b.layer_scale2(b.mlp(b.norm2(x))))


@dataclass(frozen=True)
class Family:
    """One model family: where its layers are, what its layer is, its preprocessing."""

    module: str  # transformers.models.<module>.modeling_<module>
    layer: str  # its layer class
    attention: str  # its attention class
    view: type
    layers_path: str  # from the backbone
    mean: tuple
    std: tuple
    crop_pct: float = 1.0
    interpolation: str = "bicubic"  # its image processor's resample
    crop_mode: str = "center"  # resized by the shorter side ('center'), or to height x width ('squash')
    makes_mask: bool = True  # its model makes an attention mask for its layers (create_bidirectional_mask)


_STANDARD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
FAMILIES = {
    "vit": Family("vit", "ViTLayer", "ViTAttention", ViTLayerView, "layers", *_STANDARD, interpolation="bilinear",
                  crop_mode="squash"),
    "deit": Family("deit", "DeiTLayer", "DeiTAttention", ViTLayerView, "layers", *_STANDARD, crop_pct=0.875,
                   crop_mode="squash"),
    "clip": Family("clip", "CLIPEncoderLayer", "CLIPAttention", CLIPLayerView, "encoder.layers", *_CLIP,
                   makes_mask=False),
    "dinov2": Family("dinov2", "Dinov2Layer", "Dinov2Attention", Dinov2LayerView, "encoder.layer", *_IMAGENET,
                     crop_pct=0.875),
    "dinov2_with_registers": Family("dinov2_with_registers", "Dinov2WithRegistersLayer",
                                    "Dinov2WithRegistersAttention", Dinov2LayerView, "encoder.layer", *_IMAGENET,
                                    crop_pct=0.875),
    "siglip": Family("siglip", "SiglipEncoderLayer", "SiglipAttention", CLIPLayerView, "encoder.layers", *_STANDARD,
                     crop_mode="squash", makes_mask=False),
}
#: served model classes: (family, pooling). Pooling: 'token' (a head or pooler on the class token),
#: 'token+avg' (on the class token and the image tokens' mean), 'sequence' (the tokens themselves)
CLASSES = {
    "ViTModel": ("vit", "token"), "ViTForImageClassification": ("vit", "token"),
    "DeiTModel": ("deit", "token"), "DeiTForImageClassification": ("deit", "token"),
    "DeiTForImageClassificationWithTeacher": ("deit", "token"),
    "CLIPVisionModel": ("clip", "token"), "CLIPVisionModelWithProjection": ("clip", "token"),
    "Dinov2Model": ("dinov2", "token"), "Dinov2ForImageClassification": ("dinov2", "token+avg"),
    "Dinov2WithRegistersModel": ("dinov2_with_registers", "token"),
    "Dinov2WithRegistersForImageClassification": ("dinov2_with_registers", "token+avg"),
    "SiglipVisionModel": ("siglip", "sequence"),
}


def _modeling(family: Family) -> Any:
    import importlib

    return importlib.import_module(f"transformers.models.{family.module}.modeling_{family.module}")


def _served_class(model: nn.Module) -> Optional[str]:
    """The served transformers class ``model`` is (by its class's defining module, not only its name)."""
    cls = type(model)
    entry = CLASSES.get(cls.__name__)
    if entry is None or getattr(_modeling(FAMILIES[entry[0]]), cls.__name__, None) is not cls:
        return None
    return cls.__name__


def serves(model: nn.Module) -> bool:
    return _served_class(model) is not None


def host(model: nn.Module) -> "TransformersHost":
    return TransformersHost(model)


def view_class(block_class: type) -> Optional[type]:
    """The view class for a served family's layer class, else None."""
    for family in FAMILIES.values():
        if block_class is getattr(_modeling(family), family.layer):
            return family.view
    return None


def attention_view(module: nn.Module) -> Optional[AttentionView]:
    for family in FAMILIES.values():
        if type(module) is getattr(_modeling(family), family.attention):
            return HFAttention(module)
    return None


class TransformersHost(Host):
    library = "transformers"
    returns_tensor = False
    class_token_text = "a head on the class token"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.family_name, self._pooling = CLASSES[_served_class(model)]
        self.family = FAMILIES[self.family_name]
        self.backbone = model.base_model
        self.config = self.backbone.config
        self.follower_mixin = MaskFollower if self.family.makes_mask else None

    def check(self) -> None:
        check_version()
        impl = self.config._attn_implementation
        if impl not in IMPLEMENTATIONS:
            raise ValueError(f"evit cannot patch {self.name}: it runs attn_implementation={impl!r}; evit serves "
                             f"{' and '.join(repr(i) for i in IMPLEMENTATIONS)} (build or load it with "
                             "attn_implementation='sdpa')")
        if self.family_name == "siglip" and getattr(self.backbone, "use_head", False):
            raise ValueError(f"evit cannot patch {self.name}: it pools with SigLIP's attention-pooling head "
                             "(vision_use_head=True), which no evit method serves (its attention would need the merged "
                             "tokens' sizes); build it with vision_use_head=False to reduce its token sequence")
        layer_class = getattr(_modeling(self.family), self.family.layer)
        for i, layer in enumerate(self.blocks):
            base = base_class(layer)
            if base is not layer_class:
                raise TypeError(f"evit cannot patch {self.name}: layer {i} is {base.__name__}, not {layer_class.__name__}")

    @property
    def name(self) -> str:
        return type(self.model).__name__

    @property
    def blocks(self):
        module = self.backbone
        for part in self.family.layers_path.split("."):
            module = getattr(module, part)
        return module

    def view_class(self, block: nn.Module) -> type:
        return self.family.view

    @property
    def num_prefix_tokens(self) -> int:
        embeddings = self.backbone.embeddings
        registers = getattr(embeddings, "register_tokens", None)
        return int(self.has_class_token) + int(getattr(embeddings, "distillation_token", None) is not None) + \
            (0 if registers is None else registers.shape[1])

    @property
    def has_class_token(self) -> bool:
        embeddings = self.backbone.embeddings
        return getattr(embeddings, "cls_token", None) is not None or hasattr(embeddings, "class_embedding")

    @property
    def embed_dim(self) -> int:
        return self.config.hidden_size

    @property
    def pooling(self) -> str:
        if self._pooling == "token" and self.family_name in ("vit", "deit") and type(self.model) is type(self.backbone) \
                and self.backbone.pooler is None:
            return "sequence"  # a ViTModel without its pooler returns the tokens themselves
        return self._pooling

    @property
    def pooling_text(self) -> str:
        return {"token": "its class token", "token+avg": "its class token and the mean of its image tokens",
                "sequence": "its token sequence"}[self.pooling]

    @property
    def read_prefix_tokens(self) -> int:
        """The class token (its head, pooler, or its place first in a sequence), and the distillation token where
        a head reads it (DeiT's teacher model's ``distillation_classifier``; DeiT's classifier reads the class token
        only); registers never."""
        return int(self.has_class_token) + int(hasattr(self.model, "distillation_classifier"))

    @property
    def final_norm(self) -> Optional[nn.Module]:
        return self.backbone.layernorm if self.pooling == "token+avg" else None

    @property
    def input_size(self) -> tuple[int, int, int]:
        return (self.config.num_channels, *pair(self.config.image_size))

    def patch_grid(self, hw: Optional[tuple[int, int]] = None) -> tuple[int, int]:
        (h, w), (ph, pw) = hw or self.input_size[1:], pair(self.config.patch_size)
        return h // ph, w // pw

    @property
    def image_entry(self) -> nn.Module:
        """ViT, DeiT, DINOv2: ``embeddings.patch_embeddings``; CLIP, SigLIP: the convolution
        ``embeddings.patch_embedding``."""
        embeddings = self.backbone.embeddings
        entry = getattr(embeddings, "patch_embeddings", None)
        return entry if entry is not None else embeddings.patch_embedding

    @property
    def takes_any_size(self) -> bool:
        return self.family_name.startswith("dinov2")  # its position embeddings are interpolated at every call

    def set_input_size(self, hw: tuple[int, int]) -> None:
        """The position embeddings resampled by the family's own ``interpolate_pos_encoding`` (bicubic, prefix
        tokens kept), once: the model then gives what transformers gives with ``interpolate_pos_encoding=True``
        at that size, without interpolating at every call. DINOv2 interpolates at every call anyway: only the
        size it is run at changes. Each side must be a multiple of the patch size (the patch embedding would crop
        the image); CLIP and SigLIP take square inputs only."""
        (h, w), (ph, pw) = hw, pair(self.config.patch_size)
        check_patch_multiple((h, w), (ph, pw))
        if (h, w) == tuple(self.input_size[1:]):
            return
        embeddings, grid = self.backbone.embeddings, (h // ph) * (w // pw)
        table = getattr(embeddings, "position_embedding", None)  # CLIP, SigLIP: an nn.Embedding
        if table is not None and h != w:
            raise ValueError(f"{self.name} takes square inputs only (its embeddings check one side): use {h}x{h}")
        if not self.takes_any_size:
            n = grid + self.num_prefix_tokens
            old = table.weight if table is not None else embeddings.position_embeddings
            with torch.no_grad():
                new = embeddings.interpolate_pos_encoding(old.new_empty(1, n, old.shape[-1]), h, w).detach().clone()
            if table is not None:
                embeddings.position_embedding = nn.Embedding(n, old.shape[-1], _weight=new[0], device=old.device,
                                                             dtype=old.dtype)
                embeddings.position_embedding.weight.requires_grad_(old.requires_grad)
                embeddings.position_ids = torch.arange(n, device=old.device).expand(1, -1)
                embeddings.num_patches, embeddings.num_positions, embeddings.image_size = grid, n, h
            else:
                embeddings.position_embeddings = nn.Parameter(new, requires_grad=old.requires_grad)
        patches = getattr(embeddings, "patch_embeddings", None)
        if patches is not None:  # ViT, DeiT, DINOv2: the patch embedding checks (or records) the size
            patches.image_size, patches.num_patches = (h, w), grid
            if hasattr(embeddings, "image_size"):
                embeddings.image_size = (h, w)
        self.config.image_size = h if h == w else [h, w]

    def forward(self, images: Tensor, runner: Optional[nn.Module] = None) -> Tensor:
        masks = {}
        if torch.compiler.is_exporting() and self.family.makes_mask:
            # under torch.export, transformers hands every layer a full-length all-attending mask, which a layer
            # after a reduction cannot take; a 1 x 1 mask that masks nothing broadcasts to any length instead
            masks["attention_mask"] = images.new_zeros(1, 1, 1, 1)
        out = (runner or self.model)(pixel_values=images, **masks)
        for key in ("logits", "image_embeds", "pooler_output", "last_hidden_state"):
            if getattr(out, key, None) is not None:
                return getattr(out, key)
        raise TypeError(f"{self.name} returned no tensor evit knows ({type(out).__name__})")  # pragma: no cover

    def adapt_state_dict(self, state: dict) -> dict:
        """A file ``save_pretrained`` wrote (or a training script of an older transformers) names the tensors in
        transformers' saved layout (``encoder.layer.0.attention.attention.query``), not the modules' own
        (``layers.0.attention.q_proj``): such a state is read the way ``from_pretrained`` reads it, with
        transformers' own conversion, into a model of this class and config. A head that is not this model's
        (trained on other classes, or none) does not stop the rest converting: it is kept as the file has it, for
        the caller to judge. A state that fits as it is, or that transformers cannot place either, is returned
        as it is (the caller names what does not fit)."""
        own = self.model.state_dict()
        if all(k in state for k in own) or not state:
            return state
        import tempfile

        from safetensors.torch import save_file

        with tempfile.TemporaryDirectory(prefix="evit-") as folder, quiet_loading():
            self.model.config.save_pretrained(folder)
            save_file({k: v.contiguous() for k, v in state.items()}, f"{folder}/model.safetensors")
            try:
                loaded, info = type(self.model).from_pretrained(folder, config=self.model.config,
                                                                output_loading_info=True, ignore_mismatched_sizes=True)
            except Exception:  # noqa: BLE001 - shapes transformers cannot take: the caller names them
                return state
        unexpected = set(info.get("unexpected_keys") or ())
        if any(not self.in_head(k) for k in [*info.get("missing_keys", ()), *unexpected,
                                              *(k for k, *_ in info.get("mismatched_keys") or ())]):
            return state
        # a base model's file (no key under the base model's prefix) holds no head: its pooler is no classifier
        base = any(k.startswith(f"{self.model.base_model_prefix}.") for k in state)
        head = {k: v for k, v in state.items() if base and self.in_head(k) and (k in own or k in unexpected)}
        return {**{k: v for k, v in loaded.state_dict().items() if not self.in_head(k)}, **head}

    def check_trainable(self) -> None:
        if not self._has_head:  # a base model (ViTModel, CLIPVisionModel, ...)
            raise self._headless("logits to train", "train {}")
        if hasattr(self.model, "cls_classifier"):  # DeiTForImageClassificationWithTeacher
            raise ValueError(f"{self.name} is inference-only in transformers (its logits average a class-token head "
                             "and a distillation head, and no teacher trains the latter): train "
                             "DeiTForImageClassification (model_class=DeiTForImageClassification) instead")

    @property
    def _has_head(self) -> bool:
        return hasattr(self.model, "classifier") or hasattr(self.model, "cls_classifier")

    def _headless(self, lacks: str, remedy: str) -> ValueError:
        """The refusal of a model without a head: it has no ``lacks``; ``remedy`` formats its family's classifier
        class, where the family has one."""
        classifier = next((c for c, (family, _) in CLASSES.items()
                           if family == self.family_name and "Classification" in c), None)
        return ValueError(f"{self.name} has no classification head (it gives embeddings), so it has no {lacks}; " +
                          (remedy.format(f"{classifier} (model_class={classifier})") if classifier
                           else "evit bench, show and export serve it"))

    @property
    def head_names(self) -> tuple[str, ...]:
        """Everything outside transformers' base model (``base_model_prefix``): the classifier(s)."""
        if not self._has_head:
            return ()
        return tuple(n for n, _ in self.model.named_children() if n != self.model.base_model_prefix)

    def in_head(self, key: str) -> bool:
        """Anything outside the base model: a checkpoint's head by any name (a teacher model's ``cls_classifier``
        and ``distillation_classifier`` where this model has ``classifier``)."""
        return self._has_head and not key.startswith(f"{self.model.base_model_prefix}.")

    @property
    def head_outputs(self) -> int:
        if not self._has_head:
            raise self._headless("accuracy to score", "load the weights as {} to score them")
        return self.model.config.num_labels

    def _record(self, class_names: Optional[Sequence[str]]) -> None:
        """The preprocessing stays on the model (read first by :meth:`data_config`); the names go in its config's
        ``id2label``."""
        if class_names is None:
            return
        self.model.config.id2label = dict(enumerate(class_names))
        self.model.config.label2id = {name: i for i, name in enumerate(class_names)}

    @property
    def class_names(self) -> Optional[list[str]]:
        """``id2label``'s names, unless they are transformers' placeholders (``LABEL_0``, ...)."""
        labels = getattr(self.model.config, "id2label", None) or {}
        names = [str(labels.get(i, labels.get(str(i), ""))) for i in range(len(labels))]
        if not names or all(n == f"LABEL_{i}" for i, n in enumerate(names)):
            return None
        return names

    def data_config(self, input_size: Optional[Sequence[int]] = None) -> dict:
        """The family's preprocessing (as transformers' image processor for it does), or the one a local
        folder's ``preprocessor_config.json`` gives."""
        family = self.family
        found = dict(mean=family.mean, std=family.std, crop_pct=family.crop_pct, interpolation=family.interpolation,
                     crop_mode=family.crop_mode, crop_offset="floor")  # its processor crops at half the margin, floored
        saved = Path(str(getattr(self.model.config, "_name_or_path", "") or "")) / "preprocessor_config.json"
        if saved.is_file():
            found = saved_preprocessing(saved, self.config.num_channels, found)
        size = tuple(int(s) for s in input_size) if input_size else self.input_size
        return dict(input_size=size, **{**found, **getattr(self.model, self.RECORD, {})})


@contextmanager
def quiet_loading():
    """transformers' loading report and progress bar off: evit says in one line what is wrong."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
