"""Built-in methods; importing this package registers them."""

import importlib

from anomalens.methods.base import (
    Method,
    Prediction,
    Stage,
    TrainBatch,
    TrainConfig,
    create,
    list_methods,
    load,
    register,
)

# Method modules; each registers itself on import.
_MODULES = ("winclip", "april_gan", "patchcore", "anomalyclip", "aa_clip", "crane", "inctrl", "core_clip")

for _name in _MODULES:
    try:
        importlib.import_module(f"anomalens.methods.{_name}")
    except ModuleNotFoundError as _e:  # a method still being written in this tree
        if _e.name != f"anomalens.methods.{_name}":
            raise

__all__ = [
    "Method",
    "Prediction",
    "Stage",
    "TrainBatch",
    "TrainConfig",
    "create",
    "list_methods",
    "load",
    "register",
]
