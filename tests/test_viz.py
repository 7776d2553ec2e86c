"""Heatmap overlays, outlines, atomic PNG/HTML writing and the best/worst-case report."""

from __future__ import annotations

import base64
import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomalens import metrics as al_metrics
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


def _class_report(group: str, cls: str, seed: int, defects: bool = True) -> viz.ClassReport:
    """A class of 4 normal and 4 anomalous images (two defect types) with one case of each kind."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((40, 40), bool)
    mask[5:15, 5:15] = True
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    scores = np.array([0.1, 0.2, 0.35, 0.3, 0.9, 0.25, 0.8, 0.7])
    kinds = ["", "", "", "", "crack", "crack", "hole", "hole"] if defects else [""] * 8
    entries = [
        viz.ReportEntry(
            rng.integers(0, 256, (40, 40, 3), dtype=np.uint8),
            rng.random((10, 10)).astype(np.float32),
            score=score,
            label=label,
            class_name=cls,
            path=f"{cls}/test/<odd>&name.png",
            case=case,
            mask=mask if label else None,
            group=group,
            mask_threshold=0.5,
        )
        for case, score, label in ((viz.TOP_ANOMALIES, 0.9, 1), (viz.FALSE_ALARMS, 0.35, 0))
    ]
    metrics = {"image_auroc": 0.875, "pixel_auroc": None}
    return viz.ClassReport(group, cls, labels, scores, kinds, metrics, entries, threshold=0.5)


def test_curve_points_match_the_metrics():
    labels = np.array([0, 1, 0, 1, 1, 0, 1])
    scores = np.array([0.1, 0.4, 0.4, 0.8, 0.3, 0.2, 0.9])  # a tie between a normal and an anomaly
    points = viz.curve_points(labels, scores)
    fpr, tpr = points["fpr"], points["tpr"]
    area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))  # trapezoids under the plotted curve
    assert area == pytest.approx(al_metrics.image_auroc(labels, scores))
    # Hand-checked: thresholds 0.9, 0.8, 0.4 (one of each label), 0.3, 0.2, 0.1.
    np.testing.assert_allclose(points["thresholds"], [0.9, 0.8, 0.4, 0.3, 0.2, 0.1])
    np.testing.assert_allclose(points["precision"], [1, 1, 3 / 4, 4 / 5, 4 / 6, 4 / 7])
    np.testing.assert_allclose(points["recall"], [1 / 4, 2 / 4, 3 / 4, 1, 1, 1])
    assert viz.f1_threshold(labels, scores) == 0.3  # F1 = 8/9 there, the maximum
    assert viz.curve_points(np.zeros(3), np.arange(3.0))["fpr"].size == 0  # one class only: no curve
    assert viz.f1_threshold(np.zeros(3), np.arange(3.0)) is None


def test_normal_pixel_threshold():
    maps = [np.arange(100, dtype=np.float32).reshape(10, 10), np.full((10, 10), 1000.0, np.float32)]
    labels = np.array([0, 1])  # the anomalous map is ignored
    assert viz.normal_pixel_threshold(labels, maps, fpr=0.1) == pytest.approx(
        np.quantile(np.arange(100), 0.9)
    )
    assert viz.normal_pixel_threshold(np.array([1, 1]), maps) is None


def test_html_report_has_metrics_curves_histogram_defects_and_cases(tmp_path: Path):
    classes = [_class_report("mvtec", "bottle", 1), _class_report("mvtec", "grid", 2, defects=False)]
    path = viz.html_report(classes, tmp_path / "report.html", title="My <report>")
    text = path.read_text()
    assert "<title>My &lt;report&gt;</title>" in text
    assert text.index('id="metrics"') < text.index('<svg class="roc"')  # the table comes first
    assert "<td>mvtec / bottle</td><td>87.5</td><td>–</td>" in text and "mvtec / mean" in text
    assert text.count('<svg class="roc"') == 2 and text.count('<svg class="pr"') == 2
    assert text.count('<polyline class="curve"') == 4
    assert (
        text.count('<svg class="histogram"') == 2 and text.count('class="threshold"') == 4
    )  # F1 + calibrated
    assert text.count('class="defects"') == 1  # only bottle names its defect types
    assert "<td>crack</td><td>2</td>" in text and "<td>hole</td><td>2</td>" in text
    assert "&lt;odd&gt;&amp;name.png" in text and "<odd>" not in text
    assert "http" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "")  # nothing fetched
    uris = text.split('src="data:image/png;base64,')[1:]
    assert len(uris) == 2 * 2 * 4  # 2 classes × 2 cases × (image, ground truth, heatmap, thresholded)
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


def test_report_renders_in_a_headless_browser(tmp_path: Path):
    """Chromium opens the file without console errors and draws the curves and the images."""
    webdriver = pytest.importorskip("selenium.webdriver")
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.skip("needs Debian's chromium and chromium-driver (.ci/run installs them)")
    path = viz.html_report([_class_report("mvtec", "bottle", 1)], tmp_path / "report.html")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        driver.get(path.as_uri())
        drawn = driver.execute_script(
            "const len = s => [...document.querySelectorAll(s)].map(e => e.getTotalLength());"
            "return {roc: len('svg.roc polyline.curve'), pr: len('svg.pr polyline.curve'),"
            " bars: document.querySelectorAll('svg.histogram rect[class^=bar]').length,"
            " images: [...document.images].map(i => i.complete && i.naturalWidth)};"
        )
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    finally:
        driver.quit()
    assert errors == []
    assert len(drawn["roc"]) == 1 and drawn["roc"][0] > 100  # a curve across the plot, in pixels
    assert len(drawn["pr"]) == 1 and drawn["pr"][0] > 100
    assert drawn["bars"] >= 4
    assert len(drawn["images"]) == 8 and all(w == 40 for w in drawn["images"])
