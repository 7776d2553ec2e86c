"""AdaCLIP: its formulas on hand-checked tensors, the hybrid prompts, the loss and training."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import anomalens as al
from anomalens.converters.adaclip import convert
from anomalens.methods.adaclip import (
    AdaClip,
    anomaly_map,
    class_prompts,
    hsf_embedding,
    hybrid_prompts,
    image_embedding,
    pixel_loss,
)
from anomalens.metrics import image_auroc, pixel_auroc
from helpers import differ

SIZE = 64
TINY = {"backbone": "test-tiny", "pretrained": None, "device": "cpu", "image_size": SIZE}


def make(**options) -> AdaClip:
    torch.manual_seed(0)
    return al.create("adaclip", **TINY, **options)


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------- equations
def test_class_prompts_are_the_official_ensemble():
    normal, anomalous = class_prompts("metal-nut")
    assert len(normal) == 7 * 4 and len(anomalous) == 5 * 4
    assert normal[0] == "a bad photo of a metal nut."
    assert normal[5] == "a low resolution photo of the flawless metal nut."
    assert anomalous[-1] == "a cropped photo of the metal nut with damage."


def test_hybrid_prompts_add_static_and_dynamic():
    static = torch.tensor([[1.0, 2.0]])  # (n=1, D=2)
    dynamic = torch.tensor([[[10.0, 20.0]], [[30.0, 40.0]]])  # (B=2, 1, 2)
    torch.testing.assert_close(
        hybrid_prompts(static, dynamic), torch.tensor([[[11.0, 22.0]], [[31.0, 42.0]]])
    )
    assert hybrid_prompts(static, None) is static and hybrid_prompts(None, dynamic) is dynamic


def test_anomaly_map_softmax_of_mean_logits():
    # Two layers on a 1x1 grid: mean logits [0, ln 3] → P = [1/4, 3/4] → (3/4 + 1 − 1/4)/2 = 3/4.
    logits = [torch.tensor([[[0.0, 0.0]]]), torch.tensor([[[0.0, 2 * math.log(3.0)]]])]
    amap = anomaly_map(logits, (1, 1), 3)
    torch.testing.assert_close(amap, torch.full((1, 3, 3), 0.75))


def test_anomaly_map_upsamples_with_aligned_corners():
    # A 1x2 grid whose anomalous logit is 0 then 2 ln 3: corners keep the patch values exactly.
    logits = [torch.tensor([[[0.0, 0.0], [0.0, 2 * math.log(3.0)]]])]
    amap = anomaly_map(logits, (1, 2), 3)[0]
    torch.testing.assert_close(amap[:, 0], torch.full((3,), 0.5))
    torch.testing.assert_close(amap[:, 2], torch.full((3,), 0.9))


def test_hsf_averages_cluster_centres_not_patches():
    # One layer, 4 patches (all selected: K = min(4, 5k)): three at a, one at b, k = 2 clusters →
    # centres a and b, result normalize((a + b)/2), not the patch mean (3a + b)/4.
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    features = [torch.stack([a, a, a, b])[None]]  # (1, 4, 2)
    logits = [torch.zeros(1, 4, 2)]
    out = hsf_embedding(features, logits, k_clusters=2, seed=0)
    torch.testing.assert_close(out, F.normalize((a + b)[None] / 2, dim=-1))


def test_hsf_keeps_the_most_anomalous_patches_and_pools_layers():
    # k = 1 → K = 5 patches of highest p: patch 5 (lowest anomalous logit) is left out. One cluster:
    # the centre is the mean over the 5 patches and both layers.
    gen = torch.Generator().manual_seed(0)
    layer1, layer2 = torch.randn(1, 6, 3, generator=gen), torch.randn(1, 6, 3, generator=gen)
    anomalous = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, -9.0])
    logits = [torch.stack([torch.zeros(6), anomalous], dim=-1)[None]] * 2
    out = hsf_embedding([layer1, layer2], logits, k_clusters=1, seed=0)
    expected = torch.cat([layer1[0, :5], layer2[0, :5]]).mean(dim=0)
    torch.testing.assert_close(out[0], F.normalize(expected, dim=0))


def test_image_embedding_mixes_hsf_and_cls():
    cls, hsf = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    torch.testing.assert_close(
        image_embedding(cls, hsf, 0.2), F.normalize(torch.tensor([[0.8, 0.2]]), dim=-1)
    )
    assert image_embedding(cls, None, 0.2) is cls


def test_pixel_loss_is_zero_for_a_confident_correct_map():
    mask = torch.zeros(1, 2, 2)
    mask[0, 0, 0] = 1.0
    right = torch.tensor([[[0.0, 50.0]], [[50.0, 0.0]], [[50.0, 0.0]], [[50.0, 0.0]]]).view(1, 4, 2)
    # Each mask pixel is its own patch (grid 2x2 at size 2): focal ≈ 0 and both dice terms are 0.
    assert pixel_loss(right, (2, 2), mask).item() < 1e-6
    wrong = right.flip(-1)
    # Inverted: dice(P_a) = 1 − 1/(3 + 1 + 1)... both dice terms near 1, focal large.
    assert pixel_loss(wrong, (2, 2), mask).item() > 1.5


def test_pixel_loss_hand_checked():
    # One patch, one pixel, mask 1, logits [0, ln 3] → P = [1/4, 3/4]: focal −(1/4)² ln(3/4) = 0.017980,
    # dice(P_a, 1) = 1 − (2·3/4 + 1)/(3/4 + 1 + 1) = 1/11, dice(P_n, 0) = 1 − 1/(1/4 + 1) = 1/5.
    logits = torch.tensor([[[0.0, math.log(3.0)]]])
    expected = 0.0625 * -math.log(0.75) + 1 / 11 + 1 / 5
    assert pixel_loss(logits, (1, 1), torch.ones(1, 1, 1)).item() == pytest.approx(expected, rel=1e-4)


# ---------------------------------------------------------------------- method
def test_parameters_follow_prompt_type_and_branch():
    m = make()
    n, width = m.config.prompt_length, m.backbone.width
    assert len(m.static_visual) == 4 and m.static_visual[0].shape == (n, width)
    assert len(m.static_text) == 3  # text blocks 2..4
    assert m.dynamic_visual.out_features == n * width and len(m.patch_projections) == 4
    static = make(prompt_type="S", prompt_branch="V")
    assert static.dynamic_visual is None and static.dynamic_text is None and static.static_text is None
    with pytest.raises(ValueError, match="prompt_type"):
        make(prompt_type="X")
    with pytest.raises(ValueError, match="prompt_depth"):
        make(prompt_depth=9)


def test_dynamic_prompts_depend_on_the_image():
    m = make(prompt_type="D")
    images = _images(2, 1)
    with torch.no_grad():
        feats = m.features(images, ["object", "object"])
        frozen = m.features(images[:1], ["object"])
    assert differ(feats.text[0], feats.text[1])  # same class, different image → different anchors
    torch.testing.assert_close(frozen.text[0], feats.text[0], atol=1e-5, rtol=0)
    static = make(prompt_type="S")
    with torch.no_grad():
        shared = static.features(images, ["object", "object"]).text
    torch.testing.assert_close(shared[0], shared[1])


def test_visual_prompts_change_the_features():
    m = make()
    images = _images(1, 2)
    with torch.no_grad():
        before = m.features(images, ["object"]).patches[0]
        # Random, not constant: a constant shift of a token is removed by the blocks' LayerNorm.
        m.static_visual[0].add_(
            torch.randn(m.static_visual[0].shape, generator=torch.Generator().manual_seed(3))
        )
        after = m.features(images, ["object"]).patches[0]
    assert differ(before, after)


def test_official_compat_rounds_prompts_through_fp16():
    m = make(official_compat=True)
    prompts = m.visual_prompts(None, 2)
    assert prompts[1].shape == (2, *m.static_visual[0].shape)
    torch.testing.assert_close(prompts[1][1], m.static_visual[0].half().float(), atol=0, rtol=0)


# ---------------------------------------------------------------------- training
def _batch(method: AdaClip, n: int = 4):
    ds = al.data.load("synthetic:defects?size=48&n=2&seed=5", split="test", classes=["disc"])
    return method.collate([ds[i] for i in range(n)], augment=False)


def test_training_loss_reaches_every_learned_parameter_only():
    m = make().train()
    out = m.training_loss(_batch(m))
    assert set(out) == {"loss", "image", "pixel"}
    assert out["loss"].item() == pytest.approx((out["image"] + out["pixel"]).item(), rel=1e-6)
    out["loss"].backward()
    learned = m.learned_parameters()
    assert len(learned) == 4 + 3 + 2 + 2 + 2 * 4 + 2  # static V/L, generators, projections, CLS layer
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in learned)
    assert all(p.grad is None for p in m.backbone.parameters())


def test_training_without_masks_uses_image_loss_only():
    m = make().train()
    batch = _batch(m)
    batch.has_mask[:] = False
    out = m.training_loss(batch)
    assert out["pixel"].item() == 0.0 and out["loss"].item() == pytest.approx(out["image"].item())


def test_stage_is_the_official_optimiser():
    (stage,) = make().training_stages()
    assert (stage.config.optimizer, stage.config.lr, stage.config.betas) == ("adamw", 0.01, (0.5, 0.999))
    assert stage.config.epochs == 5 and stage.config.batch_size == 1


def _evaluate(method: AdaClip, dataset) -> tuple[float, float]:
    samples = [dataset[i] for i in range(len(dataset))]
    pred = method.predict(np.stack([s.image for s in samples]), class_names="grain")
    masks = np.stack([s.mask if s.mask is not None else np.zeros((SIZE, SIZE), bool) for s in samples])
    return image_auroc([s.label for s in samples], pred.scores), pixel_auroc(masks, pred.maps)


def test_learning_zero_shot_protocol_on_synthetic_defects():
    """Train on one set's test split, evaluate unseen images of another seed (the zero-shot protocol)."""
    train = al.data.load("synthetic:defects?size=64&n=16&seed=0", split="test", classes=["grain"])
    test = al.data.load("synthetic:defects?size=64&n=16&seed=1", split="test", classes=["grain"])
    m = make()
    image_before, pixel_before = _evaluate(m, test)
    history = m.fit(train, epochs=5, batch_size=8, lr=1e-2, seed=0, progress=False)
    image_after, pixel_after = _evaluate(m, test)
    assert history["prompts"][-1]["loss"] < 0.6 * history["prompts"][0]["loss"]
    # measured (torch seeds 0..3): image AUROC 0.27-0.48 -> 0.68-0.76, pixel 0.19-0.50 -> 0.93-0.95
    assert image_after > max(0.65, image_before + 0.15), (image_before, image_after)
    assert pixel_after > max(0.85, pixel_before + 0.3), (pixel_before, pixel_after)


