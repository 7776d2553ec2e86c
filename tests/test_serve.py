"""`anomalens.serve`: the HTTP API through FastAPI's TestClient, with real methods on test-tiny at 64 px."""

from __future__ import annotations

import base64
import io
import struct
import threading
import time
import zlib

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

import anomalens  # noqa: E402
from anomalens.serve import MicroBatcher, QueueFull, accepts_support, create_app, read_support  # noqa: E402

# Batched and single-image predictions agree to this (as in test_methods' batch-invariance test).
ATOL = 1e-4
# |int8 - fp32| score bound of a served test-tiny model (measured drift in the test that uses it).
INT8_ATOL = 0.02


@pytest.fixture(scope="module")
def zero_shot():
    return anomalens.create("aa-clip", backbone="test-tiny", pretrained=None, device="cpu", image_size=64)


@pytest.fixture(scope="module")
def few_shot():
    return anomalens.create("patchcore", backbone="test-tiny", pretrained=None, device="cpu", image_size=64)


def images(n: int, seed: int = 0) -> list[np.ndarray]:
    """n random RGB images of different sizes."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (30 + 7 * i, 40 + 3 * i, 3), dtype=np.uint8) for i in range(n)]


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def upload(*arrays: np.ndarray) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("image", (f"img{i}.png", png(a), "image/png")) for i, a in enumerate(arrays)]


def bomb_png(side: int) -> bytes:
    """A valid 1-bit side×side PNG of zeros, built without ever holding its pixels: every 1000 rows
    compress to the same bytes (a full flush resets the compressor), so 40000² is about 200 KB."""
    rows = 1000
    block = (b"\x00" * (1 + (side + 7) // 8)) * rows  # per row: filter byte 0, then packed bits
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)  # raw deflate; zlib header and checksum below
    flushed = deflate.compress(block) + deflate.flush(zlib.Z_FULL_FLUSH)
    adler = 1
    for _ in range(side // rows):
        adler = zlib.adler32(block, adler)
    stream = b"\x78\xda" + flushed * (side // rows) + deflate.flush() + struct.pack(">I", adler)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # bit depth 1, grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", stream) + chunk(b"IEND", b"")


def test_bomb_png_is_a_valid_png():
    decoded = np.asarray(Image.open(io.BytesIO(bomb_png(2000))))
    assert decoded.shape == (2000, 2000) and not decoded.any()
    assert len(bomb_png(40_000)) < 400_000


# ---------------------------------------------------------------------- API
def test_health_model_and_page(zero_shot):
    with TestClient(create_app(zero_shot, threshold=0.25)) as client:
        assert client.get("/health").json() == {"status": "ok"}
        info = client.get("/v1/model").json()
        page = client.get("/")
    assert info["method"] == "aa-clip" and info["backbone"] == "test-tiny" and info["image_size"] == 64
    assert info["threshold"] == 0.25 and info["default_class"] == "object" and not info["needs_support"]
    assert page.status_code == 200 and 'id="files"' in page.text
    assert "http://" not in page.text and "https://" not in page.text  # works offline: nothing external


def test_served_scores_equal_predict_and_heatmaps_have_the_image_size(zero_shot):
    arrays = images(3)
    with TestClient(create_app(zero_shot, threshold=0.5)) as client:
        one = client.post("/v1/predict", files=upload(arrays[0]), data={"class_name": "bottle"}).json()
        several = client.post("/v1/predict", files=upload(*arrays), data={"class_name": "bottle"}).json()
    expected = zero_shot.predict(arrays, "bottle", batch_size=1)
    assert one["score"] == pytest.approx(float(expected.scores[0]), abs=ATOL)
    assert [r["score"] for r in several["results"]] == pytest.approx(expected.scores.tolist(), abs=ATOL)
    for result, array, score in zip(several["results"], arrays, expected.scores, strict=True):
        assert (result["height"], result["width"]) == array.shape[:2]
        assert result["verdict"] == ("anomalous" if result["score"] > 0.5 else "normal")
        heatmap = Image.open(io.BytesIO(base64.b64decode(result["heatmap_png"])))
        assert heatmap.size == (array.shape[1], array.shape[0]) and heatmap.mode == "RGB"
        assert abs(result["score"] - score) <= ATOL


def test_served_int8_model_reports_its_precision_and_scores_near_fp32():
    """int8 changes scores a little: over 120 random images and 3 weight seeds (test-tiny AA-CLIP at 64 px,
    batch 1 and 8) max |int8 - fp32| was 0.0025 on a 0.19-0.25 score range; INT8_ATOL is 8x that."""
    model = anomalens.create("aa-clip", backbone="test-tiny", pretrained=None, device="cpu", image_size=64)
    arrays = images(2, seed=3)
    fp32 = model.predict(arrays, "bottle", batch_size=1).scores
    model.set_precision("int8")
    expected = model.predict(arrays, "bottle", batch_size=1).scores
    with TestClient(create_app(model)) as client:
        info = client.get("/v1/model").json()
        served = [
            client.post("/v1/predict", files=upload(a), data={"class_name": "bottle"}).json() for a in arrays
        ]
    assert info["precision"] == "int8" and model.backbone.int8_blocks is not None
    scores = np.array([r["score"] for r in served])
    np.testing.assert_allclose(scores, expected, atol=ATOL, rtol=0)  # the int8 model's own predict
    np.testing.assert_allclose(scores, fp32, atol=INT8_ATOL, rtol=0)


def test_cli_serve_precision_sets_the_served_model(monkeypatch):
    import anomalens.serve
    from anomalens.cli import main

    served = {}
    monkeypatch.setattr(anomalens.serve, "run", lambda model, **_: served.setdefault("model", model))
    tiny = [
        "--method",
        "aa-clip",
        "--backbone",
        "test-tiny",
        "--pretrained",
        "none",
        "--set",
        "image_size=64",
    ]
    assert main(["serve", *tiny, "--precision", "int8"]) == 0
    assert served["model"].precision == "int8"


def test_heatmap_false_and_no_threshold_give_nulls(zero_shot):
    with TestClient(create_app(zero_shot)) as client:
        result = client.post("/v1/predict", files=upload(*images(1)), data={"heatmap": "false"}).json()
    assert result["heatmap_png"] is None and result["verdict"] is None and isinstance(result["score"], float)


def test_concurrent_requests_are_batched_and_score_as_predict(zero_shot, monkeypatch):
    batch_sizes = []
    predict = zero_shot.predict

    def recording_predict(arrays, *args, **kwargs):
        batch_sizes.append(len(arrays))
        return predict(arrays, *args, **kwargs)

    monkeypatch.setattr(zero_shot, "predict", recording_predict)
    arrays = images(6, seed=1)
    scores: dict[int, float] = {}
    # A long wait: the worker scores once the batch of 6 is full, so all six must share one batch.
    with TestClient(create_app(zero_shot, max_batch_size=6, max_wait_ms=10_000)) as client:

        def request(i: int) -> None:
            scores[i] = client.post("/v1/predict", files=upload(arrays[i])).json()["score"]

        threads = [threading.Thread(target=request, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    monkeypatch.undo()
    assert batch_sizes == [6]
    expected = zero_shot.predict(arrays, batch_size=1).scores
    assert [scores[i] for i in range(6)] == pytest.approx(expected.tolist(), abs=ATOL)


@pytest.mark.parametrize(
    "files, message",
    [
        ([("image", ("notes.txt", b"hello, not an image", "text/plain"))], "cannot read image notes.txt"),
        ([("image", ("empty.png", b"", "image/png"))], "empty.png: the file is empty"),
        ([("image", ("cut.png", png(images(1)[0])[:120], "image/png"))], "cut.png: image file is truncated"),
        ([("picture", ("a.png", b"x", "image/png"))], "image: Field required"),
    ],
)
def test_bad_uploads_get_400_naming_the_problem(zero_shot, files, message):
    with TestClient(create_app(zero_shot)) as client:
        response = client.post("/v1/predict", files=files)
        assert client.get("/health").status_code == 200  # the server is still up
    assert response.status_code == 400
    assert message in response.json()["error"]


def test_decompression_bomb_and_too_many_pixels_get_413(zero_shot):
    with TestClient(create_app(zero_shot, max_pixels=1000)) as client:
        bomb = client.post("/v1/predict", files=[("image", ("bomb.png", bomb_png(40_000), "image/png"))])
        large = client.post("/v1/predict", files=upload(np.zeros((40, 30, 3), np.uint8)))
        small = client.post("/v1/predict", files=upload(np.zeros((20, 30, 3), np.uint8)))
    assert bomb.status_code == 413 and "decompression-bomb" in bomb.json()["error"]
    assert large.status_code == 413 and "30x40 pixels is above the limit of 1000" in large.json()["error"]
    assert small.status_code == 200


def test_oversize_upload_gets_413_with_and_without_content_length(zero_shot):
    body = png(np.random.default_rng(0).integers(0, 256, (80, 80, 3), dtype=np.uint8))  # ~19 KB
    with TestClient(create_app(zero_shot, max_upload_mb=0.01)) as client:
        declared = client.post("/v1/predict", files=[("image", ("big.png", body, "image/png"))])
        chunked = client.post(
            "/v1/predict",
            content=(body[i : i + 4096] for i in range(0, len(body), 4096)),
            headers={"content-type": "multipart/form-data; boundary=x"},
        )
        assert client.get("/health").status_code == 200
    for response in (declared, chunked):
        assert response.status_code == 413
        assert response.json() == {"error": "request body above the upload limit of 0.01 MB"}


def test_full_queue_answers_503(zero_shot, monkeypatch):
    started, release = threading.Event(), threading.Event()
    predict = zero_shot.predict

    def blocking_predict(*args, **kwargs):
        started.set()
        release.wait(timeout=30)
        return predict(*args, **kwargs)

    monkeypatch.setattr(zero_shot, "predict", blocking_predict)
    statuses: dict[str, int] = {}
    with TestClient(create_app(zero_shot, max_batch_size=1, max_wait_ms=0, max_queue=1)) as client:

        def request(key: str) -> None:
            statuses[key] = client.post("/v1/predict", files=upload(*images(1))).status_code

        first = threading.Thread(target=request, args=("running",))
        first.start()
        assert started.wait(timeout=30)  # the worker holds the first image; the queue is empty
        waiting = [threading.Thread(target=request, args=(key,)) for key in ("b", "c")]
        for t in waiting:
            t.start()
        # Of the next two, the first to arrive fills the queue (one place) and the other gets 503.
        for _ in range(300):
            if statuses:
                break
            time.sleep(0.1)
        release.set()
        for t in [first, *waiting]:
            t.join(timeout=60)
        over_limit = client.post("/v1/predict", files=upload(*images(2)))
    assert statuses["running"] == 200
    assert sorted([statuses["b"], statuses["c"]]) == [200, 503]
    assert over_limit.status_code == 413  # more images than the queue can ever hold


def test_few_shot_support_at_start_up_and_over_http(few_shot, tmp_path):
    normals = images(2, seed=3)
    for i, array in enumerate(normals):
        Image.fromarray(array).save(tmp_path / f"n{i}.png")
    (tmp_path / "grid").mkdir()
    Image.fromarray(normals[0]).save(tmp_path / "grid" / "g.png")
    query = images(1, seed=4)
    with TestClient(create_app(few_shot, class_name="bottle", support=tmp_path)) as client:
        assert client.get("/v1/model").json()["classes"] == ["bottle", "grid"]
        known = client.post("/v1/predict", files=upload(*query)).json()
        unknown = client.post("/v1/predict", files=upload(*query), data={"class_name": "screw"})
        added = client.post("/v1/support/screw", files=upload(normals[1]))
        after = client.post("/v1/predict", files=upload(*query), data={"class_name": "screw"}).json()
    expected = few_shot.predict(query, "bottle", support=normals).scores[0]
    assert known["score"] == pytest.approx(float(expected), abs=ATOL)
    assert unknown.status_code == 400
    assert "no support images for class 'screw'" in unknown.json()["error"]
    assert added.json() == {"class_name": "screw", "shots": 1, "classes": ["bottle", "grid", "screw"]}
    expected_screw = few_shot.predict(query, "screw", support=[normals[1]]).scores[0]
    assert after["score"] == pytest.approx(float(expected_screw), abs=ATOL)


def test_zero_shot_methods_refuse_support(zero_shot, tmp_path):
    with TestClient(create_app(zero_shot)) as client:
        response = client.post("/v1/support/bottle", files=upload(*images(1)))
    assert response.status_code == 400 and "zero-shot" in response.json()["error"]
    with pytest.raises(ValueError, match="zero-shot"):
        create_app(zero_shot, support=tmp_path)


def test_methods_that_accept_support():
    from anomalens.methods.base import method_class

    accepting = {name for name in anomalens.list_methods() if accepts_support(method_class(name))}
    assert {"patchcore", "inctrl", "winclip", "april-gan"} <= accepting
    assert not accepting & {"aa-clip", "crane", "anomalyclip"}


def test_read_support_classes_and_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no image files"):
        read_support(tmp_path)
    (tmp_path / "cable" / "deep").mkdir(parents=True)
    Image.fromarray(images(1)[0]).save(tmp_path / "cable" / "deep" / "a.png")
    (tmp_path / ".hidden.png").write_bytes(b"not read")
    support = read_support(tmp_path, "bottle")
    assert list(support) == ["cable"] and support["cable"][0].shape == (30, 40, 3)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        read_support(tmp_path / "missing")


# ---------------------------------------------------------------------- batcher
class _Scores:
    """A stand-in `score` function recording its calls; score = the image's first pixel."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, str]] = []

    def __call__(self, arrays: list[np.ndarray], class_name: str) -> anomalens.Prediction:
        self.calls.append((len(arrays), class_name))
        if class_name == "broken":
            raise RuntimeError("model failure")
        scores = np.array([a[0, 0, 0] for a in arrays], np.float32)
        return anomalens.Prediction(scores, np.zeros((len(arrays), 2, 2), np.float32))


