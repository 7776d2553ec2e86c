"""The method protocol every detector implements, the registry, and checkpoint save/load.

A method is an ``nn.Module`` holding a frozen backbone plus its own (possibly trainable) parts. The base
class owns everything that is the same for all methods: input conversion, batching, support caching,
upsampling maps to each input's resolution, saving and loading. A method implements ``forward_batch``
(and ``prepare_support`` if it is few-shot, ``training_stages`` if it learns).

The typed contracts (`Prediction`, `TrainConfig`, `TrainBatch`, `Stage`) live in `anomalens.contracts`,
below both this module and the training engine, and are re-exported here. ``fit`` imports the engine on
first use (STYLE: inference does not load training code); the engine never imports `methods/`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import zlib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from anomalens.contracts import (
    FROZEN_PREFIXES,
    BatchPrediction,
    Prediction,
    Stage,
    TrainBatch,
    TrainConfig,
    TrainProgress,
    override_schedule,
)
from anomalens.data.types import Dataset, Sample
from anomalens.files import atomic_path
from anomalens.ops import resolve_device
from anomalens.prompts import ensemble_text_features

__all__ = [  # the training contract and `Prediction` are re-exported from `anomalens.contracts`
    "DEFAULT",
    "FROZEN_PREFIXES",
    "BatchPrediction",
    "Method",
    "Prediction",
    "Stage",
    "TrainBatch",
    "TrainConfig",
    "TrainProgress",
    "create",
    "list_methods",
    "load",
    "method_class",
    "read_checkpoint",
    "register",
]

_REGISTRY: dict[str, type[Method]] = {}

# Sentinel: "the method's own default pretrained tag".
DEFAULT = "default"
FORMAT_VERSION = 1


def register(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: make a method reachable by name through `create` and `list_methods`."""

    def wrap(cls: type[Method]) -> type[Method]:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def list_methods() -> list[str]:
    """Names of all registered methods, sorted."""
    _discover()
    return sorted(_REGISTRY)


@functools.cache
def _discover() -> None:
    """Import every module of the `anomalens.methods` package once; each registers its method(s).

    A new method is one file in `methods/`: no import list to edit. Modules whose name starts with an
    underscore are skipped (private helpers); `anomalens.catalog` reads the same modules without
    importing them, for `anomalens list`."""
    import importlib

    from anomalens.catalog import method_modules

    for module in method_modules():
        importlib.import_module(f"{__package__}.{module}")


def method_class(name: str) -> type[Method]:
    names = list_methods()
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(names)}")
    return _REGISTRY[name]


ImageLike = np.ndarray | str | os.PathLike