# ---------------------------------------------------------------------- converter
def official_state(method: AdaClip) -> dict[str, torch.Tensor]:
    """Our tensors in the official ``AdaCLIP_Trainer.state_dict()`` layout (the inverse mapping)."""
    n = method.config.prompt_length
    state = {f"clip_model.visual_prompter.static_prompts.{j}": p for j, p in enumerate(method.static_visual)}
    state["clip_model.text_prompter.static_prompts.0"] = torch.zeros_like(method.static_text[0])
    state.update(
        {f"clip_model.text_prompter.static_prompts.{j + 1}": p for j, p in enumerate(method.static_text)}
    )
    for ours, theirs in (("dynamic_visual", "dynamic_visual"), ("dynamic_text", "dynamic_text")):
        layer = getattr(method, ours)
        for i, (w, b) in enumerate(zip(layer.weight.chunk(n), layer.bias.chunk(n), strict=True)):
            state[f"clip_model.{theirs}_prompt_generator.head.{i}.weight"] = w
            state[f"clip_model.{theirs}_prompt_generator.head.{i}.bias"] = b
    for i, proj in enumerate(method.patch_projections):
        state[f"clip_model.patch_token_layer.head.{i}.weight"] = proj.weight
        state[f"clip_model.patch_token_layer.head.{i}.bias"] = proj.bias
    state["clip_model.cls_token_layer.head.0.weight"] = method.cls_projection.weight
    state["clip_model.cls_token_layer.head.0.bias"] = method.cls_projection.bias
    return {k: v.detach().clone() for k, v in state.items()}


