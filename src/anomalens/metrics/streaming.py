"""Pixel metrics over many batches in bounded memory, from fixed-bin score histograms."""

from __future__ import annotations

import numpy as np

from anomalens.metrics.checks import PixelInput, check_fpr_limit, has_both_classes, pixel_pairs
from anomalens.metrics.curves import RankStats, pro_area
from anomalens.metrics.pixel import NEGATIVE, POSITIVE, pixel_metric, region_weights

DEFAULT_BINS = 2**16


class PixelMetricAccumulator:
    """Pixel AUROC, AP, F1-max and AUPRO ("mvtec") accumulated batch by batch in O(bins) memory.

    Each pixel's score is mapped to one of `bins` equal bins over `score_range`; per bin the accumulator
    keeps the number of normal pixels, of anomalous pixels, and the anomalous pixels' PRO weights
    (1 / area of their 8-connected GT region, labelled per image in `add`). Memory: 3 arrays of `bins`
    values, whatever the number of images (full VisA at 518 x 518 included).

    Exactness: the mapping to bins is monotone, so `compute` returns exactly the metrics of the scores
    rounded down to their bin's lower edge: pixels in one bin become ties, nothing is reordered. The
    difference from the exact functions comes only from pairs of pixels whose scores fall in the same bin
    (width (hi - lo) / bins, 1.5e-5 for [0, 1] and the default 2**16 bins): the AUROC moves by at most
    half the fraction of (anomalous, normal) pairs sharing a bin, and the PRO curve is exact at the bin
    edges and linear between them. Scores that are already on the bin grid (e.g. k / 2**16 in [0, 1])
    give the exact values.
    """

    def __init__(self, score_range: tuple[float, float] = (0.0, 1.0), bins: int = DEFAULT_BINS) -> None:
        low, high = (float(v) for v in score_range)
        if not (np.isfinite(low) and np.isfinite(high) and low < high):
            raise ValueError(f"score_range must be finite with low < high, got {score_range}")
        if bins < 2:
            raise ValueError(f"bins must be >= 2, got {bins}")
        self.score_range = (low, high)
        self.bins = bins
        self._neg_count = np.zeros(bins, np.int64)
        self._pos_count = np.zeros(bins, np.int64)
        self._pro_weight = np.zeros(bins, np.float64)
        self._n_regions = 0

    def add(self, masks: PixelInput, maps: PixelInput) -> None:
        """Add images: masks (N, H, W) or a list of (H, W) (None = normal image), maps of the same shapes.

        Raises ValueError when a score lies outside `score_range`.
        """
        for mask, amap in pixel_pairs(masks, maps):
            index = self._bin_index(amap)
            pos_index = index[mask]
            weights, n_regions = region_weights(mask)
            self._neg_count += np.bincount(index[~mask], minlength=self.bins)
            self._pos_count += np.bincount(pos_index, minlength=self.bins)
            self._pro_weight += np.bincount(pos_index, weights=weights, minlength=self.bins)
            self._n_regions += n_regions

    def compute(self, fpr_limit: float = 0.3) -> dict[str, float | None]:
        """{pixel_auroc, pixel_ap, pixel_f1_max, aupro} of everything added so far (None if undefined)."""
        limit = check_fpr_limit(fpr_limit)
        stats, occupied = self._stats()
        results = {name: pixel_metric(stats, name) for name in ("pixel_auroc", "pixel_ap", "pixel_f1_max")}
        results["aupro"] = (
            pro_area(stats, self._pro_weight[occupied], self._n_regions, limit)
            if has_both_classes(stats.n_pos, stats.n_neg, "aupro", POSITIVE, NEGATIVE)
            else None
        )
        return results

    def _bin_index(self, amap: np.ndarray) -> np.ndarray:
        low, high = self.score_range
        if amap.size and (amap.min() < low or amap.max() > high):
            raise ValueError(
                f"map values span [{amap.min()}, {amap.max()}], outside score_range [{low}, {high}]; "
                "create the accumulator with a wider score_range"
            )
        index = ((amap.astype(np.float64) - low) * (self.bins / (high - low))).astype(np.intp)
        return np.minimum(index, self.bins - 1)  # the top edge `high` belongs to the last bin

    def _stats(self) -> tuple[RankStats, np.ndarray]:
        """RankStats with one group per bin holding anomalous pixels, and the mask of those bins."""
        neg_ge = np.cumsum(self._neg_count[::-1])[::-1]  # normal pixels in this bin or above
        pos_ge = np.cumsum(self._pos_count[::-1])[::-1]
        occupied = self._pos_count > 0
        stats = RankStats(
            n_pos=int(pos_ge[0]),
            n_neg=int(neg_ge[0]),
            pos_count=self._pos_count[occupied],
            pos_ge=pos_ge[occupied],
            neg_ge=neg_ge[occupied],
            neg_gt=(neg_ge - self._neg_count)[occupied],
        )
        return stats, occupied