class Method(nn.Module):
    """Base class of all detectors. Subclasses set `config_class` and implement `forward_batch`."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type] = object
    default_backbone: ClassVar[str] = "ViT-L-14-336"
    default_pretrained: ClassVar[str | None] = "openai"
    needs_support: ClassVar[bool] = False
    # Training-stage defaults: a frozen dataclass with one `TrainConfig` field per stage, next to the
    # config class (None = nothing to train); `trainable` is derived from it.
    schedule_class: ClassVar[type | None] = None
    trainable: ClassVar[bool] = False
    # Which backbone family `build` loads: "clip" (open_clip names, `test-tiny`) or "dino" (timm DINOv2
    # names, `test-tiny-dino`).
    backbone_kind: ClassVar[str] = "clip"
    # A set-level method scores the images of one `predict` call against each other (MuSc): an image's
    # score depends on the set, but not on the set's order nor on `batch_size`.
    set_level: ClassVar[bool] = False
    resize: ClassVar[str] = "squash"  # squash | short_side_crop
    pos_interp: ClassVar[str] = "bicubic"
    # What `train --shots N` means (`data.shot_subset`): "per_label" = N normal + N anomalous images per
    # class, "per_class" = N per class at 1:1 (AA-CLIP), "support" = no training subset (the K-shot of
    # a few-shot method is its support at evaluation).
    shot_semantics: ClassVar[str] = "per_label"

    def __init_subclass__(cls, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        cls.trainable = cls.schedule_class is not None

    def __init__(self, config: Any, backbone: nn.Module):
        super().__init__()
        self.config = config
        self.backbone = backbone
        # The stage configs training uses: the defaults, with a recipe's overrides (`recipes.apply`),
        # or what the last `fit` trained with, or what a loaded model file records.
        self.schedule: Any = None if self.schedule_class is None else self.schedule_class()
        self.threshold: float | None = None
        self.recipe: dict[str, Any] | None = None  # the training recipe (`anomalens.recipes`), if any
        self._support_key: str | None = None
        self._support_ctx: Any = None
        self._anchor_cache: dict[str, torch.Tensor] = {}
        self._anchor_key: tuple[float, ...] = ()

    # ------------------------------------------------------------------ construction
    @classmethod
    def make_config(cls, **options: Any) -> Any:
        """The method's config dataclass with `options` applied; unknown names are a clear error."""
        valid = {f.name for f in dataclasses.fields(cls.config_class)}
        unknown = sorted(set(options) - valid)
        if unknown:
            raise ValueError(
                f"unknown option(s) for {cls.name}: {', '.join(unknown)}; valid: {', '.join(sorted(valid))}"
            )
        config = cls.config_class()
        fields = {f.name: f for f in dataclasses.fields(cls.config_class)}
        # JSON round trips turn tuples into lists; restore the declared container type.
        coerced = {
            k: tuple(v) if isinstance(v, list) and isinstance(getattr(config, k), tuple) else v
            for k, v in options.items()
            if k in fields
        }
        return dataclasses.replace(config, **coerced)

    @classmethod
    def image_size(cls, config: Any, backbone: str) -> int | None:
        """Input size for `backbone` (None = the backbone's native size)."""
        return getattr(config, "image_size", None)

    @classmethod
    def backbone_options(cls, config: Any) -> dict[str, Any]:
        """Extra `load_clip` arguments a method derives from its config (e.g. ``quick_gelu``)."""
        return {}

    @classmethod
    def build(
        cls,
        backbone: str | None = None,
        pretrained: str | None = DEFAULT,
        device: str = "auto",
        **options: Any,
    ) -> Method:
        from anomalens.backbones import load_clip

        config = cls.make_config(**options)
        name = backbone or cls.default_backbone
        tag = cls.default_pretrained if pretrained == DEFAULT else pretrained
        dev = resolve_device(device)
        clip = load_clip(
            name,
            tag,
            image_size=cls.image_size(config, name),
            pos_interp=cls.pos_interp,
            **cls.backbone_options(config),
        )
        method = cls(config, clip)
        return method.to(dev).eval()

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    @property
    def precision(self) -> str:
        return getattr(self.backbone, "precision", "fp32")

    def set_precision(self, precision: str) -> Method:
        """Inference precision of the image tower: "fp32", "bf16" (autocast), "fp16" (GPU autocast) or
        "int8" (CPU, dynamic quantisation); text features, heads and scores stay float32
        (`ClipBackbone.set_precision`). Backbones without it (DINO) run fp32 only. Returns self."""
        if hasattr(self.backbone, "set_precision"):
            self.backbone.set_precision(precision)
        elif precision != "fp32":
            raise ValueError(f"method {self.name!r} runs in fp32 only (precision {precision!r} given)")
        return self

    # ------------------------------------------------------------------ inference
    def forward_batch(self, images: torch.Tensor, class_names: list[str], support: Any) -> BatchPrediction:
        """(B,3,S,S) normalised images → scores (B,), maps (B,h,w) at any model resolution and any
        per-image (B,) extras (returned in `Prediction.extras`)."""
        raise NotImplementedError

    def prepare_support(self, images: torch.Tensor) -> Any:
        """Per-support-set context (e.g. cached support features) from (K,3,S,S) images."""
        return images

    @torch.no_grad()
    def predict(
        self,
        images: np.ndarray | Sequence[ImageLike],
        class_names: str | Sequence[str] | None = None,
        support: Sequence[ImageLike] | np.ndarray | None = None,
        batch_size: int = 16,
        *,
        pixels: torch.Tensor | None = None,
    ) -> Prediction:
        """Score and segment `images` (uint8 (B,H,W,3), a list of arrays of any size, or paths).

        pixels: ``input_pixels(images)`` when already computed (e.g. in a data loader worker, see
        `anomalens.inference`); the images are then not resized again here.
        """
        arrays = to_arrays(images, "images")
        pixels = checked_pixels(pixels, len(arrays))
        names = broadcast_class_names(class_names, len(arrays))
        if self.needs_support and support is None:
            raise ValueError(f"method {self.name!r} needs support=[K normal images of the class]")
        ctx = self._support_context(to_arrays(support, "support")) if support is not None else None
        self.eval()
        parts = []
        for start in range(0, len(arrays), batch_size):
            chunk = arrays[start : start + batch_size]
            if pixels is None:
                x = self.backbone.preprocess(chunk, resize=self.resize).to(self.device)
            else:  # the same values: preprocess = normalize(pixels(...))
                x = self.backbone.normalize(pixels[start : start + batch_size]).to(self.device)
            out = self.forward_batch(x, names[start : start + batch_size], ctx)
            if not isinstance(out, BatchPrediction):
                got = type(out).__name__
                raise TypeError(
                    f"{type(self).__name__}.forward_batch must return a BatchPrediction, not {got}"
                )
            extras = {k: v.detach().double().cpu().numpy() for k, v in out.extras.items()}
            sized = resize_maps(out.maps.float(), [a.shape[:2] for a in chunk], self.resize)
            scores = out.scores.float().cpu().numpy()
            parts.append(Prediction(scores, [self.finish_map(a) for a in sized], extras))
        return Prediction.concat(parts)

    def input_pixels(self, images: Sequence[np.ndarray]) -> torch.Tensor | None:
        """uint8 (B, 3, S, S) on the CPU: `images` resized to the model's input as `predict` does, before
        normalisation (the part of preprocessing a data loader worker can do); None when the backbone
        has no separate resize step (`pixels`, `normalize`)."""
        if not hasattr(self.backbone, "pixels"):
            return None
        return self.backbone.pixels(images, resize=self.resize)

    def finish_map(self, amap: np.ndarray) -> np.ndarray:
        """Last step on each (H, W) map at its image's own resolution (after `resize_maps`); identity
        unless a method smooths at full resolution as its official code does (AnomalyDINO)."""
        return amap

    def support_images(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """The images the support context is built from, before preprocessing (default: the support
        itself; AnomalyDINO adds rotated copies)."""
        return arrays

    def _support_context(self, arrays: list[np.ndarray]) -> Any:
        digest = hashlib.sha1()
        for a in arrays:
            digest.update(str(a.shape).encode())
            digest.update(np.ascontiguousarray(a).tobytes())
        key = digest.hexdigest()
        if key != self._support_key:
            x = self.backbone.preprocess(self.support_images(arrays), resize=self.resize).to(self.device)
            self._support_ctx = self.prepare_support(x)
            self._support_key = key
        return self._support_ctx

    @torch.no_grad()
    def cached_anchors(
        self,
        class_names: Sequence[str],
        compute: Callable[[list[str]], torch.Tensor],
        depends_on: Iterable[torch.Tensor] = (),
    ) -> torch.Tensor:
        """Per-class text anchors of each name, (B, ...) on the method's device.

        ``compute(names)`` gives the (C, ...) anchors of the names not cached yet; it runs once per class
        name, without gradient and in full precision (outside autocast: the anchors are reused outside
        it), and is stored in float32 (float64 in a ``.double()`` model). The cache is emptied when the
        tensors in ``depends_on`` (the learned text weights the anchors come from) change, which
        `weights_fingerprint` detects.
        """
        key = weights_fingerprint(depends_on)
        if key != self._anchor_key:
            self._anchor_cache, self._anchor_key = {}, key
        missing = sorted(set(class_names) - set(self._anchor_cache))
        if missing:
            with torch.autocast(self.device.type, enabled=False):
                wide = any(p.dtype == torch.float64 for p in self.parameters())
                dtype = torch.float64 if wide else torch.float32
                self._anchor_cache.update(zip(missing, compute(missing).to(dtype), strict=True))
        return torch.stack([self._anchor_cache[c] for c in class_names]).to(self.device)

    def prompt_anchors(
        self, class_names: Sequence[str], prompts: Callable[[str], tuple[list[str], list[str]]]
    ) -> torch.Tensor:
        """(B, 2, E) unit-norm [normal, anomalous] anchors of the frozen text tower, cached per class:
        each side is the re-normalised mean of its prompts' normalised embeddings
        (`prompts.ensemble_text_features`); ``prompts(name)`` gives the (normal, anomalous) prompts."""

        def encode(texts: list[str]) -> torch.Tensor:
            return self.backbone.encode_text(self.backbone.tokenize(texts))

        def compute(names: list[str]) -> torch.Tensor:
            pairs = [[ensemble_text_features(encode, side) for side in prompts(n)] for n in names]
            return torch.stack([torch.stack(pair) for pair in pairs])  # (C, 2, E)

        return self.cached_anchors(class_names, compute)

    def set_scores(self, prediction: Prediction, class_names: Sequence[str]) -> np.ndarray:
        """Image scores for a whole evaluated set; methods whose tables normalise per class override."""
        return prediction.scores

    # ------------------------------------------------------------------ training
    def training_stages(self) -> list[Stage]:
        return []

    def collate(self, samples: list[Sample], augment: bool) -> TrainBatch:
        """Default collation: preprocess images and masks at the model's input size."""
        images = self.backbone.preprocess([s.image for s in samples], resize=self.resize)
        size = images.shape[-2:]
        masks = torch.zeros((len(samples), *size))
        has_mask = torch.zeros(len(samples), dtype=torch.bool)
        for i, s in enumerate(samples):
            if s.mask is not None:
                masks[i] = self.backbone.preprocess_masks([s.mask], resize=self.resize)[0]
                has_mask[i] = True
            elif s.label == 0:
                has_mask[i] = True  # a normal image's mask is known to be empty
        subject = None
        if any(s.subject_mask is not None for s in samples):
            subject = torch.stack(
                [
                    self.backbone.preprocess_masks([s.subject_mask], resize=self.resize)[0]
                    if s.subject_mask is not None
                    else torch.ones(size)
                    for s in samples
                ]
            )
        labels = torch.tensor([s.label for s in samples], dtype=torch.long)
        return TrainBatch(images, masks, labels, has_mask, [s.class_name for s in samples], subject)

    def fit(self, dataset: Dataset, **train_options: Any) -> dict:
        """Train the method's stages on `dataset` (see `anomalens.engine.train_method` for options)."""
        if not self.training_stages():
            raise ValueError(f"method {self.name!r} has nothing to train")
        from anomalens.engine import train_method

        return train_method(self, dataset, **train_options)

    # ------------------------------------------------------------------ persistence
    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Everything learned (parameters and buffers), never the frozen backbones."""
        return {
            k: v.detach().cpu().contiguous()
            for k, v in self.state_dict().items()
            if not k.startswith(FROZEN_PREFIXES)
        }

    def describe(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "method": self.name,
            "backbone": self.backbone.name,
            "pretrained": self.backbone.pretrained,
            "options": json_safe(dataclasses.asdict(self.config)),
            "threshold": self.threshold,
            "recipe": self.recipe,
            "schedule": None if self.schedule is None else json_safe(dataclasses.asdict(self.schedule)),
            "version": _version(),
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write learned tensors (safetensors) with the JSON config in its header; atomic."""
        from safetensors.torch import save_file

        state = self.trainable_state() or {"_empty": torch.zeros(0)}
        with atomic_path(path) as tmp:
            save_file(state, tmp, metadata={"anomalens": json.dumps(self.describe())})
        return Path(path)


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(description, tensors) of a file written by `Method.save`; errors name the file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys() if k != "_empty"}  # noqa: SIM118
    except Exception as e:  # safetensors raises several types for corrupt headers
        raise ValueError(f"{path}: not an anomalens checkpoint ({e})") from None
    if "anomalens" not in meta:
        raise ValueError(f"{path}: not an anomalens checkpoint (no 'anomalens' metadata)")
    return json.loads(meta["anomalens"]), tensors


