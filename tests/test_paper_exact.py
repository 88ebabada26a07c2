"""EViT and ToMe against references written here from their papers' definitions, in float64.

The references work one image at a time on plain Python lists: an explicit attention matrix, the
class token's attention row ranked with ``sorted``, ToMe's bipartite edges drawn in a double loop.
They share nothing with evit's code but the model's own modules (norms, projections, MLP,
LayerScale). The models have DeiT-S's width and depth (embed 384, 6 heads, 12 blocks) at a small
input, with a class token, with a distillation token, with four registers and, for ToMe, with
average pooling and no class token. Logits must agree to 1e-10, and the tokens each reduction
leaves (which input patches each token holds; evit's own tracking) must be the reference's.
"""
import math

import pytest
import timm
import torch

import evit
from conftest import make_model

DEIT_S = dict(depth=12, embed_dim=384, num_heads=6)
#: name -> (conftest variant, its input size): 36 image tokens each
MODELS = {"class": ("deit", 96), "distilled": ("deit_distilled", 96), "registers": ("dinov2_registers", 84)}
LOCATIONS = (3, 6, 9)  # EViT's, for depth 12


def _gap_model():
    """DeiT-S-shaped, average-pooled, no class token (as vit_*_gap), random weights as in conftest."""
    torch.manual_seed(0)
    model = timm.create_model("vit_medium_patch16_gap_256", pretrained=False, img_size=96, **DEIT_S)
    with torch.no_grad():
        model.head.weight.normal_(0, 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def models():
    built = {name: make_model(variant, img_size=size, **DEIT_S) for name, (variant, size) in MODELS.items()}
    built["avg_pooled"] = _gap_model()
    for model in built.values():
        model.double()
    return built


def _images(model, count=2):
    torch.manual_seed(2)
    return torch.randn(count, 3, *model.patch_embed.img_size, dtype=torch.float64)


# ---- the references ------------------------------------------------------------------------------

def reference(model, image, reduce):
    """Logits of ``model`` on one image, and the sources of its tokens after each reduction.

    ``reduce(block, tokens, attention, keys, sizes, sources)`` -> (tokens, sizes, sources) or None
    when the block leaves the tokens as they are. ``sizes``: input patches per token (ToMe's
    proportional attention adds their log to the logits); ``sources``: per token, the frozenset
    of input tokens it holds."""
    p = model.num_prefix_tokens
    t = model.norm_pre(model._pos_embed(model.patch_embed(image[None])))[0]  # (N, C)
    sizes = [1.0] * t.shape[0]
    sources = [frozenset([i]) for i in range(t.shape[0])]
    stages = []
    for i, blk in enumerate(model.blocks):
        N, C = t.shape
        a = blk.attn
        q, k, v = a.qkv(blk.norm1(t)).reshape(N, 3, a.num_heads, -1).permute(1, 2, 0, 3)  # 3 x (H, N, d)
        q, k = a.q_norm(q), a.k_norm(k)
        logits = (q @ k.transpose(-2, -1)) * a.head_dim ** -0.5 + torch.tensor(sizes, dtype=t.dtype).log()
        attention = logits.softmax(dim=-1)  # (H, N, N)
        t = t + blk.ls1(a.proj(a.norm((attention @ v).transpose(0, 1).reshape(N, C))))
        reduced = reduce(i, t, attention, k.mean(dim=0), sizes, sources)
        if reduced is not None:
            t, sizes, sources = reduced
            stages.append((i, sources))
        t = t + blk.ls2(blk.mlp(blk.norm2(t)))
    t = model.norm(t)
    if model.global_pool == "avg":  # the mean over input patches: each token weighted by its size
        w = torch.tensor(sizes[p:], dtype=t.dtype)
        pooled = (w[:, None] * t[p:]).sum(dim=0) / w.sum()
        return model.head(model.fc_norm(pooled))[None], stages
    return model.forward_head(t[None]), stages


def evit_reduce(p, keep_rate, fusion):
    """EViT: rank the image tokens by the class token's attention (mean over heads), keep the
    ceil(keep_rate * n) best; the rest become one token, the sum of each times the class token's
    attention to it ("sum", the authors') or that divided by the attention's total ("mean"), or
    are dropped (fusion None)."""
    def reduce(block, t, attention, keys, sizes, sources):
        n = t.shape[0] - p
        k = math.ceil(keep_rate * n)
        if block not in LOCATIONS or k >= n:
            return None
        score = attention[:, 0, p:].mean(dim=0)
        ranked = sorted(range(n), key=lambda j: -score[j].item())
        kept, rest = [p + j for j in ranked[:k]], [p + j for j in ranked[k:]]
        tokens = [t[j] for j in range(p)] + [t[j] for j in kept]
        held = sources[:p] + [sources[j] for j in kept]
        if fusion is not None:
            weights = [score[j - p] for j in rest]
            total = sum(weights) if fusion == "mean" else 1.0
            tokens.append(sum(w / total * t[j] for w, j in zip(weights, rest)))
            held.append(frozenset().union(*(sources[j] for j in rest)))
        return torch.stack(tokens), [1.0] * len(tokens), held
    return reduce


def tome_reduce(p, r_per_block):
    """ToMe: sets A (even positions) and B (odd) over the whole sequence; prefix tokens take no
    part. Each A token's edge goes to its most similar B token (cosine of the keys, mean over
    heads); the r best edges merge A into B, as size-weighted averages. Then: the prefix tokens,
    the unmerged A tokens in their original order (in score order when there is no prefix token),
    then B."""
    def reduce(block, t, attention, keys, sizes, sources):
        N = t.shape[0]
        r = min(r_per_block[block], (N - p) // 2)
        if r <= 0:
            return None
        unit = keys / keys.norm(dim=-1, keepdim=True)
        set_b = [j for j in range(1, N, 2) if j >= p]
        edges = []
        for a in range(0, N, 2):
            if a < p:
                continue
            similarity = {b: (unit[a] @ unit[b]).item() for b in set_b}
            best = max(set_b, key=lambda b: similarity[b])
            edges.append((similarity[best], a, best))
        edges.sort(key=lambda e: -e[0])
        unmerged = [a for _, a, _ in edges[r:]]
        groups = {b: [b] for b in set_b}
        for _, a, b in edges[:r]:
            groups[b].append(a)
        order = [[j] for j in range(p)] + [[a] for a in (sorted(unmerged) if p else unmerged)] + \
                [groups[b] for b in set_b]
        new_sizes = [sum(sizes[j] for j in g) for g in order]
        tokens = [sum(sizes[j] * t[j] for j in g) / s for g, s in zip(order, new_sizes)]
        return torch.stack(tokens), new_sizes, [frozenset().union(*(sources[j] for j in g)) for g in order]
    return reduce


# ---- evit against them ---------------------------------------------------------------------------

def _tracked(model, x):
    """(logits, [(block, per image: list of frozensets of input tokens, in token order)]) of the
    patched ``model``, from evit's own token tracking."""
    state = next(iter(evit.reductions(model).values())).state
    state.track = True
    try:
        with torch.no_grad():
            logits = model(x)
        stages = [(block, [[frozenset(row.nonzero().flatten().tolist()) for row in image] for image in s])
                  for block, s in state.stages]
    finally:
        state.track = False
        state.reset()
    return logits, stages


def _check(model, x, reduce, ordered, fused=False):
    """evit's logits and token sets equal the reference's on each image of ``x`` (one forward with
    tracking on: the same code path as without, for blocks that reduce);
    ``ordered``: in the same order; else the prefix tokens first, the same kept tokens in any order
    (topk's) and, ``fused``, the fused token last."""
    refs = [reference(model, image, reduce) for image in x]
    expected = torch.cat([logits for logits, _ in refs])
    logits, stages = _tracked(model, x)
    assert (logits - expected).abs().max().item() < 1e-10
    assert [block for block, _ in stages] == [block for block, _ in refs[0][1]]
    p = model.num_prefix_tokens
    for b, (_, ref_stages) in enumerate(refs):
        for (block, got), (_, want) in zip(stages, ref_stages):
            got = got[b]
            if ordered:  # ToMe: the order decides the next block's sets
                assert got == want, f"image {b}, block {block}: tokens differ from the reference"
            else:
                assert got[:p] == want[:p] and set(got[p:]) == set(want[p:]), f"image {b}, block {block}"
                assert not fused or got[-1] == want[-1], f"image {b}, block {block}: the fused token differs"
    return expected


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("fusion", ["sum", "mean"])
def test_evit_equals_the_papers_definition(models, name, fusion):
    model = models[name]
    x = _images(model)
    p = model.num_prefix_tokens
    for keep_rate in (0.5, 0.7, 0.9):
        evit.patch(model, keep_rate, fusion=fusion)
        expected = _check(model, x, evit_reduce(p, keep_rate, fusion), ordered=False, fused=True)
        if keep_rate == 0.5:  # the training path (out of place, for autograd) gives the same
            with torch.enable_grad():
                assert (model(x) - expected).abs().max().item() < 1e-10
    evit.unpatch(model)


def test_evit_fusions_differ_and_topk_drops(models):
    """The two fusions are different models (so the test above can tell them apart), and without
    fusion the rest is dropped, as the reference drops it."""
    model = models["class"]
    x = _images(model)
    with torch.no_grad():
        evit.patch(model, 0.7, fusion="sum")
        by_sum = model(x)
        evit.patch(model, 0.7, fusion="mean")
        assert (model(x) - by_sum).abs().max().item() > 1e-3
    evit.patch(model, 0.7, fuse=False)
    _check(model, x, evit_reduce(1, 0.7, None), ordered=False)
    evit.unpatch(model)


SCHEDULE = [4] * 4 + [2] * 4 + [1] * 4


@pytest.mark.parametrize("name", list(MODELS) + ["avg_pooled"])
def test_tome_equals_the_papers_definition(models, name):
    model = models[name]
    x = _images(model)
    for r in (1, 8, 13, SCHEDULE):
        evit.patch(model, method="tome", r=r)
        _check(model, x, tome_reduce(model.num_prefix_tokens, r if isinstance(r, list) else [r] * 12), ordered=True)
    evit.unpatch(model)
