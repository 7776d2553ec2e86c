"""contextual:<dir> manifests (CAAD-3K schema): parsing, split semantics, masks and errors."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from anomalens.data.contextual import load_contextual
from anomalens.data.types import DataError

COLUMNS = ["image", "subject_mask", "class", "context", "label", "split"]
ROWS = [
    ["a.png", "a_sub.png", "boat", "harbour", "normal", "SS"],
    ["b.png", "b_sub.png", "boat", "highway", "anomalous", "ss"],
    ["c.png", "c_sub.png", "car", "road", "0", "CC"],
    ["d.png", "d_sub.png", "car", "lake", "1", "CC"],
]


def _write_files(root, names=("a", "b", "c", "d", "e")) -> None:
    for i, name in enumerate(names):
        Image.fromarray(np.full((8, 10, 3), 20 * i, np.uint8)).save(root / f"{name}.png")
        sub = np.zeros((8, 10), np.uint8)
        sub[2:5, 3 : 4 + i] = 255
        Image.fromarray(sub).save(root / f"{name}_sub.png")


def _write_csv(root, columns=COLUMNS, rows=ROWS) -> None:
    with open(root / "manifest.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(rows)


@pytest.fixture
def root(tmp_path):
    _write_files(tmp_path)
    _write_csv(tmp_path)
    return tmp_path


def test_without_set_column_train_is_ss_and_test_is_cc(root):
    train = load_contextual(str(root), "train", None)
    test = load_contextual(str(root), "test", None)
    assert [s.meta["context"] for s in train] == ["harbour", "highway"]
    assert [s.meta["context"] for s in test] == ["road", "lake"]
    assert list(train.labels) == [0, 1] and list(test.labels) == [0, 1]
    assert {s.meta["split"] for s in train} == {"SS"} and {s.meta["set"] for s in test} == {"test"}
    assert len(load_contextual(str(root), "all", None)) == 4


def test_samples_carry_subject_masks_and_anomaly_masks(root):
    normal, anomalous = load_contextual(str(root), "train", ["boat"])
    assert normal.class_name == "boat" and normal.meta["subject"] == "boat"
    assert normal.image.shape == (8, 10, 3) and normal.mask is None
    assert normal.subject_mask.sum() == 3 * 1
    # The CAAD-3K convention: an anomalous sample's anomaly is its subject region.
    assert np.array_equal(anomalous.mask, anomalous.subject_mask) and anomalous.mask.sum() == 3 * 2


def test_set_column_explicit_mask_and_extra_fields(tmp_path):
    _write_files(tmp_path)
    Image.fromarray(np.eye(8, 10, dtype=np.uint8) * 255).save(tmp_path / "defect.png")
    columns = [*COLUMNS, "set", "mask", "prompt"]
    rows = [
        ["a.png", "a_sub.png", "boat", "harbour", "0", "SS", "train", "", "p1"],
        ["b.png", "", "boat", "highway", "1", "SS", "test", "defect.png", "p2"],
        ["c.png", "c_sub.png", "car", "lake", "1", "CC", "Test", "", "p3"],
    ]
    _write_csv(tmp_path, columns, rows)
    test = load_contextual(str(tmp_path), "test", None)
    assert [s.meta["split"] for s in test] == ["SS", "CC"]
    explicit, default = test
    assert explicit.subject_mask is None and explicit.mask.sum() == 8
    assert np.array_equal(default.mask, default.subject_mask)
    assert explicit.meta["prompt"] == "p2"
    # SS→CC protocol: `contextual:<dir>?part=cc` keeps only the cross-context rows
    import anomalens.data as al_data

    assert [s.meta["split"] for s in al_data.load(f"contextual:{tmp_path}?part=cc", "test")] == ["CC"]
    assert [s.meta["split"] for s in al_data.load(f"contextual:{tmp_path}?part=ss", "all")] == ["SS", "SS"]
    with pytest.raises(al_data.DataError, match="part must be"):
        al_data.load(f"contextual:{tmp_path}?part=xx", "test")


def test_json_manifest(tmp_path):
    _write_files(tmp_path)
    rows = [dict(zip(COLUMNS, row, strict=True)) for row in ROWS]
    rows[3]["label"] = 1
    (tmp_path / "manifest.json").write_text(json.dumps(rows))
    test = load_contextual(str(tmp_path), "test", None)
    assert [s.label for s in test] == [0, 1]


def _error(root) -> str:
    with pytest.raises(DataError) as info:
        load_contextual(str(root), "all", None)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_missing_columns_are_named(tmp_path):
    _write_csv(tmp_path, ["image", "class", "label"], [["a.png", "boat", "0"]])
    message = _error(tmp_path)
    assert "subject_mask" in message and "context" in message and "split" in message
    assert "image," not in message


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        (["e.png", "e_sub.png", "cow", "sea", "maybe", "SS"], ("row 5 (e.png): bad label 'maybe'",)),
        (["e.png", "e_sub.png", "cow", "sea", "1", "XX"], ("row 5 (e.png): bad split 'XX'",)),
        (["gone.png", "e_sub.png", "cow", "sea", "1", "SS"], ("row 5 (gone.png): image file not found",)),
        (
            ["e.png", "gone_sub.png", "cow", "sea", "1", "SS"],
            ("row 5 (e.png): subject mask file not found", "gone_sub.png"),
        ),
    ],
)
def test_bad_rows_name_the_row_and_the_file(root, row, expected):
    _write_csv(root, COLUMNS, [*ROWS, row])
    message = _error(root)
    assert "manifest.csv" in message
    assert all(part in message for part in expected), message


def test_missing_manifest_both_manifests_and_unknown_class(root):
    (root / "manifest.json").write_text("[]")
    assert "both manifest.csv and manifest.json" in _error(root)
    (root / "manifest.json").unlink()
    with pytest.raises(DataError, match="unknown class 'plane'"):
        load_contextual(str(root), "test", ["plane"])
    (root / "manifest.csv").unlink()
    assert "no manifest.csv or manifest.json" in _error(root)
