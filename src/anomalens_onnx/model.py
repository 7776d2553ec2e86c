"""`OnnxModel`: run a model written by `anomalens export --format onnx` with ONNX Runtime only.

This module imports numpy, Pillow and onnxruntime, never torch or anything of the `anomalens` library
(except its image reader when it is installed, see `read_image`): it is the whole of the torch-free
``anomalens-onnx`` distribution (``packages/anomalens-onnx``) and is re-exported by
`anomalens.onnx_model` in the full library.
Preprocessing reproduces `ClipBackbone.preprocess` (Pillow bicubic resize, squash or short side + centre
crop) and maps are brought back to each image's size as `Method.predict` does (bilinear,
``align_corners=False``), so scores equal the library's to float32 rounding.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps

METADATA_PREFIX = "anomalens."


@dataclass
class OnnxPrediction:
    """Scores (B,) float32 and maps (B, H, W) float32 at each image's size (a list if sizes differ)."""

    scores: np.ndarray
    maps: np.ndarray | list[np.ndarray]

    def __len__(self) -> int:
        return len(self.scores)


class OnnxModel:
    """An exported detector with a `Method.predict`-like API.

    Attributes (from the model's metadata): ``name`` (the method), ``backbone``, ``image_size``,
    ``resize``, ``class_names`` (the exported classes), ``threshold`` (None when not calibrated),
    ``precision`` ("fp32", or "int8" for a dynamically quantised image tower).
    """

    needs_support = False  # support features, if any, are baked into the graph
    set_level = False  # each image is scored on its own

    def __init__(self, path: str | os.PathLike, providers: Sequence[str] | None = None, threads: int = 0):
        import onnxruntime as ort

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"ONNX model not found: {path}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(
                path, options, providers=list(providers or ["CPUExecutionProvider"])
            )
        except Exception as e:  # onnxruntime raises its own exception types for unreadable files
            raise ValueError(f"{path}: not an ONNX model ({str(e).splitlines()[0]})") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        missing = [k for k in ("method", "image_size", "classes") if METADATA_PREFIX + k not in meta]
        if missing:
            raise ValueError(f"{path}: not an anomalens export (metadata lacks {', '.join(missing)})")
        self.path = path
        self.metadata = {
            k[len(METADATA_PREFIX) :]: v for k, v in meta.items() if k.startswith(METADATA_PREFIX)
        }
        self.name = self.metadata["method"]
        self.backbone = self.metadata.get("backbone", "")
        self.image_size = int(self.metadata["image_size"])
        self.resize = self.metadata.get("resize", "squash")
        self.class_names: list[str] = json.loads(self.metadata["classes"])
        self.threshold: float | None = json.loads(self.metadata.get("threshold", "null"))
        self.precision = self.metadata.get("precision", "fp32")
        self._inputs = [i.name for i in self.session.get_inputs()]

    def predict(
        self,
        images: np.ndarray | Sequence[Any],
        class_names: str | Sequence[str] | None = None,
        support: Any = None,
        batch_size: int = 16,
    ) -> OnnxPrediction:
        """Score and segment ``images`` (uint8 (B,H,W,3), a list of arrays of any size, or paths).

        class_names: one name or one per image, among the exported classes; None = the first exported
        class. ``support`` must be None: a few-shot model's support set is part of the export.
        """
        if support is not None:
            raise ValueError("support: an exported model carries its support set; export again to change it")
        arrays = _to_arrays(images)
        index = self._class_index(class_names, len(arrays))
        scores, maps = [], []
        for start in range(0, len(arrays), batch_size):
            chunk = arrays[start : start + batch_size]
            feed = {"images": np.stack([self.preprocess(a) for a in chunk])}  # (b, 3, S, S)
            if "class_index" in self._inputs:
                feed["class_index"] = index[start : start + batch_size]
            s, m = self.session.run(["scores", "maps"], feed)
            scores.append(s.astype(np.float32))
            maps.extend(_map_to_image(mi, a.shape[:2], self.resize) for mi, a in zip(m, chunk, strict=True))
        out_maps = np.stack(maps) if len({m.shape for m in maps}) == 1 else maps
        return OnnxPrediction(np.concatenate(scores), out_maps)

    def verdicts(self, scores: np.ndarray, threshold: float | None = None) -> list[str | None]:
        """Per score: "anomalous" if above the threshold (default: the model's), else "normal";
        None when there is no threshold."""
        t = self.threshold if threshold is None else threshold
        return [None if t is None else ("anomalous" if s > t else "normal") for s in np.asarray(scores)]

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        """uint8 (H, W, 3) → float32 (3, S, S) RGB in [0, 1], resized like `ClipBackbone.preprocess`."""
        size = self.image_size
        pil = Image.fromarray(image)
        if self.resize == "short_side_crop":
            width, height = pil.size
            short, long = min(width, height), max(width, height)
            new_long = int(size * long / short)
            new = (size, new_long) if width <= height else (new_long, size)
            pil = pil.resize(new, Image.BICUBIC) if new != pil.size else pil
            top = int(round((pil.size[1] - size) / 2.0))
            left = int(round((pil.size[0] - size) / 2.0))
            pil = pil.crop((left, top, left + size, top + size))
        elif pil.size != (size, size):
            pil = pil.resize((size, size), Image.BICUBIC)
        return (np.asarray(pil, dtype=np.float32) / np.float32(255.0)).transpose(2, 0, 1)

    def _class_index(self, class_names: str | Sequence[str] | None, n: int) -> np.ndarray:
        if class_names is None:
            names = [self.class_names[0]] * n
        elif isinstance(class_names, str):
            names = [class_names] * n
        else:
            names = list(class_names)
            names = names * n if len(names) == 1 else names
            if len(names) != n:
                raise ValueError(f"class_names: got {len(names)} names for {n} images")
        unknown = sorted(set(names) - set(self.class_names))
        if unknown:
            raise ValueError(
                f"class {unknown[0]!r} was not exported into {self.path} "
                f"(it has: {', '.join(self.class_names)})"
            )
        return np.array([self.class_names.index(c) for c in names], dtype=np.int64)