def load(path: str | os.PathLike, device: str = "auto", pretrained: str | None = DEFAULT) -> Method:
    """Rebuild a saved method (its backbone is loaded again by name; its weights are not stored)."""
    desc, tensors = read_checkpoint(path)
    cls = method_class(desc["method"])
    tag = desc["pretrained"] if pretrained == DEFAULT else pretrained
    method = cls.build(desc["backbone"], tag, device=device, **desc["options"])
    missing, unexpected = method.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if not k.startswith(FROZEN_PREFIXES)]
    if missing or unexpected:
        raise ValueError(
            f"{path}: checkpoint does not match {desc['method']} (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]})"
        )
    method.threshold = desc.get("threshold")
    method.recipe = desc.get("recipe")
    if desc.get("schedule") and method.schedule is not None:
        recorded = desc["schedule"]
        overrides = {f"{stage}.{k}": v for stage, values in recorded.items() for k, v in values.items()}
        try:
            method.schedule = override_schedule(method.schedule, overrides)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None
    return method.to(resolve_device(device)).eval()


def create(
    name: str,
    backbone: str | None = None,
    pretrained: str | None = DEFAULT,
    device: str = "auto",
    **options: Any,
) -> Method:
    """Build a registered method, e.g. ``create("crane", backbone="ViT-L-14-336", pretrained="openai")``."""
    return method_class(name).build(backbone, pretrained, device=device, **options)


