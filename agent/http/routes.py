"""The HTTP endpoints as FastAPI routers: samples (fit_ok, send_ng, calibrate), inference (predict),
state (models, health, metrics) and ui (operator page, heatmaps). Every request that needs the model
becomes a Job through the intake, exactly as a folder file or an MQTT message does."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time
import uuid
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.datastructures import UploadFile as StarletteUpload

from agent.health import health_body
from agent.http.csrf import page_token, set_token
from agent.http.errors import ApiError, _rid_header
from agent.http.models import (
    ERRORS,
    FitResult,
    MmPerPx,
    Policy,
    PredictResult,
    Relabel,
    RequestId,
    Roi,
    RoiState,
    Role,
    Source,
)
from agent.jobs import Job, Outcome, as_flag
from agent.operator.page import render_page
from core.errors import InputError
from core.ids import validate_id
from core.method import thresholds
from core.roi.manifest import disk_state
from core.roi.model import stored_rois
from core.storage import RoiStore

if TYPE_CHECKING:
    from agent.http.context import HttpContext

log = logging.getLogger("agent.http.api")


class HttpJobs:
    """Build a job from a request, queue it, wait for its one outcome (then mirror it to MQTT)."""

    def __init__(self, ctx: HttpContext) -> None:
        self.ctx = ctx

    async def read_files(self, files: list[UploadFile]) -> list[bytes]:
        limit = self.ctx.cfg.limits.max_bytes
        out = []
        for f in files:
            data = await f.read(limit + 1)
            if len(data) > limit:
                raise ApiError("file_too_large", f"{f.filename or 'file'}: over limits.max_bytes ({limit} bytes)")
            out.append(data)
        return out

    def job(self, action: str, role_id: str, roi_id: str, images: list[bytes], request_id: str | None,
            **params: Any) -> Job:
        return self.ctx.intake.build_job("http", role_id, roi_id, action, images, request_id, params, None,
                                         default_id=f"http-{uuid.uuid4().hex}")

    async def run(self, job: Job) -> JSONResponse:
        """Queue the job, wait for its outcome; the ok data, or ApiError with the worker's code."""
        ctx = self.ctx
        if not ctx.accepting:
            raise ApiError("shutting_down", "the agent is stopping; retry on its restart")
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Outcome] = loop.create_future()

        def reply(_job: Job, outcome: Outcome) -> None:  # in the worker thread
            loop.call_soon_threadsafe(lambda: done.done() or done.set_result(outcome))
            # after the answer is on its way: no extra latency for the client
            ctx.intake.publish("http", outcome.with_heatmap_b64())

        job.reply = reply
        if not ctx.intake.submit(job, timeout=0):
            raise ApiError("queue_full", f"the worker queue is full ({ctx.cfg.worker.queue_size}); retry later")
        try:
            outcome = await asyncio.wait_for(done, ctx.cfg.http.request_timeout_s)
        except asyncio.TimeoutError:
            raise ApiError("timeout", f"no result within http.request_timeout_s ({ctx.cfg.http.request_timeout_s} "
                           "s); the job stays queued and runs", counted=True) from None
        result = outcome.with_heatmap_b64()
        if result["status"] != "ok":
            raise ApiError(result["error"]["code"], result["error"]["message"], counted=True)
        body = {"request_id": job.request_id, "role_id": job.role_id, "roi_id": job.roi_id, **result["data"]}
        return JSONResponse(body, headers=_rid_header(job.request_id))


def samples_router(jobs: HttpJobs) -> APIRouter:
    r = APIRouter(tags=["samples"])

    async def samples(action: str, role_id: str, roi_id: str, files: list[UploadFile], mm_per_px: float | None,
                      source: str, request_id: str | None, relabel: bool) -> JSONResponse:
        return await jobs.run(jobs.job(action, role_id, roi_id, await jobs.read_files(files), request_id,
                                       mm_per_px=mm_per_px, source=source, relabel=relabel))

    @r.post("/fit_ok", response_model=FitResult, responses=ERRORS)
    async def fit_ok(role_id: Role, roi_id: Roi, files: Annotated[list[UploadFile], File(description="OK images")],
                     mm_per_px: MmPerPx = None, source: Source = "http", request_id: RequestId = None,
                     relabel: Relabel = False) -> JSONResponse:
        """Store OK samples (image + JSON) and update the ROI's memory bank and threshold in one batch."""
        return await samples("fit_ok", role_id, roi_id, files, mm_per_px, source, request_id, relabel)

    @r.post("/send_ng", response_model=FitResult, responses=ERRORS)
    async def send_ng(role_id: Role, roi_id: Roi, files: Annotated[list[UploadFile], File(description="NG images")],
                      mm_per_px: MmPerPx = None, source: Source = "http", request_id: RequestId = None,
                      relabel: Relabel = False) -> JSONResponse:
        """Store NG samples and recalibrate the threshold (policy auto: between OK and NG scores)."""
        return await samples("send_ng", role_id, roi_id, files, mm_per_px, source, request_id, relabel)

    @r.post("/calibrate", response_model=RoiState, responses=ERRORS)
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
        return await jobs.run(jobs.job("calibrate", role_id, roi_id, [], request_id, policy=policy,
                                       threshold=threshold, ok_percentile=ok_percentile, ng_margin=ng_margin,
                                       ng_recall=ng_recall))

    return r