def _to_arrays(images: Any) -> list[np.ndarray]:
    """uint8 (B,H,W,3), (H,W,3), a list of arrays, or paths → list of (H,W,3) uint8."""
    if isinstance(images, np.ndarray):
        images = list(images[None] if images.ndim == 3 else images)
    elif isinstance(images, (str, os.PathLike)):
        images = [images]
    out = []
    for i, item in enumerate(images):
        if isinstance(item, (str, os.PathLike)):
            item = read_image(item)
        a = np.asarray(item)
        if a.ndim != 3 or a.shape[-1] != 3 or a.dtype != np.uint8:
            raise ValueError(f"images[{i}]: expected uint8 (H,W,3) RGB, got {a.dtype} {a.shape}")
        out.append(a)
    if not out:
        raise ValueError("images: no images given")
    return out


def read_image(path: str | os.PathLike) -> np.ndarray:
    """uint8 (H, W, 3) RGB of an image file.

    With the anomalens library installed this is `anomalens.data.io.read_image`, so paths decode as
    `Method.predict` decodes them. Without it (the torch-free ``anomalens-onnx`` install) Pillow decodes:
    EXIF orientation applied, alpha dropped, grayscale and palette expanded, which matches the library
    for 8-bit images; 16-bit and float images differ (Pillow clips them): pass such images as arrays.
    """
    try:
        from anomalens.data.io import read_image as library_read_image
    except ImportError:
        library_read_image = None
    if library_read_image is not None:
        return library_read_image(path)
    try:
        with Image.open(path) as image:
            return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read image {os.fspath(path)}: {e}") from None


def _map_to_image(amap: np.ndarray, shape: tuple[int, int], resize: str) -> np.ndarray:
    """An (S, S) map onto its image's (H, W) pixels, as `anomalens.methods.base.resize_maps` does."""
    height, width = shape
    if resize == "short_side_crop" and height != width:
        side = min(height, width)
        square = bilinear(amap, (side, side))
        full = np.full((height, width), square.min(), dtype=np.float32)
        top, left = (height - side) // 2, (width - side) // 2
        full[top : top + side, left : left + side] = square
        return full
    return bilinear(amap, (height, width))


def bilinear(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a 2-D float array to ``size`` = (H, W), as torch's ``F.interpolate(...,
    mode="bilinear", align_corners=False)`` (no antialiasing)."""
    if image.shape == tuple(size):
        return image.astype(np.float32, copy=False)
    rows = _taps(image.shape[0], size[0])
    cols = _taps(image.shape[1], size[1])
    x = image.astype(np.float32)
    x = x[rows[0]] * (1 - rows[2])[:, None] + x[rows[1]] * rows[2][:, None]  # (H, w)
    x = x[:, cols[0]] * (1 - cols[2]) + x[:, cols[1]] * cols[2]  # (H, W)
    return x.astype(np.float32)


def _taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices i0, i1 and weights of i1 for each output index (half-pixel centres, clamped)."""
    src = np.maximum((np.arange(n_out, dtype=np.float32) + 0.5) * np.float32(n_in / n_out) - 0.5, 0)
    i0 = np.floor(src).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (src - i0).astype(np.float32)
