"""anomalens: vision-language (CLIP-based) anomaly detection and segmentation."""

__version__ = "0.1.0"
