"""HTTP request fields and response models (the OpenAPI schema at /docs)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import Form
from pydantic import BaseModel, ConfigDict


class ErrorBody(BaseModel):
    class Detail(BaseModel):
        code: str
        message: str

    error: Detail


class RoiState(BaseModel):
    """A ROI's state, as on the MQTT state topic."""

    model_config = ConfigDict(extra="allow")
    role_id: str
    roi_id: str
    model_version: int
    samples: dict[str, int]
    bank_size: int
    threshold: float | None
    threshold_method: str
    threshold_details: dict
    threshold_policy: dict


class FitResult(RoiState):
    request_id: str
    added: int
    duplicates: int
    duplicates_in_batch: int


class PredictResult(BaseModel):
    """The `data` object of the MQTT result, with the request's ids."""

    model_config = ConfigDict(extra="allow")
    request_id: str
    role_id: str
    roi_id: str
    is_anomaly: bool
    score: float
    threshold: float
    threshold_method: str
    inference_ms: float
    model_version: int
    mm_per_px: float | None
    defects: dict
    heatmap_png_b64: str | None = None


ERRORS: dict[int | str, dict[str, Any]] = {s: {"model": ErrorBody} for s in (400, 401, 404, 413, 415, 422, 503)}


Role = Annotated[str, Form(description="station / recipe id, [A-Za-z0-9_.-]{1,64}")]
Roi = Annotated[str, Form(description="ROI id, [A-Za-z0-9_.-]{1,64}")]
MmPerPx = Annotated[float | None, Form(description="millimetres per pixel of the image (defect areas in mm²)")]
RequestId = Annotated[str | None, Form(max_length=200, description="your id, echoed in the result")]
Relabel = Annotated[bool, Form(description="an image stored under the other label moves to this one "
                                           "(else refused: conflicting_label)")]
Source = Annotated[str, Form(max_length=200, description="who sent it (kept in the sample's JSON)")]
Policy = Annotated[Literal["auto", "ok_only", "manual", "config"] | None, Form(description=(
    "auto: between OK and NG scores when NG samples exist, else the OK percentile; ok_only: the OK "
    "percentile; manual: `threshold`; config: back to the configured policy; empty: recompute"))]
