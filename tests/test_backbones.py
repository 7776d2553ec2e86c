"""Backbone wrapper: parity with open_clip, every extension point against a naive reference, fail-fast
weight resolution, layer mapping, attention kernels on hand-checked tensors, DINO features."""

from __future__ import annotations

import math
import socket
import time

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from anomalens.backbones import (
    EAttnSpec,
    WeightsUnavailableError,
    attention,
    load_clip,
    load_dino,
    map_layer,
    map_layers,
    window_indices,
)
from anomalens.backbones.registry import (
    PAPER_BACKBONES,
    is_torchscript_archive,
    list_backbones,
    resolve_pretrained,
    resolve_timm_pretrained,
)
from helpers import differ

S = 64  # test image side: a 4x4 patch grid on test-tiny
ATOL = 1e-5


@pytest.fixture(scope="module")
def bb():
    return load_clip("test-tiny", None, image_size=S)


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, S, S, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def tokens(bb):
    return bb.tokenize(["a photo of a bottle", "a damaged bottle with a long crack", "x"])


def _blocks(bb):
    return bb.model.visual.transformer.resblocks


def _heads(x, heads):
    """(B, M, D) -> (B, heads, M, hd)."""
    b, m, d = x.shape
    return x.view(b, m, heads, d // heads).transpose(1, 2)


def _merge(x):
    """(B, heads, M, hd) -> (B, M, D)."""
    b, h, m, hd = x.shape
    return x.transpose(1, 2).reshape(b, m, h * hd)


def _block_inputs(bb, images):
    """Residual stream at the input of every block (1-based dict) plus the final output, from open_clip."""
    visual = bb.model.visual
    out = visual.forward_intermediates(images, indices=None, output_fmt="NLC", output_extra_tokens=True)
    after = [
        torch.cat([p, t], dim=1)
        for p, t in zip(out["image_intermediates_prefix"], out["image_intermediates"], strict=True)
    ]
    embed = visual.ln_pre(
        torch.cat(
            [
                visual.class_embedding.expand(images.shape[0], 1, -1),
                visual.conv1(images).flatten(2).transpose(1, 2),
            ],
            dim=1,
        )
        + visual.positional_embedding
    )
    inputs = {1: embed, **{i + 2: a for i, a in enumerate(after[:-1])}}
    return inputs, after


# ---------------------------------------------------------------- parity with open_clip


def test_parity_with_open_clip_tiny(bb, images, tokens):
    out = bb.encode_image(images, layers=range(1, bb.depth + 1))
    torch.testing.assert_close(out.cls, bb.model.encode_image(images), atol=ATOL, rtol=0)
    inputs, after = _block_inputs(bb, images)
    for i in range(1, bb.depth + 1):
        torch.testing.assert_close(out.tokens[i], after[i - 1], atol=ATOL, rtol=0)
    torch.testing.assert_close(out.final, after[-1], atol=ATOL, rtol=0)
    text = bb.encode_text(tokens, normalize=False)
    torch.testing.assert_close(text, bb.model.encode_text(tokens), atol=ATOL, rtol=0)
    assert text.shape == (3, bb.embed_dim)
    torch.testing.assert_close(bb.encode_text(tokens).norm(dim=-1), torch.ones(3))


def test_cls_only_last_block_gives_the_same_cls_and_branch(bb, images):
    eattn = EAttnSpec(start=2, taps=(3, 4))
    full = bb.encode_image(images, layers=(2,), eattn=eattn, values_at={4: "input"})
    part = bb.encode_image(images, layers=(2,), eattn=eattn, values_at={4: "input"}, cls_only=True)
    assert part.final.shape == (3, 1, bb.width)
    torch.testing.assert_close(part.final, full.final[:, :1], atol=ATOL, rtol=0)
    torch.testing.assert_close(part.cls, full.cls, atol=ATOL, rtol=0)
    for got, want in [(part.tokens, full.tokens), (part.branch, full.branch), (part.values, full.values)]:
        assert got.keys() == want.keys()
        for i in want:
            torch.testing.assert_close(got[i], want[i], atol=ATOL, rtol=0)
    plain = bb.encode_image(images, cls_only=True).cls
    torch.testing.assert_close(plain, bb.model.encode_image(images), atol=ATOL, rtol=0)
    for clash in ({"layers": (bb.depth,)}, {"values_at": {bb.depth: "mid"}}, {"attention": {bb.depth: "vv"}}):
        with pytest.raises(ValueError, match="cls_only"):
            bb.encode_image(images, cls_only=True, **clash)


def test_post_norm_and_token_embeddings(bb, images, tokens):
    out = bb.encode_image(images)
    cls = bb.post_norm(out.final[:, 0]) @ bb.model.visual.proj
    torch.testing.assert_close(cls, out.cls, atol=ATOL, rtol=0)
    assert differ(bb.post_norm(out.final), out.final)
    emb = bb.token_embeddings(tokens)  # (C, L, text_width)
    assert emb.shape == (*tokens.shape, bb.text_width)
    torch.testing.assert_close(bb.encode_text(tokens, prompt_embeddings=emb), bb.encode_text(tokens))


def test_parity_with_open_clip_vit_b16_random():
    vb = load_clip("ViT-B-16", None)
    assert (vb.depth, vb.width, vb.heads, vb.embed_dim, vb.grid) == (12, 768, 12, 512, (14, 14))
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(vb.encode_image(x).cls, vb.model.encode_image(x), atol=ATOL, rtol=0)
        t = vb.tokenize(["a photo of a screw"])
        torch.testing.assert_close(
            vb.encode_text(t, normalize=False), vb.model.encode_text(t), atol=ATOL, rtol=0
        )
        # Overridden path with "standard" attention (own q/k/v + SDPA) equals the block itself.
        manual = vb.encode_image(x, values_at={i: "input" for i in range(1, 13)}).cls
        torch.testing.assert_close(manual, vb.model.encode_image(x), atol=ATOL, rtol=0)


def test_random_init_is_seeded(bb):
    again = load_clip("test-tiny", None, image_size=S)
    for a, b in zip(bb.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_attributes(bb):
    assert (bb.depth, bb.text_depth, bb.width, bb.text_width, bb.embed_dim, bb.heads) == (4, 4, 64, 64, 64, 4)
    assert (bb.patch_size, bb.grid, bb.image_size, bb.native_image_size) == (16, (4, 4), S, 224)
    assert bb.logit_scale == pytest.approx(1 / 0.07, rel=1e-6)
    assert len(bb.mean) == len(bb.std) == 3
    assert bb.map_layers((6, 12, 18, 24), 24) == [1, 2, 3, 4]


# ---------------------------------------------------------------- layer mapping


def test_map_layer():
    assert [map_layer(i, 4, 24) for i in (6, 12, 18, 24)] == [1, 2, 3, 4]
    assert [map_layer(i, 12, 24) for i in (6, 12, 18, 24)] == [3, 6, 9, 12]
    assert [map_layer(i, 4, 12) for i in (7, 9, 11)] == [2, 3, 4]
    assert map_layer(1, 4, 24) == 1  # 0.17 -> at least 1
    assert map_layer(3, 4, 24) == 1  # 0.5 rounds half up (Python's round would give 0 -> 1 anyway)
    assert map_layer(9, 4, 24) == 2  # 1.5 -> 2
    assert map_layer(15, 4, 24) == 3  # 2.5 -> 3 (banker's rounding would give 2)
    assert map_layers((24, 6, 1, 2, 12), 4, 24) == [1, 2, 4]
    with pytest.raises(ValueError):
        map_layer(25, 4, 24)


# ---------------------------------------------------------------- positional embedding


@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
def test_pos_interp(mode):
    native = load_clip("test-tiny", None)
    small = load_clip("test-tiny", None, image_size=96, pos_interp=mode)
    pos = native.model.visual.positional_embedding
    new = small.model.visual.positional_embedding
    assert new.shape == (1 + 36, 64) and small.grid == (6, 6)
    torch.testing.assert_close(new[0], pos[0])
    grid = pos[1:].reshape(1, 14, 14, 64).permute(0, 3, 1, 2)
    kwargs = {"antialias": True} if mode == "bicubic" else {}
    want = F.interpolate(grid, size=(6, 6), mode=mode, align_corners=False, **kwargs)
    torch.testing.assert_close(new[1:], want.permute(0, 2, 3, 1).reshape(36, 64))
    same = load_clip("test-tiny", None, image_size=224)
    assert torch.equal(same.model.visual.positional_embedding, pos)
    x = torch.randn(2, 3, 96, 96)
    torch.testing.assert_close(small.encode_image(x).cls, small.model.encode_image(x), atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="expects 96x96"):
        small.encode_image(torch.randn(1, 3, 64, 64))


# ---------------------------------------------------------------- adapters


class Recorder(nn.Module):
    """Records its input and adds a constant."""

    def __init__(self, add: float = 1.0):
        super().__init__()
        self.add = add
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return x + self.add


class RandomMap(Recorder):
    """Records its input and applies a fixed random linear map: a change no LayerNorm downstream can undo
    (a constant shift of every channel would be removed exactly by the next pre-norm and ln_final)."""

    def __init__(self, d: int):
        super().__init__()
        self.weight = torch.randn(d, d, generator=torch.Generator().manual_seed(0)) / math.sqrt(d)

    def forward(self, x):
        super().forward(x)
        return x @ self.weight.T


class ZeroResidual(nn.Module):
    """x + W x with W zero-initialised: an identity that still has a trainable parameter."""

    def __init__(self, d):
        super().__init__()
        self.fc = nn.Linear(d, d, bias=False)
        nn.init.zeros_(self.fc.weight)

    def forward(self, x):
        return x + self.fc(x)


def test_image_adapters(bb, images):
    plain = bb.encode_image(images, layers=(1, 2, 3, 4))
    rec = Recorder(1.0)
    out = bb.encode_image(images, layers=(1, 2, 3, 4), adapters={2: rec})
    assert len(rec.seen) == 1
    torch.testing.assert_close(rec.seen[0], plain.tokens[2])  # applied to block 2's output, all tokens
    torch.testing.assert_close(out.tokens[1], plain.tokens[1])
    torch.testing.assert_close(out.tokens[2], plain.tokens[2] + 1)
    want3 = _blocks(bb)[2](plain.tokens[2] + 1)
    torch.testing.assert_close(out.tokens[3], want3, atol=ATOL, rtol=0)
    zero = ZeroResidual(bb.width)
    z = bb.encode_image(images, adapters={1: zero})
    torch.testing.assert_close(z.cls, plain.cls, atol=ATOL, rtol=0)
    z.cls.sum().backward()
    assert zero.fc.weight.grad is not None and zero.fc.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in bb.parameters())


def test_text_adapters(bb, tokens):
    rec = RandomMap(bb.text_width)
    out = bb.encode_text(tokens, adapters={3: rec}, normalize=False)
    # positions after the last EOT are dropped (causal attention: they cannot reach any EOT token)
    assert rec.seen[0].shape == (3, int(tokens.argmax(-1).max()) + 1, bb.text_width)
    # a random rotation of the residual stream changes the embedding by O(1), far beyond rounding
    assert (out - bb.encode_text(tokens, normalize=False)).abs().max() > 0.05
    zero = ZeroResidual(bb.text_width)
    torch.testing.assert_close(
        bb.encode_text(tokens, adapters={1: zero}), bb.encode_text(tokens), atol=ATOL, rtol=0
    )


def test_text_truncation_is_exact_with_adapters_and_deep_prompts(bb):
    torch.manual_seed(0)
    adapter = nn.Sequential(nn.Linear(bb.text_width, bb.text_width), nn.Tanh())
    deep = {2: torch.randn(4, bb.text_width), 3: torch.randn(4, bb.text_width)}
    short = bb.tokenize(["x"])  # EOT at position 2: encoded on max(3, 1 + 4) positions alone
    long = bb.tokenize(["a much longer prompt that keeps many more positions of the sequence"])
    alone = bb.encode_text(short, adapters={1: adapter}, deep_prompts=deep)
    batched = bb.encode_text(torch.cat([short, long]), adapters={1: adapter}, deep_prompts=deep)
    torch.testing.assert_close(alone[0], batched[0], atol=ATOL, rtol=0)


# ---------------------------------------------------------------- attention overrides


def _manual_block(block, x, heads, weights_fn):
    """Reference block: attention weights from `weights_fn(q, k, v)` applied to V, then MLP."""
    d = x.shape[-1]
    h = block.ln_1(x)
    w, b = block.attn.in_proj_weight, block.attn.in_proj_bias
    q, k, v = (_heads(h @ w[j * d : (j + 1) * d].T + b[j * d : (j + 1) * d], heads) for j in range(3))
    a = weights_fn(q, k, v) @ v
    x = x + block.attn.out_proj(_merge(a))
    return x + block.mlp(block.ln_2(x))


def test_vv_attention_by_hand(bb, images):
    plain = bb.encode_image(images, layers=(1,))
    out = bb.encode_image(images, layers=(2, 3), attention={2: "vv", 3: "vv"})
    scale = bb.head_dim**-0.5

    def vv(q, k, v):
        return torch.softmax(v @ v.transpose(-1, -2) * scale, dim=-1)

    x2 = _manual_block(_blocks(bb)[1], plain.tokens[1], bb.heads, vv)
    torch.testing.assert_close(out.tokens[2], x2, atol=ATOL, rtol=0)
    torch.testing.assert_close(
        out.tokens[3], _manual_block(_blocks(bb)[2], x2, bb.heads, vv), atol=ATOL, rtol=0
    )
    qq = bb.encode_image(images, layers=(2,), attention={2: "qq"}).tokens[2]

    def qq_ref(q, k, v):
        return torch.softmax(q @ q.transpose(-1, -2) * scale, dim=-1)

    torch.testing.assert_close(
        qq, _manual_block(_blocks(bb)[1], plain.tokens[1], bb.heads, qq_ref), atol=ATOL, rtol=0
    )
    with pytest.raises(ValueError):
        bb.encode_image(images, attention={2: "diagonal"})


def _eattn_reference(bb, images, start, variant):
    """Naive E-Attn: standard forward for the main path, then H_l per layer from its block inputs."""
    inputs, _ = _block_inputs(bb, images)
    scale = bb.head_dim**-0.5
    z = inputs[start]
    snaps = {}
    for layer in range(start, bb.depth + 1):
        block = _blocks(bb)[layer - 1]
        d = bb.width
        h = block.ln_1(inputs[layer])
        w, b = block.attn.in_proj_weight, block.attn.in_proj_bias
        qkv = {
            n: _heads(h @ w[j * d : (j + 1) * d].T + b[j * d : (j + 1) * d], bb.heads)
            for j, n in enumerate("qkv")
        }
        terms = {"qkv": "qkv", "qq+kk": "qk", "vv": "v"}[variant]
        weights = sum(torch.softmax(qkv[t] @ qkv[t].transpose(-1, -2) * scale, dim=-1) for t in terms)
        z = z + block.attn.out_proj(_merge(weights @ qkv["v"]))
        snaps[layer] = z
    return snaps


@pytest.mark.parametrize("variant", ["qkv", "qq+kk", "vv"])
def test_eattn_matches_naive_reference(bb, images, variant):
    taps = (2, 3, 4)
    out = bb.encode_image(images, eattn=EAttnSpec(start=2, variant=variant, taps=taps))
    ref = _eattn_reference(bb, images, 2, variant)
    for t in taps:
        torch.testing.assert_close(out.branch[t], ref[t], atol=ATOL, rtol=0)
    assert differ(out.branch[2], out.branch[4])
    torch.testing.assert_close(out.cls, bb.encode_image(images).cls, atol=ATOL, rtol=0)  # main path unchanged


def test_eattn_alias_taps(bb, images):
    spec = EAttnSpec(start=1, taps=(1, 2, 4), alias_taps=True)
    out = bb.encode_image(images, eattn=spec)
    exact = bb.encode_image(images, eattn=EAttnSpec(start=1, taps=(1, 2, 4)))
    for t in (1, 2, 4):
        torch.testing.assert_close(out.branch[t], exact.branch[4])
    assert differ(exact.branch[1], exact.branch[4])
    with pytest.raises(ValueError):
        bb.encode_image(images, eattn=EAttnSpec(start=3, taps=(2,)))


@pytest.mark.parametrize("variant", sorted(attention.EATTN_VARIANTS))
def test_eattn_output_equals_weights_times_values(variant):
    q, k, v = torch.randn(3, 2, 3, 7, 4, generator=torch.Generator().manual_seed(6)).unbind(0)
    want = attention.eattn_weights(q, k, v, 0.5, variant) @ v
    torch.testing.assert_close(attention.eattn_output(q, k, v, 0.5, variant), want, atol=1e-6, rtol=0)


def test_eattn_weights_rows_sum():
    q, k, v = torch.randn(3, 2, 2, 5, 4).unbind(0)
    w = attention.eattn_weights(q, k, v, 0.5, "qkv")
    torch.testing.assert_close(w.sum(-1), torch.full((2, 2, 5), 3.0))
    torch.testing.assert_close(
        attention.eattn_weights(q, k, v, 0.5, "kk+vv").sum(-1), torch.full((2, 2, 5), 2.0)
    )


# ---------------------------------------------------------------- values and attention_output


def test_values_at_input_and_mid(bb, images):
    inputs, _ = _block_inputs(bb, images)
    out = bb.encode_image(images, values_at={2: "input", 4: "mid"})
    d = bb.width
    blk = _blocks(bb)[1]
    wv, bv = blk.attn.in_proj_weight[2 * d :], blk.attn.in_proj_bias[2 * d :]
    want = _heads(blk.ln_1(inputs[2]) @ wv.T + bv, bb.heads)
    torch.testing.assert_close(out.values[2], want, atol=ATOL, rtol=0)
    blk = _blocks(bb)[3]
    x = inputs[4]
    mid = x + blk.attention(blk.ln_1(x))
    wv, bv = blk.attn.in_proj_weight[2 * d :], blk.attn.in_proj_bias[2 * d :]
    torch.testing.assert_close(out.values[4], _heads(blk.ln_1(mid) @ wv.T + bv, bb.heads), atol=ATOL, rtol=0)
    assert out.values[4].shape == (3, bb.heads, 17, bb.head_dim)
    torch.testing.assert_close(out.cls, bb.encode_image(images).cls, atol=ATOL, rtol=0)


def test_attention_output(bb):
    g = torch.Generator().manual_seed(3)
    values = torch.randn(2, bb.heads, 16, bb.head_dim, generator=g)
    weights = torch.softmax(torch.randn(2, 1, 16, 16, generator=g), -1)
    out = bb.attention_output(4, weights, values)
    blk = _blocks(bb)[3]
    want = blk.attn.out_proj(_merge(torch.einsum("bmn,bhnd->bhmd", weights[:, 0], values)))
    torch.testing.assert_close(out, want, atol=ATOL, rtol=0)
    # Standard attention weights on the block's own q, k, v reproduce the block's attention output.
    x = torch.randn(2, 17, bb.width, generator=g)
    h = blk.ln_1(x)
    d = bb.width
    q, k, v = (
        _heads(
            h @ blk.attn.in_proj_weight[j * d : (j + 1) * d].T + blk.attn.in_proj_bias[j * d : (j + 1) * d],
            bb.heads,
        )
        for j in range(3)
    )
    w = torch.softmax(q @ k.transpose(-1, -2) * bb.head_dim**-0.5, -1)
    torch.testing.assert_close(bb.attention_output(4, w, v), blk.attention(h), atol=ATOL, rtol=0)


# ---------------------------------------------------------------- windows


def test_window_indices_by_hand():
    w = window_indices((3, 3), 2)
    assert w.tolist() == [[0, 1, 3, 4], [1, 2, 4, 5], [3, 4, 6, 7], [4, 5, 7, 8]]
    assert window_indices((4, 4), 3, stride=1).shape == (4, 9)
    assert window_indices((4, 4), 2, stride=2).tolist() == [
        [0, 1, 4, 5],
        [2, 3, 6, 7],
        [8, 9, 12, 13],
        [10, 11, 14, 15],
    ]
    assert window_indices((4, 4), (1, 4)).shape == (4, 4)


def test_encode_windows_matches_loop(bb, images):
    windows = torch.cat([window_indices(bb.grid, 2), window_indices(bb.grid, 3)[:, :4]])
    out = bb.encode_windows(images, windows, chunk=7)
    assert out.shape == (3, len(windows), bb.embed_dim)
    visual = bb.model.visual
    inputs, _ = _block_inputs(bb, images)
    embed = inputs[1]
    for j, idx in enumerate(windows):
        seq = torch.cat([embed[:, :1], embed[:, idx + 1]], dim=1)
        seq = visual.transformer(seq)
        torch.testing.assert_close(out[:, j], visual.ln_post(seq[:, 0]) @ visual.proj, atol=ATOL, rtol=0)
    full = bb.encode_windows(images, torch.arange(16)[None])
    torch.testing.assert_close(full[:, 0], bb.encode_image(images).cls, atol=ATOL, rtol=0)


# ---------------------------------------------------------------- text prompts


class ReplacePositions(nn.Module):
    def __init__(self, prompt):
        super().__init__()
        self.prompt = prompt

    def forward(self, x):
        x = x.clone()
        x[:, 1 : 1 + len(self.prompt)] = self.prompt
        return x


def test_prompt_embeddings(bb, tokens):
    embeds = bb.model.token_embedding(tokens)
    torch.testing.assert_close(
        bb.encode_text(tokens, prompt_embeddings=embeds), bb.encode_text(tokens), atol=ATOL, rtol=0
    )
    eot = tokens.argmax(-1)
    after = embeds.clone()
    # A random vector, not a constant: LayerNorm removes constant shifts.
    noise = torch.randn(bb.text_width, generator=torch.Generator().manual_seed(4))
    after[:, -1] += noise  # after every EOT: the causal mask hides it
    assert int(eot.max()) < 76
    torch.testing.assert_close(
        bb.encode_text(tokens, prompt_embeddings=after), bb.encode_text(tokens), atol=ATOL, rtol=0
    )
    before = embeds.clone()
    before[:, 1] += noise
    assert differ(bb.encode_text(tokens, prompt_embeddings=before), bb.encode_text(tokens))


def test_deep_prompts_replace_block_input(bb, tokens):
    prompt = torch.randn(2, bb.text_width, generator=torch.Generator().manual_seed(5))
    deep = bb.encode_text(tokens, deep_prompts={3: prompt})
    # Replacing positions 1..2 of block 2's output == replacing them at block 3's input.
    torch.testing.assert_close(
        deep, bb.encode_text(tokens, adapters={2: ReplacePositions(prompt)}), atol=ATOL, rtol=0
    )
    assert differ(deep, bb.encode_text(tokens))
    per_class = bb.encode_text(tokens, deep_prompts={3: prompt.expand(3, -1, -1)})
    torch.testing.assert_close(per_class, deep)
    with pytest.raises(ValueError):
        bb.encode_text(tokens, deep_prompts={1: prompt})


def test_text_projection_override(bb, tokens):
    proj = bb.model.text_projection

    class Same(nn.Module):
        def forward(self, x):
            return x @ proj

    torch.testing.assert_close(
        bb.encode_text(tokens, projection=Same()), bb.encode_text(tokens), atol=ATOL, rtol=0
    )
    other = nn.Linear(bb.text_width, 10, bias=False)
    assert bb.encode_text(tokens, projection=other).shape == (3, 10)


# ---------------------------------------------------------------- batch invariance, frozen, preprocess


def test_batch_invariance(bb, images):
    kw = {
        "layers": (2,),
        "attention": {3: "vv"},
        "eattn": EAttnSpec(start=2, taps=(2, 4)),
        "values_at": {4: "mid"},
    }
    batch = bb.encode_image(images, **kw)
    windows = window_indices(bb.grid, 2)
    wins = bb.encode_windows(images, windows)
    for i in range(len(images)):
        one = bb.encode_image(images[i : i + 1], **kw)
        torch.testing.assert_close(one.cls, batch.cls[i : i + 1], atol=ATOL, rtol=0)
        torch.testing.assert_close(one.tokens[2], batch.tokens[2][i : i + 1], atol=ATOL, rtol=0)
        torch.testing.assert_close(one.branch[4], batch.branch[4][i : i + 1], atol=ATOL, rtol=0)
        torch.testing.assert_close(one.values[4], batch.values[4][i : i + 1], atol=ATOL, rtol=0)
        torch.testing.assert_close(
            bb.encode_windows(images[i : i + 1], windows), wins[i : i + 1], atol=ATOL, rtol=0
        )


def test_frozen_and_eval(bb):
    bb.train()
    assert all(not p.requires_grad for p in bb.parameters())
    assert all(not m.training for m in bb.model.modules())
    wrapper = nn.ModuleDict({"backbone": bb, "head": nn.Linear(2, 2)})
    wrapper.train()
    assert wrapper["head"].training and not bb.model.training
    bb.eval()


def test_preprocess(bb):
    rng = np.random.default_rng(0)
    imgs = [
        rng.integers(0, 256, (40, 90, 3), dtype=np.uint8),
        rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
    ]
    x = bb.preprocess(imgs)
    assert x.shape == (2, 3, S, S) and x.dtype == torch.float32
    mean, std = torch.tensor(bb.mean).view(3, 1, 1), torch.tensor(bb.std).view(3, 1, 1)
    torch.testing.assert_close(
        x[1], torch.from_numpy(imgs[1]).permute(2, 0, 1).float() / 255 * 1 / std - mean / std
    )
    crop = bb.preprocess(imgs, resize="short_side_crop")
    assert crop.shape == (2, 3, S, S) and differ(crop[0], x[0])
    mask = np.zeros((40, 90), bool)
    mask[:, 45:] = True
    m = bb.preprocess_masks([mask], resize="squash")
    assert m.shape == (1, S, S) and set(m.unique().tolist()) == {0.0, 1.0}
    assert m[0, :, : S // 2 - 1].sum() == 0 and m[0, :, S // 2 + 1 :].all()
    mb = bb.preprocess_masks([mask], mode="bilinear")
    assert torch.equal(mb, m)
    with pytest.raises(ValueError):
        bb.preprocess([np.zeros((8, 8), np.uint8)])


# ---------------------------------------------------------------- weights


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Empty caches and a network that refuses every connection."""

    def refuse(*args, **kwargs):
        raise OSError("network unreachable (test)")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("ANOMALENS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return tmp_path


def test_missing_clip_weights_fail_fast(offline):
    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError) as err:
        load_clip("ViT-B-16", "openai")
    assert time.monotonic() - start < 5
    msg = str(err.value)
    assert "ViT-B-16" in msg and "'openai'" in msg and "--pretrained" in msg and "ANOMALENS_CACHE" in msg
    assert "\n" not in msg
    assert isinstance(err.value, RuntimeError)


def test_missing_dino_weights_fail_fast(offline):
    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError, match="vit_base_patch14_reg4_dinov2"):
        load_dino()
    assert time.monotonic() - start < 5


def test_paper_backbones_are_supported_configs():
    for name in PAPER_BACKBONES:
        cfg = open_clip.get_model_config(name)
        vision = cfg["vision_cfg"]
        assert "timm_model_name" not in vision and not vision.get("attentional_pool", False)
        assert vision.get("pool_type", "tok") == "tok" and "hf_model_name" not in cfg["text_cfg"]
    assert "test-tiny" in list_backbones() and "test-tiny-dino" in list_backbones()


def test_unknown_tag_lists_valid_tags():
    with pytest.raises(ValueError, match="laion400m_e32"):
        resolve_pretrained("ViT-B-16", "laion9000")
    with pytest.raises(ValueError, match="does not exist"):
        resolve_pretrained("ViT-B-16", "/no/such/file.pt")
    assert resolve_pretrained("ViT-B-16", "none") is None and resolve_pretrained("ViT-B-16", None) is None


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning")
def test_local_file_and_jit_archive(tmp_path):
    native = load_clip("test-tiny", None)
    path = tmp_path / "tiny.pt"
    torch.save({k: v + 1 for k, v in native.model.state_dict().items()}, path)
    loaded = load_clip("test-tiny", str(path), image_size=S)
    assert loaded.pretrained == str(path)
    torch.testing.assert_close(loaded.model.token_embedding.weight, native.model.token_embedding.weight + 1)
    # An OpenAI-style TorchScript archive (torch.load(weights_only=True) refuses those).
    archive = tmp_path / "jit.pt"
    native_file = load_clip("test-tiny", str(path)).model
    traced = torch.jit.trace_module(native_file, {"encode_image": torch.randn(1, 3, 224, 224)})
    torch.jit.save(traced, archive)
    assert is_torchscript_archive(str(archive)) and not is_torchscript_archive(str(path))
    from_jit = load_clip("test-tiny", str(archive), image_size=S)
    for (key, a), b in zip(from_jit.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), key


def _fake_hf_cache(root, repo_id, filename):
    """The on-disk layout huggingface_hub uses: models--org--name/{refs/main, snapshots/<rev>/file}."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / filename).write_bytes(b"weights")
    return str(snap / filename)


def test_cached_weights_found_offline(offline):
    cache = offline / "cache"
    cache.mkdir()
    (cache / "ViT-B-16.pt").write_bytes(b"")
    assert resolve_pretrained("ViT-B-16", "openai") == str(cache / "ViT-B-16.pt")
    hf = _fake_hf_cache(
        offline / "hf", "timm/vit_base_patch16_clip_224.laion400m_e32", "open_clip_model.safetensors"
    )
    assert resolve_pretrained("ViT-B-16", "laion400m_e32") == hf
    # open_clip maps B-16-plus-240 laion400m_e32 to the e31 HF repository: never take e31 for e32.
    _fake_hf_cache(
        offline / "hf", "timm/vit_base_patch16_plus_clip_240.laion400m_e31", "open_clip_model.safetensors"
    )
    with pytest.raises(WeightsUnavailableError, match="laion400m_e32"):
        resolve_pretrained("ViT-B-16-plus-240", "laion400m_e32")
    (cache / "vit_b_16_plus_240-laion400m_e32-699c4b84.pt").write_bytes(b"")
    assert resolve_pretrained("ViT-B-16-plus-240", "laion400m_e32").endswith("e32-699c4b84.pt")
    # A generic HF file name in the flat cache folder is ambiguous and ignored.
    (cache / "open_clip_model.safetensors").write_bytes(b"")
    with pytest.raises(WeightsUnavailableError):
        resolve_pretrained("ViT-L-14-336", "openai")
    dino = _fake_hf_cache(offline / "hf", "timm/vit_base_patch14_reg4_dinov2.lvd142m", "model.safetensors")
    assert resolve_timm_pretrained("vit_base_patch14_reg4_dinov2.lvd142m", True) == dino


# ---------------------------------------------------------------- DINO


def test_dino_tiny_patch_features(bb, images):
    dino = load_dino("test-tiny-dino", None)
    assert dino.input_size(S) == 70 and dino.input_size(518) == 518
    feats = dino.patch_features(images, bb.mean, bb.std)
    assert feats.shape == (3, 5, 5, dino.width)
    # Final LayerNorm applied (weight 1, bias 0 at init): every token has zero mean, unit variance.
    torch.testing.assert_close(feats.mean(-1), torch.zeros(3, 5, 5), atol=1e-5, rtol=0)
    torch.testing.assert_close(feats.var(-1, unbiased=False), torch.ones(3, 5, 5), atol=1e-3, rtol=0)
    x = (images * torch.tensor(bb.std).view(1, 3, 1, 1) + torch.tensor(bb.mean).view(1, 3, 1, 1)).clamp(0, 1)
    x = (x - torch.tensor(dino.mean).view(1, 3, 1, 1)) / torch.tensor(dino.std).view(1, 3, 1, 1)
    x = F.interpolate(x, size=(70, 70), mode="bilinear", align_corners=False)
    ref = dino.model.get_intermediate_layers(x, n=1, norm=True)[0]
    torch.testing.assert_close(feats.reshape(3, 25, -1), ref, atol=ATOL, rtol=0)
    one = dino.patch_features(images[1:2], bb.mean, bb.std)
    torch.testing.assert_close(one, feats[1:2], atol=ATOL, rtol=0)
    assert all(not p.requires_grad for p in dino.parameters())
    dino.train()
    assert not dino.model.training


# ---------------------------------------------------------------- attention kernels by hand


def test_self_correlation_by_hand():
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0]]).view(1, 1, 2, 2)
    w = attention.self_correlation_weights(x, scale=1.0)
    # rows of x xᵀ: [1, 0], [0, 4]
    e = math.e
    want = torch.tensor([[e / (e + 1), 1 / (e + 1)], [1 / (1 + e**4), e**4 / (1 + e**4)]]).view(1, 1, 2, 2)
    torch.testing.assert_close(w, want)


