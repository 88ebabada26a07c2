"""Everything evit knows about timm's Vision Transformers.

Served: ``timm.models.vision_transformer.VisionTransformer`` built of timm's pre-norm
``Block`` with timm's ``Attention`` (ViT, DeiT, DeiT III, DINOv2 with registers, CLIP,
hybrid ResNet-ViTs, ...), pooled from the class token (``global_pool='token'``) or by the
mean of the image tokens (``'avg'``). Refused, with the reason: other families, parallel
and post-norm blocks, other attention types (rotary, differential), attention pooling
(``'map'``: SigLIP).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from .base import AttentionView, BlockView, Host, base_class, check_patch_multiple


def _classes():
    from timm.layers import Attention
    from timm.models.vision_transformer import Block, VisionTransformer

    return VisionTransformer, Block, Attention


def serves(model: nn.Module) -> bool:
    """True for a timm VisionTransformer (checked further by :meth:`TimmHost.check`)."""
    return isinstance(model, _classes()[0])


def serves_block(block_class: type) -> bool:
    return issubclass(block_class, _classes()[1])


def serves_attention(module: nn.Module) -> bool:
    return isinstance(module, _classes()[2])


class TimmAttention(AttentionView):
    """timm's ``Attention``: one fused qkv projection, optional q/k norms, norm and gate before ``proj``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__(module)
        self.num_heads, self.head_dim, self.scale = module.num_heads, module.head_dim, module.scale

    @property
    def fused(self) -> bool:
        return self.module.fused_attn

    @property
    def dropout_p(self) -> float:
        return self.module.attn_drop.p if self.module.training else 0.0

    def dropout(self, probs: Tensor) -> Tensor:
        return self.module.attn_drop(probs)

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        attn, (B, N, _) = self.module, x.shape
        q, k, v = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return attn.q_norm(q), attn.k_norm(k), v

    def _rows(self, x: Tensor, start: int, stop: int) -> Tensor:
        """Thirds ``start:stop`` of the fused qkv projection (q: 0, k: 1, v: 2) applied to ``x``, split into heads."""
        qkv = self.module.qkv
        rows = slice(start * qkv.out_features // 3, stop * qkv.out_features // 3)
        bias = None if qkv.bias is None else qkv.bias[rows]
        B, N, _ = x.shape
        heads = F.linear(x, qkv.weight[rows], bias).reshape(B, N, stop - start, self.num_heads, self.head_dim)
        return heads.permute(2, 0, 3, 1, 4)  # explicit shapes: B may be 0

    def queries(self, x: Tensor) -> Tensor:
        return self.module.q_norm(self._rows(x, 0, 1)[0])

    def keys_values(self, x: Tensor) -> tuple[Tensor, Tensor]:
        k, v = self._rows(x, 1, 3).unbind(0)
        return self.module.k_norm(k), v

    def finish(self, out: Tensor, x: Tensor) -> Tensor:
        attn = self.module
        out = attn.norm(out)
        if getattr(attn, "gate", None) is not None:
            out = out * attn.gate(x).sigmoid()
        return attn.proj_drop(attn.proj(out))


class TimmBlock(BlockView):
    """timm's pre-norm ``Block``: ``x + drop_path1(ls1(attn(norm1(x))))``, then the same around the MLP."""

    def arguments(self, args: tuple, kwargs: dict) -> tuple[Tensor, tuple, dict]:
        x = args[0] if args else kwargs["x"]
        attn_mask = args[1] if len(args) > 1 else kwargs.get("attn_mask")
        if attn_mask is not None or (args[2] if len(args) > 2 else kwargs.get("is_causal", False)):
            raise ValueError(
                "evit: attention masks and causal attention are not supported in a token-reducing block "
                "(the mask would not follow the shortened sequence); call the model without attn_mask"
            )
        return x, args, kwargs

    @property
    def attention(self) -> TimmAttention:
        return TimmAttention(self.block.attn)

    def attention_norm(self, x: Tensor) -> Tensor:
        return self.block.norm1(x)

    def attention_scale(self, out: Tensor) -> Tensor:
        return self.block.ls1(out)

    def attention_residual(self, x: Tensor, out: Tensor) -> Tensor:
        return x + self.block.drop_path1(self.block.ls1(out))

    def mlp_residual(self, x: Tensor) -> Tensor:
        b = self.block
        return x + b.drop_path2(b.ls2(b.mlp(b.norm2(x))))


def data_config(model: nn.Module, input_size: Optional[Sequence[int]] = None) -> dict:
    """timm's preprocessing for any timm model (from its pretrained config) at ``input_size``."""
    from timm.data import resolve_data_config

    return resolve_data_config({"input_size": tuple(int(s) for s in input_size)} if input_size else {}, model=model)


def model_name(model: nn.Module) -> str:
    """timm's architecture name of ``model`` (any timm model), else its class name."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or type(model).__name__


class TimmHost(Host):
    library = "timm"
    class_token_text = "global_pool='token' with a class token"

    @property
    def name(self) -> str:
        return model_name(self.model)

    def check(self) -> None:
        _, Block, Attention = _classes()
        model, name = self.model, self.name
        if getattr(model, "attn_pool", None) is not None:
            raise ValueError(
                f"evit cannot patch {name}: it classifies from global_pool={model.global_pool!r}, an attention-pooling "
                "head, which no evit method serves (its attention would need the merged tokens' sizes)"
            )
        for i, block in enumerate(model.blocks):
            base = base_class(block)
            if not issubclass(base, Block) or base.forward is not Block.forward:
                raise TypeError(
                    f"evit cannot patch {name}: block {i} is {base.__name__}, not timm's pre-norm Block "
                    "(parallel and post-norm blocks are not supported)"
                )
            attn = block.attn
            if not isinstance(attn, Attention) or type(attn).forward is not Attention.forward:
                raise TypeError(
                    f"evit cannot patch {name}: block {i} uses {type(attn).__name__}, not timm's Attention "
                    "(rotary, differential and other attention variants are not supported)"
                )

    @property
    def blocks(self):
        return self.model.blocks

    def view_class(self, block: nn.Module) -> type:
        return TimmBlock

    @property
    def num_prefix_tokens(self) -> int:
        return self.model.num_prefix_tokens

    @property
    def has_class_token(self) -> bool:
        return getattr(self.model, "cls_token", None) is not None

    @property
    def embed_dim(self) -> int:
        return self.model.embed_dim

    @property
    def pooling(self) -> str:
        return self.model.global_pool

    @property
    def pooling_text(self) -> str:
        return f"global_pool={self.model.global_pool!r}"

    @property
    def read_prefix_tokens(self) -> int:
        """The class token for ``global_pool='token'``, with the distillation token, which ``head_dist`` reads."""
        if self.pooling != "token":
            return 0
        return self.num_prefix_tokens - getattr(self.model, "num_reg_tokens", 0)

    @property
    def final_norm(self) -> Optional[nn.Module]:
        return self.model.norm

    @property
    def input_size(self) -> tuple[int, int, int]:
        embed = self.model.patch_embed
        if getattr(embed, "img_size", None) is not None:
            # a hybrid's HybridEmbed says its image channels (its proj takes the backbone's features)
            channels = getattr(embed, "in_chans", None) or (embed.proj.in_channels if hasattr(embed, "proj") else 3)
            return (channels, *embed.img_size)
        return tuple(getattr(self.model, "pretrained_cfg", {}).get("input_size", (3, 224, 224)))

    def patch_grid(self, hw: Optional[tuple[int, int]] = None) -> tuple[int, int]:
        embed = self.model.patch_embed
        if hw is None or tuple(hw) == tuple(embed.img_size or ()):
            return tuple(embed.grid_size)
        if hasattr(embed, "dynamic_feat_size"):
            return tuple(embed.dynamic_feat_size(tuple(hw)))
        return hw[0] // embed.patch_size[0], hw[1] // embed.patch_size[1]

    @property
    def image_entry(self) -> nn.Module:
        return self.model.patch_embed

    @property
    def takes_any_size(self) -> bool:
        return bool(getattr(self.model, "dynamic_img_size", False))

    def set_input_size(self, hw: tuple[int, int]) -> None:
        """timm's own ``VisionTransformer.set_input_size`` (position embeddings resampled bicubic, prefix
        tokens kept: the resize timm uses when it loads weights at a new size). Each side must be a multiple
        of the patch size: the patch embedding would otherwise crop (or pad) the image silently."""
        h, w = hw
        embed = self.model.patch_embed
        ph, pw = embed.patch_size
        if not getattr(embed, "dynamic_img_pad", False):
            check_patch_multiple((h, w), (ph, pw))
        if tuple(embed.img_size or ()) != (h, w):
            self.model.set_input_size(img_size=(h, w))

    @property
    def head_outputs(self) -> int:
        return self.model.num_classes

    @property
    def head_names(self) -> tuple[str, ...]:
        """timm's own record of them: the pretrained config's ``classifier`` (``head``, and ``head_dist`` for a
        distilled DeiT), which timm itself leaves out when pretrained weights load onto another class count."""
        named = (getattr(self.model, "pretrained_cfg", None) or {}).get("classifier") or "head"
        modules = dict(self.model.named_modules())
        return tuple(n for n in ((named,) if isinstance(named, str) else named) if n in modules)

    @property
    def untrained_head_of(self) -> Optional[int]:
        """timm's pretrained config's ``num_classes`` where the model's differs: timm's loader then leaves the
        weights' ``classifier`` out, as it does for a model built with another ``num_classes``."""
        cfg = getattr(self.model, "pretrained_cfg", None) or {}
        trained_for, outputs = cfg.get("num_classes"), self.model.num_classes
        return trained_for if cfg.get("classifier") and outputs and trained_for not in (None, outputs) else None

    @property
    def class_names(self) -> Optional[list[str]]:
        """timm's ``label_names`` of the pretrained config (one per output), e.g. the embedded model's."""
        names = (getattr(self.model, "pretrained_cfg", None) or {}).get("label_names")
        return list(names) if names and len(names) == self.head_outputs else None

    def data_config(self, input_size: Optional[Sequence[int]] = None) -> dict:
        return data_config(self.model, input_size)

    def _record(self, class_names: Optional[Sequence[str]]) -> None:
        """In timm's pretrained config, which timm's data config and :attr:`class_names` (``label_names``) read."""
        names = {} if class_names is None else {"label_names": list(class_names)}
        self.model.pretrained_cfg = {**(getattr(self.model, "pretrained_cfg", None) or {}),
                                     **self.recorded_preprocessing, **names}

    def adapt_state_dict(self, state: dict) -> dict:
        """timm's own filter: position embeddings resampled to this input size (higher-resolution fine-tuning)."""
        from timm.models.vision_transformer import checkpoint_filter_fn

        return checkpoint_filter_fn(state, self.model)

