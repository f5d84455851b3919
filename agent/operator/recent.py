"""The last N results of every ingress for the operator page: a thumbnail to draw the image and its heatmap
on demand, and, for predictions, the image as received (under `<data_root>/recent/`, at most N files), so
that the operator can label a result OK or NG (POST /label) as long as it is listed."""

from __future__ import annotations

import logging
import shutil
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import cv2

from agent.jobs import Job, Outcome
from core.method.heatmap import render_heatmap

log = logging.getLogger(__name__)


@dataclass
class RecentResult:
    seq: int
    ingress: str
    result: dict  # the published result, without a base64 heatmap
    preview: dict | None  # heatmap.thumbnail(): rgb uint8, map, mask
    file_name: str | None = None
    image: Path | None = None  # the predicted image as received, for labelling
    labelled: str | None = None  # "ok" / "ng" once the operator labelled it


class RecentResults:
    """A worker observer. Thread-safe: written by the worker, read by the HTTP server."""

    def __init__(self, size: int, image_dir: Path | None = None) -> None:
        self._items: deque[RecentResult] = deque(maxlen=max(1, size))
        self._lock = threading.Lock()
        self._seq = 0
        self.enabled = size > 0
        self.image_dir = image_dir
        if image_dir is not None and self.enabled:  # the list starts empty after a restart: so do its images
            shutil.rmtree(image_dir, ignore_errors=True)
            image_dir.mkdir(parents=True, exist_ok=True)

    def observe(self, job: Job, outcome: Outcome) -> None:
        if not self.enabled:
            return
        with self._lock:
            self._seq += 1
            item = RecentResult(self._seq, job.ingress, outcome.result, outcome.preview, job.params.file_name)
            if (self.image_dir is not None and job.action == "predict" and outcome.result["status"] == "ok"
                    and job.images):
                try:
                    item.image = self.image_dir / f"{item.seq}.img"
                    item.image.write_bytes(job.images[0])
                except OSError as exc:  # a full disk: the result is listed, only its label buttons are missing
                    log.warning("operator page: image of %s not kept: %s", job.request_id, exc)
                    item.image = None
            if len(self._items) == self._items.maxlen and self._items[0].image is not None:
                self._items[0].image.unlink(missing_ok=True)
            self._items.append(item)

    def items(self) -> list[RecentResult]:
        """Newest first."""
        with self._lock:
            return list(reversed(self._items))

    def find(self, request_id: str) -> RecentResult | None:
        """The newest listed prediction with this request id whose image is kept."""
        with self._lock:
            return next((i for i in reversed(self._items) if i.result.get("request_id") == request_id
                         and i.image is not None and i.image.exists()), None)

    def mark(self, item: RecentResult, label: str) -> None:
        with self._lock:
            item.labelled = label

    def _item(self, seq: int) -> RecentResult | None:
        with self._lock:
            return next((i for i in self._items if i.seq == seq), None)

    def heatmap_png(self, seq: int) -> bytes | None:
        item = self._item(seq)
        if item is None or item.preview is None:
            return None
        p = item.preview
        return render_heatmap(p["rgb"].astype("float32") / 255.0, p["map"], float(item.result["data"]["threshold"]),
                              p["mask"])

    def image_png(self, seq: int) -> bytes | None:
        """The thumbnail of the image itself (beside its heatmap on the page)."""
        item = self._item(seq)
        if item is None or item.preview is None:
            return None
        ok, png = cv2.imencode(".png", item.preview["rgb"][:, :, ::-1])
        return png.tobytes() if ok else None
