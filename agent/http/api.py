"""HTTP ingress (FastAPI): the original backend's endpoints, /models, /health, /metrics, the operator page.

The app: the guard (token, request size: agent/http/guard.py), the error answers (agent/http/errors.py)
and the routers (agent/http/routes.py). Every request that needs the model becomes a Job through the
intake, exactly as a folder or MQTT request does (one code path from request to result); the handler
waits for that job's outcome. HTTP is request/response: a client that gets no answer (agent killed)
retries; fit_ok and send_ng are idempotent (samples are deduplicated by content) and a sample is
stored before its 200.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.staticfiles import StaticFiles
from swagger_ui_bundle import swagger_ui_path

from agent.http.context import HttpContext
from agent.http.errors import STATUS_BY_CODE, ApiError, error_response, refuse
from agent.http.guard import Guard
from agent.http.lifecycle import lifecycle_router
from agent.http.routes import HttpJobs, inference_router, samples_router, state_router, ui_router
from agent.operator.actions import operator_router
from core import __version__
from core.errors import AnomalyError

__all__ = ["STATUS_BY_CODE", "HttpContext", "create_app", "error_response"]


def create_app(ctx: HttpContext) -> FastAPI:
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

    jobs = HttpJobs(ctx)
    for router in (samples_router(jobs), inference_router(jobs), state_router(ctx), ui_router(ctx),
                   lifecycle_router(ctx, jobs), operator_router(ctx, jobs)):
        app.include_router(router)
    if ctx.token:  # Swagger UI's "Authorize" button: the token is sent with "Try it out"
        schema = app.openapi()
        schema.setdefault("components", {})["securitySchemes"] = {"token": {"type": "http", "scheme": "bearer"}}
        schema["security"] = [{"token": []}]
    return app
