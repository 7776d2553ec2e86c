"""Parity with the official AnomalyDINO code (dammsi/AnomalyDINO) on identical random DINOv2 ViT-S/14 weights.

Skipped unless ``$ANOMALENS_OFFICIAL/AnomalyDINO`` and ``$ANOMALENS_OFFICIAL/dinov2`` hold checkouts of
the official repositories (never copied into this tree) and OpenCV is installed (the official code
imports it; ``pip install opencv-python-headless``). Matplotlib, imported by its plotting helpers only,
is stubbed when absent.

What is compared: the official DINOv2 ``dinov2_vits14`` model is built from its own classes with random
weights (seeded) and converted to timm's ``vit_small_patch14_dinov2`` layout with timm's own DINOv2
checkpoint filter; the official ``DINOv2Wrapper`` (``torch.hub.load`` replaced by that model) does the
preprocessing, feature extraction and zero-shot masking, ``augment_image`` the rotations, ``dists2map``
the maps and ``mean_top1p`` the scores. The official kNN search runs on faiss, which is not installed
here: it is replaced by its definition for ``knn_metric="L2_normalized"`` (squared L2 between unit
vectors / 2), written out below. Our method is then given the official rotated support images with
``rotation=False`` (OpenCV interpolates in fixed point, so our own rotation is compared separately, to
a grey level or two) and ``official_compat=True`` (the official mask morphology runs in raster order)
and must give the same features, masks, scores and full-resolution maps to 1e-4.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

OFFICIAL = Path(os.environ.get("ANOMALENS_OFFICIAL", "/nonexistent"))
ROOT, DINOV2 = OFFICIAL / "AnomalyDINO", OFFICIAL / "dinov2"
cv2 = pytest.importorskip("cv2", reason="the official AnomalyDINO code needs OpenCV")
pytestmark = pytest.mark.skipif(
    not ((ROOT / "src" / "backbones.py").is_file() and (DINOV2 / "hubconf.py").is_file()),
    reason="official AnomalyDINO / dinov2 code not at $ANOMALENS_OFFICIAL",
)

SIZE = 224  # official --resolution (448 in the paper); 16×16 patches keep the test fast


@pytest.fixture(scope="module")
def official():
    """(official modules, official DINOv2 model, our AnomalyDINO with the same weights)."""
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn

    from anomalens.backbones import DinoBackbone
    from anomalens.methods.anomalydino import AnomalyDINO

    if importlib.util.find_spec("matplotlib") is None:  # imported by src/utils.py for plots only
        plt = types.ModuleType("matplotlib.pyplot")
        sys.modules["matplotlib"] = types.ModuleType("matplotlib")
        sys.modules["matplotlib"].pyplot = plt
        sys.modules["matplotlib.pyplot"] = plt
    sys.path[:0] = [str(DINOV2), str(ROOT)]
    try:
        from dinov2.hub.backbones import dinov2_vits14
        from src import backbones, post_eval, utils
    finally:
        del sys.path[:2]
    torch.manual_seed(0)
    reference = dinov2_vits14(pretrained=False).eval()
    with torch.no_grad():  # random init leaves LayerScale at 1 and norms at identity: perturb them
        for name, p in reference.named_parameters():
            if "ls1" in name or "ls2" in name or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    state = checkpoint_filter_fn(reference.state_dict(), timm.create_model("vit_small_patch14_dinov2"))
    ours = timm.create_model("vit_small_patch14_dinov2", num_classes=0, dynamic_img_size=True)
    ours.load_state_dict(state, strict=True)
    dino = DinoBackbone(ours, name="vit_small_patch14_dinov2", pretrained=None, image_size=SIZE)
    method = AnomalyDINO(
        AnomalyDINO.make_config(image_size=SIZE, rotation=False, masking="on", official_compat=True), dino
    ).eval()
    hub = torch.hub.load
    torch.hub.load = lambda *args, **kwargs: reference
    try:
        wrapper = backbones.get_model("dinov2_vits14", "cpu", smaller_edge_size=SIZE)
    finally:
        torch.hub.load = hub
    return wrapper, utils, post_eval, method


def _images(n: int, seed: int, size: int = 160) -> list[np.ndarray]:
    """Smooth random colour fields with a bright square "object" in the middle (so masks vary)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        coarse = rng.integers(0, 256, (8, 8, 3)).astype(np.float32)
        image = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
        lo, hi = size // 4, 3 * size // 4
        image[lo:hi, lo:hi] = 0.5 * image[lo:hi, lo:hi] + 120
        out.append(np.clip(image, 0, 255).astype(np.uint8))
    return out


