"""synthetic:defects and synthetic:contextual: determinism, exact masks, compatibility logic, the cache."""

from __future__ import annotations

import numpy as np
import pytest

from anomalens.data import synthetic
from anomalens.data.synthetic import (
    APPEARANCES,
    COMPATIBLE,
    CONTEXTS,
    DEFECT_CLASSES,
    DEFECT_TYPES,
    MIN_CONTRAST,
    MIN_DEFECT_AREA,
    SUBJECTS,
    apply_defects,
    contexts_for,
    load_synthetic,
    mosaic,
    render_context,
    render_normal,
    render_subject,
)
from anomalens.data.types import DataError

SMALL = {"n": "4", "size": "48"}


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ANOMALENS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _pixels(ds) -> list[tuple[np.ndarray, np.ndarray | None, np.ndarray | None]]:
    return [(s.image, s.mask, s.subject_mask) for s in ds]


def _same(a, b) -> bool:
    return len(a) == len(b) and all(
        all(
            (x is None and y is None) or (x is not None and y is not None and np.array_equal(x, y))
            for x, y in zip(sa, sb, strict=True)
        )
        for sa, sb in zip(a, b, strict=True)
    )


def test_defects_splits_and_samples():
    train = load_synthetic("defects", {}, "train", None)
    test = load_synthetic("defects", {}, "test", None)
    assert train.class_names == test.class_names == sorted(DEFECT_CLASSES)
    assert len(train) == 16 * 5 and train.labels.sum() == 0
    assert len(test) == 32 * 5 and test.labels.sum() == 16 * 5
    assert len(load_synthetic("defects", {}, "all", None)) == 48 * 5
    seen_types = set()
    for s in test:
        assert s.image.shape == (64, 64, 3) and s.image.dtype == np.uint8
        if s.label == 0:
            assert s.mask is None and s.meta["defect"] == "good"
        else:
            assert s.mask.dtype == bool and s.mask.mean() >= MIN_DEFECT_AREA
            seen_types.add(s.meta["defect"])
    assert seen_types == set(DEFECT_TYPES)


@pytest.mark.parametrize("cls", DEFECT_CLASSES)
def test_defect_masks_are_exactly_the_changed_pixels(cls):
    rng = np.random.default_rng(7)
    clean, region = render_normal(cls, 12, 64, rng)
    out, masks, kinds = apply_defects(clean, region, rng)
    diff = np.abs(out.astype(int) - clean.astype(int)).max(axis=-1)
    assert (diff[~masks] == 0).all()  # nothing outside the mask changed
    assert (diff[masks] >= MIN_CONTRAST).all()  # every masked pixel changed visibly
    assert not (masks & ~region).any()  # objects: defects stay on the object
    assert (masks.mean(axis=(1, 2)) >= MIN_DEFECT_AREA).all()
    assert sorted(set(kinds)) == sorted(DEFECT_TYPES)


def test_same_seed_same_pixels_other_seed_differs(tmp_path, monkeypatch):
    for kind in ("defects", "contextual"):
        first = _pixels(load_synthetic(kind, SMALL, "all", None))
        monkeypatch.setenv("ANOMALENS_CACHE", str(tmp_path / f"fresh-{kind}"))
        again = _pixels(load_synthetic(kind, SMALL, "all", None))
        other = _pixels(load_synthetic(kind, {**SMALL, "seed": "1"}, "all", None))
        assert _same(first, again)
        assert not _same(first, other)


def test_cache_is_reused_without_regenerating(cache, monkeypatch):
    ds = load_synthetic("defects", SMALL, "test", None)
    (folder,) = (cache / "synthetic").iterdir()
    stamp = (folder / "index.json").stat().st_mtime_ns

    def fail(*args):
        raise AssertionError("regenerated")

    monkeypatch.setitem(synthetic._WRITERS, "defects", fail)
    again = load_synthetic("defects", SMALL, "test", ["disc"])
    assert (folder / "index.json").stat().st_mtime_ns == stamp
    assert [r.path for r in again.records] == [r.path for r in ds.records if r.class_name == "disc"]
    assert again[0].image.shape == (48, 48, 3)


def test_interrupted_generation_leaves_no_cache(cache, monkeypatch):
    write_png = synthetic._write_png
    calls = []

    def crash_after_some_files(path, array):
        calls.append(path)
        if len(calls) == 10:
            raise KeyboardInterrupt
        write_png(path, array)

    monkeypatch.setattr(synthetic, "_write_png", crash_after_some_files)
    with pytest.raises(KeyboardInterrupt):
        load_synthetic("contextual", SMALL, "test", None)
    assert list((cache / "synthetic").iterdir()) == []  # neither a final folder nor a temporary one
    monkeypatch.setattr(synthetic, "_write_png", write_png)
    assert len(load_synthetic("contextual", SMALL, "test", None)) == 4 * 4 * len(SUBJECTS)


