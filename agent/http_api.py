"""HTTP ingress (FastAPI): the original backend's endpoints, /models, /health, /metrics, the operator page.

Every request that needs the model becomes a Job on the worker's queue, exactly as a folder or MQTT
request does (one code path from request to result); the handler waits for that job's result.
HTTP is request/response: a client that gets no answer (agent killed) retries; fit_ok and send_ng
are idempotent (samples are deduplicated by content) and a sample is stored before its 200.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid
from base64 import b64decode
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import FastAPI, File, Form, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.staticfiles import StaticFiles
from swagger_ui_bundle import swagger_ui_path

from core import __version__
from core.errors import AnomalyError
from core.ids import request_id_from, safe_text, validate_id
from core.model import manifest_state, stored_rois
from core.storage import RoiStore

from .config import AgentConfig
from .health import health_body
from .jobs import Job
from .metrics import Metrics
from .operator_page import render_page
from .recent import RecentResults
from .runtime import Runtime
from .worker import Worker

log = logging.getLogger(__name__)

# error code -> HTTP status; any other code of a rejected input is 400
STATUS_BY_CODE = {
    "unauthorized": 401, "model_not_fitted": 404, "unknown_roi": 404, "not_found": 404,
    "method_not_allowed": 405, "backbone_mismatch": 409, "file_too_large": 413, "payload_too_large": 413,
    "unknown_format": 415, "unsupported_image": 415, "invalid_field": 422, "invalid_id": 422,
    "invalid_mm_per_px": 422, "invalid_threshold": 422, "invalid_policy": 422, "internal_error": 500,
    "queue_full": 503, "shutting_down": 503, "timeout": 504, "disk_full": 507, "storage_error": 500,
}


ENDPOINTS = ("fit_ok", "send_ng", "predict", "calibrate", "models", "health", "metrics", "docs", "docs-static",
             "openapi.json", "ui")


class ApiError(Exception):
    """An HTTP error answer; `counted`: the worker's result observers already counted the request."""

    def __init__(self, code: str, message: str, counted: bool = False) -> None:
        super().__init__(message)
        self.code, self.message, self.counted = code, message, counted


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
Source = Annotated[str, Form(max_length=200, description="who sent it (kept in the sample's JSON)")]
Policy = Annotated[Literal["auto", "ok_only", "manual", "config"] | None, Form(description=(
    "auto: between OK and NG scores when NG samples exist, else the OK percentile; ok_only: the OK "
    "percentile; manual: `threshold`; config: back to the configured policy; empty: recompute"))]


@dataclass
class HttpContext:
    cfg: AgentConfig
    worker: Worker
    rt: Runtime
    started: float
    metrics: Metrics
    recent: RecentResults
    token: str | None = None
    agent_id: str = "anomaly-agent"
    extra_health: Callable[[], dict] | None = None
    accepting: bool = True
    mirror: Callable[[dict, str | None], None] | None = None  # e.g. MQTT: publish HTTP results on the result topic too


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
    log.warning("http: %s %s from %s: %s %s: %s", scope.get("method"), safe_text(scope.get("path")), client[0],
                STATUS_BY_CODE.get(code, 400), code, message)
    if count:
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


def token_ok(header: bytes | None, token: str) -> bool:
    """`Authorization: Bearer <token>`, or Basic with the token as password (a browser's login prompt)."""
    if not header:
        return False
    scheme, _, value = header.decode("latin-1").partition(" ")
    if scheme.lower() == "bearer":
        given = value.strip()
    elif scheme.lower() == "basic":
        try:
            given = b64decode(value.strip()).decode().partition(":")[2]
        except (ValueError, UnicodeDecodeError):
            return False
    else:
        return False
    return hmac.compare_digest(given.encode(), token.encode())


