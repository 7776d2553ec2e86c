"""Built-in methods; importing this package registers them."""

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
