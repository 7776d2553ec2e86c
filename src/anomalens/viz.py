"""Heatmap overlays, PNG output and a self-contained HTML report (curves, histograms, cases).

numpy + Pillow only (no matplotlib). Every file is written atomically (temporary file + rename), so an
interrupted run never leaves a half-written PNG or report behind (DESIGN §8).
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image
from scipy import ndimage

from anomalens.data.types import Dataset
from anomalens.files import atomic_write

if TYPE_CHECKING:
    from anomalens.evaluation import ClassResult

OUTLINE_RGB = (0, 255, 0)
THUMBNAIL = 224  # longest side of report images, pixels
# Case names of the report, in display order.
TOP_ANOMALIES = "highest-scoring anomalies"
MISSED_ANOMALIES = "lowest-scoring anomalies"
FALSE_ALARMS = "highest-scoring normals"
NORMAL_COLOUR, ANOMALY_COLOUR = "#2f6fd0", "#d0392f"
HISTOGRAM_BINS = 20
MASK_PIXEL_FPR = 0.01  # thresholded masks: the map value exceeded by 1 % of normal-image pixels
MASK_SAMPLES = 4096  # pixels sampled per normal map to estimate that value


def colormap(values: np.ndarray) -> np.ndarray:
    """Jet-like colours for values in [0, 1] (clipped): blue → cyan → yellow → red; (...) → (..., 3) uint8."""
    v = np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0)[..., None]
    centres = np.array([0.75, 0.5, 0.25], dtype=np.float32)  # where r, g, b peak
    rgb = np.clip(1.5 - np.abs(4.0 * (v - centres)), 0.0, 1.0)
    return np.round(rgb * 255).astype(np.uint8)


def normalise_map(amap: np.ndarray, vmin: float | None = None, vmax: float | None = None) -> np.ndarray:
    """Scale a map to [0, 1] over [vmin, vmax] (default: the map's own range); non-finite values → 0."""
    m = np.asarray(amap, dtype=np.float32)
    finite = np.isfinite(m)
    values = m[finite]
    lo = vmin if vmin is not None else (float(values.min()) if values.size else 0.0)
    hi = vmax if vmax is not None else (float(values.max()) if values.size else 1.0)
    out = (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)
    return np.where(finite, np.clip(out, 0.0, 1.0), 0.0)


def overlay(
    image: np.ndarray,
    amap: np.ndarray,
    alpha: float = 0.5,
    vmin: float | None = None,
    vmax: float | None = None,
) -> np.ndarray:
    """Blend the colour-mapped `amap` over `image` (uint8 H×W×3); the map is resized to the image.

    `vmin`/`vmax` fix the colour range (e.g. over a whole class, so a normal image looks cool); by
    default the map's own range is used.
    """
    image = _check_rgb(image)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    m = normalise_map(amap, vmin, vmax)
    if m.shape != image.shape[:2]:
        resized = Image.fromarray(m).resize((image.shape[1], image.shape[0]), Image.BILINEAR)
        m = np.asarray(resized, dtype=np.float32)
    blended = (1.0 - alpha) * image.astype(np.float32) + alpha * colormap(m).astype(np.float32)
    return np.clip(np.round(blended), 0, 255).astype(np.uint8)


def draw_outline(
    image: np.ndarray, mask: np.ndarray, color: tuple[int, int, int] = OUTLINE_RGB
) -> np.ndarray:
    """A copy of `image` with the boundary pixels of the boolean `mask` painted in `color`."""
    image = _check_rgb(image)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} does not match image {image.shape[:2]}")
    edge = mask & ~ndimage.binary_erosion(mask, structure=np.ones((3, 3), bool), border_value=0)
    thicken = min(image.shape[:2]) // 256  # keep the outline visible in thumbnails of large images
    if thicken:
        edge = ndimage.binary_dilation(edge, iterations=thicken)
    out = image.copy()
    out[edge] = color
    return out


