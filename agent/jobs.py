"""Jobs flowing from any intake (folder, MQTT, HTTP) to the worker, and the one result shape for all."""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass, field

from core.prediction import SearchStats
from core.storage import utc_now

ACTIONS = ("predict", "fit_ok", "send_ng", "calibrate", "delete_samples", "rollback", "reset")
IMAGELESS = ("calibrate", "delete_samples", "rollback", "reset")  # actions that carry no image


@dataclass
class Params:
    """A request's parameters, the same for every ingress (intake.params_from converts what came in)."""

    mm_per_px: object = None  # checked when the image is decoded (invalid_mm_per_px)
    source: str = "unknown"
    heatmap: bool | None = None  # None: the ROI's default (config heatmap)
    threshold: float | None = None
    reset: bool = False
    policy: str | None = None
    ok_percentile: float | None = None
    ng_margin: float | None = None
    ng_recall: float | None = None
    file_name: str | None = None  # the upload's or file's name, shown on the operator page
    relabel: bool = False  # fit_ok / send_ng: an image stored under the other label moves to this one
    sample_ids: object = None  # delete_samples: checked by core.roi.lifecycle (invalid_sample_ids)
    version: object = None  # rollback: checked by core.roi.lifecycle (invalid_version)


@dataclass
class Outcome:
    """What the worker hands back for a job: the result payload (no heatmap in it), the heatmap PNG (each
    channel encodes it its own way: base64 in JSON, a file next to the result) and a preview thumbnail."""

    result: dict
    heatmap_png: bytes | None = None
    send_heatmap: bool = False  # the request asked for the heatmap (or its ROI sends one by default)
    preview: dict | None = None
    search: SearchStats | None = None  # a prediction's search (metrics), never in the result

    def with_heatmap_b64(self) -> dict:
        """The result as JSON channels send it: `data.heatmap_png_b64` when the heatmap was asked for."""
        if self.heatmap_png is None or not self.send_heatmap or "data" not in self.result:
            return self.result
        return {**self.result, "data": {**self.result["data"],
                                        "heatmap_png_b64": base64.b64encode(self.heatmap_png).decode()}}


@dataclass(eq=False)
class Job:
    role_id: str
    roi_id: str
    action: str
    images: list[bytes]  # one image (predict, send_ng) or several (fit_ok batch); none for calibrate
    request_id: str
    params: Params = field(default_factory=Params)
    reply: Callable[[Job, Outcome], None] | None = None  # called once, from the worker thread
    origin: object = None  # the transport's own note of where the job came from; only that transport reads it
    enqueued_at: float = 0.0
    ingress: str = "unknown"  # folder, mqtt, http: for metrics, logs and the operator page


def ok_result(job: Job, data: dict) -> dict:
    return {"status": "ok", "request_id": job.request_id, "role_id": job.role_id, "roi_id": job.roi_id,
            "action": job.action, "data": data, "timestamp_utc": utc_now()}


def error_result(job: Job, code: str, message: str) -> dict:
    return {"status": "error", "request_id": job.request_id, "role_id": job.role_id, "roi_id": job.roi_id,
            "action": job.action, "error": {"code": code, "message": message}, "timestamp_utc": utc_now()}
