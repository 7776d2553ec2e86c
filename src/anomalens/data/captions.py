"""Image–caption pairs for pre-training the `anomalens-mini` CLIP, and its transfer datasets.

Every class of `CLASSES` is a *texture* (a pattern filling the image) or an *object* (a shape with a
patterned surface on a background). Patterns are procedural (numpy) or crops of real photographs that
ship with scikit-image (`PHOTOS`; all CC0 or public domain, see docs/anomalens-mini.md). Each class
belongs to exactly one `split`:

* ``pretrain``: seen by the backbone in pre-training (captioned pairs, `sample_pairs`);
* ``train``: never seen in pre-training; methods (AA-CLIP, Crane, ...) are trained on them;
* ``heldout``: never seen in pre-training nor by method training; zero-shot transfer is measured on them.
  Held-out classes use patterns and shapes of their own (honeycomb, plaid, the gravel photo, star,
  triangle, clover) and class words that occur in no pre-training caption.

Defects (`DEFECT_TYPES`): scratch, stain, hole, crack, missing part, colour change, shape change (a
deformed outline for objects, a local warp for textures) and misplaced part (a piece moved elsewhere),
each with an exact mask. Captions use the words of the methods' prompts (`prompts.py`): WinCLIP's
templates and normal/anomalous states, plus one phrase per defect type ("{} with a scratch").

Everything is deterministic from a seed: a batch is drawn from ``np.random.default_rng([seed, index])``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from anomalens.data.synthetic import _blob_radius, _rotate, _segment_distance, _write_png
from anomalens.prompts import WINCLIP_ANOMALOUS_STATES, WINCLIP_NORMAL_STATES, WINCLIP_TEMPLATES

SPLITS = ("pretrain", "train", "heldout")
DEFECT_TYPES = ("scratch", "stain", "hole", "crack", "missing", "colour", "shape", "misplaced")
# Anomalous state phrases per defect type, in the "{}"-state form of prompts.py.
DEFECT_STATES: dict[str, tuple[str, ...]] = {
    "scratch": ("{} with a scratch", "scratched {}"),
    "stain": ("{} with a stain", "stained {}", "{} with a spot"),
    "hole": ("{} with a hole", "{} with a dark hole"),
    "crack": ("cracked {}", "{} with a crack"),
    "missing": ("{} with a missing part", "incomplete {}"),
    "colour": ("{} with a colour change", "discoloured {}"),
    "shape": ("deformed {}", "{} with a bent shape"),
    "misplaced": ("{} with a misplaced part", "{} with a part out of place"),
}
TEMPLATES = (*WINCLIP_TEMPLATES, "{}.", "a photo of {}.")
# Caption class word: the class name, else (with these probabilities) "object" (the object-agnostic
# word of AnomalyCLIP/Crane) or a random word of the tokenizer's vocabulary, so that the text tower
# learns to read the state words next to a class word it has never seen.
P_OBJECT_WORD, P_RANDOM_WORD = 0.15, 0.15
P_SPECIFIC_STATE = 0.5  # anomalous captions: a defect-type phrase, else a generic WinCLIP state
MIN_DEFECT_AREA = 0.02  # fraction of the image
TRIES = 8  # attempts at a defect type before a stain is drawn instead
MIN_CONTRAST = 30  # grey levels: every masked pixel differs this much in some channel (else unmasked)

# Photographs of scikit-image's data directory (licences: docs/anomalens-mini.md).
PHOTOS = ("brick", "grass", "gravel", "moon", "page", "chelsea", "coffee", "astronaut", "rocket", "camera")
BACKGROUND_PHOTOS = ("coffee", "astronaut", "rocket", "camera")


@dataclass(frozen=True)
class ClassSpec:
    """One class: ``pattern`` fills a texture or an object's surface (``photo:<name>`` = photo crops in
    their own colours), ``palette`` colours a procedural pattern, ``shape`` outlines an object."""

    name: str
    split: str
    pattern: str
    palette: tuple[tuple[int, int, int], tuple[int, int, int]] = ((90, 90, 90), (190, 190, 190))
    shape: str | None = None

    @property
    def kind(self) -> str:
        return "texture" if self.shape is None else "object"


# The one table of classes and splits.
CLASSES: tuple[ClassSpec, ...] = (
    # pre-training textures
    ClassSpec("carpet", "pretrain", "noise", ((150, 60, 70), (90, 160, 120))),
    ClassSpec("wood", "pretrain", "grain", ((110, 70, 60), (200, 150, 100))),
    ClassSpec("fabric", "pretrain", "weave", ((70, 90, 150), (180, 190, 200))),
    ClassSpec("marble", "pretrain", "marble", ((200, 200, 195), (110, 110, 120))),
    ClassSpec("mesh", "pretrain", "dots", ((170, 170, 175), (60, 60, 70))),
    ClassSpec("denim", "pretrain", "stripes", ((50, 70, 130), (120, 140, 190))),
    ClassSpec("cork", "pretrain", "noise", ((150, 110, 70), (200, 170, 120))),
    ClassSpec("wallpaper", "pretrain", "checker", ((200, 180, 200), (150, 170, 200))),
    ClassSpec("concrete", "pretrain", "noise", ((120, 120, 120), (170, 170, 165))),
    ClassSpec("wall", "pretrain", "bricks", ((170, 80, 60), (200, 195, 185))),
    ClassSpec("brick", "pretrain", "photo:brick"),
    ClassSpec("grass", "pretrain", "photo:grass"),
    ClassSpec("stone", "pretrain", "photo:moon"),
    ClassSpec("paper", "pretrain", "photo:page"),
    # pre-training objects
    ClassSpec("button", "pretrain", "smooth", ((60, 60, 140), (150, 150, 220)), "disc"),
    ClassSpec("washer", "pretrain", "smooth", ((100, 100, 110), (200, 200, 205)), "ring"),
    ClassSpec("nut", "pretrain", "smooth", ((110, 105, 90), (190, 185, 170)), "hexagon"),
    ClassSpec("pill", "pretrain", "smooth", ((200, 190, 170), (120, 160, 200)), "capsule"),
    ClassSpec("cookie", "pretrain", "noise", ((150, 100, 50), (210, 170, 110)), "disc"),
    ClassSpec("block", "pretrain", "grain", ((140, 90, 60), (200, 160, 110)), "square"),
    ClassSpec("plus", "pretrain", "smooth", ((170, 60, 60), (230, 140, 140)), "cross"),
    ClassSpec("egg", "pretrain", "smooth", ((180, 160, 130), (230, 220, 200)), "ellipse"),
    ClassSpec("chip", "pretrain", "dots", ((60, 110, 70), (170, 200, 160)), "square"),
    ClassSpec("badge", "pretrain", "stripes", ((170, 140, 40), (220, 200, 120)), "hexagon"),
    # method-training classes (never in pre-training)
    ClassSpec("leather", "train", "noise", ((90, 55, 40), (150, 100, 70))),
    ClassSpec("tile", "train", "checker", ((190, 190, 185), (120, 140, 150))),
    ClassSpec("fur", "train", "photo:chelsea"),
    ClassSpec("gear", "train", "smooth", ((90, 100, 110), (180, 185, 190)), "gear"),
    ClassSpec("ring", "train", "smooth", ((170, 140, 50), (230, 210, 130)), "ring"),
    ClassSpec("capsule", "train", "stripes", ((190, 70, 70), (220, 210, 200)), "capsule"),
    # held-out classes (never in pre-training, never used to train methods)
    ClassSpec("honeycomb", "heldout", "honeycomb", ((200, 160, 60), (120, 80, 30))),
    ClassSpec("plaid", "heldout", "plaid", ((150, 50, 50), (80, 110, 70))),
    ClassSpec("gravel", "heldout", "photo:gravel"),
    ClassSpec("star", "heldout", "smooth", ((180, 160, 40), (235, 220, 120)), "star"),
    ClassSpec("triangle", "heldout", "noise", ((70, 130, 160), (150, 200, 220)), "triangle"),
    ClassSpec("clover", "heldout", "smooth", ((60, 130, 60), (150, 210, 140)), "clover"),
)
BY_NAME = {c.name: c for c in CLASSES}


def class_names(split: str) -> list[str]:
    """Names of the classes of one split ("pretrain", "train" or "heldout")."""
    if split not in SPLITS:
        raise ValueError(f"unknown class split {split!r}; expected one of {', '.join(SPLITS)}")
    return [c.name for c in CLASSES if c.split == split]


# --- rendering ---------------------------------------------------------------------------------------


@functools.cache
def photo(name: str) -> np.ndarray:
    """A scikit-image sample photograph as float RGB (H, W, 3) in [0, 255]."""
    import skimage.data

    image = np.asarray(getattr(skimage.data, name)(), dtype=np.float64)
    return np.repeat(image[..., None], 3, axis=-1) if image.ndim == 2 else image[..., :3]


def photo_crop(name: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A random square crop (a quarter to a half of the short side) of a photo, resized to (S, S, 3)."""
    image = photo(name)
    h, w = image.shape[:2]
    side = int(rng.uniform(0.25, 0.5) * min(h, w))
    y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    crop = Image.fromarray(np.uint8(image[y : y + side, x : x + side]))
    out = np.asarray(crop.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float64)
    return out[:, ::-1] if rng.random() < 0.5 else out


