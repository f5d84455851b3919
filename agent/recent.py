"""The last N results of every ingress, with a thumbnail to draw their heatmap on demand (operator page)."""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

from core.heatmap import render_heatmap

from .jobs import Job, Outcome


@dataclass
class RecentResult:
    seq: int
    ingress: str
    result: dict  # the published result, without a base64 heatmap
    preview: dict | None  # heatmap.thumbnail(): rgb uint8, map, mask


class RecentResults:
    """A worker observer. Thread-safe: written by the worker, read by the HTTP server."""

    def __init__(self, size: int) -> None:
        self._items: deque[RecentResult] = deque(maxlen=max(1, size))
        self._lock = threading.Lock()
        self._seq = 0
        self.enabled = size > 0

    def observe(self, job: Job, outcome: Outcome) -> None:
        if not self.enabled:
            return
        with self._lock:
            self._seq += 1
            self._items.append(RecentResult(self._seq, job.ingress, outcome.result, outcome.preview))

    def items(self) -> list[RecentResult]:
        """Newest first."""
        with self._lock:
            return list(reversed(self._items))

    def heatmap_png(self, seq: int) -> bytes | None:
        with self._lock:
            item = next((i for i in self._items if i.seq == seq), None)
        if item is None or item.preview is None:
            return None
        p = item.preview
        return render_heatmap(p["rgb"].astype("float32") / 255.0, p["map"], float(item.result["data"]["threshold"]),
                              p["mask"])
