"""The library functions behind the CLI commands, called directly: the one batch loop around `predict`,
`detect`, dataset concatenation, the dataset report, and how the CLI fills their arguments."""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import anomalens.data as al_data
from anomalens.cli import _call, build_parser
from anomalens.data.types import Dataset
from anomalens.detect import detect, expand_inputs
from anomalens.inference import default_workers, predict_batches, predict_dataset
from anomalens.methods import create


@pytest.fixture(scope="module")
def winclip():
    return create("winclip", backbone="test-tiny", pretrained=None, device="cpu", image_size=64)


def test_predict_dataset_is_predict_over_all_images_in_batches(winclip, mvtec_root):
    dataset = al_data.load(f"mvtec:{mvtec_root}", "test")
    seen = []
    prediction, masks = predict_dataset(winclip, dataset, batch_size=3, on_batch=seen.append)
    assert seen == [3, 3, 2] and len(prediction) == len(dataset) == 8
    assert [m is None for m in masks] == [r.label == 0 for r in dataset.records]
    samples = list(dataset)
    direct = winclip.predict([s.image for s in samples], [s.class_name for s in samples], batch_size=8)
    np.testing.assert_allclose(prediction.scores, direct.scores, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(prediction.maps, direct.maps, rtol=1e-5, atol=1e-6)


def test_predict_batches_skips_unreadable_images_only_when_asked(winclip, mvtec_root):
    dataset = al_data.load(f"mvtec:{mvtec_root}", "test", ["bottle"])
    broken = Path(dataset.records[1].path)
    broken.write_bytes(broken.read_bytes()[:40])
    errors: list[str] = []
    batches = list(predict_batches(winclip, dataset, batch_size=2, errors=errors))
    assert [len(samples) for samples, _ in batches] == [1, 2]
    assert len(errors) == 1 and str(broken) in errors[0]
    with pytest.raises(al_data.DataError, match=str(broken)):
        list(predict_batches(winclip, dataset, batch_size=2))


def _traced(dataset: Dataset) -> Dataset:
    """`dataset` whose samples record the process that decoded them (meta["pid"])."""
    index = {r: i for i, r in enumerate(dataset.records)}

    def load(record):
        sample = dataset[index[record]]
        sample.meta["pid"] = os.getpid()
        return sample

    return Dataset(dataset.name, dataset.records, load)


def test_loader_workers_read_in_other_processes_and_change_no_result(winclip, mvtec_root):
    dataset = _traced(al_data.load(f"mvtec:{mvtec_root}", "test"))
    broken = Path(dataset.records[4].path)
    broken.write_bytes(broken.read_bytes()[:40])
    runs = {}
    for workers in (0, 2):
        errors: list[str] = []
        batches = list(predict_batches(winclip, dataset, batch_size=3, errors=errors, workers=workers))
        runs[workers] = (batches, errors)
    (serial, serial_errors), (parallel, parallel_errors) = runs[0], runs[2]
    assert len(serial_errors) == 1 and parallel_errors == serial_errors
    assert {s.meta["pid"] for samples, _ in serial for s in samples} == {os.getpid()}
    assert os.getpid() not in {s.meta["pid"] for samples, _ in parallel for s in samples}
    assert [[s.path for s in b] for b, _ in parallel] == [[s.path for s in b] for b, _ in serial]
    for (_, a), (_, b) in zip(serial, parallel, strict=True):  # the same batches through the same model
        np.testing.assert_array_equal(a.scores, b.scores)
        np.testing.assert_array_equal(a.maps, b.maps)
    assert default_workers(1) == 0 and default_workers(2) >= 1
    with pytest.raises(al_data.DataError, match=str(broken)):
        list(predict_batches(winclip, dataset, batch_size=3, workers=2))


def test_workers_can_send_only_the_image_sizes_back(winclip, mvtec_root):
    # predict_dataset needs no image in this process: a worker sends its size with the resized pixels.
    dataset = al_data.load(f"mvtec:{mvtec_root}", "test")
    full = list(predict_batches(winclip, dataset, batch_size=3, workers=1))
    sized = list(predict_batches(winclip, dataset, batch_size=3, workers=1, keep_images=False))
    for (samples, a), (stand_ins, b) in zip(full, sized, strict=True):
        np.testing.assert_array_equal(a.scores, b.scores)
        np.testing.assert_array_equal(a.maps, b.maps)
        assert [s.image.shape for s in stand_ins] == [s.image.shape for s in samples]
        assert all(s.image.strides == (0, 0, 0) and not s.image.any() for s in stand_ins)
        assert all(np.array_equal(s.mask, t.mask) for s, t in zip(samples, stand_ins, strict=True))


def test_a_set_level_method_scores_the_whole_set_once_whatever_the_workers(mvtec_root):
    musc = create("musc", backbone="test-tiny", pretrained=None, device="cpu", image_size=64)
    dataset = al_data.load(f"mvtec:{mvtec_root}", "test", ["bottle"])
    seen: list[int] = []
    one, masks = predict_dataset(musc, dataset, batch_size=1, on_batch=seen.append, workers=0)
    assert seen == [len(dataset)] and len(masks) == len(dataset)
    two, _ = predict_dataset(musc, dataset, batch_size=1, workers=2)
    np.testing.assert_array_equal(one.scores, two.scores)
    np.testing.assert_array_equal(one.extras["map_max"], two.extras["map_max"])
    direct = musc.predict([s.image for s in dataset], "bottle", batch_size=1)
    np.testing.assert_array_equal(one.scores, direct.scores)


def test_detect_writes_scores_and_heatmaps_and_reports_failures(winclip, tmp_path):
    rng = np.random.default_rng(0)
    for name in ("a.png", "sub/b.png"):
        (tmp_path / "in" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(tmp_path / "in" / name)
    (tmp_path / "in" / "bad.png").write_bytes(b"not a png")
    assert expand_inputs([str(tmp_path / "in")]) == sorted(str(p) for p in (tmp_path / "in").rglob("*.png"))
    result = detect(winclip, [str(tmp_path / "in")], tmp_path / "out", threshold=0.0, progress=False)
    assert [Path(p).name for p, _, _ in result.rows] == ["a.png", "b.png"]
    assert all(verdict in ("normal", "anomalous") for _, _, verdict in result.rows)
    assert len(result.failures) == 1 and "bad.png" in result.failures[0]
    assert [p.name for p in result.heatmaps] == ["a.png", "b.png"] and all(
        p.is_file() for p in result.heatmaps
    )
    with open(result.csv_path) as f:
        assert [row["path"] for row in csv.DictReader(f)] == [p for p, _, _ in result.rows]
    # Loader workers and the background heatmap writer write the same files.
    again = detect(
        winclip, [str(tmp_path / "in")], tmp_path / "again", threshold=0.0, progress=False, workers=2
    )
    assert again.rows == result.rows and again.failures == result.failures
    assert result.csv_path.read_bytes() == again.csv_path.read_bytes()
    for a, b in zip(result.heatmaps, again.heatmaps, strict=True):
        assert a.name == b.name and a.read_bytes() == b.read_bytes()


def test_concat_datasets_decodes_each_sample_with_its_own_dataset(mvtec_root):
    bottle = al_data.load(f"mvtec:{mvtec_root}", "train", ["bottle"])
    grid = al_data.load(f"mvtec:{mvtec_root}", "test", ["grid"])
    both = al_data.concat_datasets([bottle, grid])
    assert both.name == "mvtec+mvtec" and len(both) == len(bottle) + len(grid)
    assert both[len(bottle)].path == grid[0].path and both[0].path == bottle[0].path
    assert al_data.concat_datasets([grid]) is grid


def test_describe_spec_counts_and_verifies(mvtec_root):
    from anomalens.data.report import describe_spec

    report = describe_spec(f"mvtec:{mvtec_root}", progress=False)
    assert report.images == 16 and report.verified and report.problems == []
    assert "| test | grid | 4 | 2 | 2 | 2 |" in report.table.splitlines()
    broken = mvtec_root / "grid" / "test" / "crack" / "001.png"
    broken.write_bytes(broken.read_bytes()[:40])
    assert describe_spec(f"mvtec:{mvtec_root}", verify=False).problems == []
    (problem,) = describe_spec(f"mvtec:{mvtec_root}", "test", progress=False).problems
    assert str(broken) in problem


def test_call_fills_parameters_from_flags_of_the_same_name():
    def fn(a, b=1, *, c=2, **rest):
        return a, b, c, rest

    def downstream(x, *, d=3, e=4):
        return x

    args = argparse.Namespace(a=10, b=11, c=12, d=13, x=14, rest=15, unrelated=16)
    assert _call(fn, args, downstream, b=0) == (10, 0, 12, {"d": 13})


def test_flags_reach_the_library_under_their_parameter_names():
    import inspect

    def received(argv: list[str], fn) -> dict:
        """The keyword arguments `_call` gives `fn` for this command line."""

        def spy(**kwargs):
            return kwargs

        spy.__signature__ = inspect.signature(fn)
        return _call(spy, build_parser().parse_args(argv))

    argv = ["detect", "x.png", "--no-heatmaps", "--alpha", "0.3", "--class-name", "nut", "--workers", "3"]
    got = received(argv, detect)
    assert got == {
        "inputs": ["x.png"],
        "out": "runs/detect",
        "class_name": "nut",
        "support": None,
        "threshold": None,
        "batch_size": 16,
        "heatmaps": False,
        "alpha": 0.3,
        "workers": 3,
    }


def test_help_of_every_command_imports_no_model_code():
    """`anomalens <cmd> --help` loads no torch-level module of the package beyond what `import
    anomalens.cli` itself loads (the package `__init__` is measured by the start-up benchmark)."""
    code = """
import sys, contextlib, io
import anomalens.cli as cli
before = set(sys.modules)
commands = [a.dest for a in cli.build_parser()._subparsers._group_actions[0]._choices_actions]
for argv in [["--help"]] + [[c, "--help"] for c in commands]:
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli.main(argv) == 0, argv
heavy = ("torch", "open_clip", "timm", "anomalens.methods.", "anomalens.engine", "anomalens.evaluation",
         "anomalens.backbones", "anomalens.converters.")
print(len(commands), sorted(m for m in set(sys.modules) - before if m.startswith(heavy)))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    n, loaded = out.split(" ", 1)
    assert int(n) >= 9 and loaded.strip() == "[]"