def _official_predict(wrapper, utils, post_eval, support, tests):
    """run_anomaly_detection's loop (detection.py) with faiss replaced by its L2_normalized definition."""
    bank = []
    for image in support:
        for rotated in utils.augment_image(image):
            tensor, grid = wrapper.prepare_image(rotated)
            bank.append(wrapper.extract_features(tensor))  # mask_ref_images=False: every patch
    bank = np.concatenate(bank).astype(np.float32)
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    scores, maps, masks = [], [], []
    for image in tests:
        tensor, grid = wrapper.prepare_image(image)
        features = wrapper.extract_features(tensor)
        mask = wrapper.compute_background_mask(features, grid, threshold=10, masking_type=True)
        query = features[mask]
        query = query / np.linalg.norm(query, axis=1, keepdims=True)
        # faiss IndexFlatL2, k=1: the smallest squared L2 distance, |q|² + |b|² − 2 q·b.
        squared = ((query**2).sum(1)[:, None] + (bank**2).sum(1)[None] - 2 * query @ bank.T).min(axis=1)
        distances = np.zeros_like(mask, dtype=float)
        distances[mask] = squared / 2
        scores.append(post_eval.mean_top1p(distances.flatten()))
        maps.append(utils.dists2map(distances.reshape(grid), image.shape))
        masks.append(mask)
    return np.array(scores), maps, masks


def test_scores_maps_and_masks_match_official(official):
    from anomalens.methods.anomalydino import background_mask, first_principal_component

    wrapper, utils, post_eval, method = official
    support, tests = _images(1, 0), _images(3, 1)
    rotated = [r for image in support for r in utils.augment_image(image)]
    ref_scores, ref_maps, ref_masks = _official_predict(wrapper, utils, post_eval, support, tests)

    pred = method.predict(tests, class_names="object", support=rotated)
    np.testing.assert_allclose(pred.scores, ref_scores, rtol=1e-4, atol=1e-5)
    for ours, ref in zip(pred.maps, ref_maps, strict=True):
        np.testing.assert_allclose(ours, ref, atol=1e-4)

    x = method.backbone.preprocess(tests)
    features = method.backbone.encode(x).flatten(1, 2)  # (B, N, C)
    torch.testing.assert_close(
        features[0].numpy(),
        wrapper.extract_features(wrapper.prepare_image(tests[0])[0]),
        atol=1e-4,
        rtol=1e-4,
    )
    scores = first_principal_component(features)
    keep = background_mask(scores, method.backbone.grid, raster=True).numpy()
    np.testing.assert_array_equal(keep, np.stack(ref_masks))
    # The official morphology runs along the raster order; on the grid (our default) it differs here.
    assert (background_mask(scores, method.backbone.grid).numpy() != keep).any()
    assert 0 < keep.sum() < keep.size, "the test images should give non-trivial masks"


def test_first_component_matches_sklearn_pca(official):
    from sklearn.decomposition import PCA

    from anomalens.methods.anomalydino import first_principal_component

    # A clear spectral gap, so that sklearn's randomized SVD has converged to the exact component.
    scale = torch.cat([torch.tensor([5.0]), torch.linspace(1, 0.1, 23)])
    features = torch.randn(2, 200, 24, generator=torch.Generator().manual_seed(0)) * scale
    ours = first_principal_component(features).numpy()
    for i in range(2):
        ref = PCA(n_components=1, svd_solver="randomized").fit_transform(features[i].numpy())[:, 0]
        np.testing.assert_allclose(ours[i], ref, atol=1e-4)


def test_rotation_matches_opencv_to_a_grey_level(official):
    from anomalens.methods.anomalydino import rotate_image

    _, utils, _, _ = official
    image = _images(1, 3, size=96)[0][:, :80]  # non-square
    for angle, ref in zip((0, 45, 90, 135, 180, 225, 270, 315), utils.augment_image(image), strict=True):
        diff = np.abs(rotate_image(image, angle).astype(int) - ref.astype(int))
        assert diff.max() <= 2 and diff.mean() < 0.1, (angle, diff.max(), diff.mean())
