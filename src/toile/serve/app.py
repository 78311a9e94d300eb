"""``create_app(config) -> FastAPI``: routes, error bodies, security middleware, lifespan.

Nothing happens when this module is imported or when ``create_app`` is called: the store is
opened, interrupted jobs recovered and the worker started in the app's lifespan (start-up), and
all of it is stopped at shutdown. So an app can be built, inspected (``app.openapi()``) and
mounted without touching the data folder.

Every error is JSON ``{"error": {"type", "field", "message"}}``; ``field`` names the request
field, query parameter or header at fault (``RequestError.field`` where the core raised it).
"""

from __future__ import annotations

import contextlib
import errno
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from toile.errors import RequestError
from toile.serve.auth import SecurityMiddleware
from toile.serve.config import ServeConfig
from toile.serve.jobs import JobNotFoundError, JobService, Role
from toile.serve.routes import a1111, openai, system
from toile.serve.routes import jobs as job_routes
from toile.serve.routes.common import field_from_loc
from toile.serve.rows import ClientQueueFullError, QueueFullError

log = logging.getLogger("toile.serve")
WEB_DIR = Path(__file__).parent / "web"
DOCS_ASSETS_URL = "/static/swagger"


def web_page() -> FileResponse:
    """The web UI; ``no-cache`` so an upgraded server's page is picked up at once."""
    return FileResponse(WEB_DIR / "index.html", headers={"Cache-Control": "no-cache"})


def _error(status: int, kind: str, message: str, field: str | None = None, **extra: Any):
    body = {"error": {"type": kind, "field": field, "message": message, **extra}}
    return JSONResponse(body, status_code=status)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        # An unknown field (a typo, or a "path" where an id belongs) explains the rest: first.
        errors.sort(key=lambda e: e.get("type") != "extra_forbidden")
        first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request"}
        field = "body" if first.get("type") == "json_invalid" else field_from_loc(first["loc"])
        if first.get("type") == "extra_forbidden":
            first = {**first, "msg": "unknown field; see the request schema at /openapi.json"}
        details = [
            {"field": field_from_loc(e.get("loc", ())), "message": str(e.get("msg", ""))}
            for e in errors
        ]
        return _error(
            422, "invalid_request", f"{field}: {first.get('msg')}", field, details=details
        )

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError) -> JSONResponse:
        return _error(422, "invalid_request", str(exc), exc.field)

    @app.exception_handler(JobNotFoundError)
    async def not_found(request: Request, exc: JobNotFoundError) -> JSONResponse:
        return _error(404, "not_found", str(exc), "id")

    @app.exception_handler(QueueFullError)
    async def queue_full(request: Request, exc: QueueFullError) -> JSONResponse:
        response = _error(503, "queue_full", str(exc))
        response.headers["Retry-After"] = "5"
        return response

    @app.exception_handler(ClientQueueFullError)
    async def client_queue_full(request: Request, exc: ClientQueueFullError) -> JSONResponse:
        # This client is over its share (max_queued_per_client), not the server: 429.
        response = _error(429, "too_many_queued_jobs", str(exc), limit="max_queued_per_client")
        response.headers["Retry-After"] = "5"
        return response

    @app.exception_handler(OSError)
    async def storage_error(request: Request, exc: OSError) -> JSONResponse:
        # A full disk while writing an upload or a result: say so in JSON, like every error.
        if exc.errno == errno.ENOSPC:
            return _error(507, "insufficient_storage", "the server's disk is full; try later")
        return await unexpected_error(request, exc)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return _error(500, "internal_error", "the server failed on this request; see its log")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        response = _error(exc.status_code, "http_error", str(exc.detail))
        for key, value in (exc.headers or {}).items():
            response.headers[key] = value
        return response


def create_app(config: ServeConfig | None = None, *, engine: Any = None) -> FastAPI:
    """The server as an ASGI app. ``engine`` (tests, benchmarks) replaces the id-only Engine
    the lifespan would build; it must have been made with ``allow_paths=False``."""
    from toile import __version__

    config = config if config is not None else ServeConfig()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # A shared queue (PostgreSQL): this process serves the API; `toile worker`s run jobs.
        role = Role.API if config.distributed else Role.ALL
        service = await run_in_threadpool(
            lambda: JobService.open(config, engine=engine, role=role))
        app.state.jobs = service
        try:
            yield
        finally:
            await run_in_threadpool(service.close)

    # FastAPIOffline: FastAPI with Swagger UI's files served from the package (fastapi-offline
    # ships them) instead of a public CDN, so /docs works on a machine without internet. Under
    # /static/ so the page's assets follow the web page's auth rule (public files, no data).
    app = FastAPIOffline(
        static_url=DOCS_ASSETS_URL,
        title="toile",
        version=__version__,
        description=(
            "Text-to-image jobs over a durable queue. Models and LoRAs are named by id "
            "(`GET /v1/models`), never by path. With an API token, send "
            "`Authorization: Bearer <token>`."
        ),
        lifespan=lifespan,
        docs_url="/docs",
        openapi_url="/openapi.json",
        redoc_url=None,
    )
    app.state.config = config
    _install_error_handlers(app)
    app.include_router(system.router)
    app.include_router(job_routes.router)
    app.include_router(openai.router)
    app.include_router(a1111.router)
    # The web page (plain files, no build step): "/" and "/static/...", public by design (auth).
    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")
    app.add_api_route("/", web_page, methods=["GET"], include_in_schema=False)
    app.add_middleware(SecurityMiddleware, config=config)
    return app
