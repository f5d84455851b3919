"""k-center greedy coreset selection with a random projection (PatchCore, Roth et al. 2022).

Distances are computed in a seeded random projection to `proj_dim` dimensions (Johnson-Lindenstrauss),
as in the paper; the selected points keep their full features. The incremental bank built from
these pieces (per-sample selection, redundancy pruning) lives in memory_bank.py (`MemoryBank`).
"""

from __future__ import annotations

import torch


def projection(dim: int, proj_dim: int = 128, seed: int = 0) -> torch.Tensor | None:
    """Seeded Gaussian projection matrix [dim, proj_dim], or None when dim is already small."""
    if dim <= proj_dim:
        return None
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(dim, proj_dim, generator=gen) / proj_dim**0.5


def project(x: torch.Tensor, proj: torch.Tensor | None) -> torch.Tensor:
    return x if proj is None else x @ proj.to(x.device, x.dtype)


def sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared distances [len(a), len(b)] (one GEMM)."""
    return (torch.addmm((b * b).sum(1)[None, :], a, b.T, alpha=-2.0) + (a * a).sum(1)[:, None]).clamp_min_(0)


def greedy_select(points: torch.Tensor, n_select: int, mindist: torch.Tensor | None = None) -> list[int]:
    """Pick n_select indices of `points` (projected) by k-center greedy.

    mindist: squared distances of the points to an already selected set (None: start from point 0).
    """
    n = points.shape[0]
    n_select = min(n_select, n)
    if n_select <= 0:
        return []
    norms = (points * points).sum(1)
    selected: list[int] = []
    if mindist is None:
        first = 0
        selected.append(first)
        mindist = (norms + norms[first] - 2 * points @ points[first]).clamp_min_(0)
    else:
        mindist = mindist.clone()
    while len(selected) < n_select:
        idx = int(torch.argmax(mindist))
        if mindist[idx] <= 0:  # everything covered exactly (duplicates): stop early
            break
        selected.append(idx)
        d = (norms + norms[idx] - 2 * points @ points[idx]).clamp_min_(0)
        torch.minimum(mindist, d, out=mindist)
    return selected
