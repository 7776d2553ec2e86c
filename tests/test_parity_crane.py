"""Parity with the official Crane code (AlirezaSalehy/Crane), on identical random tiny weights.

Skipped unless ``$ANOMALENS_OFFICIAL/Crane`` holds a checkout of the official repository (never copied
into this tree). The official model is built from its own classes with the test-tiny dimensions and our
backbone's weights; its prompt learner is saved as an official checkpoint and read back with our
converter; then scores, smoothed maps, the training loss and its gradients must agree to 1e-4 with
``official_compat=True``.

Adaptations of the official model, all outside its code: its hard-coded QuickGELU is swapped for the
exact GELU test-tiny uses; its visual tower is rebuilt with test-tiny's 4 heads (it derives width // 64);
``torch.hub``'s DINOv2 is replaced by the same timm test-tiny-dino our method uses, behind the hub
model's ``get_intermediate_layers(x, reshape=True)`` call; missing optional imports of its package
(``pkg_resources``, ``humanhash``) are stubbed. The inference and loss glue below follows its
``test.py`` (``ScoreCalculator.forward``) and ``train.py`` (training step) using its own functions.
"""

from __future__ import annotations

import importlib
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter
from torch import nn

import anomalens as al
from anomalens.backbones import load_clip
from anomalens.converters.crane import convert

ROOT = Path(os.environ.get("ANOMALENS_OFFICIAL", "/nonexistent")) / "Crane"
pytestmark = pytest.mark.skipif(
    not (ROOT / "models" / "Crane.py").is_file(),
    reason="official Crane code not at $ANOMALENS_OFFICIAL/Crane",
)

SIZE = 64
TINY = {"backbone": "test-tiny", "pretrained": None, "device": "cpu", "image_size": SIZE}
# name: (our options, official features_list, official dino_model, soft_mean)
CASES = {
    "crane": ({"layers": (6, 12, 18, 24), "use_dattn": False, "soft_mean": True}, "none"),
    "crane+": ({"layers": (24,), "use_dattn": True, "dino": "test-tiny-dino", "soft_mean": False}, "dinov2"),
    "multi-tap+dattn": (
        {
            "layers": (18, 24),
            "eattn_start": 12,
            "use_dattn": True,
            "dino": "test-tiny-dino",
            "soft_mean": True,
        },
        "dinov2",
    ),
}


@pytest.fixture(scope="module")
def official():
    """The official modules (`models.Crane`, `models.prompt_ensemble`, `utils.*`), imported from ROOT."""
    import packaging.version

    stubs = {"pkg_resources": {"packaging": packaging}, "humanhash": {"humanize": lambda *a, **k: "x"}}
    added = []
    for name, attrs in stubs.items():
        if importlib.util.find_spec(name) is None:
            module = types.ModuleType(name)
            module.__dict__.update(attrs)
            sys.modules[name] = module
            added.append(name)
    before = set(sys.modules)
    sys.path.insert(0, str(ROOT))
    try:
        mods = types.SimpleNamespace(
            crane=importlib.import_module("models.Crane"),
            prompts=importlib.import_module("models.prompt_ensemble"),
            similarity=importlib.import_module("utils.similarity"),
            loss=importlib.import_module("utils.loss"),
        )
        yield mods
    finally:
        sys.path.remove(str(ROOT))
        for name in set(sys.modules) - before:
            if name.split(".")[0] in ("models", "utils", "segment_anything"):
                del sys.modules[name]
        for name in added:
            del sys.modules[name]


class HubStyleDino(nn.Module):
    """The timm DINO of our method behind the torch.hub DINOv2 call the official code makes."""

    def __init__(self, dino):
        super().__init__()
        self.dino = dino

    def get_intermediate_layers(self, x, reshape=True):
        side = self.dino.input_size(x.shape[-1])
        x = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
        tokens = self.dino.model.forward_features(x)[:, self.dino.model.num_prefix_tokens :]
        grid = side // self.dino.patch_size
        return [tokens.transpose(1, 2).reshape(x.shape[0], -1, grid, grid)]


def _official_model(mods, ours, dino_model: str, train: bool):
    """The official Crane with test-tiny's dimensions and weights, E-Attn from our mapped start block."""
    bb = ours.backbone
    args = types.SimpleNamespace(
        image_size=SIZE,
        dino_model=dino_model,
        both_eattn_dattn=True,
        train_with_img_cls_type="pad_suffix",
        train_with_img_cls_prob=1 if train else 0,
    )
    details = {
        "Prompt_length": ours.config.n_ctx,
        "learnabel_text_embedding_depth": len(ours.deep_prompts) + 1,
        "learnabel_text_embedding_length": ours.config.deep_prompt_length,
        "others": args,
    }
    native = load_clip(
        "test-tiny", None
    )  # positional embedding at 224: the official code resamples it itself
    model = mods.crane.Crane(
        bb.embed_dim,
        native.image_size,
        bb.depth,
        bb.width,
        bb.patch_size,
        77,
        bb.model.token_embedding.num_embeddings,
        bb.text_width,
        bb.model.transformer.resblocks[0].attn.num_heads,
        bb.text_depth,
        design_details=details,
    )
    model.visual = mods.crane.VisionTransformer(
        native.image_size, bb.patch_size, bb.width, bb.depth, bb.heads, bb.embed_dim, design_details=details
    )
    model.load_state_dict(native.model.state_dict(), strict=True)
    for block in [*model.visual.transformer.resblocks, *model.transformer.resblocks]:
        block.mlp.gelu = nn.GELU()  # test-tiny uses exact GELU; the official code hard-codes QuickGELU
    model.visual.replace_with_EAttn(to_layer=bb.depth - ours.eattn_start + 2, type="qq+kk+vv")
    if dino_model != "none":
        model.vfm, model.vfm_model = HubStyleDino(ours.dino), "dinov2"
    prompt_learner = mods.prompts.PromptLearner(model, details)
    return model.eval(), prompt_learner, args


