"""Patch Slimming (Tang et al., CVPR 2022): choose the patches top-down, from the last layer back.

Only what the head reads matters at the end of a classifier: the class token's output (and a
distillation token's where a head reads it; registers' never), and for a head on the image
tokens' mean too (DINOv2's classifier), theirs. Going down from the
last block, the impact of each token on that output is carried back through every
block's attention (the residual passes a token's impact to itself, attention passes
the impact of each output token j to the input tokens i it attends to, by A[j, i]).
At each chosen block the tokens with the least impact on the final output are removed,
top-down: a patch kept at a deeper block is kept at every shallower one, which gives
the pyramid the paper builds.

The choice is static, as in the paper's Patch Slimming (not its dynamic variant
DPS-ViT): positions are chosen once from the attention of sample images
(:func:`select`, mean over images and heads) and are the same for every input, so at
inference a block only takes fixed rows (no scoring at all). The paper refines the
choice layer by layer with fine-tuning in between; here it is made in one pass from
the unreduced model, and fine-tuning (``evit train``) follows. The chosen positions
are a buffer: they travel with the weights, with what they were chosen for (``made_for``: the tokens
entering the model, its patch grid and the blocks of the pyramid). A lower level's choice depends on the
levels above it, and a position names a patch only on its own grid, so a saved choice is used only by a
patch at the same blocks, for as many tokens on the same grid, keeping as many at each (:func:`misfit`);
any other patch chooses afresh, or is refused without sample images.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Optional

import torch
from torch import Tensor, nn

from .. import hosts
from ..attention import Seen, attention_probs
from ..patch import reductions, set_keep_rate, token_counts
from ..registry import register
from .base import KeepRateReduction, kept_count


@register
class PatchSlimming(KeepRateReduction):
    needs_images = True
    name, label = "patchslimming", "Patch Slimming"

    def __init__(self, keep_rate: float = 0.7, fuse: bool = False) -> None:
        if fuse:
            raise ValueError("Patch Slimming removes the patches it does not keep; it has no fused token")
        super().__init__(keep_rate, fuse=False)
        self.register_buffer("index", torch.empty(0, dtype=torch.long))  # kept positions among this block's image tokens
        self.register_buffer("made_for", torch.empty(0, dtype=torch.long))  # (tokens, grid rows, columns, *blocks)

    @classmethod
    def create(cls, block: int, keep_rate: float = 0.7, fuse: bool = False, **settings) -> "PatchSlimming":
        return cls(keep_rate, **settings)

    @classmethod
    def prepare(cls, model: nn.Module, images: Optional[Tensor], saved: Optional[Mapping[int, dict]] = None) -> None:
        """Keep the choice the model's weights file ``saved`` (by block, :func:`evit.patch.keep_saved_state`) where
        it was made for this patch (:func:`misfit`): weights fine-tuned on a choice run with it. Otherwise choose
        from ``images``; without them, refuse in one line saying what differs."""
        problem = restore(model, saved) if saved else None
        if saved and problem is None:
            return
        if images is None:
            raise ValueError(f"Patch Slimming: the choice of tokens saved with this model's weights {problem}, so it is "
                             "not the one this patch would choose: give sample images (images=...) to choose afresh, "
                             "or patch as it was made")
        select(model, images)

    @classmethod
    def describe_saved(cls, saved: Mapping[int, dict]) -> str:
        """'made at blocks 1, 3, 4 for 50 tokens (7x7 patches), keeping 25, 13, 7 image tokens: it is used where ...':
        what a saved choice was made for and where it is used (:func:`misfit`)."""
        record = next(iter(saved.values())).get("made_for", torch.empty(0)).tolist()
        kept = ", ".join(str(s["index"].numel()) for s in saved.values() if "index" in s)
        at = f"made at blocks {_listed(saved)}"
        if len(record) < 3:
            return (f"{at} (keeping {kept} image tokens) with no record of the input it was made for (saved by an "
                    f"earlier evit): it is not used; {cls.label} chooses again from the sample images")
        return (f"{at} for {record[0]} tokens ({record[1]}x{record[2]} patches), keeping {kept} image tokens: it is "
                "used where a setting patches those blocks of this model at that input size, keeping as many tokens "
                f"at each; elsewhere {cls.label} chooses again from the sample images")

    def forward(self, x: Tensor, seen: Seen) -> Tensor:
        p, N = self.num_prefix_tokens, x.shape[1]
        k = kept_count(self.keep_rate, N - p)
        if k >= N - p:
            return x
        if self.index.numel() != k:
            raise RuntimeError(
                f"Patch Slimming at block {self.block} has no choice of {k} of {N - p} image tokens: call "
                "evit.methods.patch_slimming.select(model, images) with sample images after patching")
        # the choice is made on the CPU (select): a model patched, and chosen for, on a GPU takes it there
        index = torch.cat([torch.arange(p, device=x.device), self.index.to(x.device) + p])
        if self.state.track:
            self.state.follow(x, index.expand(x.shape[0], -1))
        return x.index_select(1, index)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("index", "made_for"):
            if prefix + name in state_dict:  # a choice (its record) of another length than the empty default
                setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def restore(model: nn.Module, saved: Mapping[int, dict]) -> Optional[str]:
    """Load the choice ``saved`` (by block) into the Patch Slimming blocks of ``model`` when it was saved at the
    same blocks; None when it then fits (:func:`misfit`), else what differs, in words."""
    blocks = _blocks(model)
    if sorted(saved) != list(blocks):  # the pyramid's levels above a block shape its choice: all or none
        return f"was made at blocks {_listed(saved)}, not at blocks {_listed(blocks)}"
    for i, m in blocks.items():
        m.load_state_dict(saved[i])
    return misfit(model)


def misfit(model: nn.Module) -> Optional[str]:
    """None when every Patch Slimming block of ``model`` holds a choice made for its patch: at the same blocks, for
    as many tokens entering the model on the same grid of patches (a position names another patch on another
    grid of as many), keeping as many image tokens at each block as its keep rate keeps (the keep
    rate enters the choice only through those counts: :func:`select`), as positions in order, each once. Else
    what differs, in words."""
    host, blocks = hosts.adapter(model), _blocks(model)
    n, grid, records = host.num_tokens(), tuple(host.patch_grid()), {tuple(m.made_for.tolist()) for m in blocks.values()}
    if len(records) != 1 or len(next(iter(records))) < 3:
        return "holds no record of the blocks and input it was made for"
    made_n, rows, cols, *made_at = records.pop()
    if made_at != list(blocks):
        return f"was made at blocks {_listed(made_at)}, not at blocks {_listed(blocks)}"
    if made_n != n:
        return f"was made for {made_n} tokens entering the model, and this model takes {n} (another input size)"
    if (rows, cols) != grid:
        return f"was made on {rows}x{cols} patches, and this model's are {grid[0]}x{grid[1]} (another input shape)"
    p, found = host.num_prefix_tokens, sorted(reductions(model).items())
    entering = token_counts(model, n)[:-1]  # tokens entering each reducing block
    for (i, m), n_in in zip(found, entering):
        k = kept_count(m.keep_rate, n_in - p) if isinstance(m, PatchSlimming) else n_in - p
        index = m.index
        if k < n_in - p and index.numel() != k:
            return (f"keeps {index.numel()} of the {n_in - p} image tokens entering block {i}, where keep rate "
                    f"{m.keep_rate} keeps {k}")
        if k < n_in - p and (int(index.min()) < 0 or int(index.max()) >= n_in - p
                             or not bool((index[1:] > index[:-1]).all())):  # positions in order, each once
            return f"holds positions at block {i} that are not {n_in - p} image tokens' in order, each once"
    return None


def _blocks(model: nn.Module) -> dict[int, "PatchSlimming"]:
    return {i: m for i, m in sorted(reductions(model).items()) if isinstance(m, PatchSlimming)}


def _listed(blocks: Iterable[int]) -> str:
    return ", ".join(map(str, blocks))


@torch.no_grad()
def impact(model: nn.Module, images: Tensor, batch_size: int = 64) -> list[Tensor]:
    """Per block l, the impact (N,) of each token at the output of block l's attention on the
    final output the model's head reads, from the unreduced model's attention on ``images``."""
    host = hosts.adapter(model)
    image_mean = host.pooling in ("avg", "token+avg")  # a head on the image tokens' mean (DINOv2's classifier) too
    return carry_back(_mean_attention(model, images, batch_size), host.read_prefix_tokens,
                      host.num_prefix_tokens if image_mean else None)


def carry_back(maps: list[Tensor], prefix: int, image_from: Optional[int] = None) -> list[Tensor]:
    """Impacts from attention ``maps`` (per block, (N, N), rows the queries), last block first.

    The head reads the first ``prefix`` tokens' outputs (the class token, and a distillation token a head reads;
    never registers) and, with ``image_from``, the mean of the tokens from there on (the image tokens); each
    feature it reads weighs alike. The MLP is per token, so a token's impact after block l's attention is its
    impact at block l's output. Back through block l, half goes along the residual (to the token itself) and half
    through attention (from output j to input i by A[j, i]).
    """
    n, features = maps[0].shape[0], prefix + (image_from is not None)
    weight = torch.zeros(n)
    weight[:prefix] = 1.0 / features
    if image_from is not None:
        weight[image_from:] = 1.0 / features / (n - image_from)
    impacts = [weight] * len(maps)
    for layer in reversed(range(len(maps))):
        impacts[layer] = weight
        weight = 0.5 * weight + 0.5 * maps[layer].T @ weight
        weight = weight / weight.sum()
    return impacts


def select(model: nn.Module, images: Tensor, batch_size: int = 64) -> dict[int, Tensor]:
    """Choose, top-down, the positions every Patch Slimming block of ``model`` keeps; returns them
    (original image-token positions, by block)."""
    blocks = _blocks(model)
    if not blocks:
        raise ValueError("select: the model has no Patch Slimming blocks; patch it with method='patchslimming' first")
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"select needs a batch of sample images (B, C, H, W), got shape {tuple(images.shape)}")
    impacts = impact(model, images, batch_size)
    p = hosts.adapter(model).num_prefix_tokens
    counts = [impacts[0].shape[0] - p]  # image tokens entering each chosen block
    for m in blocks.values():
        counts.append(min(counts[-1], kept_count(m.keep_rate, counts[-1])))
    picked: dict[int, Tensor] = {}
    deeper = torch.empty(0, dtype=torch.long)
    for (i, m), k in reversed(list(zip(blocks.items(), counts[1:]))):  # deepest first
        score = impacts[i][p:].clone()
        score[deeper] = float("inf")  # kept deeper: kept here
        picked[i] = deeper = score.topk(k).indices.sort().values
    before = torch.arange(counts[0])
    grid = hosts.adapter(model).patch_grid(tuple(images.shape[-2:]))
    made_for = torch.tensor([impacts[0].shape[0], *grid, *blocks])  # what this choice is for (see misfit)
    for i, m in blocks.items():  # as indices into each block's own (already reduced) input
        m.index = torch.searchsorted(before, picked[i]).to(m.index.device)
        m.made_for = made_for.clone().to(m.made_for.device)
        before = picked[i]
    return dict(sorted(picked.items()))


def _mean_attention(model: nn.Module, images: Tensor, batch_size: int) -> list[Tensor]:
    """Each block's attention probabilities, mean over images and heads, with no token removed."""
    rates = {i: m.keep_rate for i, m in reductions(model).items() if hasattr(m, "keep_rate")}
    sums: dict[int, Tensor] = {}

    host = hosts.adapter(model)

    def record(i: int, view: hosts.BlockView):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            probs = attention_probs(view.attention, view.attention_norm(view.tokens(args, kwargs))).mean(dim=1).sum(dim=0)
            sums[i] = probs if i not in sums else sums[i] + probs
        return hook

    handles = [b.register_forward_pre_hook(record(i, host.view(b)), with_kwargs=True) for i, b in enumerate(host.blocks)]
    was_training = model.training
    try:
        set_keep_rate(model, 1.0)
        model.eval()
        for batch in _batches(images, batch_size):
            model(batch)
    finally:
        for h in handles:
            h.remove()
        for i, r in rates.items():
            reductions(model)[i].keep_rate = r
        model.train(was_training)
    return [sums[i].float().cpu() / len(images) for i in range(len(host.blocks))]


def _batches(images: Tensor, size: int) -> Iterable[Tensor]:
    for start in range(0, len(images), size):
        yield images[start:start + size]
