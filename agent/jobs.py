"""Jobs flowing from any intake (folder, MQTT, HTTP) to the worker, and the one result shape for all."""

from __future__ import annotations

import base64
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

from core.errors import InputError
from core.ids import safe_text
from core.prediction import SearchStats
from core.storage import utc_now

ACTIONS = ("predict", "fit_ok", "send_ng", "calibrate", "delete_samples", "rollback", "reset")
IMAGELESS = ("calibrate", "delete_samples", "rollback", "reset")  # actions that carry no image


FLAGS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}
NUMBERS = {"threshold": "invalid_threshold", "ok_percentile": "invalid_policy", "ng_margin": "invalid_policy",
           "ng_recall": "invalid_policy"}  # a number that is not one: refused with this code


def as_flag(name: str, value: object) -> bool | None:
    """A flag from outside: true/false, 1/0, and the strings of FLAGS ("false" is false, not a non-empty
    string; "" is no value); anything else is refused (invalid_field), the same over every transport."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and (value.strip().lower() in FLAGS or not value.strip()):
        return FLAGS.get(value.strip().lower())
    raise InputError(f"{name}: must be true or false, got {safe_text(value, 20)!r}", code="invalid_field")


def as_number(name: str, value: object) -> float | None:
    if value is None:
        return None
    try:
        number = float(value) if isinstance(value, (int, float, str)) and not isinstance(value, bool) else math.nan
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise InputError(f"{name} must be a finite number, got {safe_text(value, 60)!r}", code=NUMBERS[name])
    return number


class Params(BaseModel):
    """A request's parameters: one schema for every ingress (HTTP form or JSON, MQTT JSON or v5 user
    properties, folder sidecar), so the same value is read, or refused with the same code, whichever way it
    came. `Params.of(raw)` validates what came in; unknown keys are ignored (each transport's own)."""

    model_config = ConfigDict(extra="ignore", arbitrary_types_allowed=True)

    mm_per_px: object = None  # checked when the image is decoded (invalid_mm_per_px)
    source: str = "unknown"
    heatmap: bool | None = None  # None: the ROI's default (config heatmap)
    threshold: float | None = None
    reset: bool = False
    policy: str | None = None  # checked with its numbers by core.method.thresholds (invalid_policy)
    ok_percentile: float | None = None
    ng_margin: float | None = None
    ng_recall: float | None = None
    file_name: str | None = None  # the upload's or file's name, shown on the operator page
    relabel: bool = False  # fit_ok / send_ng: an image stored under the other label moves to this one
    sample_ids: object = None  # delete_samples: checked by core.roi.lifecycle (invalid_sample_ids)
    version: object = None  # rollback: checked by core.roi.lifecycle (invalid_version)

    @field_validator("heatmap", "reset", "relabel", mode="before")
    @classmethod
    def _flag(cls, v: object, info: ValidationInfo) -> bool | None:
        flag = as_flag(str(info.field_name), v)
        return flag if flag is not None or info.field_name == "heatmap" else False

    @field_validator(*NUMBERS, mode="before")
    @classmethod
    def _number(cls, v: object, info: ValidationInfo) -> float | None:
        return as_number(str(info.field_name), v)

    @field_validator("source", mode="before")
    @classmethod
    def _source(cls, v: object) -> str:
        return "unknown" if v is None else safe_text(v)

    @field_validator("file_name", mode="before")
    @classmethod
    def _file_name(cls, v: object) -> str | None:
        return None if v is None else safe_text(v, 200)

    @field_validator("policy", mode="before")
    @classmethod
    def _policy(cls, v: object) -> str | None:
        return None if v is None else safe_text(v, 60)

    @classmethod
    def of(cls, raw: Mapping[str, object]) -> Params:
        """Request parameters from any ingress; InputError (invalid_field, invalid_threshold,
        invalid_policy) names the first that cannot be used."""
        return cls.model_validate(dict(raw))


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
