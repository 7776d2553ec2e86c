"""`OnnxModel`, the torch-free ONNX Runtime inferencer: defined in the `anomalens_onnx` package (shipped
both inside this library and alone as the ``anomalens-onnx`` distribution) and re-exported here."""

from anomalens_onnx.model import METADATA_PREFIX, OnnxModel, OnnxPrediction, bilinear, read_image

__all__ = ["METADATA_PREFIX", "OnnxModel", "OnnxPrediction", "bilinear", "read_image"]
