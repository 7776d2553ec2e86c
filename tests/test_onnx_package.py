"""The torch-free ``anomalens-onnx`` distribution (``packages/anomalens-onnx``).

pip installs it into a fresh virtual environment, where torch and the anomalens library are absent, and
it scores an exported test-tiny PatchCore (memory bank baked in) from an image file as `Method.predict`
does, through `OnnxModel` and through its ``anomalens-onnx detect`` command. pip resolves onnxruntime,
numpy and Pillow from the configured index, as `make test` itself does; that test takes about 30 s,
mostly unpacking onnxruntime and numpy. A fast test runs the command where importing torch or anomalens
fails.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import anomalens as al  # noqa: E402
from anomalens.export import export_onnx  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path("packages", "anomalens-onnx")
SIZE = 64
# Run inside the fresh environment: fails if torch or anomalens can be imported there.
PREDICT = """
import importlib.util, json, sys
import numpy as np
from anomalens_onnx import OnnxModel
absent = [m for m in ("torch", "anomalens") if importlib.util.find_spec(m) is not None]
assert not absent, f"importable in the torch-free environment: {absent}"
pred = OnnxModel(sys.argv[1]).predict([sys.argv[2]], "bottle")
np.save(sys.argv[3], pred.maps[0])
print(json.dumps(float(pred.scores[0])))
"""


def test_version_is_the_library_version():
    text = (ROOT / PACKAGE / "pyproject.toml").read_text()
    assert re.search(r'^version = "([^"]+)"', text, re.M).group(1) == al.__version__


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(ONNX file, image file, `Method.predict` of that image): a test-tiny PatchCore with a 2-image
    support set baked in, calibrated so that the image is anomalous."""
    from PIL import Image

    tmp_path = tmp_path_factory.mktemp("exported")
    torch.manual_seed(0)
    method = al.create("patchcore", backbone="test-tiny", pretrained=None, device="cpu", image_size=SIZE)
    rng = np.random.default_rng(0)
    support = rng.integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8)
    Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(tmp_path / "part.png")
    expected = method.predict([tmp_path / "part.png"], "bottle", support=support)
    method.threshold = float(expected.scores[0]) / 2
    model = export_onnx(method, tmp_path / "patchcore.onnx", ["bottle"], support)
    return model, tmp_path / "part.png", expected


def test_detect_command_imports_neither_torch_nor_anomalens(exported, tmp_path):
    from PIL import Image

    model, image, expected = exported
    block = "import sys; sys.modules['torch'] = sys.modules['anomalens'] = None; "  # imports now fail
    run = "from anomalens_onnx.cli import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    detect = [sys.executable, "-c", block + run, "detect", "--onnx", str(model), "--out", "out"]
    _run([*detect, str(image), str(tmp_path / "missing.png")], env, tmp_path, returncode=1)  # one line
    _run([*detect, str(image)], env, tmp_path)
    _check_detect_output(tmp_path / "out", image, expected)
    heatmap = np.asarray(Image.open(tmp_path / "out" / "heatmaps" / "part.png"))
    assert heatmap.shape == expected.maps[0].shape and heatmap.dtype == np.uint8


def _check_detect_output(out: Path, image: Path, expected) -> None:
    """scores.csv of `anomalens-onnx detect`: `Method.predict`'s score and the verdict of the threshold."""
    with open(out / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["path"] for r in rows] == [str(image)] and rows[0]["verdict"] == "anomalous"
    assert abs(float(rows[0]["score"]) - float(expected.scores[0])) < 1e-4


def test_installs_without_torch_and_predicts(exported, tmp_path):
    model, image, expected = exported

    # A copy of the package and its source with their relative layout: the build writes nothing into
    # the checkout.
    source = tmp_path / "checkout"
    shutil.copytree(ROOT / PACKAGE, source / PACKAGE)
    shutil.copytree(ROOT / "src" / "anomalens_onnx", source / "src" / "anomalens_onnx")
    python = _fresh_environment(tmp_path / "venv")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    _run([*_pip(python), "install", "-q", str(source / PACKAGE)], env, tmp_path)
    done = _run([python, "-c", PREDICT, str(model), str(image), "map.npy"], env, tmp_path)
    assert abs(json.loads(done.splitlines()[-1]) - float(expected.scores[0])) < 1e-4
    np.testing.assert_allclose(np.load(tmp_path / "map.npy"), expected.maps[0], atol=1e-4, rtol=0)
    command = str(Path(python).parent / "anomalens-onnx")  # the distribution's console script
    _run([command, "detect", "--onnx", str(model), str(image), "--out", "out"], env, tmp_path)
    _check_detect_output(tmp_path / "out", image, expected)


def _fresh_environment(path: Path) -> str:
    """A virtual environment without the site packages of this one; returns its interpreter."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    return str(path / "bin" / "python")


def _pip(python: str) -> list[str]:
    """This environment's pip acting on ``python``'s environment (pip ≥ 22.3: ``--python``); else the
    target's own pip, bootstrapped with ensurepip."""
    import pip

    if tuple(int(p) for p in pip.__version__.split(".")[:2]) >= (22, 3):
        return [sys.executable, "-m", "pip", "--python", python]
    subprocess.run([python, "-m", "ensurepip", "-q"], check=True)
    return [python, "-m", "pip"]


def _run(command: list[str], env: dict[str, str], cwd: Path, returncode: int = 0) -> str:
    done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, check=False)
    assert done.returncode == returncode, f"{' '.join(command[:4])} ...: {done.stderr[-3000:]}"
    if returncode:
        assert done.stderr.startswith("anomalens-onnx: error:") and done.stderr.count("\n") == 1
    return done.stdout


def test_anomalens_detect_onnx_imports_no_torch(exported, tmp_path):
    """`anomalens detect --onnx` of the full library runs where importing torch fails (its ONNX path
    never loads torch): the scores of `Method.predict` with verdicts, and colour overlays as with torch;
    an unreadable image is a warning line, then a one-line error and exit code 1."""
    from PIL import Image

    from anomalens.detect import write_heatmap

    model, image, expected = exported
    block = "import sys; sys.modules['torch'] = None; "  # `import torch` now fails
    run = "from anomalens.cli import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    detect = [sys.executable, "-c", block + run, "detect", "--onnx", str(model), "--quiet"]
    for workers in ("0", "2"):  # images read here, or by threads
        out = tmp_path / f"out{workers}"
        command = [*detect, str(image), "--workers", workers, "--out", str(out)]
        done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
        _check_detect_output(out, image, expected)
        overlay = np.asarray(Image.open(out / "heatmaps" / "part.png"), dtype=np.float64)
        reference = write_heatmap(np.asarray(Image.open(image)), expected.maps[0], 0.5, tmp_path / "ref.png")
        assert overlay.shape == (SIZE, SIZE, 3)  # a colour overlay, not the grey map of anomalens-onnx
        assert np.abs(overlay - np.asarray(Image.open(reference))).mean() < 1.0
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    command = [*detect, str(image), str(broken), "--out", str(tmp_path / "out")]
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, check=False)
    warning, error = done.stderr.splitlines()
    assert done.returncode == 1 and warning.startswith("anomalens: warning: cannot read image ")
    assert str(broken) in warning and error == "anomalens: error: 1 of 2 image(s) unreadable"
