"""Evaluation at the model input resolution, as the AnomalyCLIP / APRIL-GAN / Crane evaluators do."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike
from PIL import Image

from anomalens.metrics.checks import as_binary, as_scores


def resize_for_eval(
    mask: ArrayLike | None, amap: ArrayLike, size: int | tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Resize one GT mask and one anomaly map to `size` (an int for a square, or (height, width)).

    The mask goes through PIL bilinear resizing as an 8-bit 0/255 image and is binarised with > 0.5
    (after scaling to [0, 1]), which is what torchvision's Resize + ToTensor + `> 0.5` do in the official
    evaluators. The map is resized with PIL bilinear on float32 (antialiased when shrinking). A None mask
    (normal image) gives an all-False mask.

    Returns (mask bool (h, w), map float32 (h, w)).
    """
    height, width = (size, size) if isinstance(size, int) else size
    score_map = as_scores(amap, "map").astype(np.float32)
    if score_map.ndim != 2:
        raise ValueError(f"map must be 2-D (H, W), got shape {score_map.shape}")
    resized_map = np.asarray(Image.fromarray(score_map).resize((width, height), Image.Resampling.BILINEAR))
    if mask is None:
        return np.zeros((height, width), bool), resized_map
    gt = as_binary(mask, "mask")
    if gt.shape != score_map.shape:
        raise ValueError(f"mask has shape {gt.shape} but map has shape {score_map.shape}")
    mask_image = Image.fromarray(gt.astype(np.uint8) * 255).resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(mask_image) / 255.0 > 0.5, resized_map