def test_standard_and_single_path_by_hand():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(1, 1, 2, 2)
    k = torch.tensor([[2.0, 0.0], [0.0, 0.0]]).view(1, 1, 2, 2)
    v = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    out = attention.standard_attention(q, k, v, scale=0.5)
    # row 0 logits [1, 0] -> weights [e/(1+e), 1/(1+e)]; row 1 logits [0, 0] -> [0.5, 0.5]
    p = math.e / (1 + math.e)
    want = torch.tensor([[p * 1 + (1 - p) * 3, p * 2 + (1 - p) * 4], [2.0, 3.0]]).view(1, 1, 2, 2)
    torch.testing.assert_close(out, want)
    vv = attention.single_path_attention(q, k, v, 0.5, "vv")
    torch.testing.assert_close(vv, attention.self_correlation_weights(v, 0.5) @ v)
    kk = attention.single_path_attention(q, k, v, 0.5, "kk")
    torch.testing.assert_close(kk, attention.self_correlation_weights(k, 0.5) @ v)


def test_dattn_weights_by_hand():
    sim = torch.tensor([[1.0, 0.8, 0.1], [0.8, 1.0, 0.2], [0.1, 0.2, 1.0]]).view(1, 3, 3)
    w = attention.dattn_weights(sim, beta=1.2, gamma=3.0)
    mean = sim.mean()  # 5.2 / 9
    logits = (sim - 1.2 * mean) * 3.0
    # threshold 1.2*mean = 0.6933: keep 1.0 and 0.8; drop 0.1 and 0.2
    keep = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)
    want = torch.where(keep, logits, torch.tensor(float("-inf"))).softmax(-1)
    torch.testing.assert_close(w, want.view(1, 1, 3, 3))
    assert w[0, 0, 2, 2] == 1.0 and w[0, 0, 0, 2] == 0.0
    # "image" mean is per image; "batch" mean pools the batch (official), changing image 0's weights.
    other = torch.full((1, 3, 3), 0.95)  # raises the pooled threshold above 0.8
    both = torch.cat([sim, other])
    torch.testing.assert_close(attention.dattn_weights(both)[:1], w)
    assert differ(attention.dattn_weights(both, mean="batch")[:1], w)
    # A row whose off-diagonal entries are all below ε still keeps its diagonal (no NaN).
    flat = torch.eye(3).view(1, 3, 3) * 0.5
    assert torch.isfinite(attention.dattn_weights(flat, beta=10.0)).all()


