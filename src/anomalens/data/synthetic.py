"""Procedurally generated datasets for offline demos, tests and smoke benchmarks (`synthetic:<kind>`).

Three kinds, all deterministic for a seed, rendered with numpy and cached on disk:

* ``defects``: textures (weave, grain, carpet) and objects (disc, tile) with normal variation (phase,
  angle, position, colour jitter). Anomalies are scratches, holes, stains and colour shifts, drawn only
  where the class allows (the whole texture, the object's own pixels) with an exact mask: every masked
  pixel differs from the clean image by at least `MIN_CONTRAST` grey levels in some channel and every
  other pixel is unchanged. Train = normal only (as MVTec AD), test = normal + anomalous.
* ``contextual``: subjects (boat, car, cow, bird, plane) pasted on textured contexts (water, road,
  grass, sky, sand, snow). `COMPATIBLE` says where a subject belongs; the label depends only on the
  pair, and the rule is visible in the pixels: each context has its own colours. Contexts come in two
  appearances (`APPEARANCES`): "natural" in the SS parts (train and test) and "mosaic" (the same colours
  with blocks of the texture turned and shaded in a checker) in the "CC" test part (cross-context,
  paper 000), so every CC subject-context combination is unseen in training while its compatibility
  follows from the seen ones.
* ``transfer``: the method-training and held-out classes of `anomalens.data.captions`, which the
  `anomalens-mini` backbone never saw in pre-training, with eight defect types (same layout as defects).

The cache lives under ``$ANOMALENS_CACHE/synthetic/<kind>-<hash>/`` (default ``~/.cache/anomalens``),
one folder per set of generation parameters. It is written into a temporary sibling folder and renamed
into place, so an interrupted generation never leaves a partial cache. A defects cache is laid out like
MVTec AD (``mvtec:<folder>`` reads it too); a contextual cache is a ``contextual:<folder>`` dataset.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from anomalens.data.contextual import read_manifest, select_records, write_manifest
from anomalens.data.io import decode_record
from anomalens.data.types import DataError, Dataset, Record, check_classes, split_parts

CACHE_ENV = "ANOMALENS_CACHE"
# Bump when rendering changes, so that caches written by older code are not reused.
GENERATOR_VERSION = 2

# Generation parameters (they select the cache folder) and their defaults, per kind.
DEFAULTS: dict[str, dict[str, int]] = {
    "defects": {"n": 16, "size": 64, "seed": 0},
    "contextual": {"n": 8, "size": 64, "seed": 0},
    "transfer": {"n": 16, "size": 48, "seed": 0},
}
# Parameters that only select from a generated cache.
TEST_PARTS = {"both": ("SS", "CC"), "ss": ("SS",), "cc": ("CC",)}
LIMITS = {"n": (1, 10_000), "size": (32, 1024), "seed": (0, 2**32 - 1)}

# --- defects -----------------------------------------------------------------------------------------

DEFECT_CLASSES = ("weave", "grain", "carpet", "disc", "tile")
DEFECT_TYPES = ("scratch", "hole", "stain", "colour_shift")
# Normal pixels stay in [LO, HI] so that bright scratches, dark holes, saturated stains and channel
# shifts always change a pixel by at least MIN_CONTRAST.
LO, HI = 60, 200
MIN_CONTRAST = 40
MIN_DEFECT_AREA = 0.03  # fraction of the image
SCRATCH_LEVEL = (240, 256)
HOLE_LEVEL = (0, 20)
STAIN_ALPHA = (0.75, 0.9)
COLOUR_SHIFT = 80
STAIN_COLOURS = np.array(
    [[255, 0, 0], [0, 0, 255], [255, 255, 0], [255, 0, 255], [0, 255, 255], [0, 255, 0]], dtype=np.float64
)
# Two end colours per class; a pattern value t in [0, 1] interpolates between them.
PALETTES = {
    "weave": ((70, 90, 150), (180, 190, 200)),
    "grain": ((110, 70, 60), (200, 150, 100)),
    "carpet": ((150, 60, 70), (90, 160, 120)),
    "disc": ((90, 95, 105), (195, 195, 190)),
    "tile": ((180, 110, 70), (200, 180, 150)),
}
BACKGROUNDS = {"disc": (70, 110, 80), "tile": (120, 120, 130)}


def render_normal(
    class_name: str, n: int, size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """n defect-free images of a class, uint8 (n, S, S, 3) in [LO, HI], and where defects may go (n, S, S)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    c0, c1 = (np.array(c) + rng.uniform(-15, 15, (n, 1, 1, 3)) for c in PALETTES[class_name])
    region = np.ones((n, size, size), dtype=bool)
    if class_name in ("weave", "grain"):
        u, v = _rotate(
            xx,
            yy,
            rng.uniform(0, size, (n, 1, 1)),
            rng.uniform(0, size, (n, 1, 1)),
            rng.uniform(-0.2, 0.2, (n, 1, 1)),
        )
        if class_name == "weave":
            # Checkerboard of cells; threads run horizontally in one cell colour and vertically in the other.
            p = size / rng.uniform(5.5, 7.0, (n, 1, 1))
            over = (np.floor(u / p) + np.floor(v / p)) % 2 == 0
            t = 0.5 + 0.5 * np.where(over, np.cos(6 * np.pi * v / p), np.cos(6 * np.pi * u / p))
        else:
            p = size / rng.uniform(8, 11, (n, 1, 1))
            wave = size / 14 * np.sin(2 * np.pi * u / (0.8 * size) + rng.uniform(0, 2 * np.pi, (n, 1, 1)))
            t = 0.5 + 0.5 * np.sin(2 * np.pi * (v + wave) / p)
        t = t + rng.normal(0, 0.05, t.shape)
    elif class_name == "carpet":
        noise = ndimage.gaussian_filter(rng.standard_normal((n, size, size)), sigma=(0, 1.2, 1.2))
        t = 0.5 + 0.5 * np.tanh(noise / noise.std(axis=(1, 2), keepdims=True))
    else:
        cx, cy = (size / 2 + rng.uniform(-0.06, 0.06, (n, 1, 1)) * size for _ in range(2))
        scale = size * rng.uniform(0.92, 1.08, (n, 1, 1))
        if class_name == "disc":
            r = np.hypot(xx - cx, yy - cy) / (0.32 * scale)
            region = r <= 1
            groove = np.abs(r - 0.6) < 0.06
            t = np.where(groove, 0.15, 0.35 + 0.65 * (1 - r**2))
        else:
            u, v = _rotate(xx, yy, cx, cy, rng.uniform(-0.3, 0.3, (n, 1, 1)))
            edge = 0.28 * scale - np.maximum(np.abs(u), np.abs(v))  # distance inside the tile's border
            region = edge >= 0
            t = np.clip(edge / (0.05 * scale), 0, 1) * 0.7 + 0.3
        t = t + rng.normal(0, 0.03, t.shape)
    image = c0 + np.clip(t, 0, 1)[..., None] * (c1 - c0)
    if class_name in BACKGROUNDS:
        background = np.array(BACKGROUNDS[class_name]) + rng.uniform(-15, 15, (n, 1, 1, 3))
        shade = 1 + 0.1 * (yy / size - 0.5)[None, :, :, None]  # light from above
        image = np.where(region[..., None], image, background * shade)
    return np.rint(np.clip(image, LO, HI)).astype(np.uint8), region


