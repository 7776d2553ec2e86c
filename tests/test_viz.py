"""Heatmap overlays, outlines, atomic PNG/HTML writing and the best/worst-case report."""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomalens import viz


def test_colormap_extremes_and_middle():
    colours = viz.colormap(np.array([0.0, 0.5, 1.0, -3.0, 7.0]))
    assert colours.dtype == np.uint8 and colours.shape == (5, 3)
    np.testing.assert_array_equal(colours[0], [0, 0, 128])  # dark blue
    np.testing.assert_array_equal(colours[1], [128, 255, 128])  # green-ish middle
    np.testing.assert_array_equal(colours[2], [128, 0, 0])  # dark red
    np.testing.assert_array_equal(colours[3], colours[0])  # clipped below
    np.testing.assert_array_equal(colours[4], colours[2])  # clipped above


def test_overlay_shape_dtype_and_colour_extremes():
    image = np.full((20, 30, 3), 100, np.uint8)
    amap = np.zeros((5, 6), np.float32)  # other resolution: resized to the image
    amap[:, 3:] = 2.0
    out = viz.overlay(image, amap, alpha=1.0)
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[10, 0], [0, 0, 128])  # map minimum → blue
    np.testing.assert_array_equal(out[10, -1], [128, 0, 0])  # map maximum → red
    np.testing.assert_array_equal(viz.overlay(image, amap, alpha=0.0), image)
    half = viz.overlay(image, amap, alpha=0.5)
    np.testing.assert_array_equal(half[10, -1], [114, 50, 50])  # (100 + [128, 0, 0]) / 2, rounded


def test_overlay_fixed_range_and_non_finite_values():
    image = np.zeros((4, 4, 3), np.uint8)
    amap = np.full((4, 4), 0.2, np.float32)
    amap[0, 0] = np.nan
    out = viz.overlay(image, amap, alpha=1.0, vmin=0.0, vmax=1.0)
    np.testing.assert_array_equal(out[1, 1], viz.colormap(np.float32(0.2)))
    np.testing.assert_array_equal(out[0, 0], viz.colormap(np.float32(0.0)))  # NaN drawn as the minimum
    with pytest.raises(ValueError, match="uint8"):
        viz.overlay(image.astype(np.float32), amap)
    with pytest.raises(ValueError, match="alpha"):
        viz.overlay(image, amap, alpha=1.5)


def test_outline_paints_only_the_mask_border():
    image = np.zeros((12, 12, 3), np.uint8)
    mask = np.zeros((12, 12), bool)
    mask[3:9, 3:9] = True
    out = viz.draw_outline(image, mask)
    painted = (out == viz.OUTLINE_RGB).all(-1)
    assert painted[3, 3:9].all() and painted[3:9, 3].all() and painted[8, 3:9].all()
    assert not painted[5, 5] and not painted[0, 0]  # interior and background untouched
    assert not image.any()  # input not modified
    with pytest.raises(ValueError, match="mask shape"):
        viz.draw_outline(image, mask[:5])


def test_save_png_round_trip_leaves_no_temporary_file(tmp_path: Path):
    image = np.random.default_rng(0).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    path = viz.save_png(image, tmp_path / "sub" / "a.png")
    np.testing.assert_array_equal(np.asarray(Image.open(path)), image)
    assert sorted(os.listdir(path.parent)) == ["a.png"]


def test_atomic_write_keeps_the_old_file_when_interrupted(tmp_path: Path, monkeypatch):
    path = tmp_path / "report.html"
    path.write_text("old")

    def fail(*_args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        viz.atomic_write(path, "new")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["report.html"]


def test_select_cases():
    labels = np.array([0, 0, 0, 1, 1, 1, 1])
    scores = np.array([0.1, 0.9, 0.5, 0.2, 0.8, 0.3, 0.95])
    cases = viz.select_cases(labels, scores, k=2)
    assert [i for c, i in cases if c == viz.TOP_ANOMALIES] == [6, 4]
    assert [i for c, i in cases if c == viz.MISSED_ANOMALIES] == [3, 5]
    assert [i for c, i in cases if c == viz.FALSE_ALARMS] == [1, 2]
    # With few anomalies an image is shown once, as a top anomaly.
    assert viz.select_cases(np.array([0, 1]), np.array([0.3, 0.6]), k=3) == [
        (viz.TOP_ANOMALIES, 1),
        (viz.FALSE_ALARMS, 0),
    ]


def test_html_report_embeds_images_per_class(tmp_path: Path):
    rng = np.random.default_rng(1)
    mask = np.zeros((40, 40), bool)
    mask[5:15, 5:15] = True
    entries = [
        viz.ReportEntry(
            rng.integers(0, 256, (40, 40, 3), dtype=np.uint8),
            rng.random((10, 10)).astype(np.float32),
            score=0.75,
            label=1,
            class_name=cls,
            path=f"/data/{cls}/<odd>&name.png",
            case=viz.TOP_ANOMALIES,
            mask=mask,
            group="mvtec",
        )
        for cls in ("bottle", "grid")
    ]
    path = viz.html_report(entries, tmp_path / "report.html", title="My <report>")
    text = path.read_text()
    assert "<title>My &lt;report&gt;</title>" in text
    assert "mvtec / bottle" in text and "mvtec / grid" in text
    assert "&lt;odd&gt;&amp;name.png" in text and "<odd>" not in text
    assert "score 0.7500" in text
    uris = text.split('src="data:image/png;base64,')[1:]
    assert len(uris) == 4  # image with outline + overlay, per entry
    thumb = Image.open(io.BytesIO(base64.b64decode(uris[0].split('"')[0])))
    assert thumb.size == (40, 40) and thumb.mode == "RGB"


def test_loss_terms_are_read_per_stage_and_plotted(tmp_path):
    import json

    from anomalens.viz import loss_terms, loss_terms_svg

    log = tmp_path / "train_log.jsonl"
    rows = [
        {"event": "start", "seed": 0},
        {
            "event": "step",
            "stage": "image",
            "epoch": 1,
            "step": 10,
            "loss": 3.0,
            "ce": 2.0,
            "cons": 1.0,
            "lr": 0.1,
        },
        {
            "event": "step",
            "stage": "image",
            "epoch": 1,
            "step": 20,
            "loss": 2.0,
            "ce": 1.5,
            "cons": None,
            "lr": 0.1,
        },
        {"event": "epoch", "stage": "image", "epoch": 1, "step": 20, "loss": 2.5, "seconds": 1.0},
    ]
    log.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    curves = loss_terms(log)
    assert curves == {
        "image": {"loss": [(10, 3.0), (20, 2.0)], "ce": [(10, 2.0), (20, 1.5)], "cons": [(10, 1.0)]}
    }
    svg = loss_terms_svg(log)
    assert svg.count("<polyline") == 3 and ">cons</text>" in svg and "image: loss terms" in svg
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"event": "start"}) + "\n")
    assert loss_terms_svg(empty) == ""