# ---------------------------------------------------------------------- helpers


def weights_fingerprint(tensors: Iterable[torch.Tensor]) -> tuple[tuple[str, tuple[int, ...], int], ...]:
    """Content key of some weights, to invalidate caches: per tensor its dtype, shape and the CRC-32 of
    its bytes (one pass over memory: 8x cheaper than sums of squares in float64, and exact)."""
    key = []
    for t in tensors:
        data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        key.append((str(t.dtype), tuple(t.shape), zlib.crc32(data)))
    return tuple(key)


def to_arrays(images: Any, argument: str) -> list[np.ndarray]:
    """Accept uint8 (B,H,W,3), (H,W,3), a list of arrays, or paths; return a list of (H,W,3) uint8."""
    from anomalens.data import read_image

    if isinstance(images, np.ndarray):
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"{argument}: expected uint8 (B,H,W,3) RGB, got shape {images.shape}")
        images = list(images)
    elif isinstance(images, (str, os.PathLike)):
        images = [images]
    out = []
    for i, item in enumerate(images):
        if isinstance(item, (str, os.PathLike)):
            out.append(read_image(item))
            continue
        a = np.asarray(item)
        if a.ndim != 3 or a.shape[-1] != 3:
            raise ValueError(f"{argument}[{i}]: expected (H,W,3) RGB, got shape {a.shape}")
        if a.dtype != np.uint8:
            raise ValueError(f"{argument}[{i}]: expected uint8 pixels, got {a.dtype}")
        out.append(a)
    if not out:
        raise ValueError(f"{argument}: no images given")
    return out