def pixel(value: int) -> np.ndarray:
    return np.full((2, 2, 3), value, np.uint8)


def test_batcher_groups_by_class_and_isolates_failures():
    score = _Scores()
    batcher = MicroBatcher(score, max_batch_size=8, max_wait_ms=10_000, max_queue=8)
    a = batcher.submit([pixel(1), pixel(2)], "bottle")
    b = batcher.submit([pixel(3)], "broken")
    c = batcher.submit([pixel(4)], "bottle")
    batcher.start()  # all four are queued: one batch, one call per class
    batcher.close()
    assert [f.result(timeout=10)[0] for f in a + c] == [1.0, 2.0, 4.0]
    with pytest.raises(RuntimeError, match="model failure"):
        b[0].result(timeout=10)
    assert score.calls == [(3, "bottle"), (1, "broken")]


def test_batcher_queue_bound_and_batch_size():
    score = _Scores()
    batcher = MicroBatcher(score, max_batch_size=2, max_wait_ms=0, max_queue=3)
    futures = batcher.submit([pixel(i) for i in range(3)], "x")
    with pytest.raises(QueueFull, match="3 images queued"):
        batcher.submit([pixel(9)], "x")
    batcher.start()
    assert [f.result(timeout=10)[0] for f in futures] == [0.0, 1.0, 2.0]
    batcher.close()
    assert score.calls == [(2, "x"), (1, "x")]
    with pytest.raises(QueueFull, match="shutting down"):
        batcher.submit([pixel(1)], "x")


def test_cli_serve_help_lists_its_options(capsys):
    from anomalens.cli import main

    assert main(["serve", "--help"]) == 0
    text = capsys.readouterr().out
    for option in ("--support", "--max-batch-size", "--max-wait-ms", "--max-queue", "--max-upload-mb"):
        assert option in text
