"""``/health`` (public), ``/v1/events`` (the same, live) and ``/v1/models`` (the ids clients
may use)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse

from toile.serve import schemas
from toile.serve.jobs import JobService
from toile.serve.routes.deps import jobs

router = APIRouter(tags=["server"])
Service = Annotated[JobService, Depends(jobs)]


@router.get("/health", response_model=schemas.Health)
def health(service: Service) -> schemas.Health:
    """ok (the worker is alive; an API process on a shared queue: the queue answers, and
    ``worker_alive`` says whether any worker was heard from lately) and the queue length.
    Needs no token."""
    return service.health()


@router.get(
    "/v1/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
def server_events(service: Service) -> StreamingResponse:
    """Server-Sent Events for the whole server: ``status`` (the ``/health`` body) at once, then
    whenever any job is queued, starts or ends, and at every keepalive interval. The stream
    does not end; per-job progress is on ``/v1/jobs/{id}/events``."""
    keepalive = service.config.sse_keepalive_s

    async def stream() -> AsyncIterator[str]:
        yield "retry: 2000\n\n"
        async with contextlib.aclosing(service.status_events(keepalive)) as states:
            async for state in states:
                yield f"event: status\ndata: {state.model_dump_json()}\n\n"

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.get("/v1/models", response_model=schemas.ModelList)
def models(service: Service) -> schemas.ModelList:
    """Registered model ids and configured LoRA ids: the only names a job may use. Each card
    also gives the model's family and whether it can be a job's ``refiner``."""
    return service.models()
