"""Decision thresholds: "is this image anomalous or not?" (DESIGN §3.5).

A threshold is stored with the checkpoint (`Method.threshold`) and applied by `anomalens detect` to the
per-image scores of `Method.predict`: an image is anomalous when ``score > threshold``. Calibration
therefore uses those same per-image scores, never the set-level normalised ones of `Method.set_scores`
(which depend on the other images of an evaluated set and do not exist for a single image).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from anomalens.data.types import Dataset
from anomalens.inference import predict_batches
from anomalens.methods.base import DEFAULT, ImageLike, Method


@dataclass(frozen=True)
class Calibration:
    """A threshold and how it was obtained."""

    threshold: float
    rule: str  # "percentile" | "f1"
    n_normal: int
    n_anomalous: int
    percentile: float | None = None
    f1: float | None = None  # the F1 reached on the calibration set ("f1" rule)

    def summary(self) -> str:
        """One line: the threshold, its rule and the calibration set."""
        how = f"F1 {self.f1:.3f}" if self.rule == "f1" else f"{self.percentile:g}th percentile of normals"
        return (
            f"threshold {self.threshold:.6g} ({self.rule}: {how}; {self.n_normal} normal, "
            f"{self.n_anomalous} anomalous images)"
        )


def threshold_from_normals(scores: Sequence[float] | np.ndarray, percentile: float = 99.0) -> float:
    """The `percentile`-th percentile of normal images' scores: about (100 − percentile) % of normal
    images score above it and are flagged."""
    s = _finite_scores(scores)
    if not 0.0 <= percentile <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {percentile}")
    return float(np.percentile(s, percentile))


def threshold_f1(
    labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray
) -> tuple[float, float]:
    """(threshold, F1) maximising F1 of the rule ``score > threshold`` on a labelled set.

    The threshold is placed halfway between the lowest score flagged anomalous and the next lower
    distinct score, so it does not sit exactly on a calibration image's score.
    """
    s = _finite_scores(scores)
    y = np.asarray(labels).astype(bool).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in length ({y.size} vs {s.size})")
    if not y.any():
        raise ValueError("F1 threshold needs at least one anomalous image (use the percentile rule)")
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    # Cut after the last of each run of tied scores: everything above the cut is flagged.
    last_of_tie = np.r_[s_sorted[1:] != s_sorted[:-1], True]
    tp = np.cumsum(y_sorted)[last_of_tie]
    flagged = np.flatnonzero(last_of_tie) + 1
    f1 = 2 * tp / (flagged + y.sum())
    best = int(np.argmax(f1))
    cut = flagged[best]  # images s_sorted[:cut] are anomalous
    lowest_flagged = s_sorted[cut - 1]
    below = s_sorted[cut] if cut < s_sorted.size else lowest_flagged - max(1e-6, abs(lowest_flagged) * 1e-6)
    return float((lowest_flagged + below) / 2), float(f1[best])


def calibrate(
    method: Method,
    images: Sequence[ImageLike] | None = None,
    data: Dataset | None = None,
    *,
    rule: str = "auto",
    percentile: float = 99.0,
    support: Sequence[ImageLike] | None = None,
    class_name: str | None = None,
    batch_size: int = 16,
) -> Calibration:
    """Set `method.threshold` from normal `images` (percentile rule) or a labelled `data` set.

    rule: "auto" (F1-max when `data` holds anomalous images, else percentile), "percentile" or "f1".
    With `data`, each image is scored under its own class name; `support` (few-shot methods) is shared.
    """
    if (images is None) == (data is None):
        raise ValueError("calibrate needs either images (normal) or data (a dataset), not both")
    if rule not in ("auto", "percentile", "f1"):
        raise ValueError(f"unknown calibration rule {rule!r}; use auto, percentile or f1")
    if images is not None:
        labels = np.zeros(len(images), dtype=np.int64)
        scores = method.predict(images, class_name, support=support, batch_size=batch_size).scores
    else:
        if len(data) == 0:
            raise ValueError(f"dataset {data.name!r} is empty")
        labels = data.labels
        batches = predict_batches(method, data, support=support, batch_size=batch_size)
        scores = np.concatenate([prediction.scores for _, prediction in batches])
    if rule == "auto":
        rule = "f1" if labels.any() else "percentile"
    n_anomalous = int(labels.sum())
    if rule == "f1":
        threshold, f1 = threshold_f1(labels, scores)
        result = Calibration(threshold, "f1", len(labels) - n_anomalous, n_anomalous, f1=f1)
    else:
        normal = scores[labels == 0]
        if normal.size == 0:
            raise ValueError("percentile rule needs normal images; the calibration set has none")
        result = Calibration(
            threshold_from_normals(normal, percentile),
            "percentile",
            normal.size,
            n_anomalous,
            percentile=percentile,
        )
    method.threshold = result.threshold
    return result


def calibrate_checkpoint(
    checkpoint: str | os.PathLike,
    *,
    data: str | None = None,
    normals: Sequence[str] | None = None,
    split: str = "test",
    classes: Sequence[str] | None = None,
    support: Sequence[str] | None = None,
    out: str | os.PathLike | None = None,
    device: str = "auto",
    pretrained: str | None = DEFAULT,
    **options: Any,
) -> tuple[Calibration, Path]:
    """Calibrate a saved model and store its threshold (what `anomalens calibrate` runs): `calibrate` on
    the dataset spec `data` (its `split`, `classes`) or on the normal images `normals` (files, folders,
    globs), then save the model to `out` (default: over `checkpoint`). Returns the calibration and the
    file written.

    support: normal images (files, folders, globs) of few-shot methods. options: `calibrate`'s
    (``rule``, ``percentile``, ``class_name``, ``batch_size``).
    """
    import anomalens.data as al_data
    from anomalens.methods.base import load
    from anomalens_onnx.files import expand_inputs

    method = load(checkpoint, device=device, pretrained=pretrained)
    images = expand_inputs(normals) if normals else None
    dataset = al_data.load(data, split, classes) if data else None
    files = expand_inputs(support) if support else None
    return calibrate(method, images, dataset, support=files, **options), method.save(out or checkpoint)


def _finite_scores(scores: Sequence[float] | np.ndarray) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64).ravel()
    if s.size == 0:
        raise ValueError("no scores to calibrate on")
    if not np.isfinite(s).all():
        raise ValueError(f"{int((~np.isfinite(s)).sum())} non-finite score(s) in the calibration set")
    return s
