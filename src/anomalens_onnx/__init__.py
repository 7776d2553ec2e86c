"""anomalens-onnx: run a detector exported by ``anomalens export --format onnx`` with ONNX Runtime,
numpy and Pillow only (no torch).

Installed on its own from ``packages/anomalens-onnx`` (see docs/export.md), or as part of the anomalens
library, which re-exports it as `anomalens.onnx_model` / `anomalens.OnnxModel`.
"""

from anomalens_onnx.model import OnnxModel, OnnxPrediction, read_image

__all__ = ["OnnxModel", "OnnxPrediction", "read_image"]
