"""The one interface every token-reduction method implements, and the state they share.

A method is a small ``nn.Module`` placed in a block by :mod:`evit.patch`. After the
block's attention residual and before its MLP, the block calls
``method(x, seen)`` with the tokens ``x`` (B, N, C) and what attention exposed
(:class:`evit.attention.Seen`); the method returns the (usually shorter)
sequence. Prefix tokens (class, distillation, registers) sit at the front of
``x``; ``num_prefix_tokens`` is set by the patch and methods keep them.

A method class also declares what the tools and the command line need to know of it
(its setting, default grids, whether it learns parameters or needs a class token or
sample images, its label); :func:`evit.registry.register` makes it known by name.

All methods of one model share a :class:`TokenState` (``method.state``), reset at
the start of every forward by the first reducing block: token sizes for methods
that merge (ToMe's proportional attention), and, when asked for by
:func:`evit.masks.token_sources`, which input patches each token now stands for.

This module sits below the patch mechanism (which places methods) and the methods
(which implement it), so neither has to import the other's layer.
"""
from __future__ import annotations

import numbers
import threading
from typing import Mapping, Optional

import torch
from torch import Tensor, nn

from .attention import Seen


def check_keep_rate(keep_rate: float) -> float:
    if isinstance(keep_rate, bool) or not isinstance(keep_rate, numbers.Real):  # numpy's scalars too
        raise TypeError(f"keep_rate must be a number in (0, 1], got {keep_rate!r}")
    keep_rate = float(keep_rate)
    if not 0.0 < keep_rate <= 1.0:
        raise ValueError(f"keep_rate must be in (0, 1], got {keep_rate}: it is the share of image tokens kept")
    return keep_rate


def default_locations(depth: int) -> tuple[int, ...]:
    """The paper's (3, 6, 9) for depth 12; otherwise the blocks at 1/4, 1/2 and 3/4 of the depth."""
    return tuple(sorted({int(depth * f) for f in (0.25, 0.5, 0.75)}))


#: the attribute in which a model loaded from weights (:func:`evit.models.load_checkpoint`, the embedded
#: models, training) carries the token-reduction settings their file recorded
TRAINED_WITH = "evit_trained_with"
#: recorded for the record, not re-applied: the keep rate is chosen at each evaluation
NOT_APPLIED = ("method", "keep_rate", "keep_rate_min", "locations")


def trained_settings(model: nn.Module, method: str = "evit") -> dict:
    """The settings of ``method`` (by name) that ``model``'s weights were trained with, as their file
    recorded (EViT's ``fuse`` and ``fusion``): defaults for patching it with that method; {} when the
    file recorded none, or another method."""
    recorded = getattr(model, TRAINED_WITH, None) or {}
    if recorded.get("method") != method:
        return {}
    return {k: v for k, v in recorded.items() if k not in NOT_APPLIED}


class TokenState(threading.local):
    """What the reducing blocks of one model carry from block to block within a forward.

    Each thread sees its own (a ``threading.local``): a patched model called from two threads at once runs
    each forward with its own sizes, masks and image size, as an unpatched model would. (Copies and pickles
    start empty: the state lives within one forward.)

    size: (B, N) how many input patches each token stands for; None until a merging
        method sets it (then later blocks add ``log(size)`` to the attention logits).
    keep: (B, N) which tokens are still in play when a method masks them instead of removing
        them (DynamicViT in training); later blocks attend only to those.
    sources: when ``track`` is on, (B, N, N0) 0/1 matrix of the input tokens each token
        holds, and ``stages`` collects it after every reduction (for pictures and masks).
    image_hw: (H, W) of the images of the forward running now, for a method that ``needs_image_size``
        (recorded by the model's image entry before the blocks run, so :meth:`reset` keeps it); None until then.
    """

    def __init__(self) -> None:
        self.track = False
        self.image_hw: Optional[tuple[int, int]] = None
        self.reset()

    def __reduce__(self):
        return TokenState, ()

    def reset(self) -> None:
        self.size: Optional[Tensor] = None
        self.sources: Optional[Tensor] = None
        self.stages: list[tuple[int, Tensor]] = []  # (block index, sources) after each reduction
        self.keep: Optional[Tensor] = None  # (B, N) tokens still in play, when masked instead of removed
        self.block = -1  # the block running now (set while tracking)

    def attention_bias(self) -> Optional[Tensor]:
        """``log(size)`` shaped to add to attention logits (B, 1, 1, N), or None."""
        return None if self.size is None else self.size.log()[:, None, None, :]

    def follow(self, x: Tensor, index: Tensor, fused_from: Optional[int] = None) -> None:
        """Record that tokens ``index`` (B, k) were kept, in that order, and, with ``fused_from``,
        that ``index[:, fused_from:]`` were pooled into one token appended after ``index[:, :fused_from]``."""
        if not self.track:
            return
        src = self._sources(x).gather(1, index.unsqueeze(-1).expand(-1, -1, self.sources.shape[-1]))
        if fused_from is not None:
            src = torch.cat([src[:, :fused_from], src[:, fused_from:].amax(dim=1, keepdim=True)], dim=1)
        self.record(src)

    def _sources(self, x: Tensor) -> Tensor:
        if self.sources is None:
            B, N, _ = x.shape
            self.sources = torch.eye(N, dtype=torch.uint8, device=x.device).expand(B, N, N)
        return self.sources

    def record(self, sources: Tensor) -> None:
        self.sources = sources
        self.stages.append((self.block, sources))


