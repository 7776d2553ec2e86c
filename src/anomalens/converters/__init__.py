"""Converters from official checkpoints to anomalens methods.

Each module ``converters/<source>.py`` exposes ``convert(path, **build_options) -> Method``: it reads the
official file (``torch.load(..., weights_only=True)``), builds our method and loads the mapped tensors.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from anomalens.methods.base import Method

# Official source (the `anomalens convert --from` choices) -> converter module.
SOURCES = {"aa-clip": "aa_clip", "adaclip": "adaclip", "crane": "crane", "inctrl": "inctrl"}


def convert(source: str, path: str, **build_options) -> Method:
    """Build our method from the official checkpoint at `path` (`source` names the official repo)."""
    if source not in SOURCES:
        raise ValueError(f"unknown converter source {source!r}; available: {', '.join(sorted(SOURCES))}")
    module = importlib.import_module(f"anomalens.converters.{SOURCES[source]}")
    return module.convert(path, **build_options)