def inference_router(jobs: HttpJobs) -> APIRouter:
    r = APIRouter(tags=["inference"])

    @r.post("/predict", response_model=PredictResult, responses=ERRORS, openapi_extra=PREDICT_BODY)
    async def predict(request: Request) -> JSONResponse:
        """Score one ROI image: is_anomaly, score, threshold, timings, defects (and a heatmap on request).
        Multipart form (`file` + fields) or JSON (`image_b64` + the same fields), like an MQTT request."""
        if request.headers.get("content-type", "").split(";")[0].strip() == "application/json":
            fields, images = await json_request(request)
        else:
            form = await request.form()
            upload = form.get("file")
            if not isinstance(upload, StarletteUpload):
                raise ApiError("invalid_field", "file: a multipart `file` (or a JSON body with image_b64) is required")
            images = await jobs.read_files([upload])  # type: ignore[list-item]
            fields = {k: v for k, v in form.items() if k != "file" and isinstance(v, str)}
            fields["file_name"] = upload.filename
        checked = predict_fields(fields)
        return await jobs.run(jobs.job("predict", checked["role_id"], checked["roi_id"], images,
                                       checked["request_id"], mm_per_px=checked["mm_per_px"],
                                       heatmap=checked["heatmap"], source="http", file_name=fields.get("file_name")))

    return r


PREDICT_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["role_id", "roi_id", "file"], "properties": {
        "role_id": {"type": "string"}, "roi_id": {"type": "string"}, "file": {"type": "string", "format": "binary"},
        "mm_per_px": {"type": "number"}, "heatmap": {"type": "boolean"}, "request_id": {"type": "string"}}}},
    "application/json": {"schema": {"type": "object", "required": ["role_id", "roi_id", "image_b64"], "properties": {
        "role_id": {"type": "string"}, "roi_id": {"type": "string"}, "image_b64": {"type": "string"},
        "mm_per_px": {"type": "number"}, "heatmap": {"type": "boolean"}, "request_id": {"type": "string"}}}}}}}


async def json_request(request: Request) -> tuple[dict, list[bytes]]:
    """A JSON /predict body: the fields, and the image from `image_b64` (invalid_json, invalid_base64)."""
    try:
        body = json.loads(await request.body())
    except (ValueError, RecursionError) as exc:
        raise ApiError("invalid_json", f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict) or not isinstance(body.get("image_b64"), str):
        raise ApiError("invalid_field", "a JSON body needs role_id, roi_id and image_b64 (a base64 string)")
    try:
        image = base64.b64decode(body["image_b64"], validate=True)
    except (binascii.Error, ValueError):
        raise ApiError("invalid_base64", "image_b64 is not valid base64") from None
    fields = {k: body[k] for k in ("role_id", "roi_id", "mm_per_px", "heatmap", "request_id", "file_name")
              if k in body}
    for k in ("role_id", "roi_id", "request_id"):
        if k in fields and not isinstance(fields[k], str):
            raise ApiError("invalid_field", f"{k} must be a string")
    return fields, [image]


def predict_fields(fields: dict) -> dict:
    """The /predict fields of a form or a JSON body, checked as the form schema did (invalid_field)."""
    missing = [k for k in ("role_id", "roi_id") if not fields.get(k)]
    if missing:
        raise ApiError("invalid_field", "; ".join(f"{k}: Field required" for k in missing))
    rid = fields.get("request_id") or None
    if rid is not None and len(rid) > 200:
        raise ApiError("invalid_field", "request_id: String should have at most 200 characters")
    mm = fields.get("mm_per_px")
    if isinstance(mm, str):
        try:
            mm = float(mm) if mm.strip() else None
        except ValueError:
            raise ApiError("invalid_field", f"mm_per_px: not a number: {mm[:40]!r}") from None
    elif mm is not None and (isinstance(mm, bool) or not isinstance(mm, (int, float))):
        raise ApiError("invalid_field", "mm_per_px: must be a number")
    try:
        heatmap = as_flag("heatmap", fields.get("heatmap"))  # the rule of every transport (agent/jobs.py)
    except InputError as exc:
        raise ApiError(exc.code, exc.message) from None
    return {"role_id": fields["role_id"], "roi_id": fields["roi_id"], "request_id": rid, "mm_per_px": mm,
            "heatmap": heatmap}


