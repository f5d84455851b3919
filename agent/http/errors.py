"""HTTP error answers: the status of each error code, logged at WARNING and counted in one place."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from fastapi.responses import JSONResponse

from core.ids import safe_text

if TYPE_CHECKING:
    from agent.http.context import HttpContext

log = logging.getLogger("agent.http.api")

# error code -> HTTP status; any other code of a rejected input is 400
STATUS_BY_CODE = {
    "unauthorized": 401, "model_not_fitted": 404, "unknown_roi": 404, "not_found": 404,
    "method_not_allowed": 405, "backbone_mismatch": 409, "file_too_large": 413, "payload_too_large": 413,
    "unknown_format": 415, "unsupported_image": 415, "invalid_field": 422, "invalid_id": 422,
    "invalid_mm_per_px": 422, "invalid_threshold": 422, "invalid_policy": 422, "internal_error": 500,
    "queue_full": 503, "shutting_down": 503, "timeout": 504, "disk_full": 507, "storage_error": 500,
    "unknown_sample": 404, "unknown_version": 404, "conflicting_label": 409, "roi_exists": 409,
    "version_unavailable": 409, "checksum_mismatch": 422, "invalid_archive": 422, "invalid_sample_ids": 422,
    "invalid_version": 422, "unknown_request": 404, "invalid_json": 400, "invalid_base64": 400,
    "roi_unloadable": 503, "too_many_rois": 409, "busy": 409, "cross_site": 403, "csrf": 403,
    "host_not_allowed": 403, "too_many_samples": 409,
}


ENDPOINTS = ("fit_ok", "send_ng", "predict", "calibrate", "models", "health", "metrics", "docs", "docs-static",
             "openapi.json", "ui", "samples", "rollback", "reset", "export", "import", "label")


class ApiError(Exception):
    """An HTTP error answer; `counted`: the worker's result observers already counted the request."""

    def __init__(self, code: str, message: str, counted: bool = False) -> None:
        super().__init__(message)
        self.code, self.message, self.counted = code, message, counted


def _rid_header(request_id: str | None) -> dict[str, str]:
    """X-Request-ID, when the id can travel in a header (printable ASCII); it is in the body anyway."""
    return {"X-Request-ID": request_id} if request_id and request_id.isascii() and request_id.isprintable() else {}


def _action(path: str) -> str:
    """A metrics label from a request path: the endpoint, never an arbitrary path (label cardinality)."""
    name = path.strip("/").split("/")[0]
    return name if name in ENDPOINTS else "page" if not name else "other"


def refuse(ctx: HttpContext, scope: dict, code: str, message: str, count: bool = True) -> JSONResponse:
    """A request answered with an error before or instead of a result: logged, counted, answered."""
    client = scope.get("client") or ("?", 0)
    if count:  # not counted here: the worker answered it, and logged it at WARNING with the ROI and source
        log.warning("http: %s %s from %s: %s %s: %s", scope.get("method"), safe_text(scope.get("path")), client[0],
                    STATUS_BY_CODE.get(code, 400), code, message)
        ctx.metrics.rejected("http", _action(scope.get("path", "")), code)
    return error_response(code, message)


def error_response(code: str, message: str, request_id: str | None = None) -> JSONResponse:
    status = STATUS_BY_CODE.get(code, 400)
    headers = _rid_header(request_id)
    if status == 503:
        headers["Retry-After"] = "1"
    response = JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)
    if status == 401:  # Basic first: a browser then asks the operator for the token (as password)
        response.headers.append("WWW-Authenticate", 'Basic realm="anomaly-agent"')
        response.headers.append("WWW-Authenticate", "Bearer")
    return response
