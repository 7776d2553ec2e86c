"""evaluate_method, results JSON (DESIGN §3.4), markdown tables, protocols and calibration.

A tiny test-local method (not registered) keeps these tests fast and their numbers predictable: its map
is the absolute deviation of each pixel's grey level from the image mean, its score the map's maximum.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import anomalens.data as al_data
from anomalens import create
from anomalens.calibrate import calibrate, calibrate_checkpoint, threshold_f1, threshold_from_normals
from anomalens.engine import distributed
from anomalens.evaluation import evaluate_method, markdown_table, write_results
from anomalens.methods.base import BatchPrediction, Method
from anomalens.protocols import run_protocol
from conftest import write_mvtec_tree

DESIGN_KEYS = {"method", "backbone", "pretrained", "protocol", "seed", "support_files", "datasets", "timing"}
IMAGE_METRICS = {"image_auroc", "image_ap", "image_f1_max"}
PIXEL_METRICS = {"pixel_auroc", "pixel_ap", "pixel_f1_max", "aupro"}


@dataclass(frozen=True)
class DeviationConfig:
    image_size: int = 32


class Deviation(Method):
    """Map = |grey − mean grey| at the model resolution; score = its maximum."""

    name = "deviation"
    config_class = DeviationConfig

    def forward_batch(self, images, class_names, support):
        grey = images.mean(1)  # (B, S, S)
        maps = (grey - grey.mean(dim=(1, 2), keepdim=True)).abs()
        return BatchPrediction(maps.flatten(1).amax(1), maps)


class Inverted(Deviation):
    """Same predictions; the set-level hook negates the scores (so image AUROC becomes 1 − AUROC)."""

    def set_scores(self, prediction, class_names):
        return -prediction.scores


class FewShotMean(Deviation):
    """Few-shot: score = distance of the image's mean grey level to the support images' mean."""

    needs_support = True

    def prepare_support(self, images):
        return images.mean()

    def forward_batch(self, images, class_names, support):
        maps = super().forward_batch(images, class_names, support).maps
        return BatchPrediction((images.mean(dim=(1, 2, 3)) - support).abs(), maps)


def build(cls: type[Method]) -> Method:
    return cls.build("test-tiny", None, device="cpu")


@pytest.fixture(scope="module")
def deviation() -> Method:
    return build(Deviation)


def test_results_document_has_design_keys_and_means(deviation, mvtec_root):
    results = evaluate_method(deviation, f"mvtec:{mvtec_root}", progress=False)
    assert set(results) >= DESIGN_KEYS
    assert (results["method"], results["backbone"], results["pretrained"]) == ("deviation", "test-tiny", None)
    assert results["protocol"] == "zero-shot" and results["seed"] is None and results["support_files"] == {}
    mvtec = results["datasets"]["mvtec"]
    assert set(mvtec["classes"]) == {"bottle", "grid"}
    for values in mvtec["classes"].values():
        assert set(values) == IMAGE_METRICS | PIXEL_METRICS
        assert all(0.0 <= v <= 1.0 for v in values.values())
    for metric, mean in mvtec["mean"].items():
        assert mean == pytest.approx(np.mean([mvtec["classes"][c][metric] for c in ("bottle", "grid")]))
    timing = results["timing"]
    assert timing["images"] == 8 and timing["device"] == "cpu" and timing["seconds"] > 0
    assert timing["images_per_s"] == pytest.approx(8 / timing["seconds"], rel=0.01)
    json.dumps(results, allow_nan=False)  # plain JSON types only


def test_scores_match_a_direct_predict(deviation, mvtec_root):
    """Per-class batching must not change scores: AUROC equals the one computed from predict()."""
    from anomalens.metrics import image_auroc

    data = al_data.load(f"mvtec:{mvtec_root}", "test", ["bottle"])
    results = evaluate_method(deviation, data, batch_size=3, progress=False)
    scores = deviation.predict([s.image for s in data], "bottle").scores
    expected = image_auroc(data.labels, scores)
    assert results["datasets"]["mvtec"]["classes"]["bottle"]["image_auroc"] == pytest.approx(expected)


def test_classification_only_set_reports_image_metrics_only(deviation, tmp_path):
    rng = np.random.default_rng(0)
    for folder, n in (("normal", 3), ("anomaly", 3)):
        (tmp_path / "set" / folder).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
                tmp_path / "set" / folder / f"{i}.png"
            )
    results = evaluate_method(deviation, f"folder:{tmp_path / 'set'}", progress=False)
    (entry,) = results["datasets"].values()
    (values,) = entry["classes"].values()
    assert set(values) == IMAGE_METRICS
    assert set(entry["mean"]) == IMAGE_METRICS


def test_class_without_anomalies_is_null_with_a_note(deviation, mvtec_root):
    data = al_data.load(f"mvtec:{mvtec_root}", "test")
    keep = [i for i, r in enumerate(data.records) if r.class_name == "bottle" or r.label == 0]
    with pytest.warns(UserWarning):
        results = evaluate_method(deviation, data.subset(keep), progress=False)
    entry = results["datasets"]["mvtec"]
    assert entry["classes"]["grid"]["image_auroc"] is None
    assert entry["mean"]["image_auroc"] == entry["classes"]["bottle"]["image_auroc"]
    assert "image_auroc: mean over 1 of 2 classes (undefined for grid)" in entry["notes"]
    table = markdown_table(results)
    assert "| mvtec | grid | – |" in table
    assert "* mvtec: image_auroc: mean over 1 of 2 classes (undefined for grid)" in table


def test_set_scores_hook_gives_the_image_scores(deviation, mvtec_root):
    spec = f"mvtec:{mvtec_root}"
    plain = evaluate_method(deviation, spec, progress=False)["datasets"]["mvtec"]["classes"]
    inverted = evaluate_method(build(Inverted), spec, progress=False)["datasets"]["mvtec"]["classes"]
    for cls in plain:
        assert inverted[cls]["image_auroc"] == pytest.approx(1 - plain[cls]["image_auroc"])
        assert inverted[cls]["pixel_auroc"] == pytest.approx(plain[cls]["pixel_auroc"])


def test_fewshot_support_comes_from_the_train_split_and_is_recorded(mvtec_root):
    method = build(FewShotMean)
    spec = f"mvtec:{mvtec_root}"
    with pytest.raises(ValueError, match="few-shot"):
        evaluate_method(method, spec, progress=False)
    first = evaluate_method(method, spec, shots=2, support_seed=5, progress=False)
    again = evaluate_method(method, spec, shots=2, support_seed=5, progress=False)
    assert first["protocol"] == "fewshot" and first["seed"] == 5 and first["shots"] == 2
    files = first["support_files"]["mvtec"]
    assert set(files) == {"bottle", "grid"}
    for cls, paths in files.items():
        assert len(paths) == 2
        assert all(Path(p).parent == mvtec_root / cls / "train" / "good" for p in paths)
    assert again["support_files"] == first["support_files"]
    assert again["datasets"] == first["datasets"]
    test_data = al_data.load(spec, "test")
    with pytest.raises(ValueError, match="support_data"):
        evaluate_method(method, test_data, shots=1, progress=False)
    given = evaluate_method(
        method, test_data, shots=2, support_seed=5, support_data=al_data.load(spec, "train"), progress=False
    )
    assert given["support_files"] == first["support_files"]


@pytest.mark.parametrize(("resolution", "side"), [("input", 16), ("model", 32)])
def test_eval_resolution(deviation, mvtec_root, resolution, side):
    seen = []
    evaluate_method(
        deviation,
        f"mvtec:{mvtec_root}",
        classes=["bottle"],
        eval_resolution=resolution,
        progress=False,
        on_class=seen.append,
    )
    (result,) = seen
    assert (result.dataset_name, result.class_name, len(result.indices)) == ("mvtec", "bottle", 4)
    assert {m.shape for m in result.maps} == {(side, side)}
    assert set(result.metrics) == IMAGE_METRICS | PIXEL_METRICS
    with pytest.raises(ValueError, match="eval_resolution"):
        evaluate_method(deviation, f"mvtec:{mvtec_root}", eval_resolution="native", progress=False)


def test_markdown_table_rows_and_percentages(deviation, mvtec_root):
    results = evaluate_method(deviation, f"mvtec:{mvtec_root}", progress=False)
    table = markdown_table(results)
    lines = table.splitlines()
    header = next(line for line in lines if line.startswith("| dataset"))
    assert header.split(" | ")[2:5] == ["image_auroc", "image_ap", "image_f1_max"]
    mean_row = next(line for line in lines if "**mean**" in line)
    auroc = results["datasets"]["mvtec"]["mean"]["image_auroc"]
    assert f"**{100 * auroc:.1f}**" in mean_row
    assert sum(line.startswith("| mvtec |") for line in lines) == 3  # two classes and the mean


def test_write_results_is_atomic_json_and_markdown(tmp_path, monkeypatch):
    results = {
        "method": "m",
        "backbone": "b",
        "pretrained": None,
        "protocol": "zero-shot",
        "seed": None,
        "support_files": {},
        "datasets": {
            "d": {"classes": {"c": {"image_auroc": np.float32(0.5), "aupro": float("nan")}}, "mean": {}}
        },
        "timing": {"images": np.int64(3), "seconds": 1.0, "images_per_s": 3.0, "device": "cpu"},
    }
    path = write_results(results, tmp_path / "out")
    loaded = json.loads(path.read_text())
    assert loaded["datasets"]["d"]["classes"]["c"] == {"image_auroc": 0.5, "aupro": None}
    assert loaded["timing"]["images"] == 3
    assert (tmp_path / "out" / "results.md").read_text().startswith("**m · b (None) · zero-shot**")
    before = path.read_text()

    def fail(*_args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        write_results({**results, "method": "other"}, tmp_path / "out")
    assert path.read_text() == before
    assert sorted(os.listdir(tmp_path / "out")) == ["results.json", "results.md"]


def test_generalist_protocol_averages_seeds_and_records_each_draw(mvtec_root):
    method = build(FewShotMean)
    spec = f"mvtec:{mvtec_root}"
    results = run_protocol("generalist", method, spec, shots=[1, 2], seeds=2, support_seed=3, progress=False)
    assert set(results) >= DESIGN_KEYS
    assert results["protocol"] == "generalist" and results["seeds"] == [3, 4] and results["shots"] == [1, 2]
    assert set(results["datasets"]) == {"mvtec/1-shot", "mvtec/2-shot"}
    singles = [
        evaluate_method(method, spec, shots=1, support_seed=s, progress=False)["datasets"]["mvtec"]
        for s in (3, 4)
    ]
    one_shot = results["datasets"]["mvtec/1-shot"]
    for metric in IMAGE_METRICS:
        draws = [d["mean"][metric] for d in singles]
        assert one_shot["mean"][metric] == pytest.approx(np.mean(draws))
        assert one_shot["std"][metric] == pytest.approx(np.std(draws))
    files = results["support_files"]["mvtec/2-shot"]
    assert set(files) == {"3", "4"} and all(len(p) == 2 for p in files["3"].values())
    assert results["timing"]["images"] == 4 * 8
    assert "std" in markdown_table(results)


def test_protocol_arguments_are_checked(deviation, mvtec_root):
    spec = f"mvtec:{mvtec_root}"
    with pytest.raises(ValueError, match="unknown protocol"):
        run_protocol("many-shot", deviation, spec)
    with pytest.raises(ValueError, match="zero-shot"):
        run_protocol("zero-shot", deviation, spec, shots=[2])
    with pytest.raises(ValueError, match="exactly one K"):
        run_protocol("fewshot", deviation, spec, shots=[1, 2])
    results = run_protocol("fewshot", deviation, spec, shots=[1], support_seed=2, progress=False)
    assert results["protocol"] == "fewshot" and results["seed"] == 2
    assert set(results["support_files"]["mvtec"]) == {"bottle", "grid"}


def test_threshold_from_normals():
    assert threshold_from_normals(np.arange(1, 101), 99) == pytest.approx(99.01)
    assert threshold_from_normals([0.2, 0.4], 100) == pytest.approx(0.4)
    with pytest.raises(ValueError, match="non-finite"):
        threshold_from_normals([0.1, np.nan])
    with pytest.raises(ValueError, match="percentile"):
        threshold_from_normals([0.1], 101)


def test_threshold_f1_maximises_f1():
    labels = [0, 0, 1, 1, 0, 1]
    scores = [0.1, 0.4, 0.35, 0.8, 0.2, 0.9]
    threshold, f1 = threshold_f1(labels, scores)
    assert threshold == pytest.approx(0.275)  # between 0.35 (flagged) and 0.2
    assert f1 == pytest.approx(6 / 7)
    # Tied scores are flagged together; the best cut here flags every image.
    threshold, f1 = threshold_f1([0, 1, 1], [0.5, 0.5, 0.9])
    assert threshold < 0.5 and f1 == pytest.approx(0.8)
    with pytest.raises(ValueError, match="anomalous"):
        threshold_f1([0, 0], [0.1, 0.2])


def test_calibrate_sets_the_method_threshold(mvtec_root):
    method = build(Deviation)
    normals = al_data.load(f"mvtec:{mvtec_root}", "train")
    result = calibrate(method, images=[s.image for s in normals], percentile=100)
    scores = method.predict([s.image for s in normals]).scores
    assert result.rule == "percentile" and result.n_normal == len(normals)
    assert method.threshold == result.threshold == pytest.approx(float(scores.max()))
    labelled = al_data.load(f"mvtec:{mvtec_root}", "test")
    result = calibrate(method, data=labelled)
    assert result.rule == "f1" and (result.n_normal, result.n_anomalous) == (4, 4)
    scores = np.concatenate([method.predict(s.image, s.class_name).scores for s in labelled])
    expected, f1 = threshold_f1(labelled.labels, scores)
    assert method.threshold == pytest.approx(expected) and result.f1 == pytest.approx(f1)
    with pytest.raises(ValueError, match="either images"):
        calibrate(method)


def test_calibrate_checkpoint_from_a_spec_or_image_folders(mvtec_root, tmp_path):
    """A saved model calibrated from a dataset spec (F1 rule) or from a folder of normal images (the
    percentile rule), stored in `out` or over the checkpoint; the same threshold as `calibrate`."""
    import anomalens
    from anomalens_onnx.files import expand_inputs

    method = anomalens.methods.create("winclip", "test-tiny", None, device="cpu", image_size=64)
    checkpoint = method.save(tmp_path / "model.anomalens")
    spec = f"mvtec:{mvtec_root}"
    result, path = calibrate_checkpoint(
        checkpoint, data=spec, classes=["bottle"], out=tmp_path / "c.anomalens"
    )
    expected = calibrate(method, data=al_data.load(spec, "test", ["bottle"]))
    assert path == tmp_path / "c.anomalens" and result.rule == "f1"
    assert anomalens.methods.load(path).threshold == pytest.approx(expected.threshold)
    assert anomalens.methods.load(checkpoint).threshold is None  # `out` given: the checkpoint is kept
    normals = mvtec_root / "bottle" / "train" / "good"
    result, path = calibrate_checkpoint(checkpoint, normals=[str(normals)], percentile=100)
    files = expand_inputs([str(normals)])  # the folder's images (its macOS "._*" files are skipped)
    expected = float(method.predict(files).scores.max())
    assert path == checkpoint and (result.rule, result.n_normal) == ("percentile", len(files))
    assert anomalens.methods.load(checkpoint).threshold == pytest.approx(expected)


# ---------------------------------------------------------------------- torchrun: sharded eval and detect
TINY = ["--backbone", "test-tiny", "--pretrained", "none", "--set", "image_size=64", "--device", "cpu"]


def _sharded_worker(rank: int, world: int, port: int, root: str, inputs: str, out: str) -> None:
    """`anomalens eval` and `detect` alone (before joining the group), then as under torchrun; the files
    written and how many images each process scored go to `out`."""
    torch.set_num_threads(1)
    from anomalens import cli
    from anomalens.methods.base import Method
    from anomalens.methods.musc import MuSc

    scored: dict[str, list[int]] = {"aa-clip": [], "musc": []}
    for cls, name in ((Method, "aa-clip"), (MuSc, "musc")):  # count the images of each predict call
        predict = cls.predict
        cls.predict = lambda self, images, *a, _n=name, _p=predict, **k: (
            scored[_n].append(len(images)) or _p(self, images, *a, **k)
        )

    def run(folder: str) -> None:
        common = ["--batch-size", "2", "--workers", "0", "--quiet", *TINY]
        for method in ("aa-clip", "musc"):  # image-level with extras; set-level
            argv = ["eval", "--method", method, "--data", f"mvtec:{root}", "--out", f"{folder}/{method}"]
            assert cli.main([*argv, *common]) == 0
        detect = ["detect", inputs, "--method", "aa-clip", "--out", f"{folder}/detect", *common]
        assert cli.main(detect) == 1  # one unreadable input: reported, the others scored

    run(f"{out}/alone{rank}")
    for counts in scored.values():
        counts.clear()
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    try:
        run(f"{out}/sharded")  # the CLI joins the group torchrun's variables describe
        assert distributed.world_size() == world
    finally:
        distributed.cleanup()
    Path(f"{out}/scored{rank}.json").write_text(json.dumps(scored))


def test_torchrun_shards_eval_and_detect_and_merges_exactly(tmp_path):
    """2 processes over gloo write the files one process writes (timing aside), heatmaps included."""
    import socket
    import time

    import torch.multiprocessing as mp

    root = write_mvtec_tree(tmp_path / "mvtec")
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    rng = np.random.default_rng(1)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)).save(inputs / f"{i}.png")
    (inputs / "2b.png").write_bytes(b"not a png")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = (2, port, str(root), str(inputs), str(tmp_path))
    context = mp.start_processes(_sharded_worker, args=args, nprocs=2, join=False, start_method="fork")
    deadline = time.monotonic() + 300
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("distributed workers did not finish in 300 s")

    def results(folder: Path) -> dict:
        document = json.loads((folder / "results.json").read_text())
        assert document.pop("timing")["images"] == 8
        return document

    alone, sharded = tmp_path / "alone0", tmp_path / "sharded"
    for method in ("aa-clip", "musc"):
        # aa-clip's set-level table scores read the merged extras ("image_term") of the whole class
        assert results(sharded / method) == results(alone / method) == results(tmp_path / "alone1" / method)
        assert (sharded / method / "results.md").read_text() == (alone / method / "results.md").read_text()
    csv_text = (sharded / "detect" / "scores.csv").read_text()
    assert csv_text == (alone / "detect" / "scores.csv").read_text()
    assert [line.split(",")[0].rsplit("/", 1)[1] for line in csv_text.splitlines()[1:]] == [
        f"{i}.png" for i in range(5)
    ]
    pngs = sorted(p.name for p in (alone / "detect" / "heatmaps").iterdir())
    assert pngs == [f"{i}.png" for i in range(5)]
    for name in pngs:  # both processes wrote into one folder what one process writes
        assert (sharded / "detect" / "heatmaps" / name).read_bytes() == (
            alone / "detect" / "heatmaps" / name
        ).read_bytes()
    # aa-clip, batch 2: each process scored every other batch of 2 (2 of the 4 test images of each
    # class; of the 6 detect inputs, rank 0 batches [0, 1] and [3, 4], rank 1 [2, 2b] minus the
    # unreadable 2b); musc: one whole class of 4 images each.
    scored = [json.loads((tmp_path / f"scored{r}.json").read_text()) for r in range(2)]
    assert [r["aa-clip"] for r in scored] == [[2, 2, 2, 2], [2, 2, 1]]
    assert [r["musc"] for r in scored] == [[4], [4]]


def sequential_metrics(method: Method, dataset, batch_size: int, size: int | None) -> dict:
    """The per-class metrics of a plain loop: decode, predict, set scores and metrics one after another."""
    from anomalens import metrics

    per_class = {}
    for cls in dataset.class_names:
        samples = [s for s in dataset if s.class_name == cls]
        prediction = method.predict([s.image for s in samples], cls, batch_size=batch_size)
        scores = np.asarray(method.set_scores(prediction, [cls] * len(samples)), dtype=np.float64)
        masks, maps = [s.mask for s in samples], list(prediction.maps)
        if size is not None:
            pairs = [metrics.resize_for_eval(m, a, size) for m, a in zip(masks, maps, strict=True)]
            masks, maps = [gt for gt, _ in pairs], [m for _, m in pairs]
        labels = np.array([s.label for s in samples])
        per_class[cls] = {k: float(v) for k, v in metrics.evaluate(labels, scores, masks, maps).items()}
    return per_class


@pytest.mark.parametrize("resolution", ["input", "model"])
def test_pipeline_gives_the_results_of_a_sequential_loop(mvtec_root, resolution):
    # Loader workers, the model and the metrics thread overlap; the numbers must not move at all.
    method = create("aa-clip", backbone="test-tiny", pretrained=None, device="cpu", image_size=64)
    dataset = al_data.load(f"mvtec:{mvtec_root}", "test")
    seen = []
    results = evaluate_method(
        method,
        dataset,
        batch_size=3,
        eval_resolution=resolution,
        workers=2,
        progress=False,
        on_class=seen.append,
    )
    size = 64 if resolution == "model" else None
    expected = sequential_metrics(method, dataset, 3, size)
    assert results["datasets"]["mvtec"]["classes"] == expected
    assert [r.class_name for r in seen] == ["bottle", "grid"]
    assert [r.metrics for r in seen] == [expected["bottle"], expected["grid"]]
    assert {m.shape for r in seen for m in r.maps} == {(64, 64) if size else (16, 16)}


class NaNMaps(Deviation):
    def forward_batch(self, images, class_names, support):
        out = super().forward_batch(images, class_names, support)
        return BatchPrediction(out.scores, out.maps * float("nan"))


def test_an_error_in_the_metrics_thread_is_raised_by_evaluate(mvtec_root):
    with pytest.raises(ValueError, match="NaN"):
        evaluate_method(build(NaNMaps), f"mvtec:{mvtec_root}", workers=0, progress=False)
