"""What evit needs of a model library, as three small views a host file fills in.

* :class:`AttentionView`: one attention module's projections (queries, keys, values, split
  into heads and normalised as the module does), its scale, whether it runs the fused
  kernel, its dropout, and its output projection. :mod:`evit.attention` does the maths.
* :class:`BlockView`: one block's parts in the order its forward uses them (norm, attention,
  residual with LayerScale and drop-path, MLP residual) and its call convention (which
  arguments carry the tokens, which cannot follow a shortened sequence, what it returns).
  The patch swaps the block's class for a subclass that runs these parts with a reduction
  between attention and MLP; the block keeps its own modules, so parameter names do not change.
* :class:`Host`: the model as a whole: its blocks, prefix tokens (class, distillation,
  registers), embedding width, input size and patch grid, pooling, refusals.

Nothing here or in a host file knows a token-reduction method.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn


def base_class(module: nn.Module) -> type:
    """The class ``module`` had before evit's patch swapped it for a subclass (which names it ``_evit_base``)."""
    return getattr(type(module), "_evit_base", type(module))


class AttentionView:
    """One attention module, as :func:`evit.attention.attend` uses it."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    num_heads: int
    head_dim: int
    scale: float  # multiplies the query-key products
    sdpa_scale: Optional[float] = None  # the scale given to the fused kernel (None: its default)

    @property
    def fused(self) -> bool:
        """True when the module runs ``F.scaled_dot_product_attention`` (then so does evit)."""
        raise NotImplementedError

    @property
    def dropout_p(self) -> float:
        """Dropout on the attention probabilities now (0 outside training)."""
        raise NotImplementedError

    def dropout(self, probs: Tensor) -> Tensor:
        return torch.nn.functional.dropout(probs, self.dropout_p, self.module.training)

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Queries, keys and values of ``x`` (B, N, C), each (B, heads, N, head_dim), normalised as the module does."""
        return self.queries(x), *self.keys_values(x)

    def queries(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def keys_values(self, x: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def finish(self, out: Tensor, x: Tensor) -> Tensor:
        """The module's output for attention result ``out`` (B, N, heads * head_dim) of queries from ``x``."""
        raise NotImplementedError

    @staticmethod
    def heads(t: Tensor, num_heads: int) -> Tensor:
        """(B, N, heads * d) -> (B, heads, N, d)."""
        B, N, C = t.shape
        return t.view(B, N, num_heads, C // num_heads).transpose(1, 2)  # explicit: B may be 0


class BlockView:
    """One transformer block, as the patch mechanism and the methods use it.

    A block computes ``x = attention_residual(x, attention(attention_norm(x)))`` then ``mlp_residual(x)``; a reducing
    block runs a method between the two.
    """

    def __init__(self, block: nn.Module) -> None:
        self.block = block

    def arguments(self, args: tuple, kwargs: dict) -> tuple[Tensor, tuple, dict]:
        """The token tensor of a call of the block, and the call's arguments as the block's own forward
        may take them on a sequence of any length; raises ValueError for arguments that cannot follow a
        shortened sequence (attention masks, ...)."""
        raise NotImplementedError

    def tokens(self, args: tuple, kwargs: dict) -> Tensor:
        return self.arguments(args, kwargs)[0]

    def output(self, x: Tensor, args: tuple, kwargs: dict) -> Any:
        """What the block's own forward returns for output tokens ``x``."""
        return x

    @property
    def attention(self) -> AttentionView:
        raise NotImplementedError

    def attention_norm(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def attention_scale(self, out: Tensor) -> Tensor:
        """The attention branch's LayerScale (identity when the block has none), without drop-path."""
        return out

    def attention_residual(self, x: Tensor, out: Tensor) -> Tensor:
        """``x`` plus the attention branch's output ``out``, scaled and dropped as the block does."""
        raise NotImplementedError

    def mlp_residual(self, x: Tensor) -> Tensor:
        """``x`` plus the block's MLP branch on it."""
        raise NotImplementedError



def check_patch_multiple(hw: tuple[int, int], patch: tuple[int, int], what: str = "img_size") -> None:
    """Refuse an input size (``what``, as messages name it) whose sides are not multiples of the patch's: the patch
    embedding would crop it."""
    (h, w), (ph, pw) = hw, patch
    if h % ph or w % pw:
        below, above = (max(ph, h // ph * ph), max(pw, w // pw * pw)), (-(-h // ph) * ph, -(-w // pw) * pw)
        other = f" or {above[0]}x{above[1]}" if above != below else ""
        raise ValueError(f"{what} {h}x{w} is not a multiple of the patch size {ph}x{pw}: the patch embedding would "
                         f"crop it; use e.g. {below[0]}x{below[1]}{other}")

class Host:
    """One model of a host library, as evit's patch and tools use it."""

    #: the library's name, for messages
    library: str = ""
    #: the model returns its main tensor itself (not an output object)
    returns_tensor: bool = True

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @property
    def name(self) -> str:
        """How messages name the model."""
        return type(self.model).__name__

    def check(self) -> None:
        """Raise TypeError/ValueError naming the reason when evit cannot patch this model at all."""

    @property
    def blocks(self) -> Sequence[nn.Module]:
        raise NotImplementedError

    def view(self, block: nn.Module) -> BlockView:
        """The view of one of :attr:`blocks`; ``view_class`` gives its class."""
        return self.view_class(block)(block)

    def view_class(self, block: nn.Module) -> type:
        raise NotImplementedError

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the image tokens: class, distillation, registers."""
        raise NotImplementedError

    @property
    def has_class_token(self) -> bool:
        raise NotImplementedError

    @property
    def embed_dim(self) -> int:
        raise NotImplementedError

    @property
    def pooling(self) -> str:
        """What the output is read from: 'token' (the class token, or the whole sequence of a backbone),
        'avg' (the mean of the image tokens), 'token+avg' (both)."""
        raise NotImplementedError

    @property
    def pooling_text(self) -> str:
        """The pooling in the library's own words, for messages."""
        return f"pooling {self.pooling!r}"

    @property
    def read_prefix_tokens(self) -> int:
        """How many of the prefix tokens, from the first, the model's output reads: the class token, and the
        distillation token where a head reads it; registers never (they sit after those). 0 for a model that reads
        the image tokens' mean only."""
        raise NotImplementedError

    #: what a method that needs the class token asks of a model, in the library's words
    class_token_text: str = "a head on the class token"

    @property
    def final_norm(self) -> Optional[nn.Module]:
        """The norm whose output an average pool reads (size-weighted after merges), if any."""
        return None

    #: a mixin for the blocks after the first reducing one that the patch leaves as they are, when the host's
    #: model hands its blocks something made for the full-length sequence (transformers' attention mask)
    follower_mixin: Optional[type] = None

    @property
    def input_size(self) -> tuple[int, int, int]:
        """(C, H, W) the model takes now."""
        raise NotImplementedError

    def patch_grid(self, hw: Optional[tuple[int, int]] = None) -> tuple[int, int]:
        """Rows and columns of image tokens for an input of ``hw`` (default: :attr:`input_size`)."""
        raise NotImplementedError

    @property
    def image_entry(self) -> nn.Module:
        """The module the model hands its images (B, C, H, W) to, as its first argument (its patch embedding):
        where the size of each input can be read, for a model that takes inputs of other sizes than its own."""
        raise NotImplementedError

    def num_tokens(self, hw: Optional[tuple[int, int]] = None) -> int:
        """Sequence length entering the first block for an input of ``hw``."""
        h, w = self.patch_grid(hw)
        return self.num_prefix_tokens + h * w

    @property
    def takes_any_size(self) -> bool:
        """True when the model runs on inputs of other sizes than :attr:`input_size` as it is."""
        return False

    def set_input_size(self, hw: tuple[int, int]) -> None:
        """Make the model take ``hw`` inputs, in place (position embeddings resampled)."""
        raise ValueError(f"evit cannot resize {self.name} ({self.library}): build it at the input size you want")

    def forward(self, images: Tensor, runner: Optional[nn.Module] = None) -> Tensor:
        """The model's main output tensor for ``images``: logits for a classifier, else its embedding.
        ``runner``: the module called, a wrapper of the model (DDP, whose call syncs gradients); default the model."""
        return (runner or self.model)(images)

    def check_trainable(self) -> None:
        """Raise ValueError naming the reason when the model cannot be trained as a classifier on its logits
        (a head of the wrong width is refused later, against the data's classes)."""

    @property
    def head_outputs(self) -> int:
        raise NotImplementedError

    @property
    def head_names(self) -> tuple[str, ...]:
        """Names of the modules holding the classification head (their parameters' name prefixes): what a
        checkpoint trained on other classes does not give (fine-tuning starts them afresh)."""
        return ()

    @property
    def untrained_head_of(self) -> Optional[int]:
        """The class count of the pretrained weights' head where the model was built for another, so that its
        library left that head out (the model's is untrained); else None."""
        return None

    def in_head(self, key: str) -> bool:
        """Whether the state-dict entry ``key`` belongs to a classification head: the model's
        (:attr:`head_names`), or one a checkpoint of this family may hold instead."""
        return key.startswith(tuple(f"{name}." for name in self.head_names))

    @property
    def class_names(self) -> Optional[list[str]]:
        """The names of the head's classes in output order, where the model records real ones; else None."""
        return None

    def data_config(self, input_size: Optional[Sequence[int]] = None) -> dict:
        """Preprocessing for images (at ``input_size`` (C, H, W), default the model's): input_size, mean, std,
        interpolation, crop_pct (timm's keys)."""
        raise NotImplementedError

    #: the model's attribute holding what :meth:`record_preprocessing` recorded
    RECORD = "evit_preprocessing"

    def record_preprocessing(self, mean: tuple, std: tuple, crop_pct: float, interpolation: str,
                             class_names: Optional[Sequence[str]] = None) -> None:
        """Record how the model's weights were trained to see images (timm's keys) and name its classes (None: leave
        its names), where the model keeps such a record: :meth:`data_config` and :attr:`class_names` then give them,
        so images from a folder are read, and labelled, as the training data was. The record is also kept in
        :attr:`recorded_preprocessing`, which every weights file evit writes of the model carries on."""
        setattr(self.model, self.RECORD, dict(mean=tuple(mean), std=tuple(std), crop_pct=float(crop_pct),
                                              interpolation=str(interpolation)))
        self._record(class_names)

    def _record(self, class_names: Optional[Sequence[str]]) -> None:
        """Put :attr:`recorded_preprocessing` (and ``class_names``, unless None) where the library reads them."""
        raise NotImplementedError

    @property
    def recorded_preprocessing(self) -> Optional[dict]:
        """What :meth:`record_preprocessing` recorded on the model (mean, std, crop_pct, interpolation), else None:
        the model then reads images its architecture's way."""
        return getattr(self.model, self.RECORD, None)

    def adapt_state_dict(self, state: dict) -> dict:
        """``state`` adapted to this model before loading (e.g. position embeddings resampled)."""
        return state
