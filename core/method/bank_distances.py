"""Patch distances of the threshold samples to the memory bank, kept up to date as the bank changes.

The threshold needs a score for every NG sample and for the most recent OK samples (leave-one-out).
Scoring them all again after every fit_ok / send_ng cost seconds per request once a ROI had a
hundred NG samples. Between two threshold updates the bank changes by a few entries: the patches of
the newly fitted images that the coreset kept, minus the entries it pruned. So each sample keeps,
per patch, its distance to the nearest bank entry and that entry's row in the embedding index, and
an update costs only:

- patches whose nearest entry was pruned: searched again against the whole bank;
- all patches: compared with the added entries only (the others did not move);
- the score map: recomputed only for samples where some patch distance changed.

The result is exact (the same nearest neighbours as a full search); a change larger than
`full_share` of the bank (a reselected bank, another backbone) falls back to a full search.
Rows identify embedding-index rows; a reset of that index must call `clear()`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import count

import numpy as np
import torch

from core.method.knn import NearestNeighbour, unit_distance

_VERSIONS = count(1)  # unique across samples and rounds: a version names one state of one sample's distances


@dataclass
class _Sample:
    dist: np.ndarray  # [P] float32: distance of each patch to its nearest bank entry
    row: np.ndarray  # [P] int64: embedding-index row of that entry
    score: float
    version: int = 0  # bumped whenever dist changes


class BankDistances:
    """Per-sample nearest-bank-entry distances, updated by bank deltas. One round per threshold update:
    `begin(...)`, `score(...)` for every sample of the round, `end()` (forgets samples not scored)."""

    def __init__(self, full_share: float = 0.5) -> None:
        self.full_share = full_share
        self.enabled = True  # False: every round is a full search (bench/threshold_cost.py compares)
        self._items: dict[tuple[str, str], _Sample] = {}
        self._valid_for = np.zeros(0, np.int64)  # sorted bank rows the items are valid for
        self._seen: set[tuple[str, str]] = set()
        self.stats = {"full": 0, "updated": 0, "unchanged": 0, "searched": 0}

    def clear(self) -> None:
        self._items.clear()
        self._valid_for = np.zeros(0, np.int64)

    def begin(self, knn: NearestNeighbour, bank_rows: np.ndarray, bank_feats: torch.Tensor) -> None:
        known = np.isin(bank_rows, self._valid_for)
        self._removed = np.setdiff1d(self._valid_for, bank_rows)
        added = np.flatnonzero(~known)
        if not self.enabled or added.size + self._removed.size > self.full_share * max(1, bank_rows.size):
            self._items.clear()
        self._knn, self._rows = knn, bank_rows
        self._added_pos = added
        self._added_feats = bank_feats[torch.from_numpy(added)].to(knn.bank.device) if added.size else None
        self._valid_for = np.sort(bank_rows)
        self._seen = set()
        self.stats = {"full": 0, "updated": 0, "unchanged": 0, "searched": 0}

    def score(self, key: tuple[str, str], queries: torch.Tensor, exclude: torch.Tensor | None,
              score_fn: Callable[[np.ndarray], float]) -> float:
        """The score of one sample's patches `queries` [P, D] (bank positions in `exclude` never count)."""
        self._seen.add(key)
        item = self._items.get(key)
        if item is None or item.dist.shape[0] != queries.shape[0]:
            dist, pos = self._knn.search(queries, exclude)
            d = dist.numpy().astype(np.float32)
            item = self._items[key] = _Sample(d, self._rows[pos], score_fn(d), next(_VERSIONS))
            self.stats["full"] += 1
            return item.score
        changed = False
        stale = np.flatnonzero(np.isin(item.row, self._removed)) if self._removed.size else np.zeros(0, np.int64)
        if stale.size:  # their nearest entry was pruned: search the whole (current) bank again
            dist, pos = self._knn.search(queries[torch.from_numpy(stale)], exclude)
            item.dist[stale] = dist.numpy()
            item.row[stale] = self._rows[pos]
            self.stats["searched"] += int(stale.size)
            changed = True
        if self._added_feats is not None:
            sim = queries.to(self._added_feats.device, self._added_feats.dtype) @ self._added_feats.T
            if exclude is not None:
                sim[:, exclude[torch.from_numpy(self._added_pos)].to(sim.device)] = -4.0
            best = sim.max(1)
            dist = unit_distance(best.values.float().cpu()).numpy()
            better = dist < item.dist
            if better.any():
                item.dist[better] = dist[better]
                item.row[better] = self._rows[self._added_pos[best.indices.cpu().numpy()[better]]]
                changed = True
        if changed:
            item.score = score_fn(item.dist)
            item.version = next(_VERSIONS)
        self.stats["updated" if changed else "unchanged"] += 1
        return item.score

    def dist(self, key: tuple[str, str]) -> tuple[np.ndarray, int]:
        """A scored sample's patch distances and their version (which changes whenever they do)."""
        item = self._items[key]
        return item.dist, item.version

    def end(self) -> dict:
        """Forget samples that left the round (e.g. OK samples older than the hold-out window)."""
        for key in set(self._items) - self._seen:
            del self._items[key]
        return dict(self.stats)