def save_png(image: np.ndarray, path: str | os.PathLike) -> Path:
    """Write an RGB uint8 image as PNG atomically; parent folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, _png_bytes(_check_rgb(image)))
    return path


@dataclass
class ReportEntry:
    """One image shown in the report: thumbnails are made from `image`, `amap` and `mask`."""

    image: np.ndarray  # uint8 (H, W, 3)
    amap: np.ndarray  # float (h, w), any resolution
    score: float
    label: int
    class_name: str
    path: str
    case: str  # one of TOP_ANOMALIES, MISSED_ANOMALIES, FALSE_ALARMS
    mask: np.ndarray | None = None
    group: str = ""  # e.g. the dataset name
    vmin: float | None = None  # colour range of the heatmap (shared by a class)
    vmax: float | None = None
    mask_threshold: float | None = None  # map value above which the report's thresholded mask is drawn


def select_cases(labels: np.ndarray, scores: np.ndarray, k: int = 3) -> list[tuple[str, int]]:
    """(case, index) pairs: the k highest-scoring normals, k lowest-scoring and k highest-scoring
    anomalies (an anomaly appears once even when it is both)."""
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    normal, anomalous = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
    by_score = lambda idx: idx[np.argsort(scores[idx], kind="stable")]  # noqa: E731
    top = by_score(anomalous)[::-1][:k]
    missed = [i for i in by_score(anomalous)[:k] if i not in top]
    false_alarms = by_score(normal)[::-1][:k]
    return (
        [(TOP_ANOMALIES, int(i)) for i in top]
        + [(MISSED_ANOMALIES, int(i)) for i in missed]
        + [(FALSE_ALARMS, int(i)) for i in false_alarms]
    )


def case_entries(
    data: Dataset,
    indices: Sequence[int],
    scores: np.ndarray,
    maps: Sequence[np.ndarray],
    k: int = 3,
    group: str = "",
) -> list[ReportEntry]:
    """Report entries for one class: `indices` into `data`, with their `scores` and `maps`.

    Only the selected images are decoded again; heatmaps share the class's colour range.
    """
    labels = np.array([data.records[i].label for i in indices])
    finite = [m[np.isfinite(m)] for m in maps]
    values = np.concatenate([f.ravel() for f in finite]) if finite else np.zeros(0)
    vmin, vmax = (float(values.min()), float(values.max())) if values.size else (None, None)
    entries = []
    for case, j in select_cases(labels, scores, k):
        sample = data[indices[j]]
        entries.append(
            ReportEntry(
                sample.image,
                np.asarray(maps[j]),
                float(scores[j]),
                int(labels[j]),
                sample.class_name,
                sample.path,
                case,
                sample.mask,
                group,
                vmin,
                vmax,
            )
        )
    return entries


@dataclass
class ClassReport:
    """What the report shows for one class of one dataset: its curves, histogram, defect breakdown and
    cases. ``defects`` holds each image's defect type ("" for normal images and unknown types)."""

    group: str
    class_name: str
    labels: np.ndarray  # (N,) 0/1
    scores: np.ndarray  # (N,) image scores
    defects: list[str]
    metrics: dict[str, float | None]
    entries: list[ReportEntry]
    threshold: float | None = None  # the model's calibrated image threshold, if any


def class_report(result: ClassResult, k: int = 3, threshold: float | None = None) -> ClassReport:
    """The report section of one evaluated class (an `evaluation.ClassResult`).

    Case images are shown with paths relative to the dataset root (the folder holding all its images)
    and with the map thresholded at `normal_pixel_threshold` of the class.
    """
    data, indices = result.data, result.indices
    root = dataset_root(data)
    mask_threshold = normal_pixel_threshold(result.labels, result.maps)
    entries = [
        dataclasses.replace(
            e, path=os.path.relpath(e.path, root) if root else e.path, mask_threshold=mask_threshold
        )
        for e in case_entries(data, indices, result.scores, result.maps, k, result.dataset_name)
    ]
    defects = [
        dict(data.records[i].meta).get("defect", "") if label == 1 else ""
        for i, label in zip(indices, result.labels, strict=True)
    ]
    return ClassReport(
        result.dataset_name,
        result.class_name,
        np.asarray(result.labels),
        np.asarray(result.scores, dtype=np.float64),
        defects,
        dict(result.metrics),
        entries,
        threshold,
    )


def dataset_root(data: Dataset) -> str:
    """The deepest folder holding every image of `data` ("" when they share none)."""
    folders = {os.path.dirname(os.path.abspath(r.path)) for r in data.records}
    try:
        return os.path.commonpath(sorted(folders)) if folders else ""
    except ValueError:  # paths on different drives
        return ""


