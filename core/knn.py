"""Nearest-neighbour distance of query patches to a memory bank (features are L2-normalised).

For unit vectors ||q - b||^2 = 2 - 2 q.b, so the nearest neighbour is the maximum inner product.
`bench/latency.py` compares the two backends; faiss (flat inner product) is the CPU default and torch
matmul the CUDA default.
"""

from __future__ import annotations

import numpy as np
import torch

try:  # faiss-cpu is a dependency, but keep the torch path usable without it
    import faiss
except ImportError:  # pragma: no cover
    faiss = None


class NearestNeighbour:
    """Exact 1-NN L2 distance to a fixed bank; rebuild when the bank changes."""

    def __init__(self, bank: torch.Tensor, backend: str = "auto", chunk: int = 512) -> None:
        if backend == "auto":
            backend = "faiss" if bank.device.type == "cpu" and faiss is not None else "torch"
        self.backend = backend
        self.bank = bank
        self.chunk = chunk
        self.size = bank.shape[0]
        self._index = None
        if backend == "faiss":
            self._index = faiss.IndexFlatIP(bank.shape[1])
            self._index.add(np.ascontiguousarray(bank.detach().cpu().numpy(), dtype=np.float32))

    def distances(self, queries: torch.Tensor, exclude: torch.Tensor | None = None) -> torch.Tensor:
        """L2 distance of each query [N, D] to its nearest bank entry -> [N] float32 on the CPU.

        exclude: optional bool mask over the bank; excluded entries are never the neighbour
        (used to score a stored OK sample against a bank without its own patches).
        """
        if self.size == 0:
            raise ValueError("memory bank is empty")
        if exclude is None and self._index is not None:
            sims, _ = self._index.search(np.ascontiguousarray(queries.detach().cpu().numpy(), np.float32), 1)
            sim = torch.from_numpy(sims[:, 0])
        else:
            bank = self.bank.to(queries.device)
            q = queries.to(bank.dtype)
            parts = []
            for i in range(0, q.shape[0], self.chunk):
                s = q[i : i + self.chunk] @ bank.T
                if exclude is not None:
                    s[:, exclude.to(s.device)] = -4.0
                parts.append(s.max(1).values)
            sim = torch.cat(parts).float().cpu()
        return (2.0 - 2.0 * sim).clamp_min_(0).sqrt_()
