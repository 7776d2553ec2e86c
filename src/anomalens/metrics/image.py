"""Image-level AUROC, AP and F1-max (one score and one 0/1 label per image)."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from anomalens.metrics import curves
from anomalens.metrics.checks import has_both_classes, image_inputs
from anomalens.metrics.curves import RankStats, rank_stats

POSITIVE = "anomalous image"
NEGATIVE = "normal image"


def image_stats(labels: ArrayLike, scores: ArrayLike) -> RankStats:
    """RankStats of image scores (one group per anomalous image)."""
    y, s = image_inputs(labels, scores)
    return rank_stats(np.sort(s[y]), np.sort(s[~y]))


def image_metric(stats: RankStats, metric: str) -> float | None:
    """`metric` in {image_auroc, image_ap, image_f1_max} from shared stats; None if a class is absent."""
    if not has_both_classes(stats.n_pos, stats.n_neg, metric, POSITIVE, NEGATIVE):
        return None
    return _IMAGE_FORMULAS[metric](stats)


def image_auroc(labels: ArrayLike, scores: ArrayLike) -> float | None:
    """Image AUROC, equal to sklearn's roc_auc_score (ties count one half).

    labels: (N,) bool or 0/1, 1 = anomalous. scores: (N,) higher = more anomalous.
    Returns None with an UndefinedMetricWarning when only one class is present.
    """
    return image_metric(image_stats(labels, scores), "image_auroc")


def image_ap(labels: ArrayLike, scores: ArrayLike) -> float | None:
    """Image average precision, equal to sklearn's average_precision_score; None if one class only."""
    return image_metric(image_stats(labels, scores), "image_ap")


def f1_max(labels: ArrayLike, scores: ArrayLike) -> float | None:
    """Largest F1 over all distinct thresholds (max of F1 along sklearn's precision_recall_curve).

    Returns None with an UndefinedMetricWarning when only one class is present.
    """
    return image_metric(image_stats(labels, scores), "image_f1_max")


_IMAGE_FORMULAS = {
    "image_auroc": curves.auroc,
    "image_ap": curves.average_precision,
    "image_f1_max": curves.f1_max,
}
