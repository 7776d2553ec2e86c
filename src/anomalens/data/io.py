"""Decoding images and masks from disk into the arrays every reader hands out.

`read_image` always returns uint8 (H, W, 3) RGB and `read_mask` bool (H, W), whatever the file holds:

* EXIF orientation is applied (a phone photo tagged "rotate 90°" comes back rotated, as viewers show it).
* Grayscale (L, 1, I;16, I, F) is repeated into three channels.
* Alpha (LA, RGBA, PA) is dropped, not composited: the colour channels are kept as stored, which is what
  `PIL.Image.convert("RGB")` in the official method code does, so parity holds.
* Palette (P) images are expanded through their palette; CMYK and YCbCr are converted by Pillow.
* More than 8 bits are scaled by the nominal range of the data type, never clipped: uint16 by 255/65535
  (65535 → 255, 32768 → 128). Pillow's own `convert("L")` clips 16-bit values at 255 instead. Pillow
  decodes 16-bit RGB PNG/TIFF to 8 bits by dropping the low byte (within 1 of the exact scaling).
  32-bit integers ("I") are taken as 8-bit data when all values are in 0..255, as 16-bit data when in
  0..65535, else min-max scaled. Floats in [0, 1] are multiplied by 255, other finite floats min-max
  scaled; NaN or infinite pixels are an error.
* TIFFs Pillow cannot decode (float RGB, multi-sample 16-bit, ...) are read with tifffile; `.npy` arrays
  (InCTRL's data lists may point at them) are read with `numpy.load(allow_pickle=False)`.
* Images with more pixels than `ANOMALENS_MAX_PIXELS` (default 300,000,000) are refused before decoding.

Every failure raises `DataError` with a one-line message naming the file.
"""

from __future__ import annotations

import os
import threading
import warnings

import numpy as np
from PIL import Image, ImageOps

from anomalens.data.types import DataError, Record, Sample

MAX_PIXELS_ENV = "ANOMALENS_MAX_PIXELS"
DEFAULT_MAX_PIXELS = 300_000_000
TIFF_SUFFIXES = (".tif", ".tiff")
_RAISE_HINT = f"set {MAX_PIXELS_ENV} to raise it"

# Pillow's decompression-bomb limit is a module global; it is set to ours only while a header is parsed.
_PIL_LIMIT_LOCK = threading.Lock()


def max_pixels() -> int:
    """The largest image (width × height) `read_image` decodes: `$ANOMALENS_MAX_PIXELS` or 300 M."""
    value = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not value:
        return DEFAULT_MAX_PIXELS
    try:
        limit = int(float(value))
    except ValueError:
        limit = 0
    if limit <= 0:
        raise DataError(f"{MAX_PIXELS_ENV}={value!r} is not a positive number of pixels")
    return limit


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Decode an image file into uint8 (H, W, 3) RGB (conversion rules in the module docstring)."""
    path = os.fspath(path)
    return _gray_to_rgb(_to_uint8(_decode(path, "image"), path))


def read_mask(
    path: str | os.PathLike, shape: tuple[int, ...], image_path: str | os.PathLike | None = None
) -> np.ndarray:
    """Decode a ground-truth mask into bool (H, W): a pixel is anomalous where any channel is > 0.

    shape: the (H, W[, C]) of the image the mask belongs to; the mask must have exactly that height and
    width. image_path is only used to name the image in the error message.
    """
    path = os.fspath(path)
    raw = _decode(path, "mask")
    if raw.dtype.kind == "f" and not np.isfinite(raw).all():
        raise DataError(f"cannot read mask {path}: it contains NaN or infinite values")
    mask = raw > 0
    if mask.ndim == 3:
        mask = mask.any(axis=2)
    expected = tuple(int(s) for s in shape[:2])
    if mask.shape != expected:
        image = f"image {os.fspath(image_path)}" if image_path is not None else "its image"
        raise DataError(
            f"mask {path} is {mask.shape[1]}x{mask.shape[0]} (WxH) but {image} is {expected[1]}x{expected[0]}"
        )
    return mask


def _decode(path: str, what: str) -> np.ndarray:
    """Raw pixels of a file, (H, W) or (H, W, 3), alpha dropped, in the file's own data type."""
    if not os.path.exists(path):
        raise DataError(f"{what} not found: {path}")
    if os.path.isdir(path):
        raise DataError(f"{what} path is a directory, not a file: {path}")
    if os.path.getsize(path) == 0:
        raise DataError(f"cannot read {what} {path}: the file is empty (0 bytes)")
    if path.lower().endswith(".npy"):
        return _decode_npy(path, what)
    try:
        return _decode_pillow(path, what)
    except DataError:
        raise
    except Exception as pil_error:  # decoders raise many types (OSError, SyntaxError, zlib.error, ...)
        if not path.lower().endswith(TIFF_SUFFIXES):
            raise DataError(f"cannot read {what} {path}: {_reason(pil_error)}") from pil_error
        try:
            return _decode_tiff(path, what)
        except DataError:
            raise
        except Exception as tiff_error:
            raise DataError(
                f"cannot read {what} {path}: Pillow: {_reason(pil_error)}; tifffile: {_reason(tiff_error)}"
            ) from tiff_error


