"""Named training recipes: each builds, matches its method's shot semantics, is documented, and
`train --recipe` applies it (the user's flags still winning) and records it in model files and results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import anomalens as al
from anomalens.data.types import SPLITS
from anomalens.engine import resolve_configs
from anomalens.methods.base import method_class, read_checkpoint
from anomalens.recipes import RECIPE_NAMES, RECIPES, recipe

DOC = Path(__file__).resolve().parents[1] / "docs" / "recipes.md"
ALL = [(m, n) for m, named in RECIPES.items() for n in named]


@pytest.mark.parametrize("method, name", ALL)
def test_every_recipe_builds_and_states_its_shots(method, name):
    r = recipe(method, name)
    assert r.method == method and r.name == name and name in RECIPE_NAMES and r.split in SPLITS
    assert r.source and r.auxiliary
    cls = method_class(method)
    assert r.shots == cls.shot_semantics
    options = {**r.options, "image_size": 64} if "image_size" in r.options else r.options
    model = al.create(method, backbone="test-tiny", pretrained=None, device="cpu", **options)
    configs = resolve_configs(model.training_stages(), r.train)
    assert all(not c.amp for c in configs.values())  # every source trains in fp32


def test_every_method_with_recipes_has_a_documented_table():
    text = DOC.read_text()
    for method in RECIPES:
        assert f"(`{method}`)" in text, method


def test_unknown_recipe_is_named():
    with pytest.raises(ValueError, match="no recipe 'official' for core-clip; available: paper"):
        recipe("core-clip", "official")


def test_train_recipe_is_applied_recorded_and_overridable(capsys, mvtec_root, tmp_path):
    from anomalens.cli import main

    out = tmp_path / "run"
    argv = ["train", "--method", "aa-clip", "--recipe", "paper", "--backbone", "test-tiny"]
    argv += ["--pretrained", "none", "--set", "image_size=64", "--data", f"mvtec:{mvtec_root}"]
    argv += ["--classes", "bottle", "--shots", "2", "--epochs", "1", "--out", str(out), "--quiet"]
    assert main(argv) == 0, capsys.readouterr().err
    start = json.loads((out / "train_log.jsonl").read_text().splitlines()[0])
    text, image = start["configs"]["text"], start["configs"]["image"]
    assert (text["epochs"], text["lr"], text["batch_size"], text["betas"]) == (1, 1e-5, 16, [0.5, 0.999])
    assert (image["epochs"], image["lr"], image["batch_size"]) == (1, 5e-4, 2)
    desc, _ = read_checkpoint(out / "model.anomalens")
    assert desc["recipe"]["name"] == "paper" and desc["options"]["image_size"] == 64  # --set wins
    schedule = desc["schedule"]  # the recipe's schedule with --epochs on top
    assert (schedule["text"]["epochs"], schedule["image"]["milestones"]) == (1, [16000, 32000])
    results = tmp_path / "eval"
    argv = ["eval", "--checkpoint", str(out / "model.anomalens"), "--data", f"mvtec:{mvtec_root}"]
    assert main([*argv, "--classes", "bottle", "--out", str(results), "--quiet"]) == 0
    saved = json.loads(next(results.rglob("results.json")).read_text())
    assert saved["recipe"]["name"] == "paper" and saved["recipe"]["method"] == "aa-clip"
    assert saved["schedule"] == schedule
