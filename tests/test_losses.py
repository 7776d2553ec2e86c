"""Losses on tiny tensors whose expected values are worked out by hand (scalar maths, not torch)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from anomalens.losses import at_least_fp32, binary_focal_loss, dice_loss, focal_loss

S = 1e-5  # focal smooth


def test_focal_loss_two_pixels_by_hand():
    # Pixel 0: p = [0.8, 0.2], class 0 -> y = [1-S, S],  p_t = 0.8(1-S) + 0.2S + S = 0.8 + 0.4S
    # Pixel 1: p = [0.7, 0.3], class 1 -> y = [S, 1-S],  p_t = 0.7S + 0.3(1-S) + S = 0.3 + 1.4S
    probs = torch.tensor([[0.8, 0.7], [0.2, 0.3]], dtype=torch.float64).reshape(1, 2, 1, 2)
    target = torch.tensor([[[0, 1]]])
    pt0, pt1 = 0.8 + 0.4 * S, 0.3 + 1.4 * S
    expected = (-((1 - pt0) ** 2) * math.log(pt0) - ((1 - pt1) ** 2) * math.log(pt1)) / 2
    assert focal_loss(probs, target).item() == pytest.approx(expected, rel=1e-12)
    # gamma = 0: plain (smoothed) cross-entropy on probabilities.
    expected_ce = -(math.log(pt0) + math.log(pt1)) / 2
    assert focal_loss(probs, target, gamma=0.0).item() == pytest.approx(expected_ce, rel=1e-12)


def test_focal_loss_three_classes_clamps_to_smooth_over_c_minus_one():
    # p = [0.5, 0.3, 0.2], class 2 -> y = [S/2, S/2, 1-S]; p_t = 0.25S + 0.15S + 0.2(1-S) + S = 0.2 + 1.2S
    probs = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64).reshape(1, 3)
    pt = 0.2 + 1.2 * S
    expected = -((1 - pt) ** 2) * math.log(pt)
    assert focal_loss(probs, torch.tensor([2])).item() == pytest.approx(expected, rel=1e-12)


def test_focal_loss_float_mask_and_errors():
    probs = torch.softmax(torch.randn(2, 2, 3, 3, dtype=torch.float64), dim=1)
    mask = (torch.rand(2, 3, 3) > 0.5).to(torch.float64)
    assert focal_loss(probs, mask).item() == pytest.approx(focal_loss(probs, mask.long()).item())
    assert focal_loss(probs, mask).item() > 0
    with pytest.raises(ValueError):
        focal_loss(probs, mask[:, :2])
    with pytest.raises(ValueError):
        focal_loss(probs[:, :1], mask)


def test_focal_loss_prefers_the_right_class():
    good = torch.tensor([[0.99], [0.01]]).reshape(1, 2, 1, 1)
    bad = good.flip(1)
    target = torch.zeros(1, 1, 1, dtype=torch.long)
    assert focal_loss(good, target) < 1e-5 < focal_loss(bad, target)


def test_dice_loss_per_image_then_batch_mean():
    # Image 0: p = [0.5, 1.0], t = [0, 1]: (2*1 + 1) / (1.5 + 1 + 1) = 3/3.5
    # Image 1: p = [0, 0],     t = [0, 0]: (0 + 1) / (0 + 0 + 1)     = 1
    pred = torch.tensor([[[0.5, 1.0]], [[0.0, 0.0]]])
    target = torch.tensor([[[0, 1]], [[0, 0]]])
    expected = 1 - (3 / 3.5 + 1) / 2  # 0.0714...; a batch-pooled Dice would give 1 - 3/3.5 = 0.1428...
    assert dice_loss(pred, target).item() == pytest.approx(expected, rel=1e-6)
    assert dice_loss(pred, target.bool()).item() == pytest.approx(expected, rel=1e-6)
    # smooth = 0: image 1 would be 0/0, so use image 0 alone: 1 - 2/2.5
    assert dice_loss(pred[:1], target[:1], smooth=0.0).item() == pytest.approx(0.2, rel=1e-6)
    with pytest.raises(ValueError):
        dice_loss(pred, target[:, :, :1])


def test_binary_focal_loss_on_probabilities_by_hand():
    # p = 0.9, y = 1: BCE = -ln 0.9, p_t = 0.9 -> 0.1^2 * BCE
    # p = 0.2, y = 1: BCE = -ln 0.2, p_t = 0.2 -> 0.8^2 * BCE
    scores = torch.tensor([0.9, 0.2], dtype=torch.float64)
    target = torch.tensor([1, 1])
    expected = (0.01 * -math.log(0.9) + 0.64 * -math.log(0.2)) / 2
    assert binary_focal_loss(scores, target, logits=False).item() == pytest.approx(expected, rel=1e-12)
    assert binary_focal_loss(scores, target, logits=False, alpha=0.5).item() == pytest.approx(expected / 2)


def test_binary_focal_loss_on_logits_and_official_double_sigmoid():
    # logit 0, y = 1: BCE = ln 2, p_t = 0.5 -> 0.25 ln 2
    zero = torch.zeros(1, dtype=torch.float64)
    one = torch.ones(1)
    assert binary_focal_loss(zero, one, logits=True).item() == pytest.approx(0.25 * math.log(2), rel=1e-12)
    # InCTRL feeds probabilities with logits=True: identical to probabilities sigmoid(p) with logits=False.
    p = torch.tensor([0.9, 0.3], dtype=torch.float64)
    y = torch.tensor([1.0, 0.0])
    official = binary_focal_loss(p, y, logits=True)
    assert official.item() == pytest.approx(binary_focal_loss(torch.sigmoid(p), y, logits=False).item())
    assert official.item() != pytest.approx(binary_focal_loss(p, y, logits=False).item(), rel=1e-3)
    with pytest.raises(ValueError):
        binary_focal_loss(p, y[:1], logits=True)


def test_similarity_heads_and_losses_stay_fp32_under_autocast():
    """Training with amp=True: cosines × 100 and the losses are computed in float32 (CPU bf16 autocast
    stands in for CUDA's here)."""
    from anomalens.methods.core_clip import compatibility
    from anomalens.ops import anchor_probability

    g = torch.Generator().manual_seed(0)
    features = F.normalize(torch.randn(2, 3, 16, generator=g), dim=-1)
    text = F.normalize(torch.randn(2, 2, 16, generator=g), dim=-1)
    probs = torch.softmax(torch.randn(2, 2, 4, 4, generator=g), dim=1)
    masks = (torch.rand(2, 4, 4, generator=g) > 0.5).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cos = compatibility(features, text)
        prob = anchor_probability(features[:, 0], text, 100.0)
        focal = focal_loss(probs.bfloat16(), masks)
        dice = dice_loss(probs[:, 1].bfloat16(), masks)
    assert {t.dtype for t in (cos, prob, focal, dice)} == {torch.float32}
    torch.testing.assert_close(cos, compatibility(features, text))
    torch.testing.assert_close(focal, focal_loss(probs.bfloat16().float(), masks))


def test_at_least_fp32_widens_half_precision_only():
    for dtype, expected in (
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.float32),
        (torch.float64, torch.float64),
    ):
        assert at_least_fp32(torch.ones(2, dtype=dtype)).dtype == expected