def test_converter_maps_official_layout(tmp_path):
    source = make(prompt_length=3, prompt_depth=3)
    with torch.no_grad():
        for p in source.learned_parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
    torch.save(official_state(source), tmp_path / "pretrained.pth")
    converted = convert(tmp_path / "pretrained.pth", **TINY)
    assert (converted.config.prompt_length, converted.config.prompt_depth) == (3, 3)
    for a, b in zip(converted.learned_parameters(), source.learned_parameters(), strict=True):
        torch.testing.assert_close(a, b)
    images = _images(2, 4)
    torch.testing.assert_close(
        converted.forward_batch(images, ["object"] * 2, None).scores,
        source.forward_batch(images, ["object"] * 2, None).scores,
    )


def test_converter_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError):
        convert(tmp_path / "missing.pth", **TINY)
    torch.save({"ctx_pos": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not an official AdaCLIP"):
        convert(tmp_path / "other.pth", **TINY)
    state = official_state(make())
    del state["clip_model.patch_token_layer.head.3.weight"]
    torch.save(state, tmp_path / "short.pth")
    with pytest.raises(ValueError, match="patch_token_layer.head.3"):
        convert(tmp_path / "short.pth", **TINY)
    state = official_state(make())
    torch.save(state, tmp_path / "ok.pth")
    with pytest.raises(ValueError, match="shape"):
        convert(tmp_path / "ok.pth", **{**TINY, "prompt_length": 2})
