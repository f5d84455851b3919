"""Pure anomaly-detection pipeline: image intake, backbones, PatchCore, thresholds, storage."""

__version__ = "0.1.0"
