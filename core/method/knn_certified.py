"""The exact image score and defect regions from a fraction of the exact nearest-neighbour search.

A prediction without a heatmap needs two things from the patch distances: the peak of each branch's
smoothed map (the score) and the pixels where the fused map exceeds the threshold (the regions). Neither
needs every patch's exact distance:

1. Each patch gets an upper bound of its nearest-neighbour distance: its distance to the nearest entry of
   the bank cluster (k-means over the bank) whose centre is nearest to it. That is a real bank entry, so
   the bound is never below the true distance. Cost: about 1/k of the exact search.
2. The map is linear in the patch distances with non-negative weights (bilinear upsampling, Gaussian
   blur) and the fused map is non-decreasing in each branch map, so a map of bounds is >= the exact map
   at every pixel.
3. Patches are searched exactly where they can matter: the support (blur kernel plus the interpolation's
   cell) of each branch map's peak, and of every pixel near one where the fused map of bounds exceeds
   the threshold; repeated until those rest on exact distances only. Then each peak is the exact peak
   (every other pixel's exact value is at most its bound, which is at most the peak), and the pixels over
   the threshold, with their values, are the exact map's (a pixel of the full-resolution map interpolates
   input pixels at most one apart).

So the score, the verdict and the regions equal the exact search's (tests/test_knn_certified.py). The same
bounds give an image's most anomalous patches exactly (`certified_top`, for an NG-aware term): the largest
values are searched until all of them are exact. Away
from its peak and regions a map holds bounds: a heatmap or the full map use the exact search; the
operator page's preview thumbnail of a prediction shows that map (docs/protocol.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from core.method.fusion import BranchScale, fuse_maps
from core.method.knn import unit_distance
from core.method.scoring import input_res_map

try:
    import faiss
except ImportError:  # pragma: no cover
    faiss = None

MIN_BANK = 1024  # below this the exact search is cheap already
MAX_ROUNDS = 50  # then the rest is searched exactly (never reached in the tests; a bound, not a tuning)


class ClusteredBank:
    """A bank split into k-means clusters (spherical, seeded: the same bank gives the same clusters)."""

    def __init__(self, bank: torch.Tensor, seed: int = 1234) -> None:
        feats = np.ascontiguousarray(bank.detach().cpu().numpy(), np.float32)
        self.k = min(64, max(8, feats.shape[0] // 256))
        km = faiss.Kmeans(feats.shape[1], self.k, niter=10, seed=seed, spherical=True, verbose=False,
                          max_points_per_centroid=256)
        km.train(feats)
        assign = km.index.search(feats, 1)[1][:, 0]
        order = np.argsort(assign, kind="stable")
        self.members = torch.from_numpy(np.ascontiguousarray(feats[order]))
        self.bounds = np.searchsorted(assign[order], np.arange(self.k + 1))
        self.centroids = torch.from_numpy(np.ascontiguousarray(km.centroids, np.float32))

    def upper_bounds(self, queries: torch.Tensor) -> np.ndarray:
        """[N, D] -> [N] distance to the nearest member of each query's nearest cluster (>= the true one)."""
        nearest = (queries @ self.centroids.T).argmax(1).numpy()
        order = np.argsort(nearest, kind="stable")
        starts = np.searchsorted(nearest[order], np.arange(self.k + 1))
        q_sorted = queries[torch.from_numpy(order)]
        sims = torch.full((queries.shape[0],), -4.0)  # -4: a query whose cluster is empty gets no bound below 2
        for c in range(self.k):
            lo, hi = starts[c], starts[c + 1]
            m_lo, m_hi = self.bounds[c], self.bounds[c + 1]
            if hi > lo and m_hi > m_lo:
                sims[lo:hi] = (q_sorted[lo:hi] @ self.members[m_lo:m_hi].T).max(1).values
        best = torch.empty_like(sims)
        best[torch.from_numpy(order)] = sims
        return unit_distance(best).numpy()


def support_radius(size: int, cells: int, sigma: float) -> int:
    """Grid cells on each side of a pixel's cell that its smoothed map value depends on (one axis)."""
    r = (int(round(sigma * 8 + 1)) | 1) // 2 if sigma > 0 else 0  # OpenCV's float kernel for (0, 0) ksize
    s = size / cells
    return max(math.ceil((r - 0.5) / s + 0.5 + 1e-6), 1 + math.floor(0.5 + (r + 0.5) / s + 1e-6))


