"""All metrics of one evaluated set in one call, sharing the sorted scores between metrics."""

from __future__ import annotations

from numpy.typing import ArrayLike

from anomalens.metrics.checks import PixelInput
from anomalens.metrics.curves import rank_stats
from anomalens.metrics.image import image_metric, image_stats
from anomalens.metrics.pixel import pixel_metric, split_pixels
from anomalens.metrics.pro import AuproVariant, aupro_of_split

IMAGE_METRICS = ("image_auroc", "image_ap", "image_f1_max")
PIXEL_METRICS = ("pixel_auroc", "pixel_ap", "pixel_f1_max")
AUPRO_FPR_LIMIT = 0.3


def evaluate(
    labels: ArrayLike,
    scores: ArrayLike,
    masks: PixelInput | None = None,
    maps: PixelInput | None = None,
    aupro_variant: AuproVariant = "mvtec",
) -> dict[str, float | None]:
    """Image metrics, plus pixel metrics and AUPRO (FPR limit 0.3) when masks and maps are given.

    labels, scores: (N,) per image. masks, maps: as in `pixel_auroc` (None masks = normal images).
    Each class of pixels is sorted once for all pixel metrics. Undefined metrics are None (with a warning).
    Returns {image_auroc, image_ap, image_f1_max[, pixel_auroc, pixel_ap, pixel_f1_max, aupro]}.
    """
    if (masks is None) != (maps is None):
        raise ValueError("pass both masks and maps for pixel metrics, or neither")
    if aupro_variant not in ("mvtec", "sampled"):
        raise ValueError(f"aupro_variant must be 'mvtec' or 'sampled', got {aupro_variant!r}")
    stats = image_stats(labels, scores)
    results = {name: image_metric(stats, name) for name in IMAGE_METRICS}
    if masks is not None:
        split = split_pixels(masks, maps, with_regions=True)
        pixel_stats = rank_stats(split.pos, split.neg)
        results.update({name: pixel_metric(pixel_stats, name) for name in PIXEL_METRICS})
        results["aupro"] = aupro_of_split(split, AUPRO_FPR_LIMIT, aupro_variant)
    return results
