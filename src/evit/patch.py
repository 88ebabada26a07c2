"""The one patch mechanism: blocks of any served host that reduce tokens between attention and MLP.

Each chosen block keeps its identity and its own submodules (timm's norm1, attn, ls1, ...;
transformers' layernorm_before, attention, ...); only its class is swapped for a subclass
whose ``forward`` runs the block's parts through its host's
:class:`~evit.hosts.base.BlockView`, calls :func:`evit.attention.attend` (the host's own
attention weights, its fused kernel kept), hands the result to the block's reduction method
(stored as ``block.reduction``), and runs the MLP on the shorter sequence. Parameter names
are unchanged, so checkpoints load either way. When a method leaves a block's tokens
untouched (keep rate 1.0), the block runs its host's own forward: the machinery costs
nothing then.

What evit knows of each model library lives in :mod:`evit.hosts`; this module knows none.
"""
from __future__ import annotations

import operator
from typing import Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from . import hosts
from .attention import attend
from .reduction import Keep, TokenReduction, TokenState, check_keep_rate, default_locations, trained_settings
from .registry import method_class, names


def _reduce_patched(self, protocol: int):
    """Pickling for modules whose class :func:`_subclass` made at patch time: such a class cannot be
    imported by name, so the module pickles as (mixin, host class) and the class is made again on loading
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
    """Mixin placed in front of a host's block class by :func:`apply`; the subclass's ``_evit_view``
    is the host's :class:`~evit.hosts.base.BlockView` class for the block."""

    reduction: TokenReduction
    _evit_view: type

    def forward(self, *args, **kwargs):
        view = self._evit_view(self)
        x, args, kwargs = view.arguments(args, kwargs)  # refuses masks and the like: they would not follow
        method = self.reduction
        state = method.state
        if method.first:  # a new forward begins
            state.reset()
        bias = state.attention_bias()  # log token sizes, once a merging method ran
        if bias is None and state.keep is None and not state.track and method.is_identity(x.shape[1]):
            return super().forward(*args, **kwargs)
        out, seen = attend(view.attention, view.attention_norm(x), cls_attn=method.needs_cls_attn, keys=method.needs_keys,
                           bias=bias, keep=state.keep,
                           prefix_first=method.num_prefix_tokens if method.ranks_prefix_first else 0)
        x = view.attention_residual(x, out)
        state.block = method.block
        x = method(x, seen)
        return view.output(view.mlp_residual(x), args, kwargs)


class SizeWeightedNorm(nn.Module):
    """Mixin placed in front of the class of the model's final norm when merged tokens feed an average
    pool (timm's ``global_pool='avg'``; transformers' DINOv2 classifier, which reads the mean too).

    The average pool follows that norm (timm's ``model.norm``, the last step of its ``forward_features``). Scaling
    each image token there by ``size * M / sum(size)`` (M image tokens) turns the pool's plain mean
    into the size-weighted one: the mean over the input patches, as before merging. (So
    ``forward_features`` returns those scaled tokens.)
    """

    token_state: TokenState
    num_prefix_tokens: int

    def forward(self, x: Tensor) -> Tensor:
        x = super().forward(x)
        if self.token_state.size is None:  # nothing merged in this forward
            return x
        p = self.num_prefix_tokens
        size = self.token_state.size[:, p:].to(x.dtype)
        weights = size * (size.shape[1] / size.sum(dim=1, keepdim=True))
        return torch.cat([x[:, :p], x[:, p:] * weights.unsqueeze(-1)], dim=1)


class ImageSizeWatch(nn.Module):
    """Mixin placed in front of the class of the model's image entry (its host's
    :attr:`~evit.hosts.base.Host.image_entry`, called with the images first) when a method reads each input's size
    (:attr:`~evit.reduction.TokenReduction.needs_image_size`): it records their height and width in the shared
    state before the blocks run. Only such a patch has it: other methods pay nothing for it."""

    token_state: TokenState

    def forward(self, images: Tensor, *args, **kwargs):
        self.token_state.image_hw = (images.shape[-2], images.shape[-1])
        return super().forward(images, *args, **kwargs)


_SUBCLASSES: dict[tuple[type, type], type] = {}


