"""The one patch mechanism: timm ViT blocks that reduce tokens between attention and MLP.

Each chosen block keeps its identity and its own submodules (norm1, attn, ls1,
drop_path1, norm2, mlp, ls2, drop_path2); only its class is swapped for a
subclass whose ``forward`` calls :func:`evit.attention.attend`, hands the result to
the block's reduction method (stored as ``block.reduction``), and runs the MLP on
the shorter sequence. Parameter names are unchanged, so checkpoints load either
way. When a method leaves a block's tokens untouched (keep rate 1.0), the block
runs timm's own forward: the machinery costs nothing then.

Everything evit knows about timm's model classes lives here and in
:mod:`evit.attention`.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .attention import attend
from .methods import METHODS
from .methods.base import TokenReduction, TokenState
from .methods.evit import EViT
from .methods.slice import Keep


def _timm_classes():
    from timm.layers import Attention
    from timm.models.vision_transformer import Block, VisionTransformer

    return VisionTransformer, Block, Attention


def _reduce_patched(self, protocol: int):
    """Pickling for modules whose class :func:`_subclass` made at patch time: such a class cannot be
    imported by name, so the module pickles as (mixin, timm class) and the class is made again on loading
    (``torch.save(model)``, ``pickle``, ``copy.deepcopy``)."""
    cls = type(self)
    reduced = object.__reduce_ex__(self, protocol)
    if _SUBCLASSES.get(cls.__bases__) is not cls:  # a class of the user's own, importable as it is
        return reduced
    return (_patched_instance, cls.__bases__, *reduced[2:])


def _patched_instance(mixin: type, base: type) -> nn.Module:
    """An empty instance of ``base`` patched with ``mixin``; unpickling then restores its state."""
    cls = _subclass(mixin, base)
    return cls.__new__(cls)


class ReducingBlock(nn.Module):
    """Mixin placed in front of a timm ``Block`` class by :func:`apply`."""

    reduction: TokenReduction
    __reduce_ex__ = _reduce_patched

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        method = self.reduction
        if attn_mask is not None or is_causal:
            raise ValueError(
                "evit: attention masks and causal attention are not supported in a token-reducing block "
                "(the mask would not follow the shortened sequence); call the model without attn_mask"
            )
        state = method.state
        if method.first:  # a new forward begins
            state.reset()
        bias = state.attention_bias()  # log token sizes, once a merging method ran
        if bias is None and state.keep is None and not state.track and method.is_identity(x.shape[1]):
            return super().forward(x)
        out, seen = attend(self.attn, self.norm1(x), cls_attn=method.needs_cls_attn, keys=method.needs_keys,
                           bias=bias, keep=state.keep)
        x = x + self.drop_path1(self.ls1(out))
        state.block = method.block
        x = method(x, seen)
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class SizeWeightedNorm(nn.Module):
    """Mixin placed in front of the class of ``model.norm`` when merged tokens feed ``global_pool='avg'``.

    The average pool follows ``model.norm``, the last step of timm's ``forward_features``. Scaling
    each image token there by ``size * M / sum(size)`` (M image tokens) turns the pool's plain mean
    into the size-weighted one: the mean over the input patches, as before merging. (So
    ``forward_features`` returns those scaled tokens.)
    """

    token_state: TokenState
    num_prefix_tokens: int
    __reduce_ex__ = _reduce_patched

    def forward(self, x: Tensor) -> Tensor:
        x = super().forward(x)
        if self.token_state.size is None:  # nothing merged in this forward
            return x
        p = self.num_prefix_tokens
        size = self.token_state.size[:, p:].to(x.dtype)
        weights = size * (size.shape[1] / size.sum(dim=1, keepdim=True))
        return torch.cat([x[:, :p], x[:, p:] * weights.unsqueeze(-1)], dim=1)


_SUBCLASSES: dict[tuple[type, type], type] = {}


def _subclass(mixin: type, cls: type) -> type:
    """``cls`` with ``mixin`` in front; ``_evit_base`` names ``cls`` for :func:`unpatch`."""
    if (mixin, cls) not in _SUBCLASSES:
        prefix = "Reducing" if mixin is ReducingBlock else "SizeWeighted"
        _SUBCLASSES[mixin, cls] = type(f"{prefix}{cls.__name__}", (mixin, cls), {"_evit_base": cls})
    return _SUBCLASSES[mixin, cls]


def unwrapped(model: nn.Module) -> nn.Module:
    """The model inside ``DataParallel`` / ``DistributedDataParallel`` wrappers (``.module``), else ``model``:
    the patch works on the timm model, whatever runs it."""
    while isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    return model


def _name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or type(model).__name__


def check_model(model: nn.Module, method: Union[str, type, TokenReduction, None] = None) -> None:
    """Raise TypeError/ValueError naming the reason when evit cannot serve ``model`` with ``method``.

    ``method`` (default EViT) matters for the pooling: a method that ranks or keeps tokens by the
    class token needs a model that classifies from it; ToMe and Random drop also serve models that
    average their image tokens (``global_pool='avg'``).
    """
    VisionTransformer, Block, Attention = _timm_classes()
    model = unwrapped(model)
    name = _name(model)
    if not isinstance(model, nn.Module):
        raise TypeError(f"evit.patch expects a timm VisionTransformer, got {type(model).__name__}")
    if not isinstance(model, VisionTransformer):
        raise TypeError(
            f"evit cannot patch {name} ({type(model).__name__}): only timm VisionTransformer models "
            "(ViT, DeiT, DeiT III, DINOv2, CLIP ViT) are supported, not Swin, EVA, ConvNeXt or other families"
        )
    if getattr(model, "attn_pool", None) is not None:
        raise ValueError(
            f"evit cannot patch {name}: it classifies from global_pool={model.global_pool!r}, an attention-pooling "
            "head, which no evit method serves (its attention would need the merged tokens' sizes)"
        )
    pooling = getattr(model, "global_pool", None)
    has_cls = getattr(model, "cls_token", None) is not None
    cls = type(method) if isinstance(method, TokenReduction) else _method_class(EViT if method is None else method)
    if not (pooling == "token" and has_cls) and not (pooling == "avg" and not cls.needs_class_token):
        by = " (it ranks tokens by the class token's attention)" if cls.needs_cls_attn else ""
        raise ValueError(
            f"evit cannot patch {name} with {cls.__name__}: it classifies from global_pool={pooling!r}"
            f"{'' if has_cls else ' without a class token'}; {cls.__name__} needs global_pool='token' with a "
            f"class token{by}. Methods that need no class token also serve average-pooled "
            f"models: {', '.join(sorted(k for k, m in METHODS.items() if not m.needs_class_token and k != 'slice'))}"
        )
    for i, block in enumerate(model.blocks):
        base = getattr(type(block), "_evit_base", type(block))
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


def default_locations(depth: int) -> tuple[int, ...]:
    """The paper's (3, 6, 9) for depth 12; otherwise the blocks at 1/4, 1/2 and 3/4 of the depth."""
    return tuple(sorted({int(depth * f) for f in (0.25, 0.5, 0.75)}))