def roi_states(ctx: HttpContext, scores: dict | None = None) -> list[dict]:
    """Read from the manifests on disk (written atomically by the worker); scores: filled per ROI."""
    out = []
    for m, state in stored_rois(ctx.cfg.data_root):
        drift = ctx.rt.drift.current(state["role_id"], state["roi_id"])
        out.append({**state, **({"drift": drift} if drift else {})})
        if scores is not None:
            scores[(state["role_id"], state["roi_id"])] = (m.get("ok_scores", []), m.get("ng_scores", []))
    return out


def unloadable_states(ctx: HttpContext) -> list[dict]:
    return ctx.rt.unloadable_states()


def health(ctx: HttpContext) -> dict:
    body = health_body(ctx.rt, ctx.worker, ctx.started, ctx.agent_id)
    return {**body, **(ctx.extra_health() if ctx.extra_health else {})}


def state_router(ctx: HttpContext) -> APIRouter:
    r = APIRouter(tags=["state"])

    @r.get("/models", response_model=list[RoiState])
    async def models() -> JSONResponse:
        """State of every ROI: samples, bank size, threshold and how it was set."""
        def both() -> list[dict]:
            loaded = roi_states(ctx)
            have = {(s["role_id"], s["roi_id"]) for s in loaded}
            return loaded + [s for s in unloadable_states(ctx) if (s["role_id"], s["roi_id"]) not in have]

        return JSONResponse(await asyncio.to_thread(both))

    @r.get("/models/{role_id}/{roi_id}", response_model=RoiState, responses=ERRORS)
    async def model(role_id: str, roi_id: str) -> JSONResponse:
        """State of one ROI (404 when it has never been fitted)."""
        validate_id(role_id, "role_id")
        validate_id(roi_id, "roi_id")
        store = RoiStore(ctx.cfg.data_root, role_id, roi_id)
        m = store.read_manifest()
        bad = [s for s in unloadable_states(ctx) if (s["role_id"], s["roi_id"]) == (role_id, roi_id)]
        if bad and (not m or (role_id, roi_id) in ctx.rt.unloadable):
            return JSONResponse(bad[0])
        if not m:
            raise ApiError("unknown_roi", f"ROI {role_id}/{roi_id} has no model: send fit_ok samples first")
        drift = ctx.rt.drift.current(role_id, roi_id)
        state = disk_state(store, m)
        return JSONResponse({**state, **({"drift": drift} if drift else {})})

    @r.get("/health")
    async def get_health() -> JSONResponse:
        """Liveness and load: the same content as the MQTT health message. Needs no token."""
        return JSONResponse(health(ctx))

    @r.get("/metrics", response_class=Response)
    async def metrics() -> Response:
        """Prometheus text format."""
        return Response(ctx.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return r


def ui_router(ctx: HttpContext) -> APIRouter:
    r = APIRouter(include_in_schema=False)

    def render(roi_filter: str | None, preview: float | None, flash: str | None, csrf: str) -> str:
        scores: dict = {}
        states = roi_states(ctx, scores)
        histories = {(s["role_id"], s["roi_id"]): ctx.rt.drift.history(s["role_id"], s["roi_id"]) for s in states}
        previews = {}
        if roi_filter and preview is not None:
            for s in states:
                key = (s["role_id"], s["roi_id"])
                if f"{key[0]}/{key[1]}" == roi_filter:
                    ok, ng = scores.get(key, ([], []))
                    previews[key] = thresholds.preview(preview, s["threshold"], ok, ng,
                                                       [v for v, _ in histories.get(key, [])])
        return render_page(states, scores, ctx.recent.items(), health(ctx), ctx.cfg.http.page_refresh_s,
                           histories, previews, roi_filter, flash, csrf, unloadable_states(ctx))

    @r.get("/", response_class=HTMLResponse)
    async def page(request: Request, roi: str | None = None, preview: float | None = None,
                   flash: str | None = None) -> HTMLResponse:
        """?roi=R/X shows one ROI; &preview=V what threshold V would flip; flash: the last action's outcome."""
        t0 = time.perf_counter()
        token = page_token(request)
        html = await asyncio.to_thread(render, roi, preview if preview is None or preview > 0 else None,
                                       flash[:300] if flash else None, token)
        log.debug("operator page rendered in %.1f ms", (time.perf_counter() - t0) * 1000)
        response = HTMLResponse(html)
        set_token(response, token, secure=bool(ctx.cfg.http.tls))
        return response

    return r
