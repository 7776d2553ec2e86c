"""`anomalens serve`: HTTP API and web page over one loaded `Method` (FastAPI + uvicorn, `[serve]` extra).

Endpoints (reference with curl examples in docs/serve.md):

* ``GET /health``: 200 once the model is loaded and its worker thread runs, else 503.
* ``GET /v1/model``: method, backbone, image size, precision, threshold, default class, classes with
  support images.
* ``POST /v1/predict``: multipart, one or more files in the field ``image``, optional form fields
  ``class_name`` and ``heatmap`` (default true) → ``{"score", "verdict", "width", "height", "heatmap_png"}``
  for one file, ``{"results": [...]}`` for several.
* ``POST /v1/support/{class_name}``: K normal images (field ``image``) for a few-shot method.
* ``GET /``: a single-file web page (no CDN) to score dropped images, with a threshold slider.

Micro-batching: request handlers decode uploads (with the library's `read_image`) and queue one job per
image; one worker thread owns the model, takes up to `max_batch_size` queued images, waiting at most
`max_wait_ms` after the oldest arrived, and scores them with one `Method.predict` call per class name.
A full queue answers 503. Heatmaps are rendered and PNG-encoded by the handlers, off the worker thread.
Every bad request gets a 4xx JSON body ``{"error": "<one line naming the problem>"}``.
"""

from __future__ import annotations

import asyncio
import base64
import io
import ipaddress
import logging
import os
import tempfile
import threading
import time
import warnings
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
from PIL import Image

try:
    from fastapi import FastAPI, File, Form, Request, UploadFile
    from fastapi.concurrency import run_in_threadpool
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse
    from starlette.exceptions import HTTPException
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "anomalens serve needs the [serve] extra: pip install 'anomalens[serve]'"
        f" ({error.name or error} is missing)"
    ) from error

from anomalens.data import DataError, read_image
from anomalens.methods.base import Method
from anomalens.viz import overlay
from anomalens_onnx.files import IMAGE_SUFFIXES

if TYPE_CHECKING:
    from anomalens.methods.base import Prediction

logger = logging.getLogger(__name__)

DEFAULT_CLASS = "object"  # what `Method.predict` uses when no class name is given
DEFAULT_MAX_PIXELS = 40_000_000  # e.g. 7300×5500; larger uploads are refused before decoding
PAGE = "resources/serve.html"  # package data
ScoreFn = Callable[[list[np.ndarray], str], "Prediction"]