def _subclass(mixin: type, cls: type) -> type:
    """``cls`` with ``mixin`` in front; ``_evit_base`` names ``cls`` for :func:`unpatch`, and a reducing block's
    ``_evit_view`` is its host's view class. (A host's follower mixin, :attr:`~evit.hosts.base.Host.follower_mixin`,
    is named after itself.)"""
    if (mixin, cls) not in _SUBCLASSES:
        prefix = {ReducingBlock: "Reducing", SizeWeightedNorm: "SizeWeighted", ImageSizeWatch: "SizeWatching"}.get(
            mixin, mixin.__name__)
        view = {"_evit_view": hosts.view_class(cls)} if mixin is ReducingBlock else {}
        _SUBCLASSES[mixin, cls] = type(f"{prefix}{cls.__name__}", (mixin, cls),
                                       {"_evit_base": cls, "__reduce_ex__": _reduce_patched, **view})
    return _SUBCLASSES[mixin, cls]


def check_model(model: nn.Module, method: Union[str, type, TokenReduction, None] = None) -> hosts.Host:
    """Raise TypeError/ValueError naming the reason when evit cannot serve ``model`` with ``method``;
    return the model's host adapter.

    ``method`` (default EViT) matters for the pooling: a method that ranks or keeps tokens by the
    class token needs a model that classifies from it; ToMe and Random drop also serve models that
    average their image tokens (``global_pool='avg'``).
    """
    host = hosts.adapter(model)
    host.check()
    pooling, has_cls = host.pooling, host.has_class_token
    cls = type(method) if isinstance(method, TokenReduction) else method_class("evit" if method is None else method)
    # 'token': a head on the class token; 'token+avg': on it and the image tokens' mean; 'avg': on the mean
    # only; 'sequence': the model returns its tokens (a backbone without pooling)
    served = (pooling in ("token", "token+avg", "sequence") and has_cls) or \
        (pooling in ("avg", "sequence") and not cls.needs_class_token)
    if not served and not cls.needs_class_token:  # a pooling no method serves (timm's global_pool='': every token)
        raise ValueError(f"evit cannot patch {host.name} with {cls.__name__}: it classifies from {host.pooling_text}; "
                         f"{cls.__name__} serves models that classify from the class token or the image tokens' mean")
    if not served:
        by = " (it ranks tokens by the class token's attention)" if cls.needs_cls_attn else ""
        raise ValueError(
            f"evit cannot patch {host.name} with {cls.__name__}: it classifies from {host.pooling_text}"
            f"{'' if has_cls else ' without a class token'}; {cls.__name__} needs {host.class_token_text}{by}. "
            f"Methods that need no class token also serve average-pooled "
            f"models: {', '.join(sorted(k for k in names() if not method_class(k).needs_class_token))}"
        )
    return host


def check_locations(locations: Optional[Iterable[int]], depth: int, name: str = "model") -> tuple[int, ...]:
    if locations is None:
        return default_locations(depth)
    try:
        if isinstance(locations, (str, bytes)):
            raise TypeError
        locations = list(locations)  # an iterator or generator is read once
        if any(isinstance(i, bool) for i in locations):
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
    """Restore every patched block of ``model`` to its host's class (in place)."""
    wrapper, host = model, hosts.find(model)
    if host is None:
        return model
    for block in host.blocks:
        base = getattr(type(block), "_evit_base", None)
        if base is not None:
            if isinstance(block, ReducingBlock):
                del block.reduction
            block.__class__ = base
    norm = host.final_norm
    if isinstance(norm, SizeWeightedNorm):
        norm.__class__ = type(norm)._evit_base
        del norm.token_state, norm.num_prefix_tokens
    entry = host.image_entry
    if isinstance(entry, ImageSizeWatch):
        entry.__class__ = type(entry)._evit_base
        del entry.token_state
    return wrapper