def apply_defects(
    images: np.ndarray, region: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Draw one defect per image inside `region`: (defective images, exact bool masks, defect types).

    Types are balanced over the batch. Masks cover at least `MIN_DEFECT_AREA` of the image (small shapes,
    e.g. a short scratch clipped by an object's border, are dilated within the region until they do).
    """
    n, size = images.shape[0], images.shape[1]
    if (region.reshape(n, -1).mean(axis=1) < MIN_DEFECT_AREA).any():
        raise ValueError("a defect region is smaller than the minimum defect area")
    kinds = rng.permutation(np.arange(n) % len(DEFECT_TYPES))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    # Centre: a uniformly random pixel of each image's region.
    row, column = np.divmod(np.argmax((rng.random(region.shape) * region).reshape(n, -1), axis=1), size)
    cy, cx = row[:, None, None].astype(np.float64), column[:, None, None].astype(np.float64)
    u, v = _rotate(xx, yy, cx, cy, rng.uniform(0, np.pi, (n, 1, 1)))

    def length(lo: float, hi: float) -> np.ndarray:
        """Per-image random lengths, as fractions of the image size."""
        return rng.uniform(lo, hi, (n, 1, 1)) * size

    # Scratch: two joined segments (a kinked line) of width 3-5 % of the image.
    bend = rng.choice([-1, 1], (n, 1, 1)) * rng.uniform(0.3, 0.9, (n, 1, 1))
    d1 = _segment_distance(u, v, -length(0.25, 0.45), 0.0)
    d2 = _segment_distance(*_rotate(u, v, 0.0, 0.0, bend), length(0.25, 0.45), 0.0)
    shapes = [np.minimum(d1, d2) <= length(0.015, 0.025)]
    # Hole and stain: irregular ellipses; the colour shift: a rotated rectangle.
    hole_r = _blob_radius(u, v, length(0.1, 0.18), length(0.1, 0.18), rng)
    shapes.append(hole_r <= 1)
    shapes.append(_blob_radius(u, v, length(0.12, 0.22), length(0.12, 0.22), rng) <= 1)
    shapes.append((np.abs(u) <= length(0.1, 0.25)) & (np.abs(v) <= length(0.1, 0.25)))
    masks = np.stack(shapes)[kinds, np.arange(n)] & region
    masks = _grow_to_min_area(masks, region)

    clean = images.astype(np.float64)
    scratch = np.broadcast_to(rng.integers(*SCRATCH_LEVEL, (n, 1, 1, 1)), clean.shape)
    hole = np.broadcast_to(
        HOLE_LEVEL[0] + (HOLE_LEVEL[1] - HOLE_LEVEL[0]) * np.clip(hole_r, 0, 1)[..., None], clean.shape
    )
    stain_colour = STAIN_COLOURS[rng.integers(0, len(STAIN_COLOURS), n)][:, None, None, :]
    stain = clean + rng.uniform(*STAIN_ALPHA, (n, 1, 1, 1)) * (stain_colour - clean)
    up, down = (np.eye(3)[c][:, None, None, :] for c in _channel_pair(n, rng))
    shifted = clean + COLOUR_SHIFT * (up - down)
    altered = np.stack([scratch, hole, stain, shifted])[kinds, np.arange(n)]
    out = np.where(masks[..., None], np.rint(np.clip(altered, 0, 255)), clean).astype(np.uint8)
    return out, masks, [DEFECT_TYPES[k] for k in kinds]


def _rotate(x, y, cx, cy, angle) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates relative to (cx, cy) in a frame rotated by `angle` (radians)."""
    dx, dy = x - cx, y - cy
    c, s = np.cos(angle), np.sin(angle)
    return c * dx + s * dy, -s * dx + c * dy


def _segment_distance(u: np.ndarray, v: np.ndarray, end_u: np.ndarray, end_v: float) -> np.ndarray:
    """Distance of points (u, v) to the segment from the origin to (end_u, end_v)."""
    length2 = end_u**2 + end_v**2
    t = np.clip((u * end_u + v * end_v) / length2, 0, 1)
    return np.hypot(u - t * end_u, v - t * end_v)


def _blob_radius(u, v, a, b, rng: np.random.Generator) -> np.ndarray:
    """Normalised radius of an ellipse with semi-axes (a, b) whose outline wobbles (≤ 1 is inside)."""
    n = u.shape[0]
    angle = np.arctan2(v / b, u / a)
    wobble = (
        1
        + 0.15 * np.sin(3 * angle + rng.uniform(0, 2 * np.pi, (n, 1, 1)))
        + 0.08 * np.sin(5 * angle + rng.uniform(0, 2 * np.pi, (n, 1, 1)))
    )
    return np.hypot(u / a, v / b) / wobble


def _grow_to_min_area(masks: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Dilate (within the region) each mask smaller than `MIN_DEFECT_AREA` until it is not."""
    structure = np.ones((1, 3, 3), dtype=bool)  # dilate within each image, never across the batch
    min_pixels = MIN_DEFECT_AREA * masks.shape[1] * masks.shape[2]
    small = masks.sum(axis=(1, 2)) < min_pixels
    while small.any():
        masks[small] = ndimage.binary_dilation(masks[small], structure) & region[small]
        small = masks.sum(axis=(1, 2)) < min_pixels
    return masks


def _channel_pair(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two different channels per image: one raised, one lowered by the colour shift."""
    up = rng.integers(0, 3, n)
    return up, (up + rng.integers(1, 3, n)) % 3


def _write_defects(folder: Path, n: int, size: int, seed: int) -> None:
    """Render every class and set into `folder` (MVTec AD layout) plus `index.json` listing the records."""
    records = []
    for ci, cls in enumerate(DEFECT_CLASSES):
        for part, count in (("train", n), ("test", n)):
            rng = np.random.default_rng([seed, ci, 0 if part == "train" else 1])
            images, _ = render_normal(cls, count, size, rng)
            for i, image in enumerate(images):
                rel = f"{cls}/{part}/good/{i:03d}.png"
                _write_png(folder / rel, image)
                records.append(
                    {
                        "path": rel,
                        "label": 0,
                        "class_name": cls,
                        "mask_path": None,
                        "meta": {"defect": "good", "set": part},
                    }
                )
        rng = np.random.default_rng([seed, ci, 2])
        clean, region = render_normal(cls, n, size, rng)
        images, masks, kinds = apply_defects(clean, region, rng)
        for i, (image, mask, kind) in enumerate(zip(images, masks, kinds, strict=True)):
            rel, mask_rel = f"{cls}/test/{kind}/{i:03d}.png", f"{cls}/ground_truth/{kind}/{i:03d}_mask.png"
            _write_png(folder / rel, image)
            _write_png(folder / mask_rel, mask.astype(np.uint8) * 255)
            records.append(
                {
                    "path": rel,
                    "label": 1,
                    "class_name": cls,
                    "mask_path": mask_rel,
                    "meta": {"defect": kind, "set": "test"},
                }
            )
    (folder / "index.json").write_text(json.dumps({"records": records}, indent=1))


def _defect_records(folder: Path) -> list[Record]:
    if not (folder / "index.json").is_file():
        raise DataError(f"synthetic cache {folder} is incomplete (no index.json); delete it to regenerate")
    index = json.loads((folder / "index.json").read_text())
    return [
        Record(
            path=str(folder / r["path"]),
            label=r["label"],
            class_name=r["class_name"],
            mask_path=str(folder / r["mask_path"]) if r["mask_path"] else None,
            meta=tuple(sorted(r["meta"].items())),
        )
        for r in index["records"]
    ]


# --- contextual --------------------------------------------------------------------------------------

CONTEXTS = ("water", "road", "grass", "sky", "sand", "snow")
SUBJECTS = ("boat", "car", "cow", "bird", "plane")
# Every context is normal for some subject and anomalous for others (no context alone gives the label).
COMPATIBLE: dict[str, tuple[str, ...]] = {
    "boat": ("water", "sand"),
    "car": ("road", "snow"),
    "cow": ("grass", "snow"),
    "bird": ("sky", "grass"),
    "plane": ("sky", "road"),
}
# Appearance of the contexts per split part: the CC part shows every context in an appearance never seen
# in training, so each of its subject-context combinations is held out while the colour rule carries over.
APPEARANCES = {"SS": "natural", "CC": "mosaic"}
MOSAIC_BLOCKS = 4  # blocks per side of the CC appearance
MOSAIC_SHADE = 12  # grey levels added to / taken from alternate blocks


def contexts_for(subject: str, label: int) -> list[str]:
    """Contexts of a subject with the given label (0 compatible), in `CONTEXTS` order."""
    return [c for c in CONTEXTS if (c in COMPATIBLE[subject]) == (label == 0)]


def mosaic(backgrounds: np.ndarray) -> np.ndarray:
    """The CC appearance: alternate blocks of each background transposed, blocks shaded in a checker.

    Every pixel keeps a colour of its own background (± `MOSAIC_SHADE`), so the colour of a context is
    preserved, but oriented textures (waves, lanes, streaks, ripples, the sky's gradient) are broken up.
    """
    n, size = backgrounds.shape[0], backgrounds.shape[1]
    b = size // MOSAIC_BLOCKS
    k = b * MOSAIC_BLOCKS
    out = backgrounds.astype(np.float64)
    blocks = out[:, :k, :k].reshape(n, MOSAIC_BLOCKS, b, MOSAIC_BLOCKS, b, 3)
    checker = (np.add.outer(np.arange(MOSAIC_BLOCKS), np.arange(MOSAIC_BLOCKS)) % 2).astype(bool)
    turned = blocks.transpose(0, 1, 4, 3, 2, 5)  # each block's rows and columns swapped
    blocks = np.where(checker[None, :, None, :, None, None], turned, blocks)
    shade = np.where(checker, MOSAIC_SHADE, -MOSAIC_SHADE)[None, :, None, :, None, None]
    out[:, :k, :k] = (blocks + shade).reshape(n, k, k, 3)
    return np.rint(np.clip(out, 0, 255)).astype(np.uint8)


def render_context(context: str, n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """n textured backgrounds of one context, uint8 (n, S, S, 3)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    phase = rng.uniform(0, 2 * np.pi, (n, 1, 1))
    jitter = rng.uniform(-12, 12, (n, 1, 1, 3))

    def smooth_noise(sigma: tuple[float, float]) -> np.ndarray:
        noise = ndimage.gaussian_filter(rng.standard_normal((n, size, size)), sigma=(0, *sigma))
        return noise / noise.std(axis=(1, 2), keepdims=True)

    def paint(base: Sequence[float], amount: np.ndarray, direction: Sequence[float]) -> np.ndarray:
        return np.array(base) + amount[..., None] * np.array(direction)

    if context == "water":
        waves = np.sin(2 * np.pi * (9 * yy + 0.3 * np.sin(2 * np.pi * 2 * xx + phase)))
        image = paint((35, 90, 165), 0.5 + 0.5 * waves, (40, 50, 55))
    elif context == "road":
        image = paint((88, 88, 92), 0.15 * smooth_noise((0.7, 0.7)), (40, 40, 40))
        lane_y = rng.uniform(0.75, 0.88, (n, 1, 1))
        dashes = ((xx + rng.uniform(0, 1, (n, 1, 1))) % 0.25) < 0.14
        lane = (np.abs(yy - lane_y) < 0.025) & dashes
        image = np.where(lane[..., None], np.array([230.0, 205, 60]), image)
    elif context == "grass":
        image = paint((55, 135, 45), 0.4 * smooth_noise((3.0, 0.5)), (25, 45, 15))
    elif context == "sky":
        clouds = np.clip(smooth_noise((4.0, 6.0)) - 0.6, 0, 1)
        image = paint((95, 150, 230), yy, (70, 60, 20))
        image = image + clouds[..., None] * (np.array([250.0, 250, 250]) - image)
    elif context == "sand":
        ripples = np.sin(2 * np.pi * (7 * yy + 2 * xx) + phase)
        image = paint((210, 185, 130), 0.25 * ripples + 0.15 * smooth_noise((1.0, 1.0)), (40, 35, 30))
    elif context == "snow":
        image = paint((232, 238, 248), 0.25 * smooth_noise((2.0, 2.0)), (-30, -20, -5))
    else:
        raise ValueError(f"unknown context {context!r}")
    return np.rint(np.clip(image + jitter, 0, 255)).astype(np.uint8)


def render_subject(
    subject: str, backgrounds: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Paint one subject per background at a random position, scale and facing: (images, subject masks).

    Pixels outside the returned mask are the background's, unchanged.
    """
    n, size = backgrounds.shape[0], backgrounds.shape[1]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    scale = size * rng.uniform(0.55, 0.75, (n, 1, 1))
    facing = rng.choice([-1.0, 1.0], (n, 1, 1))
    u = facing * (xx - size * rng.uniform(0.38, 0.62, (n, 1, 1))) / scale
    v = (yy - size * rng.uniform(0.42, 0.58, (n, 1, 1))) / scale
    images = backgrounds.astype(np.float64)
    subject_mask = np.zeros((n, size, size), dtype=bool)
    for part, colour in _subject_parts(subject, u, v):
        tint = np.array(colour) + rng.uniform(-12, 12, (n, 1, 1, 3))
        images = np.where(part[..., None], tint, images)
        subject_mask |= part
    return np.rint(np.clip(images, 0, 255)).astype(np.uint8), subject_mask


def _subject_parts(
    subject: str, u: np.ndarray, v: np.ndarray
) -> list[tuple[np.ndarray, tuple[int, int, int]]]:
    """A subject's parts as (bool mask, RGB colour), painted in order, in units of the subject's size."""

    def ellipse(cu: float, cv: float, a: float, b: float) -> np.ndarray:
        return ((u - cu) / a) ** 2 + ((v - cv) / b) ** 2 <= 1

    def box(u0: float, u1: float, v0: float, v1: float) -> np.ndarray:
        return (u >= u0) & (u <= u1) & (v >= v0) & (v <= v1)

    if subject == "boat":
        hull = (v >= 0.1) & (v <= 0.35) & (np.abs(u) <= 0.5 - 0.8 * (v - 0.1))
        sail = (v >= -0.42) & (v <= 0.05) & (u >= 0.02) & (u <= 0.02 + 0.75 * (v + 0.42))
        return [(hull, (125, 70, 30)), (box(-0.03, 0.02, -0.45, 0.1), (80, 55, 30)), (sail, (245, 245, 240))]
    if subject == "car":
        cabin = (v >= -0.26) & (v <= -0.05) & (np.abs(u + 0.03) <= 0.28 + 0.6 * (v + 0.05))
        parts = [(box(-0.5, 0.5, -0.05, 0.2), (200, 30, 35)), (cabin, (200, 30, 35))]
        parts.append((box(-0.2, 0.12, -0.21, -0.08), (170, 210, 235)))
        return parts + [(ellipse(cu, 0.22, 0.11, 0.11), (25, 25, 25)) for cu in (-0.3, 0.3)]
    if subject == "cow":
        parts = [(box(cu, cu + 0.06, 0.05, 0.42), (235, 232, 225)) for cu in (-0.3, -0.17, 0.12, 0.24)]
        body = ellipse(0.0, 0.0, 0.36, 0.19)
        spots = body & (np.sin(9 * u + 1.0) * np.sin(11 * v + 2.0) > 0.45)
        parts += [
            (body, (240, 238, 232)),
            (spots, (30, 28, 26)),
            (ellipse(0.42, -0.12, 0.12, 0.09), (240, 238, 232)),
        ]
        return parts + [(ellipse(0.5, -0.08, 0.05, 0.05), (230, 150, 160))]
    if subject == "bird":
        beak = (u >= 0.38) & (u <= 0.52) & (np.abs(v + 0.1) <= 0.05 * (0.52 - u) / 0.14)
        wing = (v >= -0.42) & (v <= 0.0) & (np.abs(u + 0.05) <= 0.16 * (v + 0.42) / 0.42)
        parts = [
            (ellipse(0.0, 0.0, 0.3, 0.14), (240, 200, 30)),
            (ellipse(0.3, -0.1, 0.11, 0.11), (240, 200, 30)),
        ]
        return parts + [
            (beak, (250, 120, 20)),
            (wing, (190, 140, 20)),
            (ellipse(0.33, -0.13, 0.025, 0.025), (10, 10, 10)),
        ]
    if subject == "plane":
        wing = (np.abs(v) <= 0.42) & (u <= 0.12 - 0.3 * np.abs(v)) & (u >= -0.06 - 0.3 * np.abs(v))
        tail = (np.abs(v) <= 0.16) & (u >= -0.5) & (u <= -0.38 - 0.2 * np.abs(v))
        parts = [
            (wing, (185, 188, 200)),
            (tail, (185, 188, 200)),
            (ellipse(0.0, 0.0, 0.5, 0.08), (205, 205, 215)),
        ]
        return parts + [(ellipse(0.38, 0.0, 0.06, 0.04), (30, 50, 110))]
    raise ValueError(f"unknown subject {subject!r}")


def _write_contextual(folder: Path, n: int, size: int, seed: int) -> None:
    """Render every subject, part and label into `folder` with a `manifest.csv` (the contextual format)."""
    rows = []
    parts = (("train", "SS"), ("test", "SS"), ("test", "CC"))
    for si, subject in enumerate(SUBJECTS):
        for pi, (set_name, part) in enumerate(parts):
            for label in (0, 1):
                rng = np.random.default_rng([seed, si, pi, label])
                options = contexts_for(subject, label)
                contexts = [options[i % len(options)] for i in range(n)]
                backgrounds = np.empty((n, size, size, 3), dtype=np.uint8)
                for context in options:
                    chosen = np.array([c == context for c in contexts])
                    backgrounds[chosen] = render_context(context, int(chosen.sum()), size, rng)
                if part == "CC":
                    backgrounds = mosaic(backgrounds)
                images, masks = render_subject(subject, backgrounds, rng)
                for i, (image, mask, context) in enumerate(zip(images, masks, contexts, strict=True)):
                    stem = f"{set_name}-{part}/{subject}-{'anomalous' if label else 'normal'}-{i:03d}"
                    _write_png(folder / f"images/{stem}.png", image)
                    _write_png(folder / f"subject_masks/{stem}.png", mask.astype(np.uint8) * 255)
                    rows.append(
                        {
                            "image": f"images/{stem}.png",
                            "subject_mask": f"subject_masks/{stem}.png",
                            "class": subject,
                            "context": context,
                            "appearance": APPEARANCES[part],
                            "label": label,
                            "split": part,
                            "set": set_name,
                        }
                    )
    write_manifest(folder, rows)


# --- loading and the cache ---------------------------------------------------------------------------


def _write_transfer(folder: Path, n: int, size: int, seed: int) -> None:
    from anomalens.data.captions import write_transfer  # it imports this module's defect helpers

    write_transfer(folder, n, size, seed)


def _transfer_classes() -> list[str]:
    from anomalens.data.captions import class_names

    return class_names("train") + class_names("heldout")


_WRITERS: dict[str, Callable[[Path, int, int, int], None]] = {
    "defects": _write_defects,
    "contextual": _write_contextual,
    "transfer": _write_transfer,
}


def load_synthetic(
    kind: str,
    params: Mapping[str, str] | None = None,
    split: str = "test",
    classes: Sequence[str] | None = None,
) -> Dataset:
    """`synthetic:<kind>[?n=..&size=..&seed=..]`: generate (or reuse from the cache) and list a dataset.

    defects: `n` images per class and set (train: n normal; test: n normal + n anomalous), `size` pixels
    square, `seed`. contextual: `n` normal + `n` anomalous images per subject in each of SS-train,
    SS-test and CC-test; `test=both|ss|cc` picks the test parts. split "train" = SS-train (both labels,
    as contextual methods train few-shot on both), "test" = the chosen test parts, "all" = everything.
    transfer: the method-training and held-out classes of `anomalens.data.captions` (the classes the
    `anomalens-mini` backbone never saw), laid out as defects: `n` per class and set, `size` 48 by default.
    """
    if kind not in DEFAULTS:
        raise DataError(f"unknown synthetic kind {kind!r}; expected one of {', '.join(DEFAULTS)}")
    source = f"synthetic:{kind}"
    params = dict(params or {})
    accepted = [*DEFAULTS[kind], *(["test"] if kind == "contextual" else [])]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise DataError(f"{source}: unknown parameter {', '.join(unknown)}; accepted: {', '.join(accepted)}")
    test = params.pop("test", "both")
    if test not in TEST_PARTS:
        raise DataError(f"{source}: parameter test must be one of {', '.join(TEST_PARTS)}, got {test!r}")
    generation = _parse_params(source, DEFAULTS[kind], params)
    split_parts(split)  # refuses an unknown split
    folder = _ensure_cache(kind, generation)
    if kind in ("defects", "transfer"):
        records = [r for r in _defect_records(folder) if split == "all" or dict(r.meta)["set"] == split]
        available = DEFECT_CLASSES if kind == "defects" else _transfer_classes()
        check_classes(classes, available, source)
        records = [r for r in records if classes is None or r.class_name in classes]
    else:
        records = select_records(read_manifest(folder), split, classes, source)
        records = [
            r for r in records if dict(r.meta)["set"] == "train" or dict(r.meta)["split"] in TEST_PARTS[test]
        ]
    return Dataset(source, records, decode_record)


def cache_root() -> Path:
    """`$ANOMALENS_CACHE`, else `~/.cache/anomalens`."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "anomalens")


def _parse_params(source: str, defaults: Mapping[str, int], params: Mapping[str, str]) -> dict[str, int]:
    """The generation parameters: the defaults overridden by `params` (integers within `LIMITS`)."""
    parsed = dict(defaults)
    for name, value in params.items():
        lo, hi = LIMITS[name]
        try:
            parsed[name] = int(value)
        except (TypeError, ValueError):
            raise DataError(f"{source}: parameter {name} must be an integer, got {value!r}") from None
        if not lo <= parsed[name] <= hi:
            raise DataError(f"{source}: parameter {name} must be in [{lo}, {hi}], got {value!r}")
    return parsed


def _ensure_cache(kind: str, params: Mapping[str, int]) -> Path:
    """The cache folder for these parameters, generated first if absent (atomically: tmp folder + rename)."""
    key = json.dumps({"kind": kind, "params": dict(params), "version": GENERATOR_VERSION}, sort_keys=True)
    folder = cache_root() / "synthetic" / f"{kind}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    if folder.is_dir():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{folder.name}-", dir=folder.parent))
    try:
        _WRITERS[kind](tmp, params["n"], params["size"], params["seed"])
        (tmp / "params.json").write_text(key)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not folder.is_dir():  # otherwise a concurrent process finished first: use its copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, compress_level=1)
