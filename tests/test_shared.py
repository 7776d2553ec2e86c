"""Shared helpers: the text-anchor cache of `Method`, `Prediction.concat`, atomic file writes."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from anomalens import data
from anomalens.data import DataError
from anomalens.data.formats import READERS
from anomalens.data.types import check_classes, split_parts
from anomalens.files import atomic_path, atomic_write
from anomalens.methods.base import Prediction, create, weights_fingerprint


def test_anchors_are_computed_once_per_class_and_follow_the_weights():
    method = create("winclip", backbone="test-tiny", pretrained=None, device="cpu")
    weight = torch.nn.Parameter(torch.ones(3))
    calls: list[list[str]] = []

    def compute(names: list[str]) -> torch.Tensor:
        calls.append(names)
        assert not torch.is_grad_enabled()
        return torch.stack([weight.double() * len(n) for n in names])  # (C, 3) float64

    first = method.cached_anchors(["bb", "a", "bb"], compute, [weight])
    assert calls == [["a", "bb"]]  # the missing names, each once
    assert first.dtype == torch.float32 and first.shape == (3, 3)
    torch.testing.assert_close(first[:, 0], torch.tensor([2.0, 1.0, 2.0]))
    method.cached_anchors(["a", "ccc"], compute, [weight])
    assert calls[1:] == [["ccc"]]
    with torch.no_grad():
        weight.mul_(2.0)
    again = method.cached_anchors(["a"], compute, [weight])
    assert calls[2:] == [["a"]]  # new weights: everything is computed again
    torch.testing.assert_close(again, torch.full((1, 3), 2.0))


def test_weights_fingerprint_sees_a_change_of_any_tensor():
    a, b = torch.zeros(2), torch.ones(3)
    before = weights_fingerprint([a, b])
    assert before == weights_fingerprint([a.clone(), b.clone()]) and weights_fingerprint([]) == ()
    b[1] = -1.0
    assert weights_fingerprint([a, b]) != before
    b[1], b[2] = 1.0, -1.0  # the same values in another order
    assert weights_fingerprint([a, b]) != before
    assert weights_fingerprint([a.double(), b]) != weights_fingerprint([a, b])
    strided = torch.arange(12.0).reshape(3, 4).T  # a non-contiguous view
    assert weights_fingerprint([strided]) == weights_fingerprint([strided.contiguous()])


# ---------------------------------------------------------------------- Prediction.concat
def test_prediction_concat_keeps_order_extras_and_stacks_equal_maps():
    a = Prediction(np.array([0.1, 0.2]), np.zeros((2, 3, 3), np.float32), {"t": np.array([1.0, 2.0])})
    b = Prediction(np.array([0.3], np.float32), [np.ones((3, 3), np.float32)], {"t": np.array([3.0])})
    both = Prediction.concat([a, b])
    assert both.scores.dtype == np.float32 and both.scores.tolist() == pytest.approx([0.1, 0.2, 0.3])
    assert isinstance(both.maps, np.ndarray) and both.maps.shape == (3, 3, 3) and both.maps[2].sum() == 9
    assert both.extras["t"].tolist() == [1.0, 2.0, 3.0]
    mixed = Prediction.concat(
        [b, Prediction(np.array([0.5]), [np.zeros((2, 4), np.float32)], {"t": np.zeros(1)})]
    )
    assert isinstance(mixed.maps, list) and [m.shape for m in mixed.maps] == [(3, 3), (2, 4)]
    with pytest.raises(ValueError, match="no predictions"):
        Prediction.concat([])


# ---------------------------------------------------------------------- atomic writes
def test_atomic_write_replaces_and_creates_folders(tmp_path: Path):
    path = tmp_path / "a" / "b" / "out.txt"
    atomic_write(path, "first")
    atomic_write(path, b"second")
    assert path.read_text() == "second" and os.listdir(path.parent) == ["out.txt"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # created by open(), not mkstemp's 0600


@pytest.mark.parametrize("fsync", [False, True])
def test_atomic_path_keeps_the_old_file_when_the_writer_fails(tmp_path: Path, fsync: bool):
    path = tmp_path / "model.bin"
    path.write_text("old")
    with pytest.raises(OSError, match="disk full"), atomic_path(path, fsync=fsync) as tmp:
        tmp.write_text("half")
        raise OSError("disk full")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["model.bin"]
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_text("new")
        assert path.read_text() == "old"  # readers see the previous file until the block ends
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["model.bin"]


# ---------------------------------------------------------------------- dataset kinds and classes
def test_one_reader_table_and_one_class_check(tmp_path: Path, monkeypatch):
    assert tuple(sorted(READERS)) == data.KINDS
    assert {"mvtec", "synthetic", "contextual", "mnist", "cifar10"} <= set(READERS)
    check_classes(None, ["a"], "src")  # None: every class
    check_classes(["b", "a", "a"], ["a", "b"], "src")
    with pytest.raises(DataError, match=r"^unknown class 'c' in src; available classes: a, b$"):
        check_classes(["a", "c"], ["a", "b"], "src")
    assert split_parts("all") == ("train", "test") and split_parts("test") == ("test",)
    with pytest.raises(DataError, match="unknown split 'val'"):
        split_parts("val")
    monkeypatch.setenv("ANOMALENS_CACHE", str(tmp_path))
    spec = "synthetic:defects?n=2&size=32"
    with pytest.raises(DataError, match="unknown class 'nope' in synthetic:defects; available classes"):
        data.load(spec, classes=["nope"])
    dataset = data.load(spec)
    with pytest.raises(DataError, match=f"unknown class 'nope' in {dataset.name}; available classes"):
        data.sample_support(dataset, 1, 0, "nope")