def pattern(name: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A procedural pattern value t in [0, 1], (S, S), with random phase, angle and scale."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    u, v = _rotate(xx, yy, *rng.uniform(0, size, 2), rng.uniform(-0.3, 0.3))
    p = size / rng.uniform(5, 8)  # period
    if name == "noise":
        n = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma=rng.uniform(0.8, 2.0))
        t = 0.5 + 0.5 * np.tanh(n / n.std())
    elif name == "grain":
        wave = size / 14 * np.sin(2 * np.pi * u / (0.8 * size) + rng.uniform(0, 2 * np.pi))
        t = 0.5 + 0.5 * np.sin(2 * np.pi * (v + wave) / (p * 0.7))
    elif name == "weave":
        over = (np.floor(u / p) + np.floor(v / p)) % 2 == 0
        t = 0.5 + 0.5 * np.where(over, np.cos(6 * np.pi * v / p), np.cos(6 * np.pi * u / p))
    elif name == "marble":
        n = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma=3)
        t = np.abs(np.sin(2 * np.pi * u / (1.5 * p) + 8 * n / n.std() * 0.3)) ** 0.3
    elif name == "dots":
        t = (np.hypot((u % p) - p / 2, (v % p) - p / 2) > p / 3.5).astype(np.float64)
    elif name == "stripes":
        t = (np.sin(2 * np.pi * u / (p * 0.6)) > 0).astype(np.float64)
    elif name == "checker":
        grout = (np.minimum(u % p, v % p) < 1.5).astype(np.float64)
        t = np.where(grout > 0, 0.0, ((np.floor(u / p) + np.floor(v / p)) % 2) * 0.6 + 0.4)
    elif name == "bricks":
        row = np.floor(v / (p * 0.6))
        shifted = u + (row % 2) * p / 2
        mortar = (np.minimum(shifted % p, v % (p * 0.6)) < 1.5).astype(np.float64)
        t = np.where(mortar > 0, 1.0, 0.15 * (row % 3))
    elif name == "honeycomb":
        t = _hex_edges(u / p, v / p)
    elif name == "plaid":
        t = 0.5 * (np.sin(2 * np.pi * u / p) > 0.3) + 0.5 * (np.sin(2 * np.pi * v / p) > 0.3)
    elif name == "smooth":
        t = 1 - ((xx - size * 0.4) ** 2 + (yy - size * 0.35) ** 2) / (2 * size**2) * 3
    else:
        raise ValueError(f"unknown pattern {name!r}")
    return np.clip(t + rng.normal(0, 0.04, t.shape), 0, 1)