def test_resample_grid():
    t = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)  # (B, h, N=2x2, d)
    assert attention.resample_grid(t, (2, 2), (2, 2)) is t
    up = attention.resample_grid(t, (2, 2), (3, 3))
    assert up.shape == (2, 3, 9, 5)
    want = F.interpolate(t.reshape(6, 2, 2, 5).permute(0, 3, 1, 2), size=(3, 3), mode="bilinear")
    torch.testing.assert_close(up, want.permute(0, 2, 3, 1).reshape(2, 3, 9, 5))
    # Centre of a 3x3 upsampling (align_corners=False) is the mean of the four source patches.
    torch.testing.assert_close(up[..., 4, :], t.mean(dim=-2))


def test_cosine_similarity_matrix():
    f = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]]])
    s = attention.cosine_similarity_matrix(f)
    r = 1 / math.sqrt(2)
    torch.testing.assert_close(s, torch.tensor([[[1.0, r, 0.0], [r, 1.0, r], [0.0, r, 1.0]]]))


# ---------------------------------------------------------------- inference precision


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_reduced_precision_image_tower_stays_close_and_returns_float32(precision, images):
    bb = load_clip("test-tiny", None, image_size=S)
    with torch.no_grad():
        ref = bb.encode_image(images, layers=(2,), values_at={3: "mid"})
        out = bb.set_precision(precision).encode_image(images, layers=(2,), values_at={3: "mid"})
        windows = bb.encode_windows(images, torch.arange(4)[None])
    if precision == "int8":
        assert isinstance(bb.int8_blocks[0].qkv, torch.ao.nn.quantized.dynamic.Linear)
    for got, want in [(out.cls, ref.cls), (out.final, ref.final), (out.tokens[2], ref.tokens[2])]:
        assert got.dtype == torch.float32
        # About 1 % here (half-precision matmuls / int8 weights and activations); 5 % bounds it.
        assert float(((got - want).norm(dim=-1) / want.norm(dim=-1)).max()) < 0.05
    assert out.values[3].dtype == windows.dtype == torch.float32
    with torch.no_grad():  # back to fp32: the float code path again
        torch.testing.assert_close(bb.set_precision("fp32").encode_image(images).cls, ref.cls)


