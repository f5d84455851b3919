"""From a new image's features to its maps, score and regions, built from what it needs and nothing else.

`Scorer` takes the branches (core/method/branch.py), their score scales (core/method/fusion.py), the ROI
mask and the map and score settings, as anomalib's `AnomalyMapGenerator` takes what it needs; it knows no
ROI, no files, no threshold policy. `RoiModel` builds one and keeps its scales and mask current;
`SampleScorer` (core/roi/sample_scores.py) uses its `branch_map` / `map_score`, so stored samples and new
images are scored by the same code.

A prediction without a heatmap or the full map takes the certified search (core/method/knn_certified.py)
when every branch offers clusters: the same score and regions from a fraction of the exact search. A ROI
that adds an NG-aware term (`ng`, core/method/ng_rank.py) gets the image's most anomalous patches from the
same bounds (`certified_top`): the term equals the exact search's too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import cv2
import numpy as np

from core.method.branch import Branch
from core.method.fusion import BranchScale, fuse_maps, fuse_scores, lift_peak
from core.method.knn_certified import certified_maps, certified_top
from core.method.ng_rank import NgTerm, top_count, top_rows
from core.method.scoring import image_score, input_res_map, resize_mask
from core.prediction import SearchStats

MASK_SIZES = 32  # mask sizes kept resized (ROIs of a station share sizes); more: the cache starts again


class ScoreSettings(Protocol):
    """The settings a scorer reads (a ROI's `ModelSettings` has them)."""

    blur_sigma: float
    score_stat: str
    score_percentile: float
    knn_search: str


class Scorer:
    def __init__(self, branches: Sequence[Branch], settings: ScoreSettings, mask: np.ndarray | None = None,
                 scales: list[BranchScale] | None = None, active: Sequence[int] | None = None) -> None:
        self.branches = branches
        self.settings = settings
        self.scales = list(scales or [])
        self.active = list(active) if active is not None else list(range(len(branches)))
        self.ng: NgTerm | None = None  # the NG-aware term over the active branches, when the ROI uses one
        self.set_mask(mask)

    @property
    def active(self) -> list[int]:
        """The branches this ROI fuses (chosen per ROI, core/roi/tuning.py); the others are not searched."""
        return self._active

    @active.setter
    def active(self, value: Sequence[int]) -> None:
        self._active = [b for b in value if 0 <= b < len(self.branches)] or list(range(len(self.branches)))

    def set_mask(self, mask: np.ndarray | None) -> None:
        self.mask = mask
        self._mask_cache: dict[tuple[int, int], np.ndarray | None] = {}

    def mask_at(self, size: tuple[int, int]) -> np.ndarray | None:
        """The ROI mask resized to (w, h), computed once per size."""
        if size not in self._mask_cache:
            if len(self._mask_cache) >= MASK_SIZES:
                self._mask_cache.clear()
            self._mask_cache[size] = resize_mask(self.mask, size)
        return self._mask_cache[size]

    def branch_map(self, dist: np.ndarray, grid: tuple[int, int], input_size: tuple[int, int]) -> np.ndarray:
        """A branch's patch distances -> its map at the backbone input (upsampled, blurred)."""
        return input_res_map(dist, grid, input_size, self.settings.blur_sigma)

    def map_score(self, amap: np.ndarray) -> float:
        """A map -> the configured image statistic inside the mask."""
        mask = self.mask_at((amap.shape[1], amap.shape[0]))
        return image_score(amap, mask, self.settings.score_stat, self.settings.score_percentile)

    def distances_score(self, dist: np.ndarray, grid: tuple[int, int], input_size: tuple[int, int]) -> float:
        """One branch's patch distances -> its image score (its map's statistic inside the mask)."""
        return self.map_score(self.branch_map(dist, grid, input_size))

    def can_certify(self, exact_map_needed: bool) -> bool:
        """The certified search decides the score only when the score is the map's peak and no full map is
        wanted (a heatmap, the returned map): then it gives the exact search's results."""
        return not (exact_map_needed or self.settings.knn_search == "exact" or self.settings.score_stat != "max")

    def maps(self, feats: list[np.ndarray], grids: list[tuple[int, int]], input_size: tuple[int, int],
             threshold: float, exact_map_needed: bool) -> tuple[list[np.ndarray], SearchStats, float]:
        """Every active branch's map of one image at the backbone input, how much of the search that took,
        and the NG-aware term of the score (0 without one)."""
        on = self.active
        feats, grids = [feats[b] for b in on], [grids[b] for b in on]
        patches = sum(int(f.shape[0]) for f in feats)
        if self.can_certify(exact_map_needed):
            clusters = [self.branches[b].clusters() for b in on]
            if all(c is not None for c in clusters):
                searches = [lambda idx, i=i, b=b: self.branches[b].search(feats[i][idx]) for i, b in enumerate(on)]
                pairs, info = certified_maps(searches, clusters, feats, grids, input_size, self.settings.blur_sigma,
                                             self.mask_at(input_size), self._scales(), threshold)
                maps, term = [m for _, m in pairs], 0.0
                if self.ng is not None:
                    term = self.ng([feats[i][certified_top(d, info["exact"][i], searches[i], top_count(len(d)))]
                                    for i, (d, _) in enumerate(pairs)])
                # a term that flags the part lifts the map's peak (fuse), which moves the regions: the exact map
                if term <= 0 or fuse_scores([self.map_score(m) for m in maps], self._scales()) + term <= threshold:
                    return maps, SearchStats("certified", patches, int(sum(x.sum() for x in info["exact"]))), term
        dists = [self.branches[b].search(feats[i]) for i, b in enumerate(on)]
        maps = [self.branch_map(d, grids[i], input_size) for i, d in enumerate(dists)]
        term = self.ng([f[top_rows(d)] for f, d in zip(feats, dists, strict=True)]) if self.ng is not None else 0.0
        return maps, SearchStats("exact", patches, patches), term

    def _scales(self) -> list[BranchScale]:
        return [self.scales[b] for b in self.active] if len(self.scales) == len(self.branches) else self.scales

    def fuse(self, maps: list[np.ndarray], size: tuple[int, int], term: float = 0.0) -> tuple[float, np.ndarray]:
        """The active branches' maps (and the NG-aware term) -> (image score, fused map resized to the image's
        (w, h)); a term that lifts the score over the map's peak lifts the peak with it, so a flagged image
        still has its region where its most anomalous patches are."""
        scales = self._scales()
        score = fuse_scores([self.map_score(m) for m in maps], scales) + term
        full = cv2.resize(fuse_maps(maps, scales), size, interpolation=cv2.INTER_LINEAR)
        return score, lift_peak(full, score) if term > 0 else full