def normal_pixel_threshold(
    labels: np.ndarray, maps: Sequence[np.ndarray], fpr: float = MASK_PIXEL_FPR
) -> float | None:
    """The map value that only a fraction ``fpr`` of the normal images' pixels exceed (None without a
    normal image): the thresholded masks of the report flag what is unusual for normal images.

    Estimated from at most `MASK_SAMPLES` evenly spaced pixels of each normal map.
    """
    values = [
        m.ravel()[:: max(1, m.size // MASK_SAMPLES)]
        for m, label in zip(maps, labels, strict=True)
        if label == 0
    ]
    pooled = np.concatenate(values) if values else np.zeros(0)
    pooled = pooled[np.isfinite(pooled)]
    return float(np.quantile(pooled, 1.0 - fpr)) if pooled.size else None


def curve_points(labels: np.ndarray, scores: np.ndarray) -> dict[str, np.ndarray]:
    """ROC and precision-recall points of image scores at every distinct threshold (highest first).

    Returns arrays "fpr", "tpr" (starting at 0, 0), "recall", "precision" and "thresholds" (the score
    at each point after the first); empty arrays when a class lacks normal or anomalous images.
    """
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int((labels == 1).sum()), int((labels == 0).sum())
    if n_pos == 0 or n_neg == 0:
        return {k: np.zeros(0) for k in ("fpr", "tpr", "recall", "precision", "thresholds")}
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order] == 1
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last position of each distinct score
    tp, fp = np.cumsum(y)[last], np.cumsum(~y)[last]
    return {
        "fpr": np.r_[0.0, fp / n_neg],
        "tpr": np.r_[0.0, tp / n_pos],
        "recall": tp / n_pos,
        "precision": tp / (tp + fp),
        "thresholds": s[last],
    }


def f1_threshold(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """The image score threshold (``score >= t`` is anomalous) of the best F1 on this data."""
    points = curve_points(labels, scores)
    if not points["thresholds"].size:
        return None
    p, r = points["precision"], points["recall"]
    f1 = np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-12), 0.0)
    return float(points["thresholds"][int(np.argmax(f1))])


def html_report(
    classes: Sequence[ClassReport], path: str | os.PathLike, title: str = "anomalens report"
) -> Path:
    """Write one self-contained HTML page (inline SVG charts, PNGs embedded as base64, no script, no
    network): a metrics table, then per class ROC and PR curves, a score histogram with the thresholds,
    a per-defect-type table when the dataset names defect types, and the best and worst cases as
    image / ground truth / heatmap / thresholded mask."""
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        _metrics_table(classes),
        "<p>Per class: ROC and precision-recall curves of the image scores; score histogram of normal "
        f'(<span style="color:{NORMAL_COLOUR}">blue</span>) and anomalous '
        f'(<span style="color:{ANOMALY_COLOUR}">red</span>) images with the F1-max threshold of this data '
        "(dashed) and the model's calibrated threshold (solid, when set). Cases: image with the "
        "ground-truth outline (green), ground-truth mask, heatmap (colour range shared by the class), and "
        f"the map above the value that {MASK_PIXEL_FPR:.0%} of the class's normal-image pixels exceed. "
        "Scores: higher = more anomalous.</p>",
    ]
    for c in sorted(classes, key=lambda c: (c.group, c.class_name)):
        parts.append(_class_section(c))
    parts.append("</body></html>")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, "\n".join(parts))


_CSS = (
    "body{font-family:sans-serif;margin:1em;color:#222}table{border-collapse:collapse;margin:.5em 0}"
    "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}th:first-child,td:first-child"
    "{text-align:left}tr.mean{font-weight:bold}.charts{display:flex;flex-wrap:wrap;gap:12px}"
    "svg text{font-size:11px}figure{display:inline-block;margin:4px 8px 12px 0;vertical-align:top}"
    "figcaption{font-size:12px;max-width:940px;word-break:break-all}.panel{display:inline-block;"
    "text-align:center;font-size:11px;margin-right:3px}.panel img{display:block;min-width:200px;"
    "image-rendering:pixelated}"
)


