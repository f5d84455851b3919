"""Anomaly map, image score and defect regions.

The patch-distance grid is upsampled to the backbone input size and smoothed there (Gaussian,
sigma in input pixels, as in PatchCore); the image score is a statistic of that map inside the ROI
mask, so it does not depend on the ROI's pixel count. The map is then resized to the ROI's full
resolution for the defect regions (areas in px and mm^2) and the heatmap.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

SCORE_STATS = ("max", "percentile", "top1_mean")


def input_res_map(
    patch_dist: np.ndarray, grid: tuple[int, int], input_size: tuple[int, int], sigma: float
) -> np.ndarray:
    """[gh*gw] distances -> smoothed map at the backbone input size (w, h)."""
    m = patch_dist.reshape(grid).astype(np.float32)
    m = cv2.resize(m, input_size, interpolation=cv2.INTER_LINEAR)
    if sigma > 0:
        m = cv2.GaussianBlur(m, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)
    return m


def resize_mask(mask: np.ndarray | None, size: tuple[int, int]) -> np.ndarray | None:
    """Binary mask (any size) -> bool mask of size (w, h), nearest neighbour."""
    if mask is None:
        return None
    if (mask.shape[1], mask.shape[0]) != size:
        mask = cv2.resize(mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)
    return mask.astype(bool)


def image_score(amap: np.ndarray, mask: np.ndarray | None, stat: str = "max", percentile: float = 99.0) -> float:
    values = amap[mask] if mask is not None else amap.ravel()
    if values.size == 0:
        return 0.0
    if stat == "max":
        return float(values.max())
    if stat == "percentile":
        return float(np.percentile(values, percentile))
    if stat == "top1_mean":
        k = max(1, values.size // 100)
        return float(np.partition(values, values.size - k)[-k:].mean())
    raise ValueError(f"unknown score statistic {stat!r}; choose one of {SCORE_STATS}")


@dataclass
class Defect:
    bbox: tuple[int, int, int, int]  # x, y, w, h in ROI pixels
    area_px: int
    area_mm2: float | None
    max_score: float

    def scaled(self, g: float) -> Defect:
        """The same region in pixels g times larger (a map computed on a reduced decode)."""
        x, y, w, h = self.bbox
        return Defect((round(x * g), round(y * g), max(1, round(w * g)), max(1, round(h * g))),
                      round(self.area_px * g * g), self.area_mm2, self.max_score)

    def to_dict(self) -> dict:
        return {"bbox": list(self.bbox), "area_px": self.area_px, "area_mm2": self.area_mm2,
                "max_score": round(self.max_score, 6)}


def defect_regions(
    full_map: np.ndarray, threshold: float, mask: np.ndarray | None, mm_per_px: float | None,
    min_area_px: int = 0, max_regions: int = 50,
) -> tuple[int, list[Defect]]:
    """Connected components (8-connected) of map > threshold inside the mask: (count, largest first)."""
    binary = full_map > threshold
    if mask is not None:
        binary &= mask
    if not binary.any():
        return 0, []
    n, labels, stats, _ = cv2.connectedComponentsWithStats(binary.astype(np.uint8), connectivity=8)
    keep = [i for i in range(1, n) if stats[i, cv2.CC_STAT_AREA] >= max(1, min_area_px)]
    keep.sort(key=lambda i: -stats[i, cv2.CC_STAT_AREA])
    defects = []
    for i in keep[:max_regions]:
        x, y, w, h, area = (int(v) for v in stats[i])
        peak = float(full_map[y : y + h, x : x + w][labels[y : y + h, x : x + w] == i].max())
        mm2 = area * mm_per_px * mm_per_px if mm_per_px else None
        defects.append(Defect((x, y, w, h), area, None if mm2 is None else round(mm2, 6), peak))
    return len(keep), defects