def test_compatibility_table_and_appearances():
    for subject in SUBJECTS:
        compatible = set(COMPATIBLE[subject])
        assert compatible and compatible < set(CONTEXTS)  # every subject has normal and anomalous contexts
        assert set(contexts_for(subject, 0)) == compatible
        assert set(contexts_for(subject, 1)) == set(CONTEXTS) - compatible
    for context in CONTEXTS:  # no context is normal (or anomalous) for every subject
        assert 0 < sum(context in COMPATIBLE[s] for s in SUBJECTS) < len(SUBJECTS)
    assert set(APPEARANCES) == {"SS", "CC"} and len(set(APPEARANCES.values())) == 2


def test_mosaic_keeps_colours_and_changes_texture():
    backgrounds = render_context("water", 3, 64, np.random.default_rng(0))
    cc = mosaic(backgrounds)
    assert cc.shape == backgrounds.shape and cc.dtype == np.uint8
    assert np.abs(cc.astype(float).mean(axis=(1, 2)) - backgrounds.mean(axis=(1, 2))).max() < 3
    assert (cc != backgrounds).any(axis=-1).mean() > 0.5


def test_contextual_labels_masks_and_splits():
    train = load_synthetic("contextual", SMALL, "train", None)
    test = load_synthetic("contextual", SMALL, "test", None)
    assert train.class_names == test.class_names == sorted(SUBJECTS)
    train_pairs = {(s.meta["subject"], s.meta["context"], s.meta["appearance"]) for s in train}
    assert {s.meta["split"] for s in train} == {"SS"}
    assert len(train) == 8 * len(SUBJECTS) and train.labels.sum() == 4 * len(SUBJECTS)
    for s in [*train, *test]:
        assert s.class_name == s.meta["subject"]
        assert s.label == int(s.meta["context"] not in COMPATIBLE[s.class_name])
        assert s.meta["appearance"] == APPEARANCES[s.meta["split"]]
        assert s.subject_mask.dtype == bool and 0.05 < s.subject_mask.mean() < 0.6
        if s.label:
            assert np.array_equal(s.mask, s.subject_mask)
        else:
            assert s.mask is None
    cc = [s for s in test if s.meta["split"] == "CC"]
    assert {s.label for s in cc} == {0, 1}
    cc_pairs = {(s.meta["subject"], s.meta["context"], s.meta["appearance"]) for s in cc}
    assert not cc_pairs & train_pairs  # every CC combination is unseen in training
    # ... yet each CC subject meets every context it met in training, with the same label rule
    assert {p[:2] for p in cc_pairs} == {p[:2] for p in train_pairs}
    only_cc = load_synthetic("contextual", {**SMALL, "test": "cc"}, "test", ["cow"])
    assert {(s.meta["split"], s.class_name) for s in only_cc} == {("CC", "cow")}


def test_subject_mask_is_exactly_the_painted_pixels():
    rng = np.random.default_rng(3)
    backgrounds = render_context("grass", 6, 64, rng)
    for subject in SUBJECTS:
        images, masks = render_subject(subject, backgrounds, rng)
        assert np.array_equal(images[~masks], backgrounds[~masks])
        assert (masks.mean(axis=(1, 2)) > 0.05).all()


@pytest.mark.parametrize(
    ("kind", "params", "split", "classes", "named"),
    [
        ("scratches", {}, "test", None, "scratches"),
        ("defects", {"count": "3"}, "test", None, "count"),
        ("defects", {"n": "many"}, "test", None, "parameter n"),
        ("defects", {"size": "8"}, "test", None, "parameter size"),
        ("defects", {"test": "cc"}, "test", None, "test"),
        ("contextual", {"test": "xx"}, "test", None, "parameter test"),
        ("defects", {}, "val", None, "val"),
        ("defects", SMALL, "test", ["bottle"], "bottle"),
    ],
)
def test_bad_kind_params_split_or_class(kind, params, split, classes, named):
    with pytest.raises(DataError, match=named) as info:
        load_synthetic(kind, params, split, classes)
    assert "\n" not in str(info.value)


def test_concurrent_generation_keeps_the_copy_that_finished_first(tmp_path, cache, monkeypatch):
    load_synthetic("defects", SMALL, "test", None)
    (name,) = [p.name for p in (cache / "synthetic").iterdir()]
    write = synthetic._WRITERS["defects"]
    other = tmp_path / "other" / "synthetic" / name

    def another_process_finishes_first(folder, *args):
        write(folder, *args)
        write(other, *args)

    monkeypatch.setenv("ANOMALENS_CACHE", str(tmp_path / "other"))
    monkeypatch.setitem(synthetic._WRITERS, "defects", another_process_finishes_first)
    ds = load_synthetic("defects", SMALL, "test", None)
    assert [p.name for p in other.parent.iterdir()] == [name]  # the temporary folder is gone
    assert ds.records[0].path.startswith(str(other))