def _hex_edges(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """1 on the edges of a hexagonal grid (cell width 1 in u), 0 inside the cells."""
    q = np.stack([u, u / 2 + v * np.sqrt(3) / 2, -u / 2 + v * np.sqrt(3) / 2])
    frac = np.abs(((q + 0.5) % 1) - 0.5)  # distance to the nearest line of each family
    return (np.sort(frac, axis=0)[1] > 0.38).astype(np.float64)


def shape_region(shape: str, size: int, rng: np.random.Generator, stretch: float = 1.0) -> np.ndarray:
    """Bool (S, S) outline of an object, randomly placed, sized and turned; ``stretch`` ≠ 1 deforms it
    along one axis (the shape-change defect)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    radius = size * rng.uniform(0.3, 0.36)
    cx, cy = size / 2 + rng.uniform(-0.06, 0.06, 2) * size
    u, v = _rotate(xx, yy, cx, cy, rng.uniform(0, 2 * np.pi))
    u, v = u / (radius * stretch), v / radius
    r, theta = np.hypot(u, v), np.arctan2(v, u)
    if shape == "disc":
        return r <= 1
    if shape == "ring":
        return (r <= 1) & (r >= 0.5)
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8
    if shape == "hexagon":
        return _hex_distance(u, v) <= 0.9
    if shape == "capsule":
        return np.hypot(np.clip(np.abs(u) - 0.55, 0, None), v) <= 0.45
    if shape == "gear":
        return r <= 0.82 + 0.18 * np.sign(np.cos(8 * theta))
    if shape == "cross":
        return ((np.abs(u) < 0.33) & (np.abs(v) < 1)) | ((np.abs(v) < 0.33) & (np.abs(u) < 1))
    if shape == "ellipse":
        return np.hypot(u, v / 0.65) <= 1
    if shape == "star":
        return r <= 0.45 + 0.55 * ((np.cos(5 * theta) + 1) / 2) ** 2
    if shape == "triangle":
        return np.max([u * np.cos(a) + v * np.sin(a) for a in (0, 2 * np.pi / 3, 4 * np.pi / 3)], 0) <= 0.5
    if shape == "clover":
        return r <= 0.55 + 0.45 * np.abs(np.cos(1.5 * theta))
    raise ValueError(f"unknown shape {shape!r}")


def _hex_distance(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.max([np.abs(u * np.cos(a) + v * np.sin(a)) for a in (0, np.pi / 3, 2 * np.pi / 3)], 0)


def render_surface(spec: ClassSpec, size: int, rng: np.random.Generator) -> np.ndarray:
    """The class's pattern in its colours (jittered), float (S, S, 3) in [0, 255]."""
    if spec.pattern.startswith("photo:"):
        image = photo_crop(spec.pattern.split(":", 1)[1], size, rng)
        return np.clip(image * rng.uniform(0.85, 1.15) + rng.uniform(-15, 15, 3), 0, 255)
    c0, c1 = (np.array(c) + rng.uniform(-15, 15, 3) for c in spec.palette)
    return c0 + pattern(spec.pattern, size, rng)[..., None] * (c1 - c0)


def render_background(size: int, rng: np.random.Generator) -> np.ndarray:
    """An object's background: a plain colour, a noise pattern or a dimmed photo crop, (S, S, 3)."""
    choice = rng.integers(0, 3)
    colour = rng.uniform(40, 140, 3)
    if choice == 0:
        shade = 1 + 0.15 * (np.arange(size) / size - 0.5)[:, None, None]
        return np.broadcast_to(colour * shade, (size, size, 3)).copy()
    if choice == 1:
        return colour + pattern("noise", size, rng)[..., None] * 30
    crop = photo_crop(BACKGROUND_PHOTOS[rng.integers(0, len(BACKGROUND_PHOTOS))], size, rng)
    return 0.3 * crop + 0.5 * colour


@dataclass
class Scene:
    """A normal image and what a defect needs to know: the object region and its background."""

    image: np.ndarray  # float (S, S, 3)
    region: np.ndarray  # bool (S, S): where defects may go (all True for textures)
    background: np.ndarray | None  # objects: the background alone (S, S, 3)
    seed: int  # renders the same scene again (shape changes)


def render_scene(spec: ClassSpec, size: int, seed: int, stretch: float = 1.0) -> Scene:
    """The normal image of a class drawn from ``seed`` (``stretch`` ≠ 1 deforms an object's outline)."""
    rng = np.random.default_rng(seed)
    surface = render_surface(spec, size, rng)
    if spec.shape is None:
        return Scene(surface, np.ones((size, size), bool), None, seed)
    background = render_background(size, rng)
    region = shape_region(spec.shape, size, rng, stretch)
    soft = ndimage.gaussian_filter(region.astype(np.float64), 0.6)[..., None]
    return Scene(soft * surface + (1 - soft) * background, region, background, seed)


# --- defects -----------------------------------------------------------------------------------------


def draw_defect(
    spec: ClassSpec, scene: Scene, kind: str, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, str]:
    """(defective uint8 image (S, S, 3), exact bool mask (S, S), defect type) for one defect in ``scene``.

    The mask holds the pixels that changed by at least `MIN_CONTRAST` grey levels in some channel, so it
    is exact. A defect that changes fewer than `MIN_DEFECT_AREA` of the pixels is drawn again elsewhere;
    after `TRIES` failures (e.g. a swirl in a low-contrast texture) a stain is drawn instead and its
    type returned.
    """
    size = scene.image.shape[0]
    clean = np.rint(np.clip(scene.image, 0, 255))
    for attempt in range(2 * TRIES):
        drawn = kind if attempt < TRIES else "stain"
        altered, where = _alter(spec, scene, drawn, rng)
        altered = np.rint(np.clip(altered, 0, 255))
        mask = where & (np.abs(altered - clean).max(axis=-1) >= MIN_CONTRAST)
        if mask.sum() >= MIN_DEFECT_AREA * size * size:
            return np.where(mask[..., None], altered, clean).astype(np.uint8), mask, drawn
    raise RuntimeError(f"could not draw a visible defect on {spec.name}")


def _alter(
    spec: ClassSpec, scene: Scene, kind: str, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """The image with a defect everywhere it may show, and where it is (before the contrast check)."""
    image, region, size = scene.image, scene.region, scene.image.shape[0]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    ys, xs = np.nonzero(region)
    at = int(rng.integers(0, len(ys)))
    u, v = _rotate(xx, yy, float(xs[at]), float(ys[at]), rng.uniform(0, np.pi))

    def length(lo: float, hi: float) -> float:
        return float(rng.uniform(lo, hi) * size)

    def blob(lo: float, hi: float) -> np.ndarray:
        one = np.ones((1, 1, 1))
        return _blob_radius(u[None], v[None], length(lo, hi) * one, length(lo, hi) * one, rng)[0]

    if kind == "scratch":
        bend = rng.choice([-1, 1]) * rng.uniform(0.3, 0.9)
        d1 = _segment_distance(u, v, np.array(-length(0.2, 0.4)), 0.0)
        d2 = _segment_distance(*_rotate(u, v, 0.0, 0.0, bend), np.array(length(0.2, 0.4)), 0.0)
        where = np.minimum(d1, d2) <= length(0.015, 0.03)
        return np.broadcast_to(rng.uniform(235, 255), image.shape), where & region
    if kind == "stain":
        colour = np.eye(3)[rng.integers(0, 3)] * 255 if rng.random() < 0.5 else rng.uniform(0, 255, 3)
        alpha = rng.uniform(0.6, 0.85)
        return image + alpha * (colour - image), (blob(0.08, 0.18) <= 1) & region
    if kind == "hole":
        radius = blob(0.07, 0.15)
        dark = np.broadcast_to((5 + 15 * np.clip(radius, 0, 1))[..., None], image.shape)  # darkest inside
        return dark, (radius <= 1) & region
    if kind == "crack":
        where = np.zeros((size, size), bool)
        x, y, angle = float(xs[at]), float(ys[at]), rng.uniform(0, 2 * np.pi)
        for _ in range(int(rng.integers(6, 10))):
            step = length(0.05, 0.1)
            angle += rng.uniform(-0.8, 0.8)
            nx, ny = x + step * np.cos(angle), y + step * np.sin(angle)
            cu, cv = _rotate(xx, yy, x, y, angle)
            where |= _segment_distance(cu, cv, np.array(step), 0.0) <= size * 0.012 + 0.5
            x, y = nx, ny
        return image * rng.uniform(0.1, 0.3), where & region
    if kind == "colour":
        up = int(rng.integers(0, 3))
        down = (up + int(rng.integers(1, 3))) % 3
        shift = 90 * (np.eye(3)[up] - np.eye(3)[down])
        box = (np.abs(u) <= length(0.08, 0.2)) & (np.abs(v) <= length(0.08, 0.2))
        return image + shift, box & region
    if kind == "missing":
        where = blob(0.12, 0.2) <= 1
        if scene.background is not None:  # a bite out of the object
            return scene.background, where & region
        return np.broadcast_to(image.mean(axis=(0, 1)) * rng.uniform(0.3, 0.6), image.shape), where
    if kind == "shape":
        if scene.background is not None:  # the same object, stretched along one axis
            stretch = rng.choice([rng.uniform(0.6, 0.75), rng.uniform(1.3, 1.45)])
            warped = render_scene(spec, size, scene.seed, stretch)
            changed = warped.region != region
            return warped.image, ndimage.binary_dilation(changed)
        # textures: a local swirl of the pattern
        cx, cy = float(xs[at]), float(ys[at])
        dx, dy = xx - cx, yy - cy
        radius = length(0.12, 0.2)
        inside = np.hypot(dx, dy) < radius
        twist = rng.choice([-1, 1]) * 2.5 * np.clip(1 - np.hypot(dx, dy) / radius, 0, 1) ** 2
        sx = np.clip(np.rint(cx + np.cos(twist) * dx - np.sin(twist) * dy), 0, size - 1).astype(int)
        sy = np.clip(np.rint(cy + np.sin(twist) * dx + np.cos(twist) * dy), 0, size - 1).astype(int)
        return image[sy, sx], inside
    if kind == "misplaced":
        side = int(length(0.18, 0.3))
        y0 = int(np.clip(ys[at] - side // 2, 0, size - side))
        x0 = int(np.clip(xs[at] - side // 2, 0, size - side))
        ty, tx = (int(rng.integers(0, size - side + 1)) for _ in range(2))
        piece = np.rot90(image[y0 : y0 + side, x0 : x0 + side], k=int(rng.integers(1, 4)))
        out, where = image.copy(), np.zeros((size, size), bool)
        if scene.background is not None:  # a piece of the object leaves a gap where it was
            source = region & _square(size, y0, x0, side)
            out = np.where(source[..., None], scene.background, out)
            where |= source
        out[ty : ty + side, tx : tx + side] = piece
        where |= _square(size, ty, tx, side)
        return out, where
    raise ValueError(f"unknown defect type {kind!r}")


def _square(size: int, y: int, x: int, side: int) -> np.ndarray:
    out = np.zeros((size, size), bool)
    out[y : y + side, x : x + side] = True
    return out


# --- captions and batches ----------------------------------------------------------------------------


@functools.cache
def _random_words() -> tuple[str, ...]:
    """Whole words of the CLIP tokenizer's vocabulary that no caption state or held-out class uses."""
    from open_clip.tokenizer import SimpleTokenizer

    reserved = {c.name for c in CLASSES if c.split != "pretrain"} | {"object"}
    for phrase in (*WINCLIP_NORMAL_STATES, *WINCLIP_ANOMALOUS_STATES, *sum(DEFECT_STATES.values(), ())):
        reserved |= set(phrase.replace("{}", " ").split())
    words = sorted(
        w[:-4] for w in SimpleTokenizer().encoder if w.endswith("</w>") and w[:-4].isalpha() and len(w) > 6
    )
    return tuple(w for w in words if w not in reserved)


def caption(word: str, kind: str | None, rng: np.random.Generator) -> tuple[str, str, str]:
    """A caption of an image of class ``word``, normal when ``kind`` is None, else with that defect.

    Returns (caption, class key, state key): the class key is ``word`` or "*" when the caption's class
    word is "object" or a random word; the state key is "good", "anomalous" (a generic state) or the
    defect type.
    """
    roll, key = rng.random(), word
    if roll < P_OBJECT_WORD:
        word, key = "object", "*"
    elif roll < P_OBJECT_WORD + P_RANDOM_WORD:
        words = _random_words()
        word, key = words[int(rng.integers(0, len(words)))], "*"
    if kind is None:
        states, state_key = WINCLIP_NORMAL_STATES, "good"
    elif rng.random() < P_SPECIFIC_STATE:
        states, state_key = DEFECT_STATES[kind], kind
    else:
        states, state_key = WINCLIP_ANOMALOUS_STATES, "anomalous"
    state = states[int(rng.integers(0, len(states)))]
    return TEMPLATES[int(rng.integers(0, len(TEMPLATES)))].format(state.format(word)), key, state_key


@dataclass
class Pairs:
    """A batch of image–caption pairs. ``match[i, j]``: caption j describes image i (its class or a
    class-agnostic word, and its state), so a contrastive loss can count it as a positive."""

    images: np.ndarray  # uint8 (N, S, S, 3)
    captions: list[str]
    match: np.ndarray  # bool (N images, N captions); the diagonal is True
    masks: np.ndarray  # bool (N, S, S)


def sample_pairs(seed: int, index: int, n: int, size: int, classes: Sequence[str]) -> Pairs:
    """Batch ``index`` of a pre-training stream: n/2 scenes, each as a normal and a defective image
    (a pair that differs only by the defect and by the state words of its caption). Deterministic."""
    if n % 2:
        raise ValueError(f"batch size must be even, got {n}")
    rng = np.random.default_rng([seed, index])
    images, captions, masks, image_keys, caption_keys = [], [], [], [], []
    for _ in range(n // 2):
        spec = BY_NAME[classes[int(rng.integers(0, len(classes)))]]
        scene = render_scene(spec, size, int(rng.integers(0, 2**63)))
        kind = DEFECT_TYPES[int(rng.integers(0, len(DEFECT_TYPES)))]
        defective, mask, kind = draw_defect(spec, scene, kind, rng)
        images += [np.rint(np.clip(scene.image, 0, 255)).astype(np.uint8), defective]
        masks += [np.zeros_like(mask), mask]
        for state in (None, kind):
            text, class_key, state_key = caption(spec.name, state, rng)
            captions.append(text)
            caption_keys.append((class_key, state_key))
            image_keys.append((spec.name, state or "good"))
    match = np.array([[_matches(i, c) for c in caption_keys] for i in image_keys])
    return Pairs(np.stack(images), captions, match, np.stack(masks))


def _matches(image: tuple[str, str], text: tuple[str, str]) -> bool:
    """Whether a caption (class key, state key) describes an image (class, "good" or defect type)."""
    same_class = text[0] in ("*", image[0])
    if text[1] == "anomalous":
        return same_class and image[1] != "good"
    return same_class and text[1] == image[1]


def write_transfer(folder: Path, n: int, size: int, seed: int) -> None:
    """The method-training and held-out classes as an MVTec-AD-style dataset in ``folder``, plus
    ``index.json``: per class, n normal train images, n normal and n defective test images (defect
    types balanced), masks under ground_truth/. Pre-training classes are not written."""
    records = []
    for ci, spec in enumerate(c for c in CLASSES if c.split != "pretrain"):
        rng = np.random.default_rng([seed, ci])
        for part in ("train", "test"):
            for i in range(n):
                scene = render_scene(spec, size, int(rng.integers(0, 2**63)))
                rel = f"{spec.name}/{part}/good/{i:03d}.png"
                _write_png(folder / rel, np.rint(np.clip(scene.image, 0, 255)).astype(np.uint8))
                records.append(_record(rel, 0, spec.name, None, "good", part))
        for i in range(n):
            scene = render_scene(spec, size, int(rng.integers(0, 2**63)))
            image, mask, kind = draw_defect(spec, scene, DEFECT_TYPES[i % len(DEFECT_TYPES)], rng)
            rel = f"{spec.name}/test/{kind}/{i:03d}.png"
            mask_rel = f"{spec.name}/ground_truth/{kind}/{i:03d}_mask.png"
            _write_png(folder / rel, image)
            _write_png(folder / mask_rel, mask.astype(np.uint8) * 255)
            records.append(_record(rel, 1, spec.name, mask_rel, kind, "test"))
    (folder / "index.json").write_text(json.dumps({"records": records}, indent=1))


def _record(path: str, label: int, class_name: str, mask: str | None, defect: str, part: str) -> dict:
    return {
        "path": path,
        "label": label,
        "class_name": class_name,
        "mask_path": mask,
        "meta": {"defect": defect, "set": part, "split": BY_NAME[class_name].split},
    }
