"""Jobs flowing from ingestion (folder, MQTT, HTTP) to the worker, and the one result shape for all."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from core.storage import utc_now

ACTIONS = ("predict", "fit_ok", "send_ng", "calibrate")


@dataclass(eq=False)
class Job:
    role_id: str
    roi_id: str
    action: str
    images: list[bytes]  # one image (predict, send_ng) or several (fit_ok batch); none for calibrate
    request_id: str
    meta: dict = field(default_factory=dict)  # mm_per_px, source, heatmap, threshold, ...
    on_result: Callable[[Job, dict], None] | None = None
    enqueued_at: float = 0.0
    ingress: str = "unknown"  # folder, mqtt, http: for metrics and the operator page


def ok_result(job: Job, data: dict) -> dict:
    return {"status": "ok", "request_id": job.request_id, "role_id": job.role_id, "roi_id": job.roi_id,
            "action": job.action, "data": data, "timestamp_utc": utc_now()}


def error_result(job: Job, code: str, message: str) -> dict:
    return {"status": "error", "request_id": job.request_id, "role_id": job.role_id, "roi_id": job.roi_id,
            "action": job.action, "error": {"code": code, "message": message}, "timestamp_utc": utc_now()}