@dataclass
class _Branch:
    dist: np.ndarray  # [P] exact where `exact`, an upper bound elsewhere
    exact: np.ndarray  # [P] bool
    grid: tuple[int, int]
    kernel: np.ndarray  # ones over the support radius (rows, cols) on each side of a cell


def certified_maps(searches: list, bounds: list[ClusteredBank], feats: list[np.ndarray],
                   grids: list[tuple[int, int]], input_size: tuple[int, int], sigma: float,
                   mask: np.ndarray | None, scales: list[BranchScale], threshold: float) -> tuple[list, dict]:
    """Per branch: (distances, map at the input size), exact at each branch's peak and wherever the fused
    map is over the threshold; and counts (patches searched exactly, rounds).

    searches[b](idx) -> exact distances of branch b's patches idx."""
    w, h = input_size
    states = []
    for b, bank in enumerate(bounds):
        gh, gw = grids[b]
        rad = (support_radius(h, gh, sigma), support_radius(w, gw, sigma))
        states.append(_Branch(bank.upper_bounds(torch.from_numpy(feats[b])), np.zeros(gh * gw, bool), (gh, gw),
                              np.ones((2 * rad[0] + 1, 2 * rad[1] + 1), np.uint8)))
    rounds = 0
    while True:
        maps = [input_res_map(st.dist, st.grid, input_size, sigma) for st in states]
        pixels = [_candidates(m, mask, st) for m, st in zip(maps, states, strict=True)]
        over = fuse_maps(maps, scales) > threshold
        if over.any():
            near = cv2.dilate(over.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
            pixels = [p | near for p in pixels]
        todo = [np.flatnonzero(_cells(p, st) & ~st.exact) for p, st in zip(pixels, states, strict=True)]
        if not any(t.size for t in todo):
            break
        rounds += 1
        if rounds > MAX_ROUNDS:
            todo = [np.flatnonzero(~st.exact) for st in states]
        for b, (st, idx) in enumerate(zip(states, todo, strict=True)):
            if idx.size:
                st.dist[idx] = searches[b](idx)
                st.exact[idx] = True
    searched = int(sum(st.exact.sum() for st in states))
    return [(st.dist, m) for st, m in zip(states, maps, strict=True)], {
        "exact_patches": searched, "rounds": rounds, "exact": [st.exact for st in states]}


def certified_top(dist: np.ndarray, exact: np.ndarray, search, n: int) -> np.ndarray:  # noqa: ANN001
    """Positions of the `n` largest exact distances, from distances that are exact where `exact` and upper
    bounds elsewhere (as `certified_maps` leaves them): the n largest values are searched exactly until all
    of them are exact; then every other patch's distance is at most its bound, at most the n-th value. `dist`
    and `exact` are updated in place; `search(idx)` -> exact distances of patches idx."""
    while True:
        top = np.argsort(dist, kind="stable")[-n:]
        todo = top[~exact[top]]
        if todo.size == 0:
            return top
        dist[todo] = search(todo)
        exact[todo] = True


def _candidates(amap: np.ndarray, mask: np.ndarray | None, st: _Branch) -> np.ndarray:
    """Pixels that may still be the map's peak: above every pixel whose value is exact already (its whole
    support searched); the peak of the bounds when none is."""
    values = np.where(mask, amap, -np.inf) if mask is not None else amap
    if st.exact.any():
        gh, gw = st.grid
        done = cv2.erode(st.exact.reshape(gh, gw).astype(np.uint8), st.kernel, borderType=cv2.BORDER_CONSTANT,
                         borderValue=1) > 0
        h, w = amap.shape
        certain = done[np.minimum(np.arange(h) * gh // h, gh - 1)][:, np.minimum(np.arange(w) * gw // w, gw - 1)]
        known = values[certain]
        if known.size:
            return values > known.max()
    out = np.zeros(amap.shape, bool)
    out[np.unravel_index(int(np.argmax(values)), amap.shape)] = True
    return out


def _cells(pixels: np.ndarray, st: _Branch) -> np.ndarray:
    """Grid cells (flat bool) whose distances the map values at `pixels` depend on."""
    gh, gw = st.grid
    h, w = pixels.shape
    ys, xs = np.nonzero(pixels)
    cells = np.zeros((gh, gw), np.uint8)
    cells[np.minimum(ys * gh // h, gh - 1), np.minimum(xs * gw // w, gw - 1)] = 1
    return cv2.dilate(cells, st.kernel).ravel() > 0
