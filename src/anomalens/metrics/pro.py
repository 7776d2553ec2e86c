"""AUPRO: area under the per-region-overlap curve, in the two variants used by published tables."""

from __future__ import annotations

from typing import Literal

import numpy as np

from anomalens.metrics.checks import PixelInput, check_fpr_limit, has_both_classes, warn_undefined
from anomalens.metrics.curves import pro_area, rank_stats
from anomalens.metrics.pixel import NEGATIVE, POSITIVE, PixelSplit, split_pixels

AuproVariant = Literal["mvtec", "sampled"]
SAMPLED_STEPS = 200
"""The sampled variant's threshold count: np.arange(min, max, (max - min) / 200)."""


def aupro(
    masks: PixelInput, maps: PixelInput, fpr_limit: float = 0.3, variant: AuproVariant = "mvtec"
) -> float | None:
    """Area under the per-region-overlap (PRO) curve up to `fpr_limit`, a float in [0, 1].

    masks: bool or 0/1, (N, H, W) or a list of (H, W) arrays (sizes may differ; None = normal image).
    maps: anomaly scores of the same shapes, higher = more anomalous.

    variant="mvtec" (default): the official MVTec AD evaluation. GT regions are the 8-connected
    components of each mask; over all distinct thresholds t, FPR(t) is the fraction of all normal pixels
    (of all images) scoring >= t and PRO(t) the mean over all regions (pooled over images) of the
    fraction of the region scoring >= t. The curve (0, 0), (FPR(t), PRO(t))... is integrated with the
    trapezoid rule up to `fpr_limit`, interpolating linearly at the limit, and divided by `fpr_limit`.
    Exact (no threshold sampling), computed in float64 (the official code rounds FPR to float32).

    variant="sampled": `cal_pro_score` of the AnomalyCLIP / APRIL-GAN / Crane code. Thresholds
    np.arange(min, max, (max - min) / 200) in the maps' dtype over all maps, pixels count when
    score > threshold, 8-connected regions pooled over images (= skimage.measure.label's default in 2-D),
    keep the points with FPR < fpr_limit, min-max rescale their FPRs to [0, 1], trapezoid area, no
    division by the limit. None (with a warning) for constant maps or fewer than two distinct kept FPRs.

    Both return None with an UndefinedMetricWarning when there is no anomalous or no normal pixel.
    """
    if variant not in ("mvtec", "sampled"):
        raise ValueError(f"variant must be 'mvtec' or 'sampled', got {variant!r}")
    limit = check_fpr_limit(fpr_limit)
    return aupro_of_split(split_pixels(masks, maps, with_regions=True), limit, variant)


def aupro_of_split(split: PixelSplit, fpr_limit: float, variant: AuproVariant) -> float | None:
    """AUPRO from pooled pixels whose GT regions were labelled (`split_pixels(..., with_regions=True)`)."""
    if not has_both_classes(split.pos.size, split.neg.size, "aupro", POSITIVE, NEGATIVE):
        return None
    if variant == "mvtec":
        return pro_area(rank_stats(split.pos, split.neg), split.pos_weight, split.n_regions, fpr_limit)
    return _sampled_aupro(split, fpr_limit)


def _sampled_aupro(split: PixelSplit, fpr_limit: float) -> float | None:
    lowest = min(split.pos[0], split.neg[0])
    highest = max(split.pos[-1], split.neg[-1])
    if lowest == highest:
        warn_undefined("aupro (sampled)", "all map values are equal, so there is no threshold")
        return None
    thresholds = np.arange(lowest, highest, (highest - lowest) / SAMPLED_STEPS)
    fpr = (split.neg.size - np.searchsorted(split.neg, thresholds, side="right")) / split.neg.size
    # covered[i] = summed region weights of anomalous pixels i.. (sorted), i.e. those above a threshold.
    covered = np.append(np.cumsum(split.pos_weight[::-1])[::-1], 0.0)
    pro = covered[np.searchsorted(split.pos, thresholds, side="right")] / split.n_regions
    kept = fpr < fpr_limit
    fpr, pro = fpr[kept], pro[kept]
    if fpr.size < 2 or fpr[0] == fpr[-1]:
        warn_undefined("aupro (sampled)", f"fewer than two distinct FPRs below {fpr_limit}")
        return None
    rescaled = (fpr - fpr.min()) / (fpr.max() - fpr.min())
    # FPR falls as the threshold rises, so the trapezoids run right to left (as sklearn.metrics.auc does).
    return float(np.sum((rescaled[:-1] - rescaled[1:]) * (pro[:-1] + pro[1:]) / 2))