def _metrics_table(classes: Sequence[ClassReport]) -> str:
    names = list(dict.fromkeys(k for c in classes for k in c.metrics))
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    rows = []
    for group in sorted({c.group for c in classes}):
        members = sorted((c for c in classes if c.group == group), key=lambda c: c.class_name)
        for c in members:
            label = f"{group} / {c.class_name}" if group else c.class_name
            rows.append(f"<tr><td>{html.escape(label)}</td>{_cells(c.metrics, names)}</tr>")
        if len(members) > 1:
            mean = {n: _mean([c.metrics.get(n) for c in members]) for n in names}
            label = f"{group} / mean" if group else "mean"
            rows.append(f'<tr class="mean"><td>{html.escape(label)}</td>{_cells(mean, names)}</tr>')
    return (
        '<h2>Metrics (%)</h2><table id="metrics"><tr><th>class</th>'
        + head
        + "</tr>"
        + "".join(rows)
        + "</table>"
    )


def _cells(metrics: dict[str, float | None], names: Sequence[str]) -> str:
    values = [metrics.get(n) for n in names]
    return "".join("<td>–</td>" if v is None else f"<td>{100 * v:.1f}</td>" for v in values)


def _mean(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return float(np.mean(known)) if known else None


def _class_section(c: ClassReport) -> str:
    heading = f"{c.group} / {c.class_name}" if c.group else c.class_name
    points = curve_points(c.labels, c.scores)
    charts = [
        _line_chart("roc", points["fpr"], points["tpr"], "false positive rate", "true positive rate", True),
        _line_chart("pr", points["recall"], points["precision"], "recall", "precision", False),
        _histogram(c.labels, c.scores, f1_threshold(c.labels, c.scores), c.threshold),
    ]
    parts = [
        f'<section class="class"><h2>{html.escape(heading)}</h2>',
        '<div class="charts">',
        *charts,
        "</div>",
    ]
    parts.append(_defect_table(c))
    for case in (TOP_ANOMALIES, MISSED_ANOMALIES, FALSE_ALARMS):
        shown = [e for e in c.entries if e.case == case]
        if shown:
            parts.append(f"<h3>{html.escape(case)}</h3><div>")
            parts.extend(_figure(e) for e in shown)
            parts.append("</div>")
    parts.append("</section>")
    return "\n".join(parts)


def _defect_table(c: ClassReport) -> str:
    """Per defect type: images, mean score, and AUROC against the class's normal images."""
    from anomalens.metrics import image_auroc

    types = sorted({d for d, label in zip(c.defects, c.labels, strict=True) if label == 1 and d})
    if not types:
        return ""
    normal = c.scores[c.labels == 0]
    rows = []
    for d in types:
        own = c.scores[np.array([x == d for x in c.defects])]
        auroc = (
            image_auroc(np.r_[np.zeros(len(normal)), np.ones(len(own))], np.r_[normal, own])
            if len(normal)
            else None
        )
        shown = "–" if auroc is None else f"{100 * auroc:.1f}"
        rows.append(
            f"<tr><td>{html.escape(d)}</td><td>{len(own)}</td><td>{own.mean():.4g}</td><td>{shown}</td></tr>"
        )
    return (
        '<table class="defects"><tr><th>defect type</th><th>images</th><th>mean score</th>'
        "<th>AUROC vs normal (%)</th></tr>" + "".join(rows) + "</table>"
    )


# Chart geometry (pixels): plot area and margins of every SVG chart.
_W, _H, _LEFT, _BOTTOM, _TOP, _RIGHT = 220, 180, 44, 34, 18, 22


def _svg_open(kind: str, title: str) -> list[str]:
    width, height = _LEFT + _W + _RIGHT, _TOP + _H + _BOTTOM
    return [
        f'<svg class="{kind}" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img"><title>{html.escape(title)}</title>',
        f'<rect x="{_LEFT}" y="{_TOP}" width="{_W}" height="{_H}" fill="none" stroke="#888"/>',
    ]


def _xy(x: float, y: float, x_range: tuple[float, float] = (0.0, 1.0), y_max: float = 1.0) -> str:
    lo, hi = x_range
    px = _LEFT + (x - lo) / (hi - lo) * _W
    py = _TOP + _H - y / y_max * _H
    return f"{px:.1f},{py:.1f}"


def _axes(
    x_label: str, y_label: str, x_range: tuple[float, float] = (0.0, 1.0), y_max: float = 1.0
) -> list[str]:
    out = []
    for f in (0.0, 0.5, 1.0):
        x = x_range[0] + f * (x_range[1] - x_range[0])
        px = _LEFT + f * _W
        out.append(f'<text x="{px:.1f}" y="{_TOP + _H + 13}" text-anchor="middle">{x:.3g}</text>')
        out.append(
            f'<text x="{_LEFT - 4}" y="{_TOP + _H - f * _H + 4:.1f}" text-anchor="end">{f * y_max:.3g}</text>'
        )
    out.append(
        f'<text x="{_LEFT + _W / 2}" y="{_TOP + _H + 28}" text-anchor="middle">{html.escape(x_label)}</text>'
    )
    out.append(
        f'<text transform="translate(11,{_TOP + _H / 2}) rotate(-90)" text-anchor="middle">'
        f"{html.escape(y_label)}</text>"
    )
    return out


def _line_chart(kind: str, xs: np.ndarray, ys: np.ndarray, x_label: str, y_label: str, diagonal: bool) -> str:
    title = "ROC curve" if kind == "roc" else "precision-recall curve"
    parts = _svg_open(kind, title)
    parts += _axes(x_label, y_label)
    if diagonal:
        parts.append(
            f'<line x1="{_LEFT}" y1="{_TOP + _H}" x2="{_LEFT + _W}" y2="{_TOP}" stroke="#bbb" '
            'stroke-dasharray="3,3"/>'
        )
    if len(xs):
        points = " ".join(_xy(float(x), float(y)) for x, y in zip(xs, ys, strict=True))
        parts.append(
            f'<polyline class="curve" fill="none" stroke="{ANOMALY_COLOUR}" stroke-width="2" '
            f'points="{points}"/>'
        )
    else:
        parts.append(
            f'<text x="{_LEFT + _W / 2}" y="{_TOP + _H / 2}" text-anchor="middle">'
            "needs normal and anomalous images</text>"
        )
    parts.append(f'<text x="{_LEFT + _W / 2}" y="12" text-anchor="middle">{title}</text></svg>')
    return "".join(parts)


def _histogram(labels: np.ndarray, scores: np.ndarray, f1_t: float | None, calibrated: float | None) -> str:
    marks = [t for t in (f1_t, calibrated) if t is not None]
    lo = float(min(scores.min(), *marks)) if len(scores) else 0.0
    hi = float(max(scores.max(), *marks)) if len(scores) else 1.0
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, HISTOGRAM_BINS + 1)
    counts = {label: np.histogram(scores[labels == label], edges)[0] for label in (0, 1)}
    top = max(1, int(max(counts[0].max(), counts[1].max())))
    parts = _svg_open("histogram", "score histogram")
    parts += _axes("image score", "images", (lo, hi), top)
    width = _W / HISTOGRAM_BINS
    for label, colour in ((0, NORMAL_COLOUR), (1, ANOMALY_COLOUR)):
        for i, n in enumerate(counts[label]):
            if n:
                h = n / top * _H
                parts.append(
                    f'<rect class="bar{label}" x="{_LEFT + i * width:.1f}" y="{_TOP + _H - h:.1f}" '
                    f'width="{width:.1f}" height="{h:.1f}" fill="{colour}" fill-opacity="0.5"/>'
                )
    for t, dash, name in ((f1_t, ' stroke-dasharray="4,3"', "F1-max"), (calibrated, "", "calibrated")):
        if t is not None:
            x = _LEFT + (t - lo) / (hi - lo) * _W
            parts.append(
                f'<line class="threshold" x1="{x:.1f}" y1="{_TOP}" x2="{x:.1f}" y2="{_TOP + _H}" '
                f'stroke="#000"'
                f"{dash}><title>{name} threshold {t:.4g}</title></line>"
            )
    parts.append(f'<text x="{_LEFT + _W / 2}" y="12" text-anchor="middle">score histogram</text></svg>')
    return "".join(parts)


