"""Nearest-neighbour distance of query patches to a memory bank (features are L2-normalised).

For unit vectors ||q - b||^2 = 2 - 2 q.b, so the nearest neighbour is the maximum inner product.
Both backends are exact. `bench/knn_backends.py` (docs/benchmarks.md) compares them on the CPU with a
bank of 8192: faiss's flat index is 0.8-0.9x torch's time at 1024 queries (DINOv2 at 448), but 2-7x
slower below a few hundred queries (EfficientNet at 192, threshold updates that search a few
patches). So `auto` uses faiss on the CPU for searches of at least FAISS_MIN_QUERIES queries and torch
matmul otherwise, and torch always on CUDA.
"""

from __future__ import annotations

import numpy as np
import torch

try:  # faiss-cpu is a dependency, but keep the torch path usable without it
    import faiss
except ImportError:  # pragma: no cover
    faiss = None

FAISS_MIN_QUERIES = 768


class NearestNeighbour:
    """Exact 1-NN L2 distance to a fixed bank; rebuild when the bank changes."""

    def __init__(self, bank: torch.Tensor, backend: str = "auto", chunk: int = 512) -> None:
        use_faiss = faiss is not None and bank.device.type == "cpu" and backend in ("auto", "faiss")
        self.backend = backend if backend != "auto" else ("faiss+torch" if use_faiss else "torch")
        self._faiss_min = 0 if backend == "faiss" else FAISS_MIN_QUERIES
        self.bank = bank
        self.chunk = chunk
        self.size = bank.shape[0]
        self._index = None
        if use_faiss:
            self._index = faiss.IndexFlatIP(bank.shape[1])
            self._index.add(np.ascontiguousarray(bank.detach().cpu().numpy(), dtype=np.float32))

    def distances(self, queries: torch.Tensor, exclude: torch.Tensor | None = None) -> torch.Tensor:
        """L2 distance of each query [N, D] to its nearest bank entry -> [N] float32 on the CPU.

        exclude: optional bool mask over the bank; excluded entries are never the neighbour
        (used to score a stored OK sample against a bank without its own patches).
        """
        return self.search(queries, exclude)[0]

    def search(self, queries: torch.Tensor, exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, np.ndarray]:
        """Like `distances`, plus the bank position of each query's nearest entry -> ([N] float32, [N] int64)."""
        if self.size == 0:
            raise ValueError("memory bank is empty")
        if exclude is None and self._index is not None and queries.shape[0] >= self._faiss_min:
            sims, idx = self._index.search(np.ascontiguousarray(queries.detach().cpu().numpy(), np.float32), 1)
            sim, pos = torch.from_numpy(sims[:, 0]), idx[:, 0].astype(np.int64)
        else:
            bank = self.bank.to(queries.device)
            q = queries.to(bank.dtype)
            parts, where = [], []
            for i in range(0, q.shape[0], self.chunk):
                s = q[i : i + self.chunk] @ bank.T
                if exclude is not None:
                    s[:, exclude.to(s.device)] = -4.0
                best = s.max(1)
                parts.append(best.values)
                where.append(best.indices)
            sim = torch.cat(parts).float().cpu()
            pos = torch.cat(where).cpu().numpy().astype(np.int64)
        return unit_distance(sim), pos


def unit_distance(sim: torch.Tensor) -> torch.Tensor:
    """L2 distance of unit vectors from their inner product."""
    return (2.0 - 2.0 * sim).clamp_min_(0).sqrt_()