def test_int8_activations_use_8_bits_where_the_cpu_has_vnni():
    """`_Int8Linear` quantises activations to 8 bits (VNNI) instead of PyTorch's 7: its error against
    the float layer is about half of PyTorch's own module's (0.75 bounds it; deterministic inputs)."""
    from anomalens.backbones import clip

    reduce_range = clip.INT8_REDUCE_RANGE
    assert reduce_range == (not torch.cpu._is_vnni_supported())
    if reduce_range:
        pytest.skip("no VNNI: activations keep PyTorch's 7 bits")
    gen = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(64, 64)
    x = torch.randn(200, 64, generator=gen)
    with torch.no_grad():
        want = linear(x)
        ours = clip._Int8Linear.from_float(_with_qconfig(linear))(x)
        torchs = torch.ao.nn.quantized.dynamic.Linear.from_float(_with_qconfig(linear))(x)
    assert float((ours - want).norm()) < 0.75 * float((torchs - want).norm())


def _with_qconfig(linear: torch.nn.Linear) -> torch.nn.Linear:
    linear.qconfig = torch.ao.quantization.default_dynamic_qconfig
    return linear


def test_precision_errors(bb):
    with pytest.raises(ValueError, match="precision must be one of"):
        bb.set_precision("int4")
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        bb.set_precision("fp16")
    assert bb.precision == "fp32"