def _figure(e: ReportEntry) -> str:
    shown = draw_outline(e.image, e.mask) if e.mask is not None else e.image
    panels = [
        ("image", shown),
        ("ground truth", _mask_image(e.mask, e.image.shape[:2], e.label)),
        ("heatmap", overlay(e.image, e.amap, vmin=e.vmin, vmax=e.vmax)),
    ]
    if e.mask_threshold is not None:
        panels.append(("thresholded", _thresholded(e.image, e.amap, e.mask_threshold)))
    label = "anomalous" if e.label == 1 else "normal"
    caption = f"score {e.score:.4f} · {label} · {e.path}"
    images = "".join(
        f'<span class="panel"><img src="{_data_uri(img)}" alt="{name}">{name}</span>' for name, img in panels
    )
    return f"<figure>{images}<figcaption>{html.escape(caption)}</figcaption></figure>"


def _mask_image(mask: np.ndarray | None, shape: tuple[int, int], label: int) -> np.ndarray:
    """The ground truth as white on black; grey when an anomalous image has no mask."""
    if mask is None:
        return np.full((*shape, 3), 0 if label == 0 else 128, np.uint8)
    return np.repeat((np.asarray(mask, bool) * 255).astype(np.uint8)[..., None], 3, axis=2)


def _thresholded(image: np.ndarray, amap: np.ndarray, threshold: float) -> np.ndarray:
    """`image` with the pixels whose map value exceeds `threshold` tinted red and outlined."""
    m = np.asarray(amap, dtype=np.float32)
    if m.shape != image.shape[:2]:
        m = np.asarray(Image.fromarray(m).resize((image.shape[1], image.shape[0]), Image.BILINEAR))
    above = m > threshold
    tinted = image.astype(np.float32)
    tinted[above] = 0.5 * tinted[above] + 0.5 * np.array([255, 0, 0], np.float32)
    return draw_outline(np.round(tinted).astype(np.uint8), above, (255, 0, 0))


