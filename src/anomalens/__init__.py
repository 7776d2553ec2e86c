"""anomalens: vision-language (CLIP-based) anomaly detection and segmentation."""

__version__ = "0.1.0"

from anomalens import data, metrics  # noqa: E402
from anomalens.methods import Prediction, create, list_methods, load  # noqa: E402

__all__ = ["Prediction", "__version__", "create", "data", "list_methods", "load", "metrics"]
