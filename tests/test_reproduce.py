"""`anomalens reproduce`: paper protocols end to end on generated MVTec/VisA/CAAD trees with test-tiny,
the published numbers shipped as cited package data, and the measured-vs-published comparison."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from anomalens.methods.base import list_methods
from anomalens.reproduce import Leg, Protocol, compare, protocols, published, reproduce
from conftest import write_contextual_tree, write_mvtec_tree, write_visa_tree

TINY = {"backbone": "test-tiny", "pretrained": None, "progress": False}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("reproduce-data")
    write_mvtec_tree(root / "mvtec")
    write_visa_tree(root / "visa")
    write_contextual_tree(root / "caad")
    return root


@pytest.fixture(scope="module")
def aa_clip_run(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("aa-clip-run")
    result = reproduce(
        "aa-clip", data_root, out, options={"image_size": 64}, train_options={"epochs": 1}, **TINY
    )
    return out, result


def test_published_numbers_are_cited_percentages_for_every_protocol():
    for name, protocol in protocols().items():
        numbers = published(name)
        assert numbers, name
        assert protocol.method in list_methods()
        for n in numbers:
            assert 0 < n["value"] <= 100 and n["paper"] and n["table"] and n["column"] and n["citation"]
            assert n["dataset"] in {leg.evaluate for leg in protocol.legs}, n


def test_aa_clip_trains_each_direction_and_writes_the_table(aa_clip_run):
    out, result = aa_clip_run
    assert set(result["legs"]) == {"visa-to-mvtec", "mvtec-to-visa"} and not result["evaluated_only"]
    for leg in result["legs"]:
        log = [json.loads(line) for line in (out / leg / "train_log.jsonl").read_text().splitlines()]
        assert log[0]["configs"]["image"]["epochs"] == 1 and log[0]["configs"]["image"]["lr"] == 5e-4
    assert result["legs"]["visa-to-mvtec"]["recipe"]["name"] == "official"
    rows = {(r["dataset"], r["metric"]): r for r in result["rows"]}
    assert rows[("mvtec", "image_auroc")]["value"] == 90.5 and rows[("visa", "pixel_auroc")]["value"] == 95.5
    measured = result["legs"]["visa-to-mvtec"]["datasets"]["mvtec"]["mean"]["image_auroc"]
    assert rows[("mvtec", "image_auroc")]["measured"] == round(100 * measured, 1)
    assert json.loads((out / "results.json").read_text())["rows"] == result["rows"]
    table = (out / "table.md").read_text()
    assert "| mvtec | — | image_auroc |" in table and "paper 002 Table 2" in table and "CVPR 2025" in table
    assert "| measured | published (paper) |" in table and "not measured here" in table


def test_official_weights_are_evaluated_without_training(aa_clip_run, data_root, tmp_path):
    trained, first = aa_clip_run
    weights = {"visa": str(trained / "visa-to-mvtec" / "model.anomalens")}
    result = reproduce("aa-clip", data_root, tmp_path, weights=weights, **TINY)
    assert result["evaluated_only"] and list(result["legs"]) == ["visa-to-mvtec"]
    assert not (tmp_path / "visa-to-mvtec").exists()  # nothing trained
    same = result["legs"]["visa-to-mvtec"]["datasets"]["mvtec"]["mean"]
    assert same["image_auroc"] == pytest.approx(
        first["legs"]["visa-to-mvtec"]["datasets"]["mvtec"]["mean"]["image_auroc"]
    )
    not_run = [r for r in result["rows"] if r["dataset"] == "visa"]
    assert not_run and all(r["measured"] is None for r in not_run)


def test_inctrl_generalist_protocol_k_1_2_4_over_three_draws(data_root, tmp_path):
    train = {"epochs": 1, "max_steps_per_epoch": 1, "batch_size": 4}
    result = reproduce("inctrl", data_root, tmp_path, train_options=train, **TINY)
    visa = result["legs"]["mvtec-to-visa"]
    assert visa["shots"] == [1, 2, 4] and visa["seeds"] == [0, 1, 2]
    assert set(visa["datasets"]) == {"visa/1-shot", "visa/2-shot", "visa/4-shot"}
    row = next(
        r for r in result["rows"] if (r["dataset"], r["shots"], r["metric"]) == ("visa", 4, "image_ap")
    )
    assert row["value"] == 90.2  # paper 001 Table 2 (4-shot), InCTRL
    assert row["measured"] == round(100 * visa["datasets"]["visa/4-shot"]["mean"]["image_ap"], 1)


def test_core_clip_trains_one_model_per_n_shot(data_root, tmp_path):
    train = {"epochs": 1, "image.batch_size": 2}
    result = reproduce("core-clip", data_root, tmp_path, train_options=train, **TINY)
    assert list(result["legs"]) == ["caad-1shot-to-caad", "caad-2shot-to-caad", "caad-4shot-to-caad"]
    for n in (1, 2, 4):  # N normal + N anomalous of each of the two classes, 2 images per step
        log = (tmp_path / f"caad-{n}shot-to-caad" / "train_log.jsonl").read_text().splitlines()
        epochs = [json.loads(line) for line in log if '"event": "epoch"' in line]
        assert [e["steps"] for e in epochs if e["stage"] == "image"] == [2 * n]
    assert all(r["measured"] is not None for r in result["rows"])


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("crane", {"image_size": 64}),
        ("crane+", {"image_size": 64, "dino": "test-tiny-dino"}),
        ("inctrlv2", {}),
    ],
)
def test_other_protocols_run_end_to_end(method, options, data_root, tmp_path):
    train = {"epochs": 1, "max_steps_per_epoch": 1, "batch_size": 4}
    result = reproduce(method, data_root, tmp_path, options=options, train_options=train, **TINY)
    assert set(result["legs"]) == {"mvtec-to-visa", "visa-to-mvtec"}
    assert result["rows"] and all(r["measured"] is not None for r in result["rows"])


def test_compare_matches_dataset_and_shots():
    protocol = Protocol("inctrl", "official", (Leg("mvtec", "visa", eval_shots=(1, 2, 4)),))
    doc = {
        "datasets": {
            f"visa/{k}-shot": {"mean": {"image_auroc": k / 10, "image_ap": k / 20}} for k in (1, 2, 4)
        }
    }
    rows = compare("inctrl", protocol, {"mvtec-to-visa": doc})
    measured = {(r["shots"], r["metric"]): r["measured"] for r in rows if r["dataset"] == "visa"}
    assert measured[(1, "image_auroc")] == 10.0 and measured[(1, "image_ap")] == 5.0
    assert measured[(2, "image_ap")] == 10.0 and measured[(4, "image_ap")] == 20.0
    assert all(r["measured"] is None for r in rows if r["dataset"] == "mvtec")  # leg not run


def test_bad_arguments_name_the_argument(data_root, tmp_path):
    with pytest.raises(ValueError, match="no reproduction protocol for 'winclip'"):
        reproduce("winclip", data_root, tmp_path)
    with pytest.raises(FileNotFoundError, match="--data-root"):
        reproduce("aa-clip", tmp_path / "missing", tmp_path)
    with pytest.raises(ValueError, match="--weights: no leg trains on btad"):
        reproduce("aa-clip", data_root, tmp_path, weights={"btad": "x.anomalens"})
    with pytest.raises(ValueError, match="--weights: give DATASET=FILE"):
        reproduce("aa-clip", data_root, tmp_path, weights=["x.anomalens"])
    with pytest.raises(FileNotFoundError, match="--weights: file not found"):
        reproduce("aa-clip", data_root, tmp_path, weights={"visa": str(tmp_path / "x.anomalens")})


def test_cli_reproduce_prints_the_table(capsys, aa_clip_run, data_root, tmp_path):
    from anomalens.cli import main

    trained, _ = aa_clip_run
    weights = f"mvtec={trained / 'mvtec-to-visa' / 'model.anomalens'}"
    argv = [
        "reproduce",
        "aa-clip",
        "--data-root",
        str(data_root),
        "--weights",
        weights,
        "--out",
        str(tmp_path),
    ]
    assert main([*argv, "--quiet"]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert (
        "| visa | — | image_auroc |" in printed and "| mvtec | — | image_auroc | not run | 90.5 |" in printed
    )
    assert (tmp_path / "table.md").is_file()
    assert main(["reproduce", "aa-clip", "--data-root", str(tmp_path / "nope"), "--quiet"]) == 1
    assert "--data-root: folder not found" in capsys.readouterr().err