def _data_uri(image: np.ndarray) -> str:
    thumb = Image.fromarray(image)
    thumb.thumbnail((THUMBNAIL, THUMBNAIL), Image.BILINEAR)
    return "data:image/png;base64," + base64.b64encode(_png_bytes(np.asarray(thumb))).decode("ascii")


def _png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _check_rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 (H, W, 3) RGB image, got {image.dtype} {image.shape}")
    return image


# ---------------------------------------------------------------------- training curves
_LOG_KEYS = {"event", "stage", "epoch", "step", "lr", "seconds"}
_PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


def loss_terms(log_path: str | os.PathLike) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """{stage: {term: [(step, value), ...]}} from a ``train_log.jsonl`` (the engine's "step" records, or
    its "epoch" records when a run logged no steps). Non-finite values (logged as null) are skipped."""
    import json

    records = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    events = [r for r in records if r.get("event") == "step"] or [
        r for r in records if r.get("event") == "epoch"
    ]
    curves: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for r in events:
        stage = curves.setdefault(str(r["stage"]), {})
        for key, value in r.items():
            if key not in _LOG_KEYS and isinstance(value, (int, float)):
                stage.setdefault(key, []).append((int(r["step"]), float(value)))
    return curves


def loss_terms_svg(log_path: str | os.PathLike, width: int = 360, height: int = 200) -> str:
    """One inline SVG line chart per training stage with every logged loss term against the optimiser
    step (one shared y axis, so the term that dominates the total is visible); "" for an empty log."""
    charts = []
    for stage, terms in loss_terms(log_path).items():
        points = [p for series in terms.values() for p in series]
        if not points:
            continue
        x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
        y0, y1 = min(0.0, min(p[1] for p in points)), max(p[1] for p in points)
        sx = (width - 60) / max(x1 - x0, 1)
        sy = (height - 50) / max(y1 - y0, 1e-12)
        parts = [
            f'<svg class="loss-terms" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">',
            f'<text x="4" y="14">{html.escape(stage)}: loss terms (y {y0:.3g} to {y1:.3g}) vs step</text>',
        ]
        for i, (term, series) in enumerate(sorted(terms.items())):
            colour = _PALETTE[i % len(_PALETTE)]
            xy = " ".join(f"{50 + (s - x0) * sx:.1f},{height - 25 - (v - y0) * sy:.1f}" for s, v in series)
            name = html.escape(term)
            line = f'<polyline fill="none" stroke="{colour}" points="{xy}">'
            parts.append(f"{line}<title>{name}</title></polyline>")
            parts.append(f'<text x="{50 + 60 * (i % 5)}" y="{height - 6 - 12 * (i // 5)}" fill="{colour}">')
            parts.append(f"{name}</text>")
        parts.append("</svg>")
        charts.append("".join(parts))
    return "".join(charts)
