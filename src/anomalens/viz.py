"""Heatmap overlays, PNG output and a self-contained HTML report of best and worst cases.

numpy + Pillow only (no matplotlib). Every file is written atomically (temporary file + rename), so an
interrupted run never leaves a half-written PNG or report behind (DESIGN §8).
"""

from __future__ import annotations

import base64
import html
import io
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from anomalens.data.types import Dataset

OUTLINE_RGB = (0, 255, 0)
THUMBNAIL = 224  # longest side of report images, pixels
# Case names of the report, in display order.
TOP_ANOMALIES = "highest-scoring anomalies"
MISSED_ANOMALIES = "lowest-scoring anomalies"
FALSE_ALARMS = "highest-scoring normals"


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


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write `data` to `path` via a temporary file in the same folder and a rename."""
    path = Path(path)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")  # open() honours the umask
    try:
        with open(tmp, "xb") as f:
            f.write(raw)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
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


def html_report(
    entries: Sequence[ReportEntry], path: str | os.PathLike, title: str = "anomalens report"
) -> Path:
    """Write a self-contained HTML page (PNG thumbnails embedded as base64), grouped per class.

    Each entry shows the image with its ground-truth outline (green), the heatmap overlay and the score.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    groups: dict[tuple[str, str], list[ReportEntry]] = {}
    for e in entries:
        groups.setdefault((e.group, e.class_name), []).append(e)
    parts = [
        "<!doctype html>",
        '<html><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;margin:1em}figure{display:inline-block;margin:4px;"
        "vertical-align:top}figcaption{font-size:12px;max-width:460px;word-break:break-all}"
        "img{margin:1px}h3{margin:.4em 0}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        "<p>Left: image with the ground-truth outline (green); right: heatmap overlay (colour range shared "
        "by the class). Scores: higher = more anomalous.</p>",
    ]
    for (group, class_name), items in sorted(groups.items()):
        heading = f"{group} / {class_name}" if group else class_name
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        for case in (TOP_ANOMALIES, MISSED_ANOMALIES, FALSE_ALARMS):
            shown = [e for e in items if e.case == case]
            if not shown:
                continue
            parts.append(f"<h3>{html.escape(case)}</h3><div>")
            parts.extend(_figure(e) for e in shown)
            parts.append("</div>")
    parts.append("</body></html>")
    return atomic_write(path, "\n".join(parts))


def _figure(e: ReportEntry) -> str:
    shown = draw_outline(e.image, e.mask) if e.mask is not None else e.image
    heat = overlay(e.image, e.amap, vmin=e.vmin, vmax=e.vmax)
    label = "anomalous" if e.label == 1 else "normal"
    caption = f"score {e.score:.4f} · {label} · {e.path}"
    return (
        f'<figure><img src="{_data_uri(shown)}" alt="image"><img src="{_data_uri(heat)}" alt="heatmap">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


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
