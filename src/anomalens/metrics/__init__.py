"""Anomaly detection metrics: numpy arrays in, Python floats out (None, with a warning, when undefined).

Image level: `image_auroc`, `image_ap`, `f1_max`. Pixel level: `pixel_auroc`, `pixel_ap`, `pixel_f1_max`,
`aupro` (variants "mvtec" and "sampled"). `evaluate` computes them all at once; `PixelMetricAccumulator`
streams pixel metrics in bounded memory; `resize_for_eval` evaluates at the model's input resolution.
All exact functions are checked against sklearn and reference implementations in tests/test_metrics.py.
"""

from anomalens.metrics.checks import UndefinedMetricWarning
from anomalens.metrics.image import f1_max, image_ap, image_auroc
from anomalens.metrics.pixel import pixel_ap, pixel_auroc, pixel_f1_max
from anomalens.metrics.pro import aupro
from anomalens.metrics.resize import resize_for_eval
from anomalens.metrics.streaming import PixelMetricAccumulator
from anomalens.metrics.summary import evaluate

__all__ = [
    "PixelMetricAccumulator",
    "UndefinedMetricWarning",
    "aupro",
    "evaluate",
    "f1_max",
    "image_ap",
    "image_auroc",
    "pixel_ap",
    "pixel_auroc",
    "pixel_f1_max",
    "resize_for_eval",
]