# ---------------------------------------------------------------------- entry points
def run(
    model: Method,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    class_name: str = DEFAULT_CLASS,
    support: str | os.PathLike | None = None,
    threshold: float | None = None,
    max_batch_size: int = 8,
    max_wait_ms: float = 5.0,
    max_queue: int = 64,
    max_upload_mb: float = 20.0,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    log_level: str = "info",
) -> None:
    """Serve `model` over HTTP until interrupted (Ctrl-C); options as in `create_app`."""
    import uvicorn

    app = create_app(
        model,
        class_name=class_name,
        support=support,
        threshold=threshold,
        max_batch_size=max_batch_size,
        max_wait_ms=max_wait_ms,
        max_queue=max_queue,
        max_upload_mb=max_upload_mb,
        max_pixels=max_pixels,
    )
    if not _is_loopback(host):
        logger.warning(
            "serving on %s: the API has no authentication; anyone who can reach it can use it", host
        )
    print(f"serving {model.name} on http://{host}:{port}/ (API: /v1/predict; Ctrl-C stops)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level)


def create_app(
    model: Method,
    *,
    class_name: str = DEFAULT_CLASS,
    support: str | os.PathLike | dict[str, list[np.ndarray]] | None = None,
    threshold: float | None = None,
    max_batch_size: int = 8,
    max_wait_ms: float = 5.0,
    max_queue: int = 64,
    max_upload_mb: float = 20.0,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> FastAPI:
    """The FastAPI application serving `model` (the worker thread runs while the app's lifespan does).

    class_name: class used when a request names none. support: a folder of normal images for a
    few-shot method (see `read_support`) or {class: images}. threshold: verdicts use
    ``score > threshold``; default the model's calibrated threshold (none: verdict null).
    max_batch_size / max_wait_ms: micro-batching; max_queue: images waiting before 503;
    max_upload_mb: request body limit (413); max_pixels: largest image accepted (413).
    """
    for name, value in (("max_batch_size", max_batch_size), ("max_queue", max_queue)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if max_wait_ms < 0 or max_upload_mb <= 0 or max_pixels < 1:
        raise ValueError("max_wait_ms must be >= 0, max_upload_mb and max_pixels > 0")
    if support is not None and not accepts_support(type(model)):
        raise ValueError(f"method {model.name!r} is zero-shot: it takes no support images")
    supports = dict(support) if isinstance(support, dict) else read_support(support, class_name)
    state = _State(model, class_name, model.threshold if threshold is None else threshold, supports)
    state.batcher = MicroBatcher(state.score, max_batch_size, max_wait_ms, max_queue)
    page = resources.files("anomalens").joinpath(PAGE).read_text(encoding="utf-8")

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.batcher.start()
        try:
            yield
        finally:
            state.batcher.close()

    app = FastAPI(title="anomalens", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(_BodyLimit, max_mb=max_upload_mb)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> str:
        return page

    @app.get("/health")
    def health() -> JSONResponse:
        ok = state.batcher.alive
        return JSONResponse({"status": "ok" if ok else "worker stopped"}, status_code=200 if ok else 503)

    @app.get("/v1/model")
    def model_info() -> dict[str, Any]:
        return {
            "method": model.name,
            "backbone": model.backbone.name,
            "pretrained": model.backbone.pretrained,
            "image_size": getattr(model.backbone, "image_size", None),
            "precision": model.precision,
            "threshold": state.threshold,
            "needs_support": model.needs_support,
            "accepts_support": accepts_support(type(model)),
            "default_class": state.class_name,
            "classes": sorted(state.support),  # classes with support images (few-shot methods)
            "max_batch_size": max_batch_size,
            "max_upload_mb": max_upload_mb,
        }

    @app.post("/v1/predict")
    async def predict(
        image: Annotated[list[UploadFile], File()],
        class_name: Annotated[str | None, Form()] = None,
        heatmap: Annotated[bool, Form()] = True,
    ) -> dict[str, Any]:
        name = class_name.strip() if class_name and class_name.strip() else state.class_name
        if model.needs_support and name not in state.support:
            known = ", ".join(sorted(state.support)) or "none"
            raise HTTPException(
                400,
                f"no support images for class {name!r} (method {model.name!r} is few-shot; "
                f"POST /v1/support/{name} first; classes with support: {known})",
            )
        if len(image) > max_queue:
            raise HTTPException(413, f"{len(image)} images in one request; the queue holds {max_queue}")
        images = await run_in_threadpool(_decode_uploads, image, max_pixels)
        try:
            futures = state.batcher.submit(images, name)
        except QueueFull as error:
            raise HTTPException(503, str(error)) from None
        try:
            outputs = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
        except Exception as error:
            logger.exception("prediction failed")
            raise HTTPException(500, f"prediction failed: {_one_line(error)}") from None
        results = await run_in_threadpool(
            lambda: [state.result(im, s, m, heatmap) for im, (s, m) in zip(images, outputs, strict=True)]
        )
        return results[0] if len(results) == 1 else {"results": results}

    @app.post("/v1/support/{class_name}")
    async def set_support(class_name: str, image: Annotated[list[UploadFile], File()]) -> dict[str, Any]:
        if not accepts_support(type(model)):
            raise HTTPException(400, f"method {model.name!r} is zero-shot: it takes no support images")
        state.support[class_name] = await run_in_threadpool(_decode_uploads, image, max_pixels)
        return {"class_name": class_name, "shots": len(image), "classes": sorted(state.support)}

    return app


def accepts_support(method: type[Method]) -> bool:
    """Whether a method scores with support images: few-shot methods need them, others (WinCLIP+,
    APRIL-GAN's few-shot memory) use them for the classes that have some."""
    return method.needs_support or method.prepare_support is not Method.prepare_support


def read_support(folder: str | os.PathLike | None, class_name: str = DEFAULT_CLASS) -> dict[str, list]:
    """Support images per class from a folder: its own image files are `class_name`'s; each sub-folder
    holding images (searched recursively) is the class of its name. None → no support."""
    if folder is None:
        return {}
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"--support {root}: not a folder")

    def images(paths: Sequence[Path]) -> list[Path]:
        return sorted(p for p in paths if p.is_file() and _is_image_name(p.name))

    found = {class_name: images(list(root.iterdir()))}
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        found[sub.name] = images(list(sub.rglob("*")))
    supports = {name: [read_image(p) for p in paths] for name, paths in found.items() if paths}
    if not supports:
        raise FileNotFoundError(f"--support {root}: no image files in it or its sub-folders")
    return supports


# ---------------------------------------------------------------------- micro-batching
class QueueFull(Exception):
    """The batcher's queue cannot take the images of a request."""


@dataclass
class _Job:
    image: np.ndarray
    class_name: str
    queued: float  # time.monotonic() when queued
    future: Future = field(default_factory=Future)  # → (score, map)


class MicroBatcher:
    """A bounded queue of images and one worker thread that scores them in batches with `score`.

    The worker takes up to `max_batch_size` jobs once the batch is full or `max_wait_ms` after the oldest
    queued job arrived, and calls ``score(images, class_name)`` once per class name in the batch.
    """

    def __init__(self, score: ScoreFn, max_batch_size: int, max_wait_ms: float, max_queue: int):
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self._score = score
        self._jobs: deque[_Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="anomalens-model", daemon=True)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Score what is queued, then stop the worker."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join()

    def submit(self, images: Sequence[np.ndarray], class_name: str) -> list[Future]:
        """Queue all `images` or none (QueueFull); each future resolves to (score, map)."""
        now = time.monotonic()
        jobs = [_Job(image, class_name, now) for image in images]
        with self._cond:
            if self._closed:
                raise QueueFull("the server is shutting down")
            if len(self._jobs) + len(jobs) > self.max_queue:
                raise QueueFull(
                    f"server busy: {len(self._jobs)} images queued (limit {self.max_queue}); retry later"
                )
            self._jobs.extend(jobs)
            self._cond.notify()
        return [job.future for job in jobs]

    def _next_batch(self) -> list[_Job]:
        """The next batch ([] once closed and drained)."""
        with self._cond:
            while not self._jobs and not self._closed:
                self._cond.wait()
            while self._jobs and len(self._jobs) < self.max_batch_size and not self._closed:
                left = self._jobs[0].queued + self.max_wait - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return [self._jobs.popleft() for _ in range(min(len(self._jobs), self.max_batch_size))]

    def _loop(self) -> None:
        while batch := self._next_batch():
            by_class: dict[str, list[_Job]] = {}
            for job in batch:
                if job.future.set_running_or_notify_cancel():  # False: the client went away
                    by_class.setdefault(job.class_name, []).append(job)
            for class_name, jobs in by_class.items():
                try:
                    pred = self._score([job.image for job in jobs], class_name)
                except Exception as error:  # the request gets a 500; the worker goes on
                    for job in jobs:
                        job.future.set_exception(error)
                    continue
                for job, score, amap in zip(jobs, pred.scores, pred.maps, strict=True):
                    job.future.set_result((float(score), np.asarray(amap)))


@dataclass
class _State:
    """What the endpoints share: the model, defaults, support images per class and the batcher."""

    model: Method
    class_name: str
    threshold: float | None
    support: dict[str, list[np.ndarray]]
    batcher: MicroBatcher = field(init=False)

    def score(self, images: list[np.ndarray], class_name: str) -> Prediction:
        """`Method.predict` on one batch (runs on the worker thread)."""
        support = self.support.get(class_name) if accepts_support(type(self.model)) else None
        return self.model.predict(images, class_name, support=support, batch_size=len(images))

    def result(self, image: np.ndarray, score: float, amap: np.ndarray, heatmap: bool) -> dict[str, Any]:
        """The JSON of one scored image; the heatmap PNG has the image's size."""
        threshold = self.threshold
        verdict = None if threshold is None else ("anomalous" if score > threshold else "normal")
        png = base64.b64encode(_png(heatmap_image(image, amap))).decode("ascii") if heatmap else None
        height, width = image.shape[:2]
        return {"score": score, "verdict": verdict, "width": width, "height": height, "heatmap_png": png}


def heatmap_image(image: np.ndarray, amap: np.ndarray) -> np.ndarray:
    """The colour-mapped anomaly map at the image's size, uint8 (H, W, 3): `viz.overlay` at opacity 1,
    with the colour rule of `detect` ([0, 1] for probability-like maps, else the map's own range)."""
    in_unit = float(amap.min()) >= 0.0 and float(amap.max()) <= 1.0
    vmin, vmax = (0.0, 1.0) if in_unit else (None, None)
    return overlay(image, amap, 1.0, vmin, vmax)


# ---------------------------------------------------------------------- input checks
def decode_upload(data: bytes, filename: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """uint8 (H, W, 3) RGB of an uploaded file, decoded by `read_image`; bad input raises an HTTP 4xx.

    Images above `max_pixels` (or refused by Pillow's decompression-bomb guard) are refused from their
    header, before any pixel is decoded.
    """
    name = filename or "upload"
    if not data:
        raise HTTPException(400, f"{name}: the file is empty (0 bytes)")
    suffix = Path(name).suffix.lower()
    fd, tmp = tempfile.mkstemp(prefix="anomalens-upload-", suffix=suffix if _is_image_name(name) else "")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        size = _header_size(tmp, name)
        if size is not None and size[0] * size[1] > max_pixels:
            raise HTTPException(413, f"{name}: {size[0]}x{size[1]} pixels is above the limit of {max_pixels}")
        try:
            image = read_image(tmp)
        except DataError as error:
            raise HTTPException(400, str(error).replace(tmp, name)) from None
    finally:
        os.unlink(tmp)
    if image.shape[0] * image.shape[1] > max_pixels:  # formats Pillow cannot read (.npy, some TIFFs)
        raise HTTPException(413, f"{name}: {image.shape[1]}x{image.shape[0]} pixels is above the limit")
    return image


def _decode_uploads(files: Sequence[UploadFile], max_pixels: int) -> list[np.ndarray]:
    return [
        decode_upload(f.file.read(), f.filename or f"image {i + 1}", max_pixels) for i, f in enumerate(files)
    ]


def _header_size(path: str, name: str) -> tuple[int, int] | None:
    """(width, height) from the header when Pillow can open the file, else None (read_image decides)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as im:
                return im.size
        except Image.DecompressionBombError:
            raise HTTPException(413, f"{name}: refused by Pillow's decompression-bomb guard") from None
        except Exception:
            return None


class _BodyLimit:
    """ASGI middleware: a request body above `max_mb` MiB gets 413 (from Content-Length, or counted)."""

    def __init__(self, app: Callable[..., Awaitable[None]], max_mb: float):
        self.app = app
        self.max_mb = max_mb
        self.max_bytes = int(max_mb * 1024 * 1024)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.max_bytes:
            await self._refuse(send)
            return
        received, too_large, refused = 0, False, False

        async def counting_receive() -> dict:
            nonlocal received, too_large
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                too_large = True
                raise HTTPException(413)
            return message

        async def checked_send(message: dict) -> None:
            nonlocal refused
            if not too_large:
                await send(message)
            elif not refused:  # whatever the app answers once the body was too large, it is a 413
                refused = True
                await self._refuse(send)

        try:
            await self.app(scope, counting_receive, checked_send)
        except Exception:
            if not too_large:
                raise
            if not refused:
                await self._refuse(send)

    async def _refuse(self, send: Callable) -> None:
        await JSONResponse({"error": f"request body above the upload limit of {self.max_mb:g} MB"}, 413)(
            {"type": "http"}, _no_receive, send
        )


async def _no_receive() -> dict:
    return {"type": "http.disconnect"}


async def _http_error(_: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, HTTPException)
    return JSONResponse({"error": str(error.detail)}, status_code=error.status_code, headers=error.headers)


async def _validation_error(_: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    problems = [f"{'.'.join(str(p) for p in e['loc'][1:]) or 'request'}: {e['msg']}" for e in error.errors()]
    return JSONResponse({"error": "; ".join(problems)}, status_code=400)


# ---------------------------------------------------------------------- helpers
def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith((*IMAGE_SUFFIXES, ".npy"))


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=1)  # fast; heatmaps compress well
    return buffer.getvalue()


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__
