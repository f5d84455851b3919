"""The result of scoring one image: the one place the prediction payload (docs/protocol.md) is built."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from core.method.scoring import Defect


@dataclass(frozen=True)
class SearchStats:
    """How the nearest-neighbour search ran (never in the payload; the agent's metrics count it): `certified`
    searched `searched` of `patches` exactly and bounded the rest, `exact` searched them all."""

    mode: str
    patches: int
    searched: int


@dataclass
class Prediction:
    is_anomaly: bool
    score: float
    threshold: float
    threshold_method: str
    timings_ms: dict[str, float]  # decode (added by the caller that decoded), preprocess, backbone, knn, postprocess
    batch_size: int
    device: str
    model_version: int
    backbone: dict  # the same identity object as the state and /health: name, resolution, weights_sha256, ...
    mm_per_px: float | None
    scale: float
    image_size: tuple[int, int]  # (w, h) as scored
    defect_count: int  # connected regions above the threshold (reported only for an anomaly)
    regions: list[Defect]  # the largest of them
    heatmap_png: bytes | None = None  # never in the payload: each channel encodes it (base64, a file)
    anomaly_map: np.ndarray | None = None  # full-size map (return_map): benchmarks, pixel metrics
    preview: dict | None = None  # thumbnail of image, map and mask (operator page)
    queue_ms: float | None = None  # set by the daemon: time waited before the work began
    search: SearchStats | None = None

    @property
    def inference_ms(self) -> float:
        return round(sum(self.timings_ms.values()), 2)

    def add_decode(self, ms: float) -> None:
        self.timings_ms = {"decode": ms, **self.timings_ms}

    def defects(self) -> dict:
        total = sum(d.area_px for d in self.regions) if self.is_anomaly else 0
        mm = self.mm_per_px
        return {"count": self.defect_count if self.is_anomaly else 0, "total_area_px": total,
                "total_area_mm2": round(total * mm**2, 6) if mm else None,
                "regions": [d.to_dict() for d in self.regions] if self.is_anomaly else []}

    def to_dict(self) -> dict:
        """The `data` of a predict result, in the documented order."""
        out = {"is_anomaly": self.is_anomaly, "score": round(self.score, 6), "threshold": round(self.threshold, 6),
               "threshold_method": self.threshold_method, "inference_ms": self.inference_ms,
               "timings_ms": {k: round(v, 2) for k, v in self.timings_ms.items()}, "batch_size": self.batch_size,
               "device": self.device, "model_version": self.model_version, "backbone": self.backbone,
               "mm_per_px": self.mm_per_px, "scale": self.scale, "image_size": list(self.image_size),
               "defects": self.defects()}
        if self.queue_ms is not None:
            out["queue_ms"] = round(self.queue_ms, 2)
        return out

