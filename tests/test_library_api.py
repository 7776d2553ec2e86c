"""The library functions behind the CLI commands, called directly: the one batch loop around `predict`,
`detect`, dataset concatenation, the dataset report, and how the CLI fills their arguments."""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import anomalens.data as al_data
from anomalens.cli import _call, build_parser
from anomalens.detect import detect, expand_inputs
from anomalens.inference import predict_batches, predict_dataset
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

    got = received(["detect", "x.png", "--no-heatmaps", "--alpha", "0.3", "--class-name", "nut"], detect)
    assert got == {
        "inputs": ["x.png"],
        "out": "runs/detect",
        "class_name": "nut",
        "support": None,
        "threshold": None,
        "batch_size": 16,
        "heatmaps": False,
        "alpha": 0.3,
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
