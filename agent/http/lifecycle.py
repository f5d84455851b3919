"""HTTP endpoints of a ROI's lifecycle: list / fetch / delete samples, reset, rollback (through the worker,
as jobs like every change of a model), export and import (core/roi/archive.py)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Annotated

from fastapi import APIRouter, File, Form, UploadFile
from fastapi.responses import JSONResponse, Response

from agent.http.errors import ApiError
from agent.http.models import ERRORS, RequestId, Roi, RoiState, Role
from core.ids import validate_id
from core.roi import lifecycle
from core.roi.archive import export_roi
from core.storage import RoiStore

if TYPE_CHECKING:
    from agent.http.context import HttpContext
    from agent.http.routes import HttpJobs

MEDIA = {"png": "image/png", "jpg": "image/jpeg", "bmp": "image/bmp", "tif": "image/tiff"}


def lifecycle_router(ctx: HttpContext, jobs: HttpJobs) -> APIRouter:
    """Samples (list, fetch, delete) and versions (rollback, reset, export, import) of a ROI."""
    r = APIRouter(tags=["lifecycle"])
    r.include_router(samples_router(ctx, jobs))
    r.include_router(versions_router(ctx, jobs))
    return r


def _store(ctx: HttpContext, role_id: str, roi_id: str) -> RoiStore:
    s = RoiStore(ctx.cfg.data_root, validate_id(role_id, "role_id"), validate_id(roi_id, "roi_id"))
    if not s.exists():
        raise ApiError("unknown_roi", f"ROI {role_id}/{roi_id} has no model")
    return s


def samples_router(ctx: HttpContext, jobs: HttpJobs) -> APIRouter:
    r = APIRouter()

    @r.get("/samples/{role_id}/{roi_id}", responses=ERRORS)
    async def list_samples(role_id: str, roi_id: str) -> JSONResponse:
        """Every stored sample: sample_id, kind, sha256, source, timestamp_utc, mm_per_px, loo_score, suspect."""
        return JSONResponse(await asyncio.to_thread(lifecycle.sample_list, _store(ctx, role_id, roi_id)))

    @r.get("/samples/{role_id}/{roi_id}/{sample_id}", responses=ERRORS)
    async def fetch_sample(role_id: str, roi_id: str, sample_id: str) -> Response:
        """The stored image of one sample, as received (also from the ROI's trash)."""
        s = _store(ctx, role_id, roi_id)
        validate_id(sample_id, "sample_id")
        got = s.find_sample(sample_id)
        if got is None:
            raise ApiError("unknown_sample", f"no sample {sample_id} in {role_id}/{roi_id}")
        data = await asyncio.to_thread(got[1].read_bytes)
        return Response(data, media_type=MEDIA.get(got[1].suffix[1:], "application/octet-stream"),
                        headers={"X-Sample-Kind": got[0].get("kind", "")})

    @r.delete("/samples/{role_id}/{roi_id}/{sample_id}", response_model=RoiState, responses=ERRORS)
    async def delete_sample(role_id: str, roi_id: str, sample_id: str, request_id: str | None = None) -> JSONResponse:
        """Move one sample to the ROI's trash; the bank, threshold and state follow (a new version)."""
        return await jobs.run(jobs.job("delete_samples", role_id, roi_id, [], request_id, sample_ids=[sample_id],
                                       source="http"))

    return r


def versions_router(ctx: HttpContext, jobs: HttpJobs) -> APIRouter:
    r = APIRouter()

    @r.post("/rollback", response_model=RoiState, responses=ERRORS)
    async def rollback(role_id: Role, roi_id: Roi,
                       version: Annotated[int, Form(description="a kept version (state `versions`)")],
                       request_id: RequestId = None) -> JSONResponse:
        """Back to a kept version's samples, banks and threshold, as a new version."""
        return await jobs.run(jobs.job("rollback", role_id, roi_id, [], request_id, version=version))

    @r.post("/reset", response_model=RoiState, responses=ERRORS)
    async def reset(role_id: Role, roi_id: Roi, request_id: RequestId = None) -> JSONResponse:
        """Every sample and the mask of the ROI to its trash (its versions stay, for a rollback)."""
        return await jobs.run(jobs.job("reset", role_id, roi_id, [], request_id))

    @r.get("/export/{role_id}/{roi_id}", responses=ERRORS)
    async def export(role_id: str, roi_id: str) -> Response:
        """The ROI as one archive (tar.gz) for POST /import on another station."""
        _store(ctx, role_id, roi_id)
        data = await asyncio.to_thread(export_roi, ctx.cfg.data_root, role_id, roi_id)
        return Response(data, media_type="application/gzip",
                        headers={"Content-Disposition": f'attachment; filename="{role_id}_{roi_id}.roi.tar.gz"'})

    @r.post("/import", responses=ERRORS)
    async def import_(file: Annotated[UploadFile, File(description="an archive of GET /export")],
                      role_id: Annotated[str | None, Form(description="import under this role_id")] = None,
                      roi_id: Annotated[str | None, Form(description="import under this roi_id")] = None
                      ) -> JSONResponse:
        """A verified archive as a new ROI (refused when the ROI exists); its samples are embedded during
        the import (a low-priority thread, not the worker: other ROIs' parts do not wait), before it appears."""
        limit = ctx.cfg.http.max_request_bytes
        data = await file.read(limit + 1)
        if len(data) > limit:
            raise ApiError("file_too_large", f"over http.max_request_bytes ({limit})")
        got = await asyncio.to_thread(ctx.rt.import_roi, data, role_id, roi_id)
        return JSONResponse(got)

    return r
