"""Pixel-level AUROC, AP and F1-max over all pixels of all images, and the pixel split they share."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from anomalens.metrics import curves
from anomalens.metrics.checks import PixelInput, has_both_classes, pixel_pairs
from anomalens.metrics.curves import RankStats, rank_stats

EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
"""GT regions are 8-connected, as in the MVTec AD evaluation code (scipy's default is 4)."""

POSITIVE = "anomalous pixel"
NEGATIVE = "normal pixel"


@dataclass(frozen=True)
class PixelSplit:
    """Scores of all anomalous and all normal pixels, each sorted ascending.

    pos_weight: 1 / (area of the pixel's 8-connected GT region), aligned with `pos`; None when the
    regions were not needed. n_regions: number of GT regions over all images.
    """

    pos: np.ndarray  # (P,)
    neg: np.ndarray  # (N,)
    pos_weight: np.ndarray | None
    n_regions: int


def region_weights(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """For each anomalous pixel of `mask` (row-major), 1 / area of its 8-connected region; and the count."""
    regions, n_regions = ndimage.label(mask, structure=EIGHT_CONNECTED)
    pixel_region = regions[mask]
    areas = np.bincount(pixel_region, minlength=n_regions + 1)
    return 1.0 / areas[pixel_region], n_regions


def split_pixels(masks: PixelInput, maps: PixelInput, with_regions: bool = False) -> PixelSplit:
    """Validate, pool and sort the pixels of all images; label GT regions when `with_regions`."""
    pairs = pixel_pairs(masks, maps)
    pos = _pool([amap[mask] for mask, amap in pairs])
    neg = np.sort(_pool([amap[~mask] for mask, amap in pairs]))
    if not with_regions:
        return PixelSplit(np.sort(pos), neg, None, 0)
    labelled = [region_weights(mask) for mask, _ in pairs]
    order = np.argsort(pos)
    weights = _pool([w for w, _ in labelled])[order]
    return PixelSplit(pos[order], neg, weights, sum(n for _, n in labelled))


def _pool(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(arrays) if arrays else np.zeros(0)


def pixel_metric(stats: RankStats, metric: str) -> float | None:
    """`metric` in {pixel_auroc, pixel_ap, pixel_f1_max} from shared stats; None if a class is absent."""
    if not has_both_classes(stats.n_pos, stats.n_neg, metric, POSITIVE, NEGATIVE):
        return None
    return _PIXEL_FORMULAS[metric](stats)


def pixel_auroc(masks: PixelInput, maps: PixelInput) -> float | None:
    """Pixel AUROC over all pixels of all images (None with a warning if a class is absent).

    masks: bool or 0/1, (N, H, W) or a list of (H, W) arrays (sizes may differ; None = normal image).
    maps: anomaly scores of the same shapes, higher = more anomalous.
    """
    return _pixel_metric_of(masks, maps, "pixel_auroc")


def pixel_ap(masks: PixelInput, maps: PixelInput) -> float | None:
    """Pixel average precision (sklearn's definition); inputs as in `pixel_auroc`."""
    return _pixel_metric_of(masks, maps, "pixel_ap")


def pixel_f1_max(masks: PixelInput, maps: PixelInput) -> float | None:
    """Largest pixel F1 over all thresholds; inputs as in `pixel_auroc`."""
    return _pixel_metric_of(masks, maps, "pixel_f1_max")


def _pixel_metric_of(masks: PixelInput, maps: PixelInput, metric: str) -> float | None:
    split = split_pixels(masks, maps)
    return pixel_metric(rank_stats(split.pos, split.neg), metric)


_PIXEL_FORMULAS = {
    "pixel_auroc": curves.auroc,
    "pixel_ap": curves.average_precision,
    "pixel_f1_max": curves.f1_max,
}