def _official_predict(mods, model, prompt_learner, images, layers, soft_mean):
    """test.py ScoreCalculator.forward with static prompts (train_with_img_cls_prob = 0), then σ = 4."""
    sim = mods.similarity
    with torch.no_grad():
        image_features, patch_list = model.encode_image(images, layers, self_cor_attn_layers=20)
        image_features = image_features / image_features.norm(dim=-1, keepdim=True)
        patches = torch.stack([p / p.norm(dim=-1, keepdim=True) for p in patch_list])
        prompts, tokenized, compound, _ = prompt_learner()
        text = model.encode_text_learn(prompts, tokenized, compound).float()
        text = F.normalize(torch.stack(torch.chunk(text, dim=0, chunks=2), dim=1), dim=-1)
        logits = [sim.calc_similarity_logits(p, text) for p in patches]
        if soft_mean:
            score_map = torch.stack([sim.regrid_upsample(x.softmax(dim=-1), SIZE) for x in logits]).mean(
                dim=0
            )
        else:
            score_map = (
                torch.stack([sim.regrid_upsample(x, SIZE) for x in logits]).mean(dim=0).softmax(dim=-1)
            )
        pooled = mods.crane.ScoreBasePooling().forward(patches, logits)
        image_features = F.normalize(0.5 * pooled + 0.5 * image_features, dim=1)
        scores = sim.calc_similarity_logits(image_features, text).softmax(dim=-1)[:, 1]
    maps = np.stack([gaussian_filter(m, sigma=4) for m in score_map[..., 1].numpy()])
    return scores.numpy(), maps


def _official_loss(mods, model, prompt_learner, images, masks, labels, layers):
    """One train.py step's loss (image context inserted, nearest upsampling)."""
    sim = mods.similarity
    image_features, patch_list = model.encode_image(images, layers, self_cor_attn_layers=20)
    image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    patches = torch.stack([p / p.norm(dim=-1, keepdim=True) for p in patch_list])
    prompts, tokenized, compound, with_context = prompt_learner(img_emb=image_features)
    assert with_context
    normal = model.encode_text_learn(prompts[0], tokenized[0], compound)
    anomalous = model.encode_text_learn(prompts[1], tokenized[1], compound)
    text = F.normalize(torch.stack([normal, anomalous], dim=1), dim=-1).float()
    focal = dice = 0
    logits = []
    for p in patches:
        x = sim.calc_similarity_logits(p, text, temp=0.07)
        logits.append(x)
        probs = sim.regrid_upsample(x.softmax(dim=-1), SIZE, mode="nearest")
        dice = dice + mods.loss.BinaryDiceLoss()((1 - probs[..., 0] + probs[..., 1]) / 2, masks)
        focal = focal + mods.loss.FocalLoss()(probs.permute(0, 3, 1, 2), masks)
    pooled = mods.crane.ScoreBasePooling().forward(patches, logits)
    image_features = F.normalize(0.5 * pooled + 0.5 * image_features, dim=1)
    ce = F.cross_entropy(sim.calc_similarity_logits(image_features, text, temp=0.01), labels)
    return 2 * focal + 2 * dice + 0.2 * ce


def _batch(ours):
    ds = al.data.load("synthetic:defects?size=64&n=2&seed=3", split="test")
    return ours.collate([ds[i] for i in range(len(ds))], augment=False)


@pytest.mark.parametrize("case", sorted(CASES))
def test_inference_and_training_match_official(official, case, tmp_path):
    options, dino_model = CASES[case]
    torch.manual_seed(0)
    ours = al.create("crane", official_compat=True, **options, **TINY)
    model, learner, _ = _official_model(official, ours, dino_model, train=False)
    with torch.no_grad():  # non-trivial learned prompts
        for p in learner.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    torch.save({"prompt_learner": learner.state_dict()}, tmp_path / "epoch_5.pth")
    ours = convert(tmp_path / "epoch_5.pth", official_compat=True, **options, **TINY)
    batch = _batch(ours)

    scores, maps = _official_predict(
        official, model, learner, batch.images, ours.layers, options["soft_mean"]
    )
    ours_out = ours.forward_batch(batch.images, ["object"] * len(scores), None)
    our_scores, our_maps = ours_out.scores, ours_out.maps
    np.testing.assert_allclose(our_scores.numpy(), scores, atol=1e-4)
    np.testing.assert_allclose(our_maps.numpy(), maps, atol=1e-4)

    learner.train_with_img_cls_prob = 1
    official_loss = _official_loss(
        official, model, learner, batch.images, batch.masks, batch.labels, ours.layers
    )
    official_loss.backward()
    ours.train()
    our_loss = ours.training_loss(batch)["loss"]
    our_loss.backward()
    assert our_loss.item() == pytest.approx(official_loss.item(), abs=1e-4)
    torch.testing.assert_close(ours.ctx_anomalous.grad, learner.ctx_neg.grad[0, 0], atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(
        ours.deep_prompts[0].grad, learner.compound_prompts_text[0].grad, atol=1e-4, rtol=1e-3
    )


def test_official_tokenizer_matches_ours(official):
    ours = al.create("crane", **TINY)
    model, learner, _ = _official_model(official, ours, "none", train=False)
    assert torch.equal(learner.tokenized_prompts_pos.reshape(-1).long(), ours.prompt_tokens[0])
    assert torch.equal(learner.tokenized_prompts_neg.reshape(-1).long(), ours.prompt_tokens[1])
