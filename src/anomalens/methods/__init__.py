"""Built-in methods; importing this package registers them."""

# Each method module registers itself on import.
from anomalens.methods import (  # noqa: E402, F401
    aa_clip,
    anomalyclip,
    anomalydino,
    april_gan,
    core_clip,
    crane,
    inctrl,
    musc,
    patchcore,
    winclip,
)
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