def test_visual_prompts_are_appended_then_replaced(bb, images):
    """AdaCLIP's visual prompts against a naive loop over open_clip's own blocks."""
    gen = torch.Generator().manual_seed(6)
    first = torch.randn(3, 2, bb.width, generator=gen)  # per image
    second = torch.randn(2, bb.width, generator=gen)  # shared
    out = bb.encode_image(images, layers=[1, 4], prompts={1: first, 2: second})
    visual = bb.model.visual
    x = visual.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([visual.class_embedding.expand(3, 1, -1), x], dim=1) + visual.positional_embedding
    x = visual.ln_pre(x)
    m = x.shape[1]
    x = torch.cat([x, first], dim=1)
    taps = {}
    for i, block in enumerate(_blocks(bb), start=1):
        if i == 2:
            x = torch.cat([x[:, :m], second.expand(3, -1, -1)], dim=1)
        x = block(x)
        taps[i] = x[:, :m]
    torch.testing.assert_close(out.tokens[1], taps[1], atol=ATOL, rtol=0)
    torch.testing.assert_close(out.tokens[4], taps[4], atol=ATOL, rtol=0)
    torch.testing.assert_close(out.final, taps[4], atol=ATOL, rtol=0)
    torch.testing.assert_close(out.cls, visual.ln_post(x[:, 0]) @ visual.proj, atol=ATOL, rtol=0)
    assert out.final.shape[1] == m and differ(out.final, bb.encode_image(images).final)
    with pytest.raises(ValueError, match="same number"):
        bb.encode_image(images, prompts={1: first, 2: second[:1]})
    with pytest.raises(ValueError, match="prompts"):
        bb.encode_image(images, prompts={5: second})
