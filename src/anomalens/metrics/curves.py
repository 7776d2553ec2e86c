"""Ranking metrics (AUROC, AP, F1-max, area under the PRO curve) from where positives sit among negatives.

Every metric here is a function of the threshold curve (TP(t), FP(t)) over all distinct scores t. Instead
of walking that curve, each positive (or each group of tied positives, or each histogram bin) is placed in
the ranking of the sorted negatives by binary search. This gives the same numbers as the curve, ties
included, and lets both classes be sorted by value with `np.sort` (about 10x faster than one `argsort` of
all pixels).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RankStats:
    """Position of each group of equal-scoring positives in the ranking of all scores.

    A group is one positive sample (exact metrics) or the positives of one histogram bin (streaming).
    """

    n_pos: int
    n_neg: int
    pos_count: np.ndarray  # (G,) positives in the group
    pos_ge: np.ndarray  # (G,) positives scoring >= the group's score (the group included)
    neg_ge: np.ndarray  # (G,) negatives scoring >= the group's score
    neg_gt: np.ndarray  # (G,) negatives scoring > the group's score


def rank_stats(pos_sorted: np.ndarray, neg_sorted: np.ndarray) -> RankStats:
    """RankStats with one group per positive, from the positive and negative scores sorted ascending."""
    n_pos, n_neg = pos_sorted.size, neg_sorted.size
    return RankStats(
        n_pos=n_pos,
        n_neg=n_neg,
        pos_count=np.ones(n_pos, np.int64),
        pos_ge=n_pos - np.searchsorted(pos_sorted, pos_sorted, side="left"),
        neg_ge=n_neg - np.searchsorted(neg_sorted, pos_sorted, side="left"),
        neg_gt=n_neg - np.searchsorted(neg_sorted, pos_sorted, side="right"),
    )


def auroc(stats: RankStats) -> float:
    """Area under the ROC curve, ties counted one half (sklearn's trapezoidal ROC AUC), in integers."""
    # Each positive beats the negatives below it and ties with those at its score.
    twice_wins = np.sum(stats.pos_count * (2 * stats.n_neg - stats.neg_ge - stats.neg_gt))
    return float(twice_wins / (2 * stats.n_pos * stats.n_neg))


def average_precision(stats: RankStats) -> float:
    """sum_t (R(t) - R(t_prev)) P(t) over distinct thresholds t (sklearn's average_precision_score)."""
    precision = stats.pos_ge / (stats.pos_ge + stats.neg_ge)
    return float(np.sum(stats.pos_count * precision) / stats.n_pos)


def f1_max(stats: RankStats) -> float:
    """Largest F1 = 2 TP / (TP + FP + P) over all distinct thresholds.

    The maximum is always reached at the score of some positive: lowering the threshold to the next
    negative adds false positives only.
    """
    return float(np.max(2 * stats.pos_ge / (stats.pos_ge + stats.neg_ge + stats.n_pos)))


def pro_area(stats: RankStats, pro_weight: np.ndarray, n_regions: int, fpr_limit: float) -> float:
    """Area under the PRO curve up to `fpr_limit`, divided by `fpr_limit` (MVTec AD definition).

    The official curve joins the points (FPR(t), PRO(t)) of all distinct thresholds t by straight
    segments, starts at (0, 0) and is interpolated linearly at the limit. PRO(t) is a weighted count of
    the anomalous pixels scoring >= t, with weight 1 / (area of the pixel's GT region) / n_regions. As a
    function of FPR, a pixel's contribution is therefore a ramp: 0 before `start` (the FPR of the
    thresholds above its score), 1 after `end` (the FPR once its tie group is counted), linear in between
    (the segment across the tie; a step when no normal pixel ties with it). The area is the weighted sum
    of the ramps' integrals over [0, fpr_limit].

    pro_weight: (G,) summed weights of the group's pixels (sum over all groups = n_regions).
    """
    start = stats.neg_gt / stats.n_neg
    end = stats.neg_ge / stats.n_neg
    crossing = (start < fpr_limit) & (end > fpr_limit)
    partial = np.zeros_like(start)
    np.divide((fpr_limit - start) ** 2, 2 * (end - start), out=partial, where=crossing)
    ramp_area = np.where(end <= fpr_limit, fpr_limit - (start + end) / 2, partial)
    return float(np.sum(pro_weight * ramp_area) / (n_regions * fpr_limit))
