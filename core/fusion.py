"""Fusion of patch branches into one anomaly map and one score.

Each branch (fine and coarse patch features by default) gives a patch-distance map at the backbone
input size. Their distances are not on one scale, so each branch's map is standardised by the mean
and standard deviation of its own leave-one-out OK image scores (`BranchScale`), the standardised
maps are averaged, and the result is expressed in the first branch's units again:

    fused(x) = mu_1 + sd_1 * mean_b((map_b(x) - mu_b) / sd_b)

With one branch this is that branch's map unchanged, so scores, thresholds and heatmaps keep the
meaning they always had. The image score is the configured statistic of the fused map, and defect
regions are where the fused map exceeds the threshold, so a flagged image always has its evidence.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class BranchScale:
    mean: float
    std: float

    @classmethod
    def of(cls, scores: list[float]) -> BranchScale:
        a = np.asarray(scores, np.float64)
        if a.size == 0:
            return cls(0.0, 1.0)
        mean = float(a.mean())
        # a handful of near-identical OK images: keep the spread from collapsing to zero
        return cls(mean, max(float(a.std()), 0.05 * abs(mean), 1e-6))

    def to_dict(self) -> dict:
        return {k: round(v, 8) for k, v in asdict(self).items()}


def fuse_maps(maps: list[np.ndarray], scales: list[BranchScale]) -> np.ndarray:
    """Branch maps (same shape) -> one map in the first branch's units."""
    if len(maps) == 1:
        return maps[0]
    z = sum((m - s.mean) / s.std for m, s in zip(maps, scales, strict=True)) / len(maps)
    return (scales[0].mean + scales[0].std * z).astype(np.float32)
