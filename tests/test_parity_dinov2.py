"""Crane+'s D-Attn features against the official DINOv2 code (facebookresearch/dinov2), on identical
random weights.

Skipped unless ``$ANOMALENS_OFFICIAL/dinov2`` (the DINOv2 repository) and ``$ANOMALENS_OFFICIAL/Crane``
hold the official trees (never copied into this one). The official Crane calls
``torch.hub.load("facebookresearch/dinov2", "dinov2_vitb14_reg")`` and then
``get_intermediate_layers(Normalize(IMAGENET)(unnormalize(image, OPENAI)), reshape=True)[0]``
(models/Crane.py:454-510). Here that hub entry point itself builds the model from the repository's own
code (``pretrained=False``: nothing is downloaded), with only the ViT-B width, depth and heads shrunk to
those of our ``test-tiny-dino``; every other setting (4 registers, layer scale, bicubic antialiased
positional resampling without offset, MemEffAttention blocks) is the hub's. Its random weights, with
every tensor perturbed so that no norm or layer scale is the identity, are copied into the timm ViT that
Crane+ uses (`anomalens.backbones.load_dino`) with the key map of the released timm conversion: the
registers become ``reg_token`` and the class token's positional embedding moves into ``cls_token``
(timm's DINOv2 models add no positional embedding to prefix tokens). Then Crane+'s DINO patch tokens of
the same CLIP-normalised images must equal the hub model's to 1e-4, at Crane's 518 px (the 37×37 grid
the weights are made for) and at 224 px (16×16: the positional embedding is resampled).
"""

from __future__ import annotations

import pytest
import torch

import anomalens as al
import official_code

pytestmark = pytest.mark.skipif(
    not official_code.available("dinov2", "crane"),
    reason="official DINOv2 and Crane trees not at $ANOMALENS_OFFICIAL/{dinov2,Crane}",
)


@pytest.fixture(scope="module")
def official():
    """(the hub's ``dinov2_vitb14_reg`` builder, its vision_transformer module, Crane's utils/transform)."""
    with official_code.dinov2_modules() as mods:
        yield mods.hub, mods.vits, mods.transform


def _hub_model(hub, vits, monkeypatch, width: int, depth: int, heads: int) -> torch.nn.Module:
    """``dinov2_vitb14_reg(pretrained=False)`` with ViT-B's width, depth and heads set to ours."""
    base = vits.vit_base

    def tiny_base(patch_size: int = 16, num_register_tokens: int = 0, **kwargs):
        block = base.__globals__["partial"](vits.Block, attn_class=vits.MemEffAttention)  # as vit_base
        return vits.DinoVisionTransformer(
            patch_size=patch_size,
            embed_dim=width,
            depth=depth,
            num_heads=heads,
            mlp_ratio=4,
            block_fn=block,
            num_register_tokens=num_register_tokens,
            **kwargs,
        )

    monkeypatch.setattr(vits, "vit_base", tiny_base)
    torch.manual_seed(0)
    model = hub.dinov2_vitb14_reg(pretrained=False).eval()
    with torch.no_grad():  # no LayerNorm or LayerScale left at the identity, a non-zero class position
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hub DINOv2-with-registers keys → timm ``no_embed_class`` keys (the released timm conversion)."""
    out = {
        k: v for k, v in state.items() if k not in ("mask_token", "register_tokens", "cls_token", "pos_embed")
    }
    out["reg_token"] = state["register_tokens"]
    out["cls_token"] = state["cls_token"] + state["pos_embed"][:, :1]
    out["pos_embed"] = state["pos_embed"][:, 1:]
    return out


@pytest.mark.parametrize("size", [518, 224])
def test_crane_plus_dino_tokens_match_the_official_hub_model(official, monkeypatch, size):
    hub, vits, transform = official
    ours = al.create(  # Crane+: D-Attn from DINOv2
        "crane",
        backbone="test-tiny",
        pretrained=None,
        device="cpu",
        image_size=size,
        use_dattn=True,
        dino="test-tiny-dino",
    )
    timm_vit = ours.dino.model
    theirs = _hub_model(
        hub, vits, monkeypatch, timm_vit.embed_dim, len(timm_vit.blocks), timm_vit.blocks[0].attn.num_heads
    )
    timm_vit.load_state_dict(_to_timm(theirs.state_dict()), strict=True)

    torch.manual_seed(1)
    images = torch.randn(2, 3, size, size)  # CLIP-normalised, as Crane's encode_image receives them
    bb = ours.backbone
    assert (tuple(bb.mean), tuple(bb.std)) == (transform.OPENAI_DATASET_MEAN, transform.OPENAI_DATASET_STD)
    with torch.no_grad():
        raw = transform.unnormalize(images, transform.OPENAI_DATASET_MEAN, transform.OPENAI_DATASET_STD)
        dino_in = transform.transforms.Normalize(
            transform.IMAGENET_DATASET_MEAN, transform.IMAGENET_DATASET_STD
        )(raw)
        expected = theirs.get_intermediate_layers(dino_in, reshape=True)[0]  # (B, C, gh, gw)
        got = ours.dino.patch_features(images, bb.mean, bb.std)  # (B, gh, gw, C)
    assert expected.shape == (2, timm_vit.embed_dim, size // 14, size // 14)
    torch.testing.assert_close(got.permute(0, 3, 1, 2), expected, atol=1e-4, rtol=0)