def check_locations(locations: Optional[Iterable[int]], depth: int, name: str = "model") -> tuple[int, ...]:
    if locations is None:
        return default_locations(depth)
    import operator

    try:
        if isinstance(locations, (str, bytes)) or any(isinstance(i, bool) for i in locations):
            raise TypeError
        locs = tuple(sorted({operator.index(i) for i in locations}))  # ints only: 3.5, '3' and True are refused
    except TypeError:
        raise TypeError(f"locations must be block indices (ints), got {locations!r}") from None
    bad = [i for i in locs if not 0 <= i < depth]
    if bad or not locs:
        raise ValueError(
            f"locations {list(locations)} are not valid for {name} with {depth} blocks: "
            f"give 0-based block indices in 0..{depth - 1}"
        )
    return locs


def unpatch(model: nn.Module) -> nn.Module:
    """Restore every patched block of ``model`` to its timm class (in place)."""
    wrapper, model = model, unwrapped(model)
    for block in getattr(model, "blocks", []):
        base = getattr(type(block), "_evit_base", None)
        if base is not None:
            block.__class__ = base
            del block.reduction
    norm = getattr(model, "norm", None)
    if isinstance(norm, SizeWeightedNorm):
        norm.__class__ = type(norm)._evit_base
        del norm.token_state, norm.num_prefix_tokens
    return wrapper


