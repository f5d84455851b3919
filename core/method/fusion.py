"""Fusion of patch branches into one anomaly map and one score.

Each branch (fine and coarse patch features by default) gives a patch-distance map at the backbone
input size and an image score (the configured statistic of that map). Their distances are not on one
scale, so each is standardised by the mean and standard deviation of the branch's own leave-one-out OK
image scores (`BranchScale`) and the result is expressed in the first branch's units again:

    score = mu_1 + sd_1 * mean_b((score_b - mu_b) / sd_b)          (the image score)
    map(x) = mu_1 + sd_1 * max_b((map_b(x) - mu_b) / sd_b)          (the map shown, and its regions)

Averaging the image scores was the best fusion on the validation halves (docs/benchmarks.md); a map
averaged pixel by pixel dilutes a small defect that only the fine branch sees, so the map takes the
maximum: its peak is never below the score, so a flagged image always has a region above the
threshold. With one branch both are that branch's own score and map, unchanged.
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


def fuse_scores(scores: list[float], scales: list[BranchScale]) -> float:
    """Branch image scores -> one score in the first branch's units (mean of standardised scores)."""
    if len(scores) == 1:
        return scores[0]
    z = sum((v - s.mean) / s.std for v, s in zip(scores, scales, strict=True)) / len(scores)
    return float(scales[0].mean + scales[0].std * z)


def fuse_maps(maps: list[np.ndarray], scales: list[BranchScale]) -> np.ndarray:
    """Branch maps (same shape) -> one map in the first branch's units (max of standardised maps)."""
    if len(maps) == 1:
        return maps[0]
    z = np.maximum.reduce([(m - s.mean) / s.std for m, s in zip(maps, scales, strict=True)])
    return (scales[0].mean + scales[0].std * z).astype(np.float32)


def lift_peak(amap: np.ndarray, score: float) -> np.ndarray:
    """A map whose peak is below `score` (an image-level term raised the score), raised so that its peak is
    the score: each value above the map's median moves up in proportion to its height, so the region around
    the peak grows and the rest of the map stays."""
    peak, med = float(amap.max()), float(np.median(amap))
    if score <= peak:
        return amap
    w = np.clip((amap - med) / max(peak - med, 1e-12), 0, 1)
    return (amap + (score - peak) * w).astype(np.float32)