def _decode_pillow(path: str, what: str) -> np.ndarray:
    limit = max_pixels()
    with _PIL_LIMIT_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = limit
        try:
            im = Image.open(path)
        except Image.DecompressionBombError:
            im = None
        finally:
            Image.MAX_IMAGE_PIXELS = saved
    if im is None:  # Pillow refuses at twice the limit, before the size is known to us
        raise DataError(
            f"{what} {path} is too large: above twice the limit of {limit} pixels ({_RAISE_HINT})"
        )
    with im:
        if im.width * im.height > limit:
            raise DataError(
                f"{what} {path} is too large ({im.width}x{im.height} = {im.width * im.height} pixels): "
                f"the limit is {limit} pixels; {_RAISE_HINT}"
            )
        im.load()
        ImageOps.exif_transpose(im, in_place=True)
        mode = im.mode
        if mode in ("LA", "La"):
            return np.asarray(im)[..., 0]
        if mode in ("RGBA", "RGBa", "RGBX"):
            return np.asarray(im)[..., :3]
        if mode in ("P", "PA"):
            return np.asarray(im.convert("RGBA"))[..., :3]
        if mode in ("1", "L", "RGB", "F", "I") or mode.startswith("I;16"):
            return _native(np.asarray(im))
        return np.asarray(im.convert("RGB"))


def _decode_tiff(path: str, what: str) -> np.ndarray:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        height, width = int(page.imagelength), int(page.imagewidth)
        limit = max_pixels()
        if height * width > limit:
            raise DataError(
                f"{what} {path} is too large ({width}x{height} = {width * height} pixels): "
                f"the limit is {limit} pixels; {_RAISE_HINT}"
            )
        return _channels_last(page.asarray(), path, what)


def _decode_npy(path: str, what: str) -> np.ndarray:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as error:
        raise DataError(f"cannot read {what} {path}: {_reason(error)}") from error
    spatial = array.shape[:2] if array.ndim != 3 or array.shape[2] <= 4 else array.shape[1:]
    if array.ndim in (2, 3) and int(np.prod(spatial)) > max_pixels():
        raise DataError(f"{what} {path} is too large: the limit is {max_pixels()} pixels; {_RAISE_HINT}")
    return _channels_last(np.asarray(array), path, what)


def _channels_last(array: np.ndarray, path: str, what: str) -> np.ndarray:
    """(H, W), (H, W, C) or (C, H, W) with C in 1..4 → (H, W) or (H, W, 3); a 4th channel is alpha."""
    if array.ndim == 3 and array.shape[0] <= 4 < array.shape[2]:
        array = np.moveaxis(array, 0, -1)
    if array.ndim == 3 and array.shape[2] in (1, 2):
        array = array[..., 0]
    elif array.ndim == 3 and array.shape[2] in (3, 4):
        array = array[..., :3]
    if array.ndim not in (2, 3) or array.dtype.kind not in "biuf":
        raise DataError(
            f"cannot read {what} {path}: unsupported pixel array {array.shape} of type {array.dtype}"
        )
    return _native(array)


def _native(array: np.ndarray) -> np.ndarray:
    """The same pixels in native byte order (Pillow's I;16B arrays are big-endian)."""
    return array.astype(array.dtype.newbyteorder("="), copy=False)


def _to_uint8(array: np.ndarray, path: str) -> np.ndarray:
    """Scale any pixel data type to uint8 by its nominal range (rules in the module docstring)."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if array.dtype == np.uint16:
        return _round_to_uint8(array.astype(np.float64) * (255.0 / 65535.0))
    values = array.astype(np.float64)
    if not np.isfinite(values).all():
        raise DataError(f"cannot read image {path}: it contains NaN or infinite values")
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if array.dtype.kind in "iu" and lo >= 0 and hi <= 255:
        return values.astype(np.uint8)
    if array.dtype.kind in "iu" and lo >= 0 and hi <= 65535:
        return _round_to_uint8(values * (255.0 / 65535.0))
    if array.dtype.kind == "f" and lo >= 0 and hi <= 1:
        return _round_to_uint8(values * 255.0)
    if hi == lo:
        return np.zeros(array.shape, np.uint8)
    return _round_to_uint8((values - lo) * (255.0 / (hi - lo)))


def _round_to_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _gray_to_rgb(array: np.ndarray) -> np.ndarray:
    if array.ndim == 2:
        return np.repeat(array[:, :, None], 3, axis=2)
    return np.ascontiguousarray(array)


def _reason(error: BaseException) -> str:
    """First line of an exception's message, or its type when it has none."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def decode_record(record: Record) -> Sample:
    """Decode one `Record` (image, mask, subject mask) into a `Sample`; the loader every reader uses."""
    image = read_image(record.path)
    mask = read_mask(record.mask_path, image.shape, record.path) if record.mask_path else None
    subject = (
        read_mask(record.subject_mask_path, image.shape, record.path) if record.subject_mask_path else None
    )
    return Sample(
        image=image,
        mask=mask,
        label=record.label,
        class_name=record.class_name,
        path=record.path,
        subject_mask=subject,
        meta=dict(record.meta),
    )