class Guard:
    """ASGI middleware: the bearer token (all but /health) and the request size limit, before parsing."""

    def __init__(self, app: Any, ctx: HttpContext) -> None:
        self.app, self.ctx = app, ctx

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            refusal = None
            if self.ctx.token and scope["path"] != "/health" and not token_ok(headers.get(b"authorization"),
                                                                               self.ctx.token):
                refusal = ("unauthorized", "missing or wrong token: send 'Authorization: Bearer <token>'")
            else:
                length = headers.get(b"content-length")
                limit = self.ctx.cfg.http.max_request_bytes
                if length and length.isdigit() and int(length) > limit:
                    refusal = ("payload_too_large", f"request of {int(length)} bytes is over http.max_request_bytes "
                               f"({limit})")
            if refusal:
                await refuse(self.ctx, scope, *refusal)(scope, receive, send)
                return
            await self._bounded(scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def _bounded(self, scope: dict, receive: Any, send: Any) -> None:
        """Count the body as it streams (chunked requests have no Content-Length): past the limit, stop
        reading and answer 413 instead of holding the rest."""
        limit = self.ctx.cfg.http.max_request_bytes
        seen, started, over = 0, False, False

        async def counted_receive() -> dict:
            nonlocal seen, over
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    over = True
                    raise _BodyTooLarge
            return message

        async def watched_send(message: dict) -> None:
            nonlocal started
            if over:
                return  # the app's own answer to a body cut short (a parse error) is replaced below
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, watched_send)
        except _BodyTooLarge:
            pass
        if over and not started:
            msg = f"request body over http.max_request_bytes ({limit}): stopped reading at {seen} bytes"
            await refuse(self.ctx, scope, "payload_too_large", msg)(scope, receive, send)


class _BodyTooLarge(Exception):
    """Raised inside the app's body read when a streamed body passes the limit."""


def _ids(role_id: str, roi_id: str) -> None:
    validate_id(role_id, "role_id")
    validate_id(roi_id, "roi_id")


