"""AnomalyDINO: each step on hand-checked tensors, the DINO backbone's fixed-size path, and the method."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

import anomalens as al
import anomalens.methods.anomalydino as ad
from anomalens.backbones import load_dino

TINY = {"backbone": "test-tiny-dino", "pretrained": None, "device": "cpu", "image_size": 56}


def _images(n: int, seed: int, size: int = 56) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_rotate_image_90_degrees_by_hand():
    # 4×4, centre (2, 2): output (x, y) samples input column 4 − y, row x; column 4 reflects to 2.
    image = np.arange(16, dtype=np.uint8).reshape(4, 4)[..., None].repeat(3, axis=2) * 10
    out = ad.rotate_image(image, 90)[..., 0]
    src = image[..., 0]
    expected = np.stack([src[:, 2], src[:, 3], src[:, 2], src[:, 1]])  # row y = input column
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(ad.rotate_image(image, 0), image)


def test_rotate_image_45_degrees_interpolates_bilinearly():
    image = np.zeros((5, 5, 3), np.uint8)
    image[2, 3] = 200  # one bright pixel right of the centre (2.5, 2.5)
    out = ad.rotate_image(image, 45)[..., 0].astype(float)
    # Output (x, y) = (2, 2) samples (2.5 + (−0.5·c + 0.5·s), 2.5 + (−0.5·s − 0.5·c)) with c = s = √½:
    # (2.5, 1.79): between rows 1 and 2 of column 2 and 3 — only (2, 3) is bright: weight 0.5 · 0.79.
    c = math.sqrt(0.5)
    x, y = 2.5 - 0.5 * c + 0.5 * c, 2.5 - 0.5 * c - 0.5 * c
    wx, wy = x - math.floor(x), y - math.floor(y)
    assert out[2, 2] == round(200 * wx * wy)


def test_first_principal_component_of_points_on_a_line():
    features = torch.tensor([[[0.0, 0.0], [1.0, 2.0], [2.0, 4.0], [3.0, 6.0]]])  # (1, 4, 2)
    # Component (1, 2)/√5 (largest entry positive); centred rows are (t − 1.5)·(1, 2).
    expected = torch.tensor([[-1.5, -0.5, 0.5, 1.5]]) * math.sqrt(5)
    torch.testing.assert_close(ad.first_principal_component(features), expected)
    flipped = ad.first_principal_component(-features)
    torch.testing.assert_close(flipped, -expected)  # the component, not the data, fixes the sign


def test_background_mask_flips_when_the_centre_is_background():
    scores = torch.full((5, 5), 20.0)
    scores[1:4, 1:4] = -20.0  # above the threshold only on the border ring
    keep = ad.background_mask(scores.view(1, 25), (5, 5), kernel=1).view(5, 5)
    expected = torch.zeros(5, 5, dtype=torch.bool)
    expected[1:4, 1:4] = True  # the centre (3×3 crop) kept 0 ≤ 0.35·9 patches: flipped
    torch.testing.assert_close(keep, expected)


def test_background_mask_dilation_and_closing_ignore_the_border():
    scores = torch.zeros(6, 6)
    scores[0, 0] = 20.0
    keep = ad.background_mask(scores.view(1, 36), (6, 6), min_centre=-1.0).view(6, 6)
    expected = torch.zeros(6, 6, dtype=torch.bool)
    expected[:2, :2] = True  # dilated to 2×2; the closing's erosion does not eat at the grid edge
    torch.testing.assert_close(keep, expected)
    # Raster order (official): the element spans flattened neighbours i − 1, i, i + 1.
    raster = ad.background_mask(scores.view(1, 36), (6, 6), min_centre=-1.0, raster=True)
    assert raster[0].nonzero().flatten().tolist() == [0, 1]


def test_nearest_cosine_distance_by_hand():
    queries = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    bank = torch.tensor([[1.0, 1.0], [0.0, 3.0]])
    expected = torch.tensor([1 - math.sqrt(0.5), 0.0])
    torch.testing.assert_close(ad.nearest_cosine_distance(queries, bank), expected)
    torch.testing.assert_close(ad.nearest_cosine_distance(queries, bank, chunk=1), expected)


def test_mean_top_fraction_by_hand():
    distances = torch.arange(250, dtype=torch.float32)[None]  # 1 % of 250 = 2 patches
    torch.testing.assert_close(ad.mean_top_fraction(distances), torch.tensor([248.5]))
    few = torch.tensor([[0.1, 0.7, 0.3]])  # 1 % of 3 patches rounds to 0: the maximum
    torch.testing.assert_close(ad.mean_top_fraction(few), torch.tensor([0.7]))


def test_fixed_size_dino_equals_timm_dynamic_resampling_for_register_models():
    # test-tiny-dino has registers: DINOv2's hub rule for them (bicubic to the size, antialiased) is the
    # one timm applies at run time, so fixing the grid once must not change the features.
    fixed, dynamic = load_dino("test-tiny-dino", None, image_size=56), load_dino("test-tiny-dino", None)
    assert fixed.grid == (4, 4) and fixed.model.pos_embed.shape[1] == 16
    x = fixed.preprocess(_images(2, 0))
    torch.testing.assert_close(fixed.encode(x), dynamic.encode(x))


def test_preprocess_crops_to_whole_patches():
    dino = load_dino("test-tiny-dino", None, image_size=64)  # 64 = 4·14 + 8
    x = dino.preprocess(_images(1, 0, size=80))
    assert x.shape == (1, 3, 56, 56) and dino.grid == (4, 4)


def test_support_is_rotated_and_a_support_image_scores_zero():
    model = al.create("anomalydino", **TINY)
    support = _images(1, 1)
    assert len(model.support_images(list(support))) == 8
    pred = model.predict(np.concatenate([support, _images(1, 2)]), "object", support=support)
    assert pred.scores[0] < 1e-5 and pred.scores[1] > 1e-3
    plain = al.create("anomalydino", rotation=False, **TINY)
    assert len(plain.support_images(list(support))) == 1


def test_map_is_smoothed_at_the_image_resolution():
    model = al.create("anomalydino", sigma=4.0, **TINY)
    raw = al.create("anomalydino", sigma=0.0, **TINY)
    image, support = _images(1, 3, size=120), _images(1, 4)
    smooth, plain = model.predict(image, support=support), raw.predict(image, support=support)
    np.testing.assert_allclose(smooth.maps[0], gaussian_filter(plain.maps[0], sigma=4.0), atol=1e-6)
    np.testing.assert_allclose(smooth.scores, plain.scores)  # the score comes from raw distances


def test_masking_policy_follows_the_official_class_table():
    model = al.create("anomalydino", **TINY)
    assert model.masked("screw") and model.masked("Pipe fryum") and model.masked("macaroni1")
    assert not model.masked("bottle") and not model.masked("metal_nut") and not model.masked("widget")
    assert al.create("anomalydino", masking="on", **TINY).masked("bottle")
    assert not al.create("anomalydino", masking="off", **TINY).masked("screw")


def test_clip_backbone_name_is_a_clear_error():
    with pytest.raises(ValueError, match="DINOv2 backbone"):
        al.create("anomalydino", backbone="test-tiny", pretrained=None, device="cpu")
    with pytest.raises(ValueError, match="masking"):
        al.create("anomalydino", masking="sometimes", **TINY)
