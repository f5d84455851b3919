"""What the operator page does besides showing: label a recent result OK or NG (POST /label, also an API
endpoint), apply a threshold after previewing it (POST /ui/threshold: a manual calibration that records
who set it), and the images of recent results. Every change goes through the worker as a job."""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Annotated
from urllib.parse import quote

from fastapi import APIRouter, Form, Request
from fastapi.responses import RedirectResponse, Response

from agent.http.csrf import check_page_post
from agent.http.errors import ApiError
from agent.http.models import ERRORS, RequestId, Roi, Role
from core.errors import InputError
from core.ids import safe_text
from core.roi.manifest import check_manual_threshold
from core.storage import RoiStore

if TYPE_CHECKING:
    from agent.http.context import HttpContext
    from agent.http.routes import HttpJobs

PAGE_SOURCE = "operator page"


def wants_page(request: Request) -> bool:
    """A form posted by the page (a browser asks for HTML): answer with the page again, not JSON."""
    return "text/html" in request.headers.get("accept", "")


def back_to_page(message: str, roi: str | None = None) -> RedirectResponse:
    where = f"/?flash={quote(message[:300])}" + (f"&roi={quote(roi)}" if roi else "")
    return RedirectResponse(where, status_code=303)


def check_threshold_range(data_root: object, role_id: str, roi_id: str, value: float) -> None:
    """A threshold from the page must lie in the range the ROI's own scores allow (threshold_range)."""
    m = RoiStore(data_root, role_id, roi_id).read_manifest()  # type: ignore[arg-type]
    if m is None:
        raise ApiError("unknown_roi", f"ROI {role_id}/{roi_id} has no model: send fit_ok samples first")
    try:  # the model's own rule (every ingress), checked here too so a refused value never becomes a job
        check_manual_threshold(m, value)
    except InputError as exc:
        raise ApiError(exc.code, exc.message) from None


def operator_router(ctx: HttpContext, jobs: HttpJobs) -> APIRouter:
    r = APIRouter(tags=["operator"])

    @r.post("/label", responses=ERRORS)
    async def label(request: Request, request_id: Annotated[str, Form(description="the result's request_id")],
                    label: Annotated[str, Form(description="ok or ng")],
                    csrf: Annotated[str | None, Form(description="the page's CSRF token (browsers only)")] = None
                    ) -> Response:
        """Label a recent prediction (listed on the operator page) as OK or NG: its image is fed as fit_ok
        or send_ng (moved from the other label if it was stored there). 404 unknown_request once the
        result has left the kept list (`http.recent_results`). From a browser only as the page's own form
        (403 cross_site / csrf otherwise); API clients authenticate with the bearer token."""
        return await label_prediction(ctx, jobs, request, request_id, label, csrf)

    @r.post("/ui/threshold", include_in_schema=False)
    async def threshold(request: Request, role_id: Role, roi_id: Roi,
                        threshold: Annotated[float, Form(gt=0)], request_id: RequestId = None,
                        csrf: Annotated[str | None, Form()] = None) -> Response:
        """Apply a previewed threshold: a manual calibration whose details say it came from the page. Only
        from the page itself, and only within the range the ROI's own scores allow (threshold_range)."""
        return await apply_threshold(ctx, jobs, request, role_id, roi_id, threshold, request_id, csrf)

    @r.get("/ui/{kind}/{seq}.png", include_in_schema=False)
    async def picture(kind: str, seq: int) -> Response:
        """A recent result's image or heatmap, drawn from its thumbnail."""
        draw = {"image": ctx.recent.image_png, "heatmap": ctx.recent.heatmap_png}.get(kind)
        png = await asyncio.to_thread(draw, seq) if draw is not None else None
        if png is None:
            raise ApiError("not_found", f"no {kind} for result {seq} (older results are not kept)")
        return Response(png, media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    return r


async def label_prediction(ctx: HttpContext, jobs: HttpJobs, request: Request, request_id: str, label: str,
                           csrf: str | None) -> Response:
    """POST /label: a kept recent prediction's image fed as fit_ok (OK) or send_ng (NG), relabelled if stored
    under the other label."""
    check_page_post(request, csrf)
    if label not in ("ok", "ng"):
        raise ApiError("invalid_field", f"label must be ok or ng, got {label[:20]!r}")
    item = ctx.recent.find(request_id)
    if item is None:
        raise ApiError("unknown_request", f"no recent prediction {safe_text(request_id, 80)!r} is kept (the last "
                       f"{ctx.cfg.http.recent_results} results are: http.recent_results)")
    res = item.result
    image = await asyncio.to_thread(item.image.read_bytes)  # type: ignore[union-attr]
    job = jobs.job("fit_ok" if label == "ok" else "send_ng", res["role_id"], res["roi_id"], [image],
                   f"label-{label}-{request_id}"[:200], source=f"{PAGE_SOURCE} ({request_id})", relabel=True,
                   mm_per_px=res["data"].get("mm_per_px"), file_name=item.file_name)
    try:
        answer = await jobs.run(job)
    except ApiError as exc:
        if wants_page(request):
            return back_to_page(f"label {label.upper()} of {request_id}: {exc.code}: {exc.message}")
        raise
    ctx.recent.mark(item, label)
    if wants_page(request):
        body = json.loads(answer.body)
        return back_to_page(f"{request_id} stored as {label.upper()}: the ROI has {body['samples']['ok']} OK / "
                            f"{body['samples']['ng']} NG samples, threshold {body['threshold']:.4g}")
    return answer


async def apply_threshold(ctx: HttpContext, jobs: HttpJobs, request: Request, role_id: str, roi_id: str,
                          threshold: float, request_id: str | None, csrf: str | None) -> Response:
    """POST /ui/threshold: a manual calibration from the page, within the range the ROI's scores allow."""
    try:
        check_page_post(request, csrf)
        await asyncio.to_thread(check_threshold_range, ctx.cfg.data_root, role_id, roi_id, threshold)
    except ApiError as exc:
        if exc.code in ("cross_site", "csrf") or not wants_page(request):
            raise
        return back_to_page(f"threshold not applied: {exc.code}: {exc.message}", f"{role_id}/{roi_id}")
    job = jobs.job("calibrate", role_id, roi_id, [], request_id, policy="manual", threshold=threshold,
                   source=PAGE_SOURCE)
    try:
        await jobs.run(job)
    except ApiError as exc:
        if wants_page(request):
            return back_to_page(f"threshold not applied: {exc.code}: {exc.message}", f"{role_id}/{roi_id}")
        raise
    return back_to_page(f"threshold of {role_id}/{roi_id} set to {threshold:.4g} (manual, from the page)",
                        f"{role_id}/{roi_id}")