def apply(model: nn.Module, methods: Mapping[int, TokenReduction]) -> nn.Module:
    """Place ``methods[i]`` in block ``i`` of ``model`` (in place); earlier patches are removed first."""
    wrapper, model = model, hosts.unwrapped(model)
    for i, method in methods.items():
        if not isinstance(method, TokenReduction):
            raise TypeError(f"methods[{i}] must be an evit TokenReduction, got {type(method).__name__}")
    host = check_model(model, next((m for m in methods.values() if m.needs_class_token),
                                   next(iter(methods.values()), None)))
    blocks = host.blocks
    check_locations(methods.keys(), len(blocks), host.name)
    methods = dict(sorted(methods.items()))
    _check_carried(methods)
    unpatch(model)
    carrying = [i for i, m in methods.items() if m.tracks_size or m.masks_in_training]
    if carrying:  # blocks after a merge or a training mask must see token sizes / the mask
        methods = {i: methods[i] if i in methods else Keep() for i in range(min(methods), len(blocks))
                   if i in methods or i > carrying[0]}
    state = TokenState()  # shared by this model's methods, reset by the first at each forward
    for j, (i, method) in enumerate(methods.items()):
        method.num_prefix_tokens = host.num_prefix_tokens
        method.state, method.first, method.block = state, j == 0, i
        method.bind(model)
        block = blocks[i]
        method.train(block.training)  # a model patched in eval mode runs its methods' eval path (DynamicViT's)
        block.__class__ = _subclass(ReducingBlock, type(block))
        block.reduction = method
    if host.follower_mixin is not None:  # the blocks after the first reduction that keep their own forward
        for block in blocks[min(methods) + 1:]:
            if not isinstance(block, ReducingBlock):
                block.__class__ = _subclass(host.follower_mixin, type(block))
    norm = host.final_norm
    if host.pooling in ("avg", "token+avg") and norm is not None and any(m.tracks_size for m in methods.values()):
        norm.__class__ = _subclass(SizeWeightedNorm, type(norm))
        norm.token_state, norm.num_prefix_tokens = state, host.num_prefix_tokens
    if any(m.needs_image_size for m in methods.values()):
        entry = host.image_entry
        entry.__class__ = _subclass(ImageSizeWatch, type(entry))
        entry.token_state = state
    return wrapper


def _check_carried(methods: Mapping[int, TokenReduction]) -> None:
    """Refuse a method after a merging one (token sizes) or a masking one (a training mask) that would not carry
    them: its output would no longer match the sizes or the mask the later blocks read."""
    first: dict[str, tuple[int, TokenReduction]] = {}
    for i, method in methods.items():
        for carried in ("tracks_size", "masks_in_training"):
            if carried in first and not getattr(method, carried) and not isinstance(method, Keep):
                j, earlier = first[carried]
                what = "token sizes" if carried == "tracks_size" else \
                    "training mask (in training it masks tokens instead of dropping them)"
                raise ValueError(f"evit cannot place {type(method).__name__} in block {i} after {type(earlier).__name__} "
                                 f"in block {j}: it does not carry the {what} {type(earlier).__name__} starts; "
                                 f"patch one method, or put {type(method).__name__} before it")
            if getattr(method, carried):
                first.setdefault(carried, (i, method))


def patch(
    model: nn.Module,
    keep_rate: Optional[float] = None,
    locations: Optional[Sequence[int]] = None,
    fuse: Optional[bool] = None,
    method: Union[str, type] = "evit",
    images: Optional[Tensor] = None,
    **settings,
) -> nn.Module:
    """Make ``model`` (a timm or transformers ViT with a class token) an EViT model, in place, and return it.

    In each block of ``locations`` (default: the paper's 3, 6, 9 for depth 12), after attention
    and before the MLP, the ``ceil(keep_rate * n)`` image tokens the class token attends to most
    are kept (``keep_rate`` default 0.7), and with ``fuse`` the rest are fused into one token. Prefix
    tokens are always kept.
    Patching again replaces the earlier patch. EViT's ``fusion`` setting: ``"sum"`` (the authors'
    attention-weighted sum, what their released weights were trained with) or ``"mean"``
    (renormalised to a weighted average); see :mod:`evit.methods.evit`.

    Settings not given (``fuse``, ``fusion``) default to those the model's weights recorded for this
    method, when it was loaded by evit from weights that record them (evit's own checkpoints, the
    embedded models), so such a model runs the way it was trained; otherwise ``fuse=True``,
    ``fusion="sum"``.

    ``method`` picks another token-reduction method, by class or registered name (:mod:`evit.registry`:
    'evit', 'topk', 'random', 'tome', 'dynamicvit', 'stvit', 'patchslimming', 'slice'); ``settings``
    go to it (ToMe: ``r``; Random: ``seed``), and ``locations`` default to the method's own (ToMe:
    every block; STViT: one). ``images``: sample images for a method that chooses its tokens from
    data (Patch Slimming; without them, call ``evit.methods.patch_slimming.select`` before the first
    forward; a choice the model's file saved, :func:`keep_saved_state`, is kept where it was made for the same
    blocks, token count, patch grid and kept counts; elsewhere it is chosen afresh from ``images``, or refused
    without them).
    """
    cls = method_class(method)
    if cls.setting == "keep_rate":
        keep_rate = check_keep_rate(0.7 if keep_rate is None else keep_rate)  # its own message, not one about settings
    elif keep_rate is not None and keep_rate != 1.0:  # 1.0 (no keep-rate reduction) is what callers give every method
        raise ValueError(f"{cls.__name__} is set by {cls.setting}, not by a keep rate (got keep_rate={keep_rate!r}): "
                         f"give {cls.setting}=..., or leave keep_rate out")
    if fuse is not None and not isinstance(fuse, (bool, np.bool_)):  # not 1 or 0, which `1 == True` would let in
        raise TypeError(f"fuse must be True or False, got {fuse!r}")
    fuse = None if fuse is None else bool(fuse)
    wrapper, model = model, hosts.unwrapped(model)
    host = check_model(model, cls)
    depth = len(host.blocks)
    locs = check_locations(locations, depth, host.name) if locations is not None else cls.default_locations(depth)
    settings = {**trained_settings(wrapper, cls.name), **trained_settings(model, cls.name), **settings}
    recorded_fuse = settings.pop("fuse", True)  # fuse is an argument of its own: the call's wins
    fuse = recorded_fuse if fuse is None else fuse
    try:
        methods = {i: cls.create(i, keep_rate=1.0 if keep_rate is None else keep_rate, fuse=fuse, **settings) for i in locs}
    except TypeError as e:
        raise TypeError(f"{cls.__name__} settings {sorted(settings)} not understood: {e}") from None
    apply(model, methods)
    saved_name, saved = getattr(model, SAVED_STATE, (None, {}))
    saved = saved if saved_name == cls.name else {}  # what its file saved (Patch Slimming's choice): kept if it fits
    if cls.needs_images and (images is not None or saved):
        try:
            cls.prepare(model, images, saved)
        except ValueError:
            unpatch(model)  # refused: not left patched with no choice
            raise
    return wrapper


