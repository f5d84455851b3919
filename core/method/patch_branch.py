"""One patch-feature branch of a ROI's model: its embedding index, memory bank and nearest-neighbour search.

A ROI scores patches with one or more branches (by default two on EfficientNet-Lite: fine, blocks
4 + 10 at stride 8, and coarse, blocks 10 + 14 at stride 16, from one forward pass). Each branch keeps:

- an append-only embedding index per kind (`index/<kind>.f32` for the first branch, the layout every
  earlier version wrote; `index/<name>-<kind>.f32` for the others), rows in the order of the samples;
- a `MemoryBank` (coreset of the OK rows) saved in `index/bank.npz` / `index/<name>-bank.npz`;
- the exact kNN over that bank, and `BankDistances` for cheap threshold updates.

No threshold and no sample files here: `RoiModel` stores samples, embeds images once for all branches
and fuses the branches' maps (core/method/fusion.py).
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from core.errors import ModelNotReadyError
from core.method.bank_distances import BankDistances
from core.method.knn import NearestNeighbour
from core.method.knn_certified import MIN_BANK, ClusteredBank, faiss
from core.method.memory_bank import CoresetSize, MemoryBank
from core.storage import EmbeddingStore, atomic_write_bytes

log = logging.getLogger(__name__)


class PatchBranch:
    """Index, bank and search of one feature branch (a `Branch`, core/method/branch.py). Not thread-safe: one
    worker owns it."""

    def __init__(self, index_dir: Path, name: str, identity: dict, feature_dim: int, size: CoresetSize,
                 proj_dim: int, device: torch.device, knn_backend: str = "auto") -> None:
        self.name = name  # "" for the first branch (the original file names)
        self.identity = identity
        self.feature_dim = feature_dim
        self.device = device
        self.knn_backend = knn_backend
        prefix = f"{name}-" if name else ""
        self.emb = {kind: EmbeddingStore(index_dir, prefix + kind) for kind in ("ok", "ng")}
        self.bank_path = index_dir / f"{prefix}bank.npz"
        self.bank = MemoryBank(feature_dim, size, proj_dim)
        self.knn: NearestNeighbour | None = None
        self._clusters: ClusteredBank | None = None  # for the certified search, built when first needed
        self.bank_sample = np.zeros(0, np.int64)  # index of the OK sample each bank entry came from
        self.distances = BankDistances()

    # ------------------------------------------------------------------ index
    def index_array(self, kind: str, in_ram: bool, ram_max_mb: float) -> np.ndarray:
        return self.emb[kind].array(in_ram, ram_max_mb)

    def stale(self, kind: str, ids: list[str]) -> bool:
        """The index was built by other features, or its samples are not a prefix of `ids`."""
        store = self.emb[kind]
        indexed = [e["sample_id"] for e in store.entries]
        return store.meta["identity"] != self.identity or indexed != ids[: len(indexed)]

    def reset(self, kind: str) -> None:
        """Empty one embedding index (other features, stale rows): its rows get new meanings."""
        self.emb[kind].reset(self.identity, self.feature_dim)
        self.distances.clear()
        if kind == "ok":
            self.bank_path.unlink(missing_ok=True)

    def compact(self, kind: str, ids: set[str]) -> list[str]:
        """Drop the rows of samples no longer stored (deleted, relabelled); an OK bank is then selected again
        from the remaining rows (its row numbers changed). Returns the dropped sample ids."""
        dropped = self.emb[kind].keep(ids)
        if dropped:
            self.distances.clear()
            if kind == "ok":
                self.bank_path.unlink(missing_ok=True)
        return dropped

    def append(self, kind: str, items: list[tuple[dict, np.ndarray]]) -> list[tuple[int, int]]:
        """Append samples' rows (entry, features [n, D]); returns their (offset, count) spans."""
        store = self.emb[kind]
        if store.meta["identity"] != self.identity:
            self.reset(kind)
        spans, offset = [], store.rows
        for _, feats in items:
            spans.append((offset, feats.shape[0]))
            offset += feats.shape[0]
        store.append(items)
        return spans

    # ------------------------------------------------------------------- bank
    def extend_bank(self, data: np.ndarray, spans: list[tuple[int, int]], progress: Callable[[], None]) -> None:
        for lo, count in spans:
            progress()
            self.bank.extend(np.asarray(data[lo : lo + count]), lo, total_rows=lo + count)

    def load_or_reselect(self, data: np.ndarray, trusted: bool, progress: Callable[[], None]) -> bool:
        """The saved bank when `trusted` (manifest agrees) and consistent with the index; else a new
        selection from the stored rows. Returns True when it was reselected."""
        ok = self.emb["ok"]
        saved = self._load_bank()
        if (saved is not None and trusted and saved[1].shape == (saved[0].size, ok.meta["dim"])
                and saved[0].ndim == 1 and np.issubdtype(saved[0].dtype, np.integer)
                and (saved[0].size == 0 or (saved[0].max() < ok.rows and saved[0].min() >= 0))
                and bool(np.isfinite(saved[1]).all())):  # a hand-made or imported bank is checked, not trusted
            self.bank.set(*saved)
            return False
        self.bank.set(np.zeros(0, np.int64), np.zeros((0, self.feature_dim), np.float32))
        for e in ok.entries:
            progress()
            lo, hi = e["offset"], e["offset"] + e["count"]
            self.bank.extend(np.asarray(data[lo:hi]), lo, total_rows=hi)
        if ok.entries:  # a ROI nobody has fitted leaves nothing on disk
            self.save_bank()
        return True

    def save_bank(self) -> None:
        """The coreset: row numbers into ok.f32 and their features (so start-up reads only this file)."""
        buf = io.BytesIO()
        np.savez(buf, rows=self.bank.rows.astype(np.int64), feats=self.bank.feats.numpy().astype(np.float32))
        atomic_write_bytes(self.bank_path, buf.getvalue())

    def _load_bank(self) -> tuple[np.ndarray, np.ndarray] | None:
        if not self.bank_path.exists():
            return None
        try:
            with np.load(self.bank_path) as z:
                return z["rows"], z["feats"]
        except (OSError, ValueError, KeyError):
            return None

    def refresh_knn(self) -> None:
        self._clusters = None
        if len(self.bank) == 0:
            self.knn = None
            self.bank_sample = np.zeros(0, np.int64)
            return
        self.knn = NearestNeighbour(self.bank.feats.to(self.device), self.knn_backend)
        self.bank_sample = self.bank.owners(np.asarray([e["offset"] for e in self.emb["ok"].entries], np.int64))

    # ---------------------------------------------------------------- search
    def search(self, feats: np.ndarray, leave_out: int | None = None) -> np.ndarray:
        """Distance of each patch [P, D] to its nearest bank entry -> [P] float32; `leave_out`: the number of
        an OK sample whose own bank entries do not count (a synthetic defect made from it)."""
        if self.knn is None:
            raise ModelNotReadyError(f"branch {self.identity['name']} has an empty memory bank")
        exclude = None
        if leave_out is not None and not self.only_from(leave_out):
            exclude = torch.from_numpy(self.bank_sample == leave_out)
        return self.knn.distances(torch.from_numpy(feats).to(self.device), exclude).numpy()

    def search_without(self, feats: np.ndarray, samples: Sequence[int]) -> np.ndarray | None:
        """Distances [P] to the nearest bank entry that none of the OK samples numbered `samples` brought (a
        bank without them, for held-out scores: core/roi/tuning.py); None when every entry is theirs."""
        if self.knn is None:
            raise ModelNotReadyError(f"branch {self.identity['name']} has an empty memory bank")
        exclude = np.isin(self.bank_sample, np.asarray(list(samples), np.int64))
        if exclude.all():
            return None
        return self.knn.distances(torch.from_numpy(feats).to(self.device), torch.from_numpy(exclude)).numpy()

    def clusters(self) -> ClusteredBank | None:
        """The bank's clusters for the certified search (core/method/knn_certified.py), built at the first prediction
        after a bank change; None where the exact search is as cheap (a small bank, CUDA)."""
        if self.knn is None or len(self.bank) < MIN_BANK or self.device.type != "cpu" or faiss is None:
            return None
        if self._clusters is None:
            t0 = time.perf_counter()
            self._clusters = ClusteredBank(self.bank.feats)
            log.info("branch %s: bank of %d patches in %d clusters for the certified search (%.0f ms)",
                     self.identity["name"], len(self.bank), self._clusters.k, (time.perf_counter() - t0) * 1000)
        return self._clusters

    def begin_round(self) -> None:
        if self.knn is not None:
            self.distances.begin(self.knn, self.bank.rows, self.bank.feats)

    def end_round(self) -> dict:
        return self.distances.end() if self.knn is not None else {}

    def __len__(self) -> int:
        return len(self.bank)

    def ready(self) -> bool:
        return self.knn is not None

    def only_from(self, sample: int) -> bool:
        """Every bank entry came from OK sample number `sample`: nothing to leave it out against."""
        return bool((self.bank_sample == sample).all())

    def sample_dist(self, kind: str, e: dict, data: np.ndarray, leave_out: int | None) -> tuple[np.ndarray, int]:
        """A stored sample's patch distances (and their version), from the cache brought up to date with
        the bank; `leave_out`: the number of an OK sample whose own bank entries do not count."""
        exclude = None if leave_out is None else torch.from_numpy(self.bank_sample == leave_out)
        q = torch.from_numpy(np.array(data[e["offset"] : e["offset"] + e["count"]])).to(self.device)
        self.distances.score((kind, e["sample_id"]), q, exclude, lambda dist: 0.0)
        return self.distances.dist((kind, e["sample_id"]))
