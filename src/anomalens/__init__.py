"""anomalens: vision-language (CLIP-based) anomaly detection and segmentation.

The top-level names are resolved on first use (PEP 562): ``import anomalens`` and ``import anomalens.metrics``
load neither torch nor open_clip; ``anomalens.create`` and friends import the methods when first touched.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from anomalens._version import __version__

# public name -> module that defines it
_LAZY = {
    "Prediction": "anomalens.methods",
    "create": "anomalens.methods",
    "list_methods": "anomalens.methods",
    "load": "anomalens.methods",
    "data": "anomalens.data",
    "methods": "anomalens.methods",
    "metrics": "anomalens.metrics",
    "OnnxModel": "anomalens.onnx_model",
}

__all__ = ["OnnxModel", "Prediction", "__version__", "create", "data", "list_methods", "load", "metrics"]

if TYPE_CHECKING:
    from anomalens import data, metrics
    from anomalens.methods import Prediction, create, list_methods, load
    from anomalens.onnx_model import OnnxModel


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'anomalens' has no attribute {name!r}")
    value = importlib.import_module(module)
    if module != f"anomalens.{name}":
        value = getattr(value, name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