class TokenReduction(nn.Module):
    """Base class: subclasses set what they need from attention and implement ``forward``.

    The class attributes under "what the tools know" are read by the registry's users
    (``evit compare``, ``bench``, ``show``, ``eval``, ``train``): declaring them here is all a
    new method does beyond its own ``forward``.
    """

    # ---- what the patch mechanism asks of attention ----------------------------------------
    #: ask :func:`evit.attention.attend` for the class token's attention row
    needs_cls_attn: bool = False
    #: and with its prefix tokens' entries at +inf, so that a ranking by it puts them first (EViT, which keeps them)
    ranks_prefix_first: bool = False
    #: ask for the keys (mean over heads)
    needs_keys: bool = False
    #: this method merges tokens and tracks their sizes: every later block uses proportional attention
    tracks_size: bool = False
    #: in training this method may mask tokens instead of removing them: every later block must see the mask
    masks_in_training: bool = False
    #: reads the height and width of each input (``state.image_hw``): the patch makes the model's image entry
    #: record them (a model that takes any input size may be run at a shape whose token grid is not its own)
    needs_image_size: bool = False
    #: its tokens stand for groups of patches (ToMe's merges, STViT's windows): pictures colour the groups
    groups_patches: bool = False
    #: chooses its tokens from sample images (Patch Slimming): :meth:`prepare` must run after patching
    needs_images: bool = False
    #: chooses by, or keeps, the class token, so the model must classify from it (global_pool='token');
    #: False: it also serves models that average their image tokens (global_pool='avg')
    needs_class_token: bool = True

    # ---- what the tools know (see evit.registry) ----------------------------------------------
    #: the name :func:`evit.patch` and the command line know it by ('' until registered)
    name: str = ""
    #: how tables, plots and pictures call it (default: the class name)
    label: str = ""
    #: the one number a user sets: 'keep_rate' (share of image tokens kept) or 'r' (tokens merged per block)
    setting: str = "keep_rate"
    #: ``evit compare``'s settings when none are given
    compare_grid: tuple = (0.9, 0.8, 0.7, 0.6, 0.5)
    #: ``evit bench``'s settings when none are given
    bench_grid: tuple = (1.0, 0.7, 0.5)
    #: compare keeps ``compare_grid`` even when settings are given (they would not suit it)
    own_grid: bool = False
    #: has trained parameters: evaluated and compared only on weights trained with it
    learned: bool = False
    #: ``evit export`` offers it (its ONNX export is tested)
    exports: bool = False
    #: offered by the command line (False: internal, such as the benchmark's slicing)
    listed: bool = True

    def __init__(self) -> None:
        super().__init__()
        self.num_prefix_tokens = 1
        self.state = TokenState()  # replaced by the model's shared state when patched
        self.first = True  # the model's first reducing block resets the state
        self.block = -1  # its block index, set by the patch

    @classmethod
    def create(cls, block: int, keep_rate: float = 0.7, fuse: bool = True, **settings) -> "TokenReduction":
        """The method for block ``block`` of a patch (see :func:`evit.patch`)."""
        return cls(keep_rate, fuse, **settings)

    def bind(self, model: nn.Module) -> None:
        """Called by the patch with the model, before the first forward: build what depends on it."""

    @classmethod
    def prepare(cls, model: nn.Module, images: Optional[torch.Tensor], saved: Optional[Mapping[int, dict]] = None) -> None:
        """After patching, for methods with ``needs_images``: choose what depends on sample images, or keep what
        the model's weights file ``saved`` (by block) where it fits the patch; refuse (ValueError) a saved state
        that does not fit when there are no ``images`` to choose from."""

    @classmethod
    def describe_saved(cls, saved: Mapping[int, dict]) -> str:
        """What a state saved with a model's weights (by block) was made for and where it is used, in words."""
        return f"made at blocks {', '.join(map(str, saved))}: it is used where it fits"

    def aux_loss(self) -> Optional[Tensor]:
        """A loss term of the last forward that training adds to the task loss (None: nothing)."""
        return None

    @classmethod
    def default_locations(cls, depth: int) -> tuple[int, ...]:
        return default_locations(depth)

    def output_tokens(self, n_tokens: int) -> int:
        """Sequence length after this reduction for an input of ``n_tokens`` (prefix included)."""
        raise NotImplementedError

    def is_identity(self, n_tokens: int) -> bool:
        """True when this reduction leaves ``n_tokens`` tokens untouched (the block then runs its host's own forward)."""
        return self.output_tokens(n_tokens) == n_tokens

    def forward(self, x: Tensor, seen: Seen) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class Keep(TokenReduction):
    """Keeps every token: the patch places it in blocks after a merging or masking method, which must
    still see its token sizes or mask."""

    needs_class_token = False
    listed = False

    def output_tokens(self, n_tokens: int) -> int:
        return n_tokens

    def forward(self, x: Tensor, seen: Seen) -> Tensor:
        return x
