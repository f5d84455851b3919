"""Whole-image branch (studied in bench/quality_study.py, not in the product: it lowered AUROC on every
validation set here, docs/benchmarks.md): per-image channel statistics scored by a shrinkage Mahalanobis distance.

Patch features catch local defects but are normalised patch by patch, so a large, low-contrast change
(an uneven surface, a tint over the whole part, wrong lighting) moves little in them. The mean and
standard deviation of each channel of a few backbone blocks over the whole ROI do move. Their
distribution over the ROI's OK images is modelled with a Ledoit-Wolf shrinkage covariance (scikit-learn),
which stays well conditioned with far fewer images than dimensions; the score of an image is its
Mahalanobis distance to that distribution. OK scores for normalisation and the threshold come from
k-fold cross-fitting (each OK image scored by a model fitted without it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.covariance import LedoitWolf

MIN_IMAGES = 8  # below this the branch is off: a covariance of a handful of images says nothing


def image_stats(maps: list[torch.Tensor]) -> np.ndarray:
    """Block maps [1, C, H, W] (raw activations) -> one vector of per-channel means and stds."""
    parts = []
    for m in maps:
        flat = m.float().flatten(2)[0]
        parts += [flat.mean(1), flat.std(1, unbiased=False)]
    return torch.cat(parts).cpu().numpy().astype(np.float64)


@dataclass
class _Gaussian:
    mean: np.ndarray
    scale: np.ndarray
    precision: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray) -> _Gaussian:
        mean = x.mean(0)
        scale = x.std(0) + 1e-6  # standardise first: channels differ in scale by orders of magnitude
        lw = LedoitWolf(assume_centered=True).fit((x - mean) / scale)
        return cls(mean, scale, lw.precision_)

    def score(self, x: np.ndarray) -> np.ndarray:
        z = (np.atleast_2d(x) - self.mean) / self.scale
        return np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", z, self.precision, z), 0.0))


class ImageStatsModel:
    """Gaussian model of the OK images' statistics, with cross-fitted OK scores."""

    def __init__(self, gaussian: _Gaussian, loo_scores: np.ndarray) -> None:
        self.gaussian = gaussian
        self.loo_scores = loo_scores

    @classmethod
    def fit(cls, x: np.ndarray, folds: int = 10) -> ImageStatsModel:
        n = x.shape[0]
        if n < MIN_IMAGES:
            raise ValueError(f"the whole-image branch needs at least {MIN_IMAGES} OK images, got {n}")
        folds = min(folds, n)
        held = np.empty(n)
        for f in range(folds):
            out = np.arange(f, n, folds)
            rest = np.setdiff1d(np.arange(n), out)
            held[out] = _Gaussian.fit(x[rest]).score(x[out])
        return cls(_Gaussian.fit(x), held)

    def score(self, x: np.ndarray) -> float:
        return float(self.gaussian.score(x)[0])
