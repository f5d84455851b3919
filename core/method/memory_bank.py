"""The PatchCore memory bank of one ROI: which embedding rows it holds, their features and the
bookkeeping that keeps it small as samples arrive (incremental k-center coreset with pruning).

`MemoryBank` owns the parallel arrays (rows, features, projected features and each entry's nearest
other entry); `core/method/coreset.py` keeps the pure functions it is built from. No storage, no threshold:
a test drives it with random vectors (tests/test_memory_bank.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from core.method.coreset import greedy_select, project, projection, sq_dists


@dataclass(frozen=True)
class CoresetSize:
    """Target size: every patch while there are at most `minimum`, then `ratio` of all patches (but at
    least `minimum`), never more than `maximum`."""

    ratio: float = 0.1
    minimum: int = 4096
    maximum: int = 8192

    def scaled(self, factor: float) -> CoresetSize:
        """Bounds scaled (for a branch of wider features: the same bank bytes); 1.0 or more: unchanged."""
        if factor >= 1:
            return self
        return CoresetSize(self.ratio, max(1, int(self.minimum * factor)), max(64, int(self.maximum * factor)))

    def target(self, total_rows: int) -> int:
        return min(total_rows, max(self.minimum, math.ceil(self.ratio * total_rows)), self.maximum)


class MemoryBank:
    """Bank entries (embedding-index rows, order kept), their features and projections."""

    def __init__(self, feature_dim: int, size: CoresetSize, proj_dim: int = 64) -> None:
        self.size = size
        self.feature_dim = feature_dim
        self._proj = projection(feature_dim, proj_dim)
        self.set(np.zeros(0, np.int64), np.zeros((0, feature_dim), np.float32))

    def __len__(self) -> int:
        return int(self.rows.size)

    def set(self, rows: np.ndarray, feats: np.ndarray) -> None:
        """Replace the bank with these rows and their features."""
        self.rows = rows.astype(np.int64)
        self.feats = torch.from_numpy(np.asarray(feats, np.float32))
        self._proj_feats = project(self.feats, self._proj)
        # nearest other entry of each bank entry (for pruning): kept up to date incrementally, computed
        # on first need for a bank loaded from disk
        empty = self.rows.size == 0
        self._nn_val: torch.Tensor | None = torch.zeros(0) if empty else None
        self._nn_row: np.ndarray | None = np.zeros(0, np.int64) if empty else None

    def extend(self, new_feats: np.ndarray, offset: int, total_rows: int) -> None:
        """Incremental coreset: one sample's share joins the bank, redundancy is pruned.

        Each sample contributes at least its coreset ratio share, chosen by k-center greedy
        (farthest-first) over its patches; when the bank overshoots the target by 5 % (or hits the
        maximum), its most redundant entries (closest to another entry, new ones included) are pruned,
        so early samples do not crowd out later ones and a new sample's patches that the bank already
        covers go first. `offset`: embedding row of new_feats[0]; `total_rows`: rows indexed so far.
        """
        s = self.size
        n_new = new_feats.shape[0]
        target = s.target(total_rows)
        n_add = int(np.clip(max(target - self.rows.size, math.ceil(s.ratio * n_new)), 0, n_new))
        if n_add == 0:
            return
        feats = torch.from_numpy(np.array(new_feats, dtype=np.float32))  # a copy: memmaps are read-only
        p_new = project(feats, self._proj)
        if n_add == n_new:
            sel = torch.arange(n_new)
        else:
            # farthest-first within the sample; overlap with the bank is resolved by pruning, which
            # costs n_add x bank instead of the n_new x bank of a full distance-to-bank pass
            sel = torch.as_tensor(greedy_select(p_new, n_add), dtype=torch.long)
        new_rows = offset + sel.numpy()
        if self._nn_val is not None:
            self._update_neighbours(p_new[sel], new_rows)
        self.rows = np.concatenate([self.rows, new_rows])
        self.feats = torch.cat([self.feats, feats[sel]])
        self._proj_feats = torch.cat([self._proj_feats, p_new[sel]])
        slack = max(1, target // 20)
        if self.rows.size > min(target + slack, s.maximum):
            keep = target if target < s.maximum else s.maximum - slack
            self.prune(self.rows.size - keep)

    def _update_neighbours(self, new_p: torch.Tensor, new_rows: np.ndarray) -> None:
        """Fold entries about to join the bank into the nearest-neighbour bookkeeping."""
        inf = torch.full((new_p.shape[0],), float("inf"))
        v_new, row_new = inf, np.full(new_p.shape[0], -1, np.int64)
        if self.rows.size:
            d = sq_dists(new_p, self._proj_feats)
            v_new, j_new = d.min(1)
            row_new = self.rows[j_new.numpy()]
            v_old, j_old = d.min(0)
            better = (v_old < self._nn_val).numpy()
            self._nn_val = torch.minimum(self._nn_val, v_old)
            self._nn_row[better] = new_rows[j_old.numpy()[better]]
        if new_p.shape[0] > 1:
            dn = sq_dists(new_p, new_p)
            dn.fill_diagonal_(float("inf"))
            v2, j2 = dn.min(1)
            better = (v2 < v_new).numpy()
            v_new = torch.minimum(v_new, v2)
            row_new = np.where(better, new_rows[j2.numpy()], row_new)
        self._nn_val = torch.cat([self._nn_val, v_new])
        self._nn_row = np.concatenate([self._nn_row, row_new])

    def _neighbours_of(self, idx: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
        """Squared distance to, and row of, the nearest other bank entry for bank positions idx."""
        vals = torch.empty(idx.numel())
        pos = torch.empty(idx.numel(), dtype=torch.long)
        for i in range(0, idx.numel(), 2048):
            sub = idx[i : i + 2048]
            d = sq_dists(self._proj_feats[sub], self._proj_feats)
            d[torch.arange(sub.numel()), sub] = float("inf")
            vals[i : i + 2048], pos[i : i + 2048] = d.min(1)
        return vals, self.rows[pos.numpy()]

    def prune(self, n_remove: int) -> None:
        """Drop n_remove entries that lie closest to another entry (least coverage lost); of a close
        pair only one goes. Neighbour distances are maintained incrementally, so this is O(M log M)."""
        if self._nn_val is None or self._nn_row is None:
            self._nn_val, self._nn_row = self._neighbours_of(torch.arange(self.rows.size))
        removed: set[int] = set()
        order = torch.argsort(self._nn_val).tolist()
        for i in order:
            if len(removed) == n_remove:
                break
            if int(self._nn_row[i]) not in removed:
                removed.add(int(self.rows[i]))
        for i in order:  # a large cut may need both members of some pairs
            if len(removed) == n_remove:
                break
            removed.add(int(self.rows[i]))
        gone = np.fromiter(removed, np.int64)
        keep = ~np.isin(self.rows, gone)
        keep_t = torch.from_numpy(keep)
        self.rows = self.rows[keep]
        self.feats = self.feats[keep_t]
        self._proj_feats = self._proj_feats[keep_t]
        self._nn_val = self._nn_val[keep_t]
        self._nn_row = self._nn_row[keep]
        stale = np.flatnonzero(np.isin(self._nn_row, gone))
        if stale.size:  # their nearest entry is gone: look again
            vals, rows = self._neighbours_of(torch.from_numpy(stale))
            self._nn_val[torch.from_numpy(stale)] = vals
            self._nn_row[stale] = rows

    def owners(self, sample_starts: np.ndarray) -> np.ndarray:
        """For each entry, the index of the sample whose rows start at or before it (sorted starts)."""
        return np.searchsorted(sample_starts, self.rows, side="right") - 1