#: the attribute in which a model carries what its patched methods loaded with its weights (see :func:`keep_saved_state`)
SAVED_STATE = "evit_saved_reduction"


def keep_saved_state(model: nn.Module) -> nn.Module:
    """Record on ``model`` the state its patched methods loaded with its weights (Patch Slimming's choice of
    tokens and what it was made for, buffers), by block, then unpatch it: patching it again with that method hands
    that state to the method (:func:`patch`), which keeps it for a patch like the one it was made for."""
    found = reductions(model)
    names = {m.name for m in found.values()}
    states = {i: {k: v.detach().clone() for k, v in m.state_dict().items()} for i, m in found.items()}
    states = {i: s for i, s in states.items() if any(v.numel() for v in s.values())}
    unpatch(model)
    if len(names) == 1 and states:
        setattr(hosts.unwrapped(model), SAVED_STATE, (names.pop(), states))
    return model


def reductions(model: nn.Module) -> dict[int, TokenReduction]:
    """The reduction method of each patched block, by block index."""
    host = hosts.find(model)
    return {} if host is None else {i: b.reduction for i, b in enumerate(host.blocks) if isinstance(b, ReducingBlock)}


def set_keep_rate(model: nn.Module, keep_rate: float) -> None:
    """Change the keep rate of every patched block (for warm-up schedules and sweeps)."""
    keep_rate = check_keep_rate(keep_rate)
    placed = reductions(model).values()
    found = [m for m in placed if hasattr(m, "keep_rate")]
    if not found:
        other = next((m for m in placed if type(m) is not Keep), None)
        if other is None:
            raise ValueError("set_keep_rate: the model has no keep-rate reduction; call evit.patch(model, ...) first")
        raise ValueError(f"set_keep_rate: the model is patched with {type(other).__name__}, which is set by "
                         f"{other.setting}, not a keep rate: patch it again, evit.patch(model, method={other.name!r}, "
                         f"{other.setting}=...)")
    for m in found:
        m.keep_rate = keep_rate


def token_counts(model: nn.Module, n_tokens: int) -> list[int]:
    """Sequence lengths through the model: the input length, then the length after each patched block."""
    if isinstance(n_tokens, bool):
        raise TypeError(f"n_tokens must be a whole number of tokens, got {n_tokens!r}")
    try:
        n_tokens = operator.index(n_tokens)  # 2.5 tokens would give counts of no sequence
    except TypeError:
        raise TypeError(f"n_tokens must be a whole number of tokens, got {n_tokens!r}") from None
    if n_tokens < 1:
        raise ValueError(f"n_tokens must be at least 1, got {n_tokens}")
    counts = [n_tokens]
    for i, m in sorted(reductions(model).items()):
        counts.append(m.output_tokens(counts[-1]))
    return counts