def create_app(ctx: HttpContext) -> FastAPI:
    cfg = ctx.cfg
    app = FastAPI(title="anomaly-agent", version=__version__, docs_url=None, redoc_url=None, description=(
        "Visual anomaly detection per ROI (PatchCore). The same queue and worker serve the watched folder, "
        "MQTT and these endpoints. Errors: `{error: {code, message}}` with the codes of docs/protocol.md. "
        "With `http.token_file` set, every endpoint but /health needs `Authorization: Bearer <token>`."))
    app.add_middleware(Guard, ctx=ctx)
    # the API page works offline (a factory network has no CDN): Swagger UI served from the package.
    # Its Swagger UI 4 reads OpenAPI 3.0 documents; this schema uses nothing of 3.1 it cannot show.
    app.openapi_version = "3.0.3"
    app.mount("/docs-static", StaticFiles(directory=str(swagger_ui_path)), name="docs-static")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="anomaly-agent API",
                                   swagger_js_url="/docs-static/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-static/swagger-ui.css",
                                   swagger_favicon_url="/docs-static/favicon-32x32.png")

    @app.exception_handler(ApiError)
    async def _api_error(request: Any, exc: ApiError) -> JSONResponse:
        return refuse(ctx, request.scope, exc.code, exc.message, count=not exc.counted)

    @app.exception_handler(AnomalyError)
    async def _anomaly_error(request: Any, exc: AnomalyError) -> JSONResponse:
        return refuse(ctx, request.scope, exc.code, exc.message)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Any, exc: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(p) for p in e['loc'] if p != 'body')}: {e['msg']}" for e in exc.errors()]
        return refuse(ctx, request.scope, "invalid_field", "; ".join(parts))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Any, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse({"error": {"code": code, "message": str(exc.detail)}}, status_code=exc.status_code)

    async def read_files(files: list[UploadFile]) -> list[bytes]:
        limit = cfg.limits.max_bytes
        out = []
        for f in files:
            data = await f.read(limit + 1)
            if len(data) > limit:
                raise ApiError("file_too_large", f"{f.filename or 'file'}: over limits.max_bytes ({limit} bytes)")
            out.append(data)
        return out

    async def run(job: Job) -> dict:
        """Queue the job, wait for its one result; ok data, or ApiError with the worker's code."""
        if not ctx.accepting:
            raise ApiError("shutting_down", "the agent is stopping; retry on its restart")
        loop = asyncio.get_running_loop()
        done: asyncio.Future[dict] = loop.create_future()

        def deliver(_job: Job, result: dict) -> None:  # in the worker thread
            loop.call_soon_threadsafe(lambda: done.done() or done.set_result(result))
            if ctx.mirror is not None:  # after the answer is on its way: no extra latency for the client
                ctx.mirror(result, None)

        job.on_result = deliver
        if not ctx.worker.submit(job, timeout=0):
            raise ApiError("queue_full", f"the worker queue is full ({cfg.worker.queue_size}); retry later")
        try:
            result = await asyncio.wait_for(done, cfg.http.request_timeout_s)
        except asyncio.TimeoutError:
            raise ApiError("timeout", f"no result within http.request_timeout_s ({cfg.http.request_timeout_s} s); "
                           "the job stays queued and runs", counted=True) from None
        if result["status"] != "ok":
            raise ApiError(result["error"]["code"], result["error"]["message"], counted=True)
        return {"request_id": job.request_id, "role_id": job.role_id, "roi_id": job.roi_id, **result["data"]}

    def new_job(action: str, role_id: str, roi_id: str, images: list[bytes], request_id: str | None,
                **meta: Any) -> Job:
        _ids(role_id, roi_id)
        rid = request_id_from(request_id) if request_id else f"http-{uuid.uuid4().hex}"
        return Job(role_id, roi_id, action, images, rid, {k: v for k, v in meta.items() if v is not None},
                   ingress="http")

    def answer(body: dict) -> JSONResponse:
        return JSONResponse(body, headers=_rid_header(body["request_id"]))

    async def samples(action: str, role_id: str, roi_id: str, files: list[UploadFile], mm_per_px: float | None,
                      source: str, request_id: str | None) -> JSONResponse:
        job = new_job(action, role_id, roi_id, await read_files(files), request_id, mm_per_px=mm_per_px,
                      source=source)
        return answer(await run(job))

    @app.post("/fit_ok", response_model=FitResult, responses=ERRORS, tags=["samples"])
    async def fit_ok(role_id: Role, roi_id: Roi, files: Annotated[list[UploadFile], File(description="OK images")],
                     mm_per_px: MmPerPx = None, source: Source = "http", request_id: RequestId = None) -> JSONResponse:
        """Store OK samples (image + JSON) and update the ROI's memory bank and threshold in one batch."""
        return await samples("fit_ok", role_id, roi_id, files, mm_per_px, source, request_id)

    @app.post("/send_ng", response_model=FitResult, responses=ERRORS, tags=["samples"])
    async def send_ng(role_id: Role, roi_id: Roi, files: Annotated[list[UploadFile], File(description="NG images")],
                      mm_per_px: MmPerPx = None, source: Source = "http", request_id: RequestId = None) -> JSONResponse:
        """Store NG samples and recalibrate the threshold (policy auto: between OK and NG scores)."""
        return await samples("send_ng", role_id, roi_id, files, mm_per_px, source, request_id)

    @app.post("/predict", response_model=PredictResult, responses=ERRORS, tags=["inference"])
    async def predict(role_id: Role, roi_id: Roi, file: Annotated[UploadFile, File(description="the ROI image")],
                      mm_per_px: MmPerPx = None,
                      heatmap: Annotated[bool | None, Form(description="include heatmap_png_b64")] = None,
                      request_id: RequestId = None) -> JSONResponse:
        """Score one ROI image: is_anomaly, score, threshold, timings, defects (and a heatmap on request)."""
        job = new_job("predict", role_id, roi_id, await read_files([file]), request_id, mm_per_px=mm_per_px,
                      heatmap=heatmap, source="http")
        return answer(await run(job))

    @app.post("/calibrate", response_model=RoiState, responses=ERRORS, tags=["samples"])
    async def calibrate(
        role_id: Role, roi_id: Roi,
        policy: Policy = None,
        threshold: Annotated[float | None, Form(description="manual threshold (policy manual)")] = None,
        ok_percentile: Annotated[float | None, Form(description="percentile of leave-one-out OK scores")] = None,
        ng_margin: Annotated[float | None, Form(description="0..1 of the way from the top OK to the lowest NG")] = None,
        ng_recall: Annotated[float | None, Form(description="share of NG samples that must score above the "
                                                            "threshold (never above the OK-only one)")] = None,
        request_id: RequestId = None,
    ) -> JSONResponse:
        """Recompute the ROI's threshold from its stored OK/NG samples; the answer says how it was derived."""
        job = new_job("calibrate", role_id, roi_id, [], request_id, policy=policy, threshold=threshold,
                      ok_percentile=ok_percentile, ng_margin=ng_margin, ng_recall=ng_recall)
        return answer(await run(job))

    def roi_states(scores: dict | None = None) -> list[dict]:
        """Read from the manifests on disk (written atomically by the worker); scores: filled per ROI."""
        out = []
        for m, state in stored_rois(cfg.data_root):
            out.append(state)
            if scores is not None:
                scores[(state["role_id"], state["roi_id"])] = (m.get("ok_scores", []), m.get("ng_scores", []))
        return out

    def render() -> str:
        scores: dict = {}
        states = roi_states(scores)
        return render_page(states, scores, ctx.recent.items(), health(), cfg.http.page_refresh_s)

    @app.get("/models", response_model=list[RoiState], tags=["state"])
    async def models() -> JSONResponse:
        """State of every ROI: samples, bank size, threshold and how it was set."""
        return JSONResponse(await asyncio.to_thread(roi_states))

    @app.get("/models/{role_id}/{roi_id}", response_model=RoiState, responses=ERRORS, tags=["state"])
    async def model(role_id: str, roi_id: str) -> JSONResponse:
        """State of one ROI (404 when it has never been fitted)."""
        _ids(role_id, roi_id)
        store = RoiStore(cfg.data_root, role_id, roi_id)
        m = store.read_manifest()
        if not m:
            raise ApiError("unknown_roi", f"ROI {role_id}/{roi_id} has no model: send fit_ok samples first")
        return JSONResponse(manifest_state(m, store.mask_path.exists()))

    def health() -> dict:
        body = health_body(ctx.rt, ctx.worker, ctx.started, ctx.agent_id)
        return {**body, **(ctx.extra_health() if ctx.extra_health else {})}

    @app.get("/health", tags=["state"])
    async def get_health() -> JSONResponse:
        """Liveness and load: the same content as the MQTT health message. Needs no token."""
        return JSONResponse(health())

    @app.get("/metrics", tags=["state"], response_class=Response)
    async def metrics() -> Response:
        """Prometheus text format."""
        return Response(ctx.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        t0 = time.perf_counter()
        html = await asyncio.to_thread(render)
        log.debug("operator page rendered in %.1f ms", (time.perf_counter() - t0) * 1000)
        return HTMLResponse(html)

    @app.get("/ui/heatmap/{seq}.png", include_in_schema=False)
    async def heatmap(seq: int) -> Response:
        png = await asyncio.to_thread(ctx.recent.heatmap_png, seq)
        if png is None:
            raise ApiError("not_found", f"no heatmap for result {seq} (older results are not kept)")
        return Response(png, media_type="image/png", headers={"Cache-Control": "max-age=3600"})
    if ctx.token:  # Swagger UI's "Authorize" button: the token is sent with "Try it out"
        schema = app.openapi()
        schema.setdefault("components", {})["securitySchemes"] = {"token": {"type": "http", "scheme": "bearer"}}
        schema["security"] = [{"token": []}]
    return app