def apply(model: nn.Module, methods: Mapping[int, TokenReduction]) -> nn.Module:
    """Place ``methods[i]`` in block ``i`` of ``model`` (in place); earlier patches are removed first."""
    wrapper, model = model, unwrapped(model)
    for i, method in methods.items():
        if not isinstance(method, TokenReduction):
            raise TypeError(f"methods[{i}] must be an evit TokenReduction, got {type(method).__name__}")
    check_model(model, next((m for m in methods.values() if m.needs_class_token), next(iter(methods.values()), None)))
    check_locations(methods.keys(), len(model.blocks), _name(model))
    unpatch(model)
    methods = dict(sorted(methods.items()))
    carrying = [i for i, m in methods.items() if m.tracks_size or m.masks_in_training]
    if carrying:  # blocks after a merge or a training mask must see token sizes / the mask
        methods = {i: methods[i] if i in methods else Keep() for i in range(min(methods), len(model.blocks))
                   if i in methods or i > carrying[0]}
    state = TokenState()  # shared by this model's methods, reset by the first at each forward
    for j, (i, method) in enumerate(methods.items()):
        method.num_prefix_tokens = model.num_prefix_tokens
        method.state, method.first, method.block = state, j == 0, i
        method.bind(model)
        block = model.blocks[i]
        block.__class__ = _subclass(ReducingBlock, type(block))
        block.reduction = method
    if model.global_pool == "avg" and any(m.tracks_size for m in methods.values()):
        model.norm.__class__ = _subclass(SizeWeightedNorm, type(model.norm))
        model.norm.token_state, model.norm.num_prefix_tokens = state, model.num_prefix_tokens
    return wrapper


def patch(
    model: nn.Module,
    keep_rate: float = 0.7,
    locations: Optional[Sequence[int]] = None,
    fuse: bool = True,
    method: Union[str, type] = EViT,
    images: Optional[Tensor] = None,
    **settings,
) -> nn.Module:
    """Make ``model`` (a timm ViT with a class token) an EViT model, in place, and return it.

    In each block of ``locations`` (default: the paper's 3, 6, 9 for depth 12), after attention
    and before the MLP, the ``ceil(keep_rate * n)`` image tokens the class token attends to most
    are kept, and with ``fuse`` the rest are fused into one token. Prefix tokens are always kept.
    Patching again replaces the earlier patch. EViT's ``fusion`` setting: ``"sum"`` (default; the
    authors' attention-weighted sum, what their released weights were trained with) or ``"mean"``
    (renormalised to a weighted average); see :mod:`evit.methods.evit`.

    ``method`` picks another token-reduction method, by class or name (``evit.methods.METHODS``:
    'evit', 'topk', 'random', 'tome', 'dynamicvit', 'stvit', 'patchslimming', 'slice'); ``settings``
    go to it (ToMe: ``r``; Random: ``seed``), and ``locations`` default to the method's own (ToMe:
    every block; STViT: one). ``images``: sample images for a method that chooses its tokens from
    data (Patch Slimming; without them, call ``evit.methods.patch_slimming.select`` before the first
    forward).
    """
    cls = _method_class(method)
    wrapper, model = model, unwrapped(model)
    check_model(model, cls)
    depth = len(model.blocks)
    locs = check_locations(locations, depth, _name(model)) if locations is not None else cls.default_locations(depth)
    try:
        methods = {i: cls.create(i, keep_rate=keep_rate, fuse=fuse, **settings) for i in locs}
    except TypeError as e:
        raise TypeError(f"{cls.__name__} settings {sorted(settings)} not understood: {e}") from None
    apply(model, methods)
    if cls.needs_images and images is not None:
        cls.prepare(model, images)
    return wrapper


def _method_class(method: Union[str, type]) -> type:
    if isinstance(method, str):
        if method.lower() not in METHODS:
            raise ValueError(f"unknown token-reduction method {method!r}; choose one of {sorted(METHODS)}")
        return METHODS[method.lower()]
    if not (isinstance(method, type) and issubclass(method, TokenReduction)):
        raise TypeError(f"method must be a TokenReduction class or one of {sorted(METHODS)}, got {method!r}")
    return method


def reductions(model: nn.Module) -> dict[int, TokenReduction]:
    """The reduction method of each patched block, by block index."""
    blocks = getattr(unwrapped(model), "blocks", [])
    return {i: b.reduction for i, b in enumerate(blocks) if isinstance(b, ReducingBlock)}


def set_keep_rate(model: nn.Module, keep_rate: float) -> None:
    """Change the keep rate of every patched block (for warm-up schedules and sweeps)."""
    from .methods.base import check_keep_rate

    keep_rate = check_keep_rate(keep_rate)
    found = [m for m in reductions(model).values() if hasattr(m, "keep_rate")]
    if not found:
        raise ValueError("set_keep_rate: the model has no keep-rate reduction; call evit.patch(model, ...) first")
    for m in found:
        m.keep_rate = keep_rate


def token_counts(model: nn.Module, n_tokens: int) -> list[int]:
    """Sequence lengths through the model: the input length, then the length after each patched block."""
    counts = [n_tokens]
    for i, m in sorted(reductions(model).items()):
        counts.append(m.output_tokens(counts[-1]))
    return counts
