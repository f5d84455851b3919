"""What a scoring branch of a ROI's model is, as the rest of the model sees it.

A branch keeps per kind (ok, ng) an append-only index of its features of every stored sample, fits itself
to the OK rows (a patch branch: a coreset memory bank), and scores features of a new image as one
distance per position of its grid (higher: less like the OK samples). `RoiIndex` (core/roi/index.py) keeps
the branches in step with the samples, `SampleScorer` (core/roi/sample_scores.py) scores the stored
samples for the threshold, `Scorer` (core/method/scorer.py) turns the distances into maps, a score and
regions. None of them needs to know more of a branch than this protocol: a new kind of branch (an
image-level score, an NG-aware one) implements it, and `RoiIndex.__init__` builds it.

`PatchBranch` (core/method/patch_branch.py) is the implementation today.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from core.method.knn_certified import ClusteredBank
from core.storage import EmbeddingStore


class Branch(Protocol):
    identity: dict  # what made its features (backbone, blocks, resolution): an index of others is rebuilt
    emb: dict[str, EmbeddingStore]  # per kind: rows of every stored sample, in sample order
    bank_path: Path  # its fitted state on disk (kept with each version for a rollback)

    # ---------------------------------------------------------------- index
    def index_array(self, kind: str, in_ram: bool, ram_max_mb: float) -> np.ndarray: ...
    def stale(self, kind: str, ids: list[str]) -> bool: ...
    def reset(self, kind: str) -> None: ...
    def compact(self, kind: str, ids: set[str]) -> list[str]: ...
    def append(self, kind: str, items: list[tuple[dict, np.ndarray]]) -> list[tuple[int, int]]: ...

    # ------------------------------------------------------------------ fit
    def extend_bank(self, data: np.ndarray, spans: list[tuple[int, int]], progress: Callable[[], None]) -> None: ...
    def load_or_reselect(self, data: np.ndarray, trusted: bool, progress: Callable[[], None]) -> bool: ...
    def save_bank(self) -> None: ...
    def refresh_knn(self) -> None: ...
    def __len__(self) -> int: ...  # fitted entries (its bank's size)
    def ready(self) -> bool: ...  # fitted and searchable (after refresh_knn): it can score

    # -------------------------------------------------------------- scoring
    # features [P, D] -> distances [P]; leave_out: an OK sample whose own fitted entries do not count
    def search(self, feats: np.ndarray, leave_out: int | None = None) -> np.ndarray: ...
    # features [P, D] -> distances [P] to the bank without the entries of these OK samples; None: nothing left
    def search_without(self, feats: np.ndarray, samples: Sequence[int]) -> np.ndarray | None: ...
    def clusters(self) -> ClusteredBank | None: ...  # None: no certified search, the exact one runs

    # threshold rounds: distances of stored samples, brought up to date with the fitted state
    def begin_round(self) -> None: ...
    def end_round(self) -> dict: ...
    def sample_dist(self, kind: str, e: dict, data: np.ndarray, leave_out: int | None) -> tuple[np.ndarray, int]: ...
    def only_from(self, sample: int) -> bool: ...  # every fitted entry came from this OK sample
