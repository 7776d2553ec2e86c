"""Detection methods: one module per method, each registering itself with `@register`.

`list_methods`, `create` and `load` import every module of this package on first use (no import list
to edit); `import anomalens.methods` alone loads no method module.
"""

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
