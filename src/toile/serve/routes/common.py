"""Helpers the route modules share: turning a compatibility API's values into a native job,
running it to its end for APIs whose calls block, reading its results, and naming fields.

Every route module imports from here (and ``deps``), never from another route module or from
``toile.serve.app``, so the routes have no import circles.
"""

from __future__ import annotations

import base64
import contextlib
import io
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from fastapi import Request
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from toile.errors import RequestError
from toile.serve import schemas
from toile.serve.jobs import JobService
from toile.serve.routes.deps import caller
from toile.serve.uploads import Upload

if TYPE_CHECKING:
    from PIL import Image

WAIT_POLL_S = 1.0  # how often a waiting request checks that its client is still there
LOCATIONS = ("body", "query", "header", "path", "cookie")


def field_from_loc(loc: Sequence[Any]) -> str:
    """pydantic's ``("body", "loras", 0, "scale")`` -> ``"loras[0].scale"``."""
    parts = list(loc)
    if len(parts) > 1 and parts[0] in LOCATIONS:
        parts = parts[1:]
    name = ""
    for part in parts:
        if isinstance(part, int):
            name += f"[{part}]"
        else:
            name += f".{part}" if name else str(part)
    return name or "body"


def job_body(fields: dict[str, Any], names: Mapping[str, str]) -> schemas.JobCreate:
    """A native job body from a compatibility API's values; a bad value is a RequestError
    naming the field as *that* API's client spelled it (``names``)."""
    try:
        return schemas.JobCreate.model_validate(fields)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = field_from_loc(error.get("loc", ()))
        raise RequestError(names.get(field, field), str(error.get("msg", "is invalid"))) from None


def renamed(exc: RequestError, names: Mapping[str, str]) -> RequestError:
    """The same error, its field spelled as the compatibility API's client knows it."""
    field = exc.field or ""
    message = str(exc).removeprefix(f"{field}: ")
    base = field.split("[")[0].split(".")[0]
    new = names.get(field) or names.get(base) or field
    return RequestError(new, message)


async def run_to_end(
    service: JobService,
    body: schemas.JobCreate,
    request: Request,
    names: Mapping[str, str],
    uploads: Mapping[str, Upload] | None = None,
) -> schemas.Job:
    """Submit a job and wait until it ends (OpenAI's and A1111's calls answer with the result,
    yet the job goes through the durable queue like any other). Validation errors come back
    renamed for the caller's API. If the client disconnects while waiting, the job is
    cancelled: nobody is left to read its result. ``uploads``: images the route already
    decoded, handed over as they are (never base64 again, never decoded twice)."""
    try:
        client = request.client.host if request.client else ""
        owner = caller(request).owner
        job, _ = await run_in_threadpool(service.submit, body, None, client, owner, uploads)
    except RequestError as exc:
        raise renamed(exc, names) from None
    async with contextlib.aclosing(service.events(job.id, keepalive_s=WAIT_POLL_S)) as events:
        async for event in events:
            if event is None and await request.is_disconnected():
                await run_in_threadpool(service.cancel, job.id)
                break
    return await run_in_threadpool(service.get, job.id)


def read_png_b64(service: JobService, image_id: str) -> str:
    """A result PNG (with its record chunks) as base64."""
    path, _record = service.image(image_id)
    return base64.b64encode(path.read_bytes()).decode("ascii")


def encode_png_b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
