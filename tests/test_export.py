"""ONNX export (`anomalens.export`) and the torch-free ONNX Runtime inferencer (`anomalens.OnnxModel`).

Each exportable method is exported once (module-scoped fixture; dynamo export takes seconds) on the
random-weight test-tiny backbone at a small image size, and ONNX Runtime on the CPU must reproduce
`Method.predict` at batch 1 and batch 3 on images already at the model resolution.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import anomalens as al  # noqa: E402
from anomalens.export import export_onnx, quantize_int8  # noqa: E402
from anomalens.onnx_model import OnnxModel, bilinear  # noqa: E402

SIZE = 64
# int8 ONNX outputs vs fp32: |Δ| ≤ INT8_RTOL · max |fp32 output|. Measured on these test-tiny exports
# (3 images): at most 0.4 % for scores (anomalyclip) and 0.6 % for maps (aa-clip); 5 % is 8x that.
INT8_RTOL = 0.05
TINY = {"backbone": "test-tiny", "pretrained": None, "device": "cpu", "image_size": SIZE}
# (test id, method, extra options, support): every method that exports. Support "shots" = a 2-image support
# set baked in; "fit" = PatchCore's memory bank fitted on a one-class dataset (the bank is a buffer of the
# model, baked in without --support). Crane also as Crane+ (DINO D-Attn), WinCLIP also as WinCLIP+.
EXPORTED = [
    ("winclip", "winclip", {}, None),
    ("winclip+", "winclip", {}, "shots"),
    ("aa-clip", "aa-clip", {}, None),
    ("crane", "crane", {}, None),
    ("crane+", "crane", {"dino": "test-tiny-dino"}, None),
    ("april-gan", "april-gan", {}, None),
    ("anomalyclip", "anomalyclip", {}, None),
    ("core-clip", "core-clip", {}, None),
    ("inctrl", "inctrl", {}, "shots"),
    ("inctrlv2", "inctrlv2", {}, "shots"),
    ("patchcore", "patchcore", {}, "shots"),
    ("patchcore-fit", "patchcore", {}, "fit"),
]


def _images(n: int, seed: int, size: int = SIZE) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.fixture(scope="module", params=EXPORTED, ids=[i for i, *_ in EXPORTED])
def exported(request, tmp_path_factory):
    """(method, support, ONNX path) with the support set or fitted bank baked in."""
    _, name, options, support_kind = request.param
    torch.manual_seed(0)
    method = al.create(name, **TINY, **options)
    support = _images(2, 99) if support_kind == "shots" else None
    if support_kind == "fit":
        method.fit(
            al.data.load("synthetic:defects?n=2&seed=0", split="train", classes=["weave"]), progress=False
        )
    path = export_onnx(method, tmp_path_factory.mktemp("onnx") / f"{name}.onnx", ["bottle"], support)
    return method, support, path


@pytest.mark.parametrize("batch", [1, 3])
def test_onnx_runtime_equals_predict(exported, batch):
    method, support, path = exported
    images = _images(batch, 1)
    expected = method.predict(images, "bottle", support=support)
    got = OnnxModel(path).predict(images, "bottle")
    assert got.scores.shape == (batch,) and got.maps.shape == (batch, SIZE, SIZE)
    np.testing.assert_allclose(got.scores, expected.scores, atol=1e-4, rtol=0)
    np.testing.assert_allclose(got.maps, expected.maps, atol=1e-4, rtol=0)


def test_metadata(exported):
    method, support, path = exported
    model = OnnxModel(path)
    assert model.name == method.name and model.image_size == SIZE and model.class_names == ["bottle"]
    assert model.metadata["support_images"] == str(0 if support is None else len(support))
    assert model.threshold is None and model.verdicts(np.array([0.3])) == [None]
    inputs = {i.name: i.shape for i in model.session.get_inputs()}
    assert list(inputs) == ["images"] and inputs["images"][1:] == [3, SIZE, SIZE]
    assert isinstance(inputs["images"][0], str)  # a symbolic (dynamic) batch dimension


def test_int8_quantised_graph_runs_close_to_fp32_and_is_smaller(exported, tmp_path):
    """ONNX Runtime's dynamic quantisation of the image blocks' MatMuls (what `export --precision int8`
    applies to the traced fp32 graph) on every exported method."""
    import onnx

    method, _, path = exported
    int8 = quantize_int8(path, tmp_path / "int8.onnx", method.backbone.int8_weights())
    ops = [n.op_type for n in onnx.load(str(int8)).graph.node]
    assert ops.count("MatMulInteger") >= 4  # at least one block's q/k/v, out-projection and MLP
    images = _images(3, 1)
    fp32, got = OnnxModel(path).predict(images, "bottle"), OnnxModel(int8).predict(images, "bottle")
    assert got.scores.shape == (3,) and got.maps.shape == (3, SIZE, SIZE)
    assert np.isfinite(got.scores).all() and np.isfinite(got.maps).all()
    for out, ref in ((got.scores, fp32.scores), (got.maps, fp32.maps)):
        np.testing.assert_allclose(out, ref, atol=INT8_RTOL * np.abs(ref).max(), rtol=0)
    assert int8.stat().st_size < path.stat().st_size


def test_cli_export_int8_writes_a_quantised_graph_with_its_precision(tmp_path, capsys):
    import onnx

    from anomalens.cli import main

    tiny = ["--backbone", "test-tiny", "--pretrained", "none", "--set", f"image_size={SIZE}"]
    out = tmp_path / "int8.onnx"
    torch.manual_seed(0)
    code = main(
        [
            "export",
            "--method",
            "aa-clip",
            *tiny,
            "--precision",
            "int8",
            "--class-name",
            "bottle",
            "--out",
            str(out),
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert "int8" in capsys.readouterr().out
    model = OnnxModel(out)
    assert model.precision == "int8" and model.metadata["precision"] == "int8"
    assert "MatMulInteger" in {n.op_type for n in onnx.load(str(out)).graph.node}
    torch.manual_seed(0)
    method = al.create("aa-clip", **TINY)
    images = _images(2, 4)
    expected, got = method.predict(images, "bottle"), model.predict(images, "bottle")
    np.testing.assert_allclose(got.scores, expected.scores, atol=INT8_RTOL * np.abs(expected.scores).max())


@pytest.mark.parametrize("name", ["aa-clip", "winclip", "april-gan"])
def test_several_classes_use_a_class_index(name, tmp_path):
    torch.manual_seed(0)
    method = al.create(name, **TINY)
    method.threshold = 0.25
    path = export_onnx(method, tmp_path / "m.onnx", ["bottle", "cable"])
    model = OnnxModel(path)
    assert [i.name for i in model.session.get_inputs()] == ["images", "class_index"]
    assert model.class_names == ["bottle", "cable"] and model.threshold == 0.25
    images, names = _images(3, 2), ["cable", "bottle", "cable"]
    expected = method.predict(images, names)
    got = model.predict(images, names)
    np.testing.assert_allclose(got.scores, expected.scores, atol=1e-4, rtol=0)
    np.testing.assert_allclose(got.maps, expected.maps, atol=1e-4, rtol=0)
    assert model.verdicts(np.array([0.2, 0.3])) == ["normal", "anomalous"]
    with pytest.raises(ValueError, match="'screw' was not exported"):
        model.predict(images, "screw")
    if name == "aa-clip":
        _check_runs_without_torch(path, images[0], "cable", expected.scores[0], tmp_path)


def _check_runs_without_torch(path: Path, image: np.ndarray, name: str, expected: float, tmp_path: Path):
    """A fresh interpreter in which torch cannot be imported at all scores an image."""
    np.save(tmp_path / "image.npy", image)
    code = (
        "import sys; sys.modules['torch'] = None\n"  # any `import torch` now raises ImportError
        "import numpy as np\n"
        "from anomalens import OnnxModel\n"
        f"pred = OnnxModel({str(path)!r}).predict(np.load({str(tmp_path / 'image.npy')!r}), {name!r})\n"
        "print(float(pred.scores[0]))"
    )
    src = str(Path(al.__file__).parents[1])
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={"PYTHONPATH": src}, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert abs(float(done.stdout.splitlines()[-1]) - expected) < 1e-4


def test_images_of_other_sizes_and_paths(exported, tmp_path):
    """Resizing in `OnnxModel` (Pillow bicubic in, bilinear maps out) gives `Method.predict`'s scores.

    Maps are compared at the model resolution in the tests above: a method whose maps live on the patch
    grid is resized grid → S in the graph and S → image here, but grid → image in `predict`."""
    from PIL import Image

    method, support, path = exported
    rng = np.random.default_rng(5)
    images = [rng.integers(0, 256, (48, 80, 3), dtype=np.uint8), rng.integers(0, 256, (90, 70, 3), np.uint8)]
    Image.fromarray(images[1]).save(tmp_path / "b.png")
    expected = method.predict(images, "bottle", support=support)
    got = OnnxModel(path).predict([images[0], tmp_path / "b.png"], "bottle")
    np.testing.assert_allclose(got.scores, expected.scores, atol=1e-4, rtol=0)
    assert [m.shape for m in got.maps] == [(48, 80), (90, 70)]


def test_bilinear_equals_torch_interpolate():
    image = np.random.default_rng(0).random((5, 7)).astype(np.float32)
    for size in [(5, 7), (16, 9), (3, 4)]:
        expected = torch.nn.functional.interpolate(
            torch.from_numpy(image)[None, None], size=size, mode="bilinear", align_corners=False
        )[0, 0].numpy()
        np.testing.assert_allclose(bilinear(image, size), expected, atol=1e-6)


def test_refusals_and_bad_arguments(tmp_path):
    torch.manual_seed(0)
    dino = al.create("anomalydino", **{**TINY, "backbone": "test-tiny-dino", "image_size": 56})
    with pytest.raises(ValueError, match="anomalydino cannot be exported.*finish_map"):
        export_onnx(dino, tmp_path / "d.onnx", ["bottle"], _images(1, 0))
    musc = al.create("musc", **TINY)
    with pytest.raises(ValueError, match="musc cannot be exported.*other images"):
        export_onnx(musc, tmp_path / "m.onnx", ["bottle"])
    adaclip = al.create("adaclip", **TINY)
    with pytest.raises(ValueError, match="adaclip cannot be exported.*k-means"):
        export_onnx(adaclip, tmp_path / "a.onnx", ["bottle"])
    inctrl = al.create("inctrl", **TINY)
    with pytest.raises(ValueError, match="needs support images"):
        export_onnx(inctrl, tmp_path / "i.onnx", ["bottle"])
    winclip = al.create("winclip", **TINY)
    with pytest.raises(ValueError, match="distinct"):
        export_onnx(winclip, tmp_path / "w.onnx", ["a", "a"])
    with pytest.raises(ValueError, match="precision 'bf16' cannot be exported"):
        export_onnx(winclip.set_precision("bf16"), tmp_path / "w.onnx", ["bottle"])
    assert not list(tmp_path.iterdir())  # nothing written


def test_onnx_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        OnnxModel(tmp_path / "missing.onnx")
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="bad.onnx: not an ONNX model"):
        OnnxModel(tmp_path / "bad.onnx")


def test_cli_export_then_detect_with_onnx(tmp_path, capsys):
    from PIL import Image

    from anomalens.cli import main

    tiny = ["--backbone", "test-tiny", "--pretrained", "none", "--set", f"image_size={SIZE}"]
    out = tmp_path / "model.onnx"
    torch.manual_seed(0)
    code = main(["export", "--method", "core-clip", *tiny, "--class-name", "bottle", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert f"wrote {out}" in capsys.readouterr().out
    image = _images(1, 3)[0]
    Image.fromarray(image).save(tmp_path / "a.png")
    code = main(["detect", "--onnx", str(out), str(tmp_path / "a.png"), "--out", str(tmp_path / "det")])
    assert code == 0, capsys.readouterr().err
    row = (tmp_path / "det" / "scores.csv").read_text().splitlines()[1].split(",")
    torch.manual_seed(0)
    method = al.create("core-clip", **TINY)
    assert abs(float(row[1]) - method.predict(image, "bottle").scores[0]) < 1e-4
    assert (tmp_path / "det" / "heatmaps" / "a.png").is_file()
    code = main(["detect", "--onnx", str(out), "--method", "winclip", str(tmp_path / "a.png")])
    assert code == 2 and "--onnx replaces" in capsys.readouterr().err