def checked_pixels(pixels: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """`pixels` (the ``pixels`` argument of `Method.predict`) when it holds one uint8 image per input."""
    if pixels is not None and (pixels.dtype != torch.uint8 or pixels.ndim != 4 or len(pixels) != n):
        raise ValueError(
            f"pixels: expected uint8 (B,3,S,S) for {n} images, got {pixels.dtype} {tuple(pixels.shape)}"
        )
    return pixels


def broadcast_class_names(class_names: str | Sequence[str] | None, n: int) -> list[str]:
    if class_names is None:
        return ["object"] * n
    if isinstance(class_names, str):
        return [class_names] * n
    names = list(class_names)
    if len(names) == 1:
        return names * n
    if len(names) != n:
        raise ValueError(f"class_names: got {len(names)} names for {n} images")
    return names


def resize_maps(
    maps: torch.Tensor, sizes: Sequence[tuple[int, int]], resize: str = "squash"
) -> list[np.ndarray]:
    """Bring each (h,w) model-resolution map back onto its image's (H,W) pixels.

    "squash": bilinear resize to (H,W). "short_side_crop": the model saw the centred min(H,W) square,
    so the map is resized to that square and placed there; pixels outside it were never seen and get
    the map's minimum (the least anomalous value).
    """
    out = []
    for m, (height, width) in zip(maps, sizes, strict=True):
        if resize == "short_side_crop" and height != width:
            side = min(height, width)
            square = _bilinear(m, (side, side))
            full = torch.full((height, width), float(square.min()), dtype=square.dtype, device=square.device)
            top, left = (height - side) // 2, (width - side) // 2
            full[top : top + side, left : left + side] = square
        else:
            full = _bilinear(m, (height, width))
        out.append(full.cpu().numpy().astype(np.float32))
    return out


def _bilinear(m: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(m.shape) == size:
        return m
    return F.interpolate(m[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]


def json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _version() -> str:
    from anomalens._version import __version__

    return __version__
