"""Input validation shared by the metrics, and the warning raised for undefined metrics."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike

PixelInput = np.ndarray | Sequence[ArrayLike]
"""Pixel-level input: an (N, H, W) array, or a sequence of (H, W) arrays whose sizes may differ."""


class UndefinedMetricWarning(UserWarning):
    """A metric is undefined for the given data (e.g. a single class); it is reported as None."""


def warn_undefined(metric: str, reason: str) -> None:
    """Warn that `metric` is undefined; callers then return None instead of a number."""
    warnings.warn(f"{metric} is undefined: {reason}; returning None.", UndefinedMetricWarning, stacklevel=2)


def has_both_classes(n_pos: int, n_neg: int, metric: str, positive: str, negative: str) -> bool:
    """True when both classes are present; otherwise warn that `metric` is undefined and return False."""
    if n_pos == 0 or n_neg == 0:
        warn_undefined(metric, f"no {positive if n_pos == 0 else negative}")
        return False
    return True


def as_scores(values: ArrayLike, name: str) -> np.ndarray:
    """Finite float scores; float32/float64 are kept (sorting float32 is faster), the rest is float64."""
    scores = np.asarray(values)
    if scores.dtype.kind not in "biuf":
        raise ValueError(f"{name} must be numeric, got dtype {scores.dtype}")
    if scores.dtype not in (np.float32, np.float64):
        scores = scores.astype(np.float64)
    if not np.isfinite(scores).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return scores


def as_binary(values: ArrayLike, name: str) -> np.ndarray:
    """Boolean array from bool or 0/1 values; anything else (e.g. 0/255 masks) is an error."""
    array = np.asarray(values)
    if array.dtype == bool:
        return array
    if array.dtype.kind not in "biuf" or not ((array == 0) | (array == 1)).all():
        raise ValueError(f"{name} must be boolean or 0/1 (threshold or rescale 0/255 masks first)")
    return array.astype(bool)


def image_inputs(labels: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """(labels as bool (N,), scores as float (N,)) after checking that they match."""
    y = as_binary(labels, "labels")
    s = as_scores(scores, "scores")
    if y.ndim != 1 or s.shape != y.shape:
        raise ValueError(f"labels and scores must be 1-D of equal length, got {y.shape} and {s.shape}")
    return y, s


def pixel_pairs(masks: PixelInput, maps: PixelInput) -> list[tuple[np.ndarray, np.ndarray]]:
    """Validated (mask bool (H, W), map float (H, W)) per image.

    A None mask in a sequence stands for a normal image (no anomalous pixel), as in `Sample.mask`.
    """
    mask_list = _as_image_list(masks, "masks")
    map_list = _as_image_list(maps, "maps")
    if len(mask_list) != len(map_list):
        raise ValueError(f"got {len(mask_list)} masks but {len(map_list)} maps")
    pairs = []
    for i, (mask, amap) in enumerate(zip(mask_list, map_list, strict=True)):
        score_map = as_scores(amap, f"maps[{i}]")
        if score_map.ndim != 2:
            raise ValueError(f"maps[{i}] must be 2-D (H, W), got shape {score_map.shape}")
        gt = np.zeros(score_map.shape, bool) if mask is None else as_binary(mask, f"masks[{i}]")
        if gt.shape != score_map.shape:
            raise ValueError(f"masks[{i}] has shape {gt.shape} but maps[{i}] has shape {score_map.shape}")
        pairs.append((gt, score_map))
    return pairs


def check_fpr_limit(fpr_limit: float) -> float:
    """The FPR integration limit as a float in (0, 1]."""
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    return float(fpr_limit)


def _as_image_list(images: PixelInput, name: str) -> list:
    if isinstance(images, np.ndarray) and images.ndim != 3:
        raise ValueError(f"{name} as an array must be (N, H, W), got shape {images.shape}")
    return list(images)
