"""Everything that touches CLIP / DINOv2 internals: frozen backbones with per-layer extension points.

See ``docs/backbones.md`` for the API summary.
"""

from anomalens.backbones import attention
from anomalens.backbones.clip import ClipBackbone, EAttnSpec, VisualOutput, load_clip, window_indices
from anomalens.backbones.dino import DinoBackbone, load_dino
from anomalens.backbones.registry import (
    DEFAULT_DINO,
    TEST_TINY,
    TEST_TINY_DINO,
    WeightsUnavailableError,
    list_backbones,
    map_layer,
    map_layers,
    register_clip_configs,
    resolve_device,
    resolve_pretrained,
)

__all__ = [
    "DEFAULT_DINO",
    "TEST_TINY",
    "TEST_TINY_DINO",
    "ClipBackbone",
    "DinoBackbone",
    "EAttnSpec",
    "VisualOutput",
    "WeightsUnavailableError",
    "attention",
    "list_backbones",
    "load_clip",
    "load_dino",
    "map_layer",
    "map_layers",
    "register_clip_configs",
    "resolve_device",
    "resolve_pretrained",
    "window_indices",
]
