"""Parity with the official AA-CLIP code (Mwxinnn/AA-CLIP), run only when its source tree is at
``$ANOMALENS_OFFICIAL/AA-CLIP`` (never vendored here) and its dependency kornia is importable.

The official ``AdaptedCLIP`` hard-codes ViT-L-14-336 (widths 1024/768, 24 + 12 blocks), so both sides run
a randomly initialised ViT-L-14-336 at a small input (112 px, 8×8 grid) to stay cheap on a CPU. Chain:
identical random CLIP weights (the official loader resamples the native positional embedding itself),
random official adapters saved in the official checkpoint layout, `anomalens convert --from aa-clip`
equivalent, then preprocessing, text anchors, test maps, image terms, set-level scores and the stage-2
loss compared to 1e-4. Training steps of both stages (loss and gradients, stage 1 under
``official_compat``, whose V-V attention attends over the batch axis) are in `test_parity_aaclip_train`.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import official_code

pytestmark = pytest.mark.skipif(
    not official_code.available("aa-clip"), reason=f"official AA-CLIP source not at {official_code.AA_CLIP}"
)

SIZE = 112


@pytest.fixture(scope="module")
def official():
    pytest.importorskip("kornia", reason="the official AA-CLIP code needs kornia")
    with official_code.aa_clip_modules() as mods:
        yield mods


@pytest.fixture(scope="module")
def pair(official, tmp_path_factory):
    """(official AdaptedCLIP, our converted method) on the same random weights."""
    return official_code.aa_clip_pair(official, tmp_path_factory.mktemp("aa_clip_run"), SIZE)


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)


def test_preprocessing_matches(official, pair, tmp_path):
    _, ours = pair
    image = np.random.default_rng(0).integers(0, 256, (150, 130, 3), dtype=np.uint8)
    mask = np.zeros((150, 130), np.uint8)
    mask[20:70, 30:90] = 255
    Image.fromarray(image).save(tmp_path / "img.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    meta = {"image_path": "img.png", "label": 1, "mask_path": "mask.png", "class_name": "bottle"}
    (tmp_path / "meta.jsonl").write_text(json.dumps(meta) + "\n")
    item = official.dataset.BaseSingleClassDataset(
        str(tmp_path), str(tmp_path / "meta.jsonl"), SIZE, "bottle"
    )[0]
    torch.testing.assert_close(ours.backbone.preprocess([image])[0], item["image"], atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.backbone.preprocess_masks([mask])[0], item["mask"][0], atol=0, rtol=0)


def test_text_anchors_match(official, pair):
    theirs, ours = pair
    with torch.no_grad():
        for cls in ("bottle", "pcb1", "object"):
            dataset = "VisA" if cls == "pcb1" else "MVTec"
            expected = official.forward.get_adapted_single_class_text_embedding(theirs, dataset, cls, "cpu")
            torch.testing.assert_close(ours.frozen_anchors([cls])[0].T, expected, atol=1e-5, rtol=0)


def test_maps_image_terms_and_set_scores_match(official, pair, monkeypatch):
    theirs, ours = pair
    images = _images(4, 1)
    x = ours.backbone.preprocess(images)
    text = official_code.aa_clip_official_text(official, theirs, "bottle")
    maps, terms = official_code.aa_clip_official_predict(official, theirs, x, text)
    prediction = ours.predict(images, "bottle", batch_size=3)
    np.testing.assert_allclose(prediction.maps, maps.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(prediction.extras["image_term"], terms.numpy(), atol=1e-5)

    captured = []

    def capture(labels, scores):
        captured.append(np.asarray(scores))
        return 0.5

    monkeypatch.setattr(official.forward, "roc_auc_score", capture)
    monkeypatch.setattr(official.forward, "average_precision_score", lambda labels, scores: 0.5)
    labels = np.array([0, 1, 0, 1])
    official.forward.metrics_eval(
        np.zeros((4, 1, SIZE, SIZE)), labels, maps.numpy(), terms.numpy(), "bottle", "Industrial"
    )
    np.testing.assert_allclose(ours.set_scores(prediction, ["bottle"] * 4), captured[1], atol=1e-4)


def test_stage2_loss_matches(official, pair):
    from anomalens.methods.base import TrainBatch

    theirs, ours = pair
    x = ours.backbone.preprocess(_images(2, 2))
    masks = torch.zeros(2, SIZE, SIZE)
    masks[1, 30:60, 40:80] = 1.0
    labels = torch.tensor([0, 1])
    with torch.no_grad():
        text = official.forward.get_adapted_single_class_text_embedding(theirs, "MVTec", "bottle", "cpu")
        batch_text = torch.stack([text, text])
        patch_features, det = theirs(x)
        expected = torch.nn.functional.cross_entropy(torch.matmul(det[:, None], batch_text)[:, 0], labels)
        for f in patch_features:
            preds = official.forward.calculate_similarity_map(f, batch_text, SIZE)
            expected = expected + official.forward.calculate_seg_loss(preds, masks[:, None])
        batch = TrainBatch(x, masks, labels, torch.ones(2, dtype=torch.bool), ["bottle", "bottle"])
        got = ours.image_stage_loss(batch)["loss"]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)


def test_converter_reads_official_layout(pair):
    theirs, ours = pair
    assert ours.config.adapt_text and not ours.config.projector_act
    torch.testing.assert_close(ours.text_projection.fc.weight, theirs.text_adapter[3].fc[0].weight)
    torch.testing.assert_close(
        ours.image_adapters[5].fc.weight, theirs.image_adapter["layer_adapters"][5].fc[0].weight
    )
    torch.testing.assert_close(ours.det_projector.fc.weight, theirs.image_adapter["det_proj"].fc.weight)
