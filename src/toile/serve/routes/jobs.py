"""The native job API: ``/v1/jobs`` (submit, list, get, cancel, events) and ``/v1/images``."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import FileResponse, StreamingResponse

from toile.serve import schemas
from toile.serve.jobs import JobService
from toile.serve.routes.deps import Caller, caller, jobs

router = APIRouter(prefix="/v1", tags=["jobs"])
Service = Annotated[JobService, Depends(jobs)]
Who = Annotated[Caller, Depends(caller)]
ERRORS = {
    404: {"model": schemas.ErrorBody, "description": "no such job or image"},
    422: {"model": schemas.ErrorBody, "description": "a field is invalid; `error.field` names it"},
}


@router.post(
    "/jobs",
    status_code=202,
    response_model=schemas.JobAccepted,
    responses={
        200: {"model": schemas.JobAccepted, "description": "same Idempotency-Key: earlier job"},
        413: {"model": schemas.ErrorBody, "description": "the body is over the server's limit"},
        503: {"model": schemas.ErrorBody, "description": "the queue is full; retry later"},
        **ERRORS,
    },
)
def create_job(
    body: schemas.JobCreate,
    request: Request,
    response: Response,
    service: Service,
    who: Who,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> schemas.JobAccepted:
    """Queue a generation. 202 once it is durably stored; with an ``Idempotency-Key`` seen
    before, 200 and the same job (a different body for the same key is a 422)."""
    client = request.client.host if request.client else ""
    job, created = service.submit(body, idempotency_key, client, who.owner)
    response.status_code = 202 if created else 200
    url = f"/v1/jobs/{job.id}"
    response.headers["Location"] = url
    return schemas.JobAccepted(id=job.id, status=job.status, url=url)


@router.get("/jobs", response_model=schemas.JobList, responses=ERRORS)
def list_jobs(
    service: Service,
    who: Who,
    status: Annotated[list[str] | None, Query(description="filter; repeatable")] = None,
    limit: Annotated[int, Query(description="the newest N jobs, oldest first")] = 100,
) -> schemas.JobList:
    """The queue: the newest ``limit`` jobs (optionally of some statuses), in queue order."""
    return service.list(status or (), limit, who.scope)


@router.get("/jobs/{job_id}", response_model=schemas.Job, responses=ERRORS)
def get_job(job_id: str, service: Service, who: Who) -> schemas.Job:
    """Status, queue position, progress, result images with records, or the error."""
    return service.get(job_id, who.scope)


@router.post("/jobs/{job_id}/cancel", response_model=schemas.Job, responses=ERRORS)
def cancel_job(job_id: str, service: Service, who: Who) -> schemas.Job:
    """A queued job is cancelled and never starts; a running one stops within one denoising
    step (watch the events, or poll, for ``cancelled``). Ended jobs are left as they are."""
    return service.cancel(job_id, who.scope)


@router.get(
    "/jobs/{job_id}/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}, **ERRORS},
)
def job_events(job_id: str, request: Request, service: Service, who: Who) -> StreamingResponse:
    """Server-Sent Events: the current state first, then ``queued``, ``started``,
    ``progress`` (step, total, stage, ``preview_png`` base64 every few steps), and one of
    ``finished``, ``failed``, ``cancelled``, after which the stream ends."""
    service.get(job_id, who.scope)  # a 404 now, rather than an empty stream
    keepalive = service.config.sse_keepalive_s

    async def stream() -> AsyncIterator[str]:
        yield "retry: 2000\n\n"
        async with contextlib.aclosing(service.events(job_id, keepalive_s=keepalive)) as events:
            async for event in events:
                if event is None:
                    if await request.is_disconnected():
                        return
                    yield ": keepalive\n\n"
                    continue
                yield event.sse()

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.get(
    "/images/{image_id}",
    response_class=FileResponse,
    responses={200: {"content": {"image/png": {}}}, **ERRORS},
)
def get_image(image_id: str, service: Service, who: Who) -> FileResponse:
    """The PNG, carrying its generation record (``toile`` and A1111 ``parameters`` chunks)."""
    path, _record = service.image(image_id, who.scope)
    return FileResponse(
        path,
        media_type="image/png",
        headers={"Cache-Control": "private, max-age=31536000, immutable"},
    )
