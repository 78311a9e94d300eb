"""OpenAI's Images API over the job queue: ``POST /v1/images/generations`` and
``POST /v1/images/edits``, so code written for OpenAI (its official client included) runs
against toile by changing only ``base_url``.

Why synchronous: OpenAI's endpoints answer with the images, so these routes submit a job
through :class:`~toile.serve.jobs.JobService` and wait for it to end. The job still goes through
the durable queue, so it is ordered with every other job, shows up in ``GET /v1/jobs``, can be
cancelled, and carries its record like any other. A client that hangs up while waiting has its
job cancelled: nobody is left to read the result.

Mapping (see README "Serve"):

- ``model``: a toile model id; OpenAI's own names (``dall-e-*``, ``gpt-image-*``,
  ``chatgpt-image-*``) mean the server's default model, so unchanged client code works.
- ``size`` ``"WxH"`` -> width, height (``"auto"`` = the model's default); ``n`` -> num_images.
- ``response_format``: ``b64_json`` (the default, as for OpenAI's current models) or ``url``
  (``/v1/images/{id}``, which needs the bearer token when the server has one).
- Extensions: ``seed``, ``steps``, ``guidance``, ``negative_prompt``, ``strength`` (edits).
- Accepted and ignored (no toile equivalent, nothing about the image changes): ``quality``,
  ``style``, ``moderation``, ``user``, ``safety_identifier``, ``output_compression``,
  ``input_fidelity``, ``partial_images``. Refused with a 400 naming them: ``stream: true``,
  ``output_format`` other than ``png``, ``background: transparent``, and unknown parameters
  (as OpenAI does).
- Edits: the mask is RGBA with *transparent = edit*; toile's masks are *white = repaint*, so
  the mask's alpha is inverted. Without a mask, an image with transparent pixels uses them as
  the mask (as DALL-E 2 did); an opaque image without a mask is an img2img job. A ``size``
  other than the image's resizes the image and mask to it.
- Edits on an edit model (one whose family serves the edit task, and that cannot inpaint the
  masked request) are instruction edits, as OpenAI's current models do: the prompt says what
  to change, ``image_guidance`` (extension) how closely to keep the image; a mask part is
  refused there, an image's transparency ignored.

Errors are OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}`` (plus toile's
``field``, the same as ``param``): 400 for bad input, 409 for a cancelled job, 500 for a failed
one, 503 when the queue is full. Deterministic failures carry ``x-should-retry: false`` so the
official client does not run the same failing job three times.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from toile.engine.models import served_tasks
from toile.errors import RequestError, ToileError
from toile.request import (
    MAX_GUIDANCE,
    MAX_IMAGES,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    MAX_SIDE,
    MAX_STEPS,
    Task,
)
from toile.serve import schemas
from toile.serve.jobs import JobNotFoundError, JobService
from toile.serve.routes.common import field_from_loc, job_body, read_png_b64, renamed, run_to_end
from toile.serve.routes.deps import jobs
from toile.serve.rows import ClientQueueFullError, QueueFullError
from toile.serve.spec import JobStatus
from toile.serve.uploads import Upload, check_image_bytes, upload_of

if TYPE_CHECKING:
    from PIL import Image

Service = Annotated[JobService, Depends(jobs)]
OPENAI_MODEL_PREFIXES = ("dall-e-", "gpt-image-", "chatgpt-image")
SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")
# JobCreate's field names -> the names an OpenAI client used for them.
OPENAI_NAMES = {"num_images": "n", "width": "size", "height": "size"}


def parse_size(text: str | None, field: str = "size") -> tuple[int | None, int | None]:
    """``"WxH"`` -> (W, H); ``None``/``"auto"`` -> the model's default."""
    if text is None or text.strip().lower() == "auto":
        return None, None
    match = SIZE.match(text.strip().lower())
    if match is None:
        raise RequestError(
            field, f'must be "WIDTHxHEIGHT" (e.g. "512x512") or "auto", got {text!r}'
        )
    width, height = int(match.group(1)), int(match.group(2))
    for value in (width, height):
        if not 8 <= value <= MAX_SIDE:
            raise RequestError(field, f"each side must be in [8, {MAX_SIDE}], got {text!r}")
    return width, height


# ---------------------------------------------------------------------------- errors
class OpenAIError(Exception):
    """An error to answer in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        retry: bool = False,
        **extra: Any,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.retry, self.extra = param, code, retry, extra

    def response(self) -> JSONResponse:
        error = {
            "message": self.message,
            "type": self.type,
            "param": self.param,
            "code": self.code,
            "field": self.param,
            **self.extra,
        }
        headers = {"x-should-retry": "true" if self.retry else "false"}
        if self.status == 503:
            headers["Retry-After"] = "5"
        return JSONResponse({"error": error}, status_code=self.status, headers=headers)


def _from_validation(exc: RequestValidationError) -> OpenAIError:
    errors = list(exc.errors())
    errors.sort(key=lambda e: e.get("type") != "extra_forbidden")
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request"}
    if first.get("type") == "json_invalid":
        return OpenAIError(400, "the body is not valid JSON", param="body", code="invalid_json")
    param = field_from_loc(first.get("loc", ()))
    if first.get("type") == "extra_forbidden":
        return OpenAIError(
            400,
            f"Unknown parameter: '{param}' (not supported by toile's Images API)",
            param=param,
            code="unknown_parameter",
        )
    return OpenAIError(400, f"{param}: {first.get('msg')}", param=param, code="invalid_value")


class OpenAIRoute(APIRoute):
    """Routes whose every error is OpenAI-shaped. A route class (not app-wide handlers) so the
    native API keeps its own error bodies."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def openai_errors(request: Request) -> Response:
            try:
                return await handler(request)
            except OpenAIError as exc:
                return exc.response()
            except RequestValidationError as exc:
                return _from_validation(exc).response()
            except RequestError as exc:
                error = renamed(exc, OPENAI_NAMES)
                return OpenAIError(
                    400, str(error), param=error.field, code="invalid_value"
                ).response()
            except ClientQueueFullError as exc:
                return OpenAIError(
                    429, str(exc), type="rate_limit_error", code="too_many_queued_jobs",
                    retry=True,
                ).response()
            except QueueFullError as exc:
                return OpenAIError(
                    503, str(exc), type="server_error", code="queue_full", retry=True
                ).response()
            except JobNotFoundError as exc:
                return OpenAIError(404, str(exc), type="not_found", param="id").response()
            except HTTPException as exc:  # e.g. a malformed multipart body
                return OpenAIError(exc.status_code, str(exc.detail), param="body").response()

        return openai_errors


router = APIRouter(prefix="/v1", tags=["openai"], route_class=OpenAIRoute)
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": schemas.ErrorBody, "description": text}
    for code, text in (
        (400, "invalid input; `error.param` names the parameter"),
        (409, "the job was cancelled before it finished"),
        (500, "the job failed; `error.message` says why"),
        (503, "the queue is full; retry later"),
    )
}

Quality = Literal["auto", "low", "medium", "high", "xhigh", "max", "standard", "hd"]


class ImageOptions(BaseModel):
    """Parameters shared by generations and edits. Lax types (``"2"`` is 2) because edits
    arrive as multipart form fields, which are all strings."""

    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(max_length=MAX_PROMPT_CHARS)
    model: str | None = Field(None, max_length=64)
    n: int | None = Field(None, ge=1, le=MAX_IMAGES)
    size: str | None = Field(None, max_length=16, description='"WxH" or "auto"')
    response_format: Literal["b64_json", "url"] | None = None
    quality: Quality | None = Field(None, description="accepted and ignored")
    output_format: Literal["png"] | None = Field(None, description="toile returns PNG only")
    background: Literal["auto", "opaque"] | None = None
    moderation: Literal["low", "auto"] | None = Field(None, description="accepted and ignored")
    output_compression: int | None = Field(None, ge=0, le=100, description="ignored (PNG)")
    partial_images: int | None = Field(None, ge=0, le=3, description="ignored (no streaming)")
    stream: bool | None = Field(None, description="must be false: streaming is not supported")
    user: str | None = Field(None, max_length=256, description="accepted and ignored")
    safety_identifier: str | None = Field(None, max_length=256, description="ignored")
    # toile extensions
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="toile extension")
    steps: int | None = Field(None, ge=1, le=MAX_STEPS, description="toile extension")
    guidance: float | None = Field(None, ge=0.0, le=MAX_GUIDANCE, description="toile extension")
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS, description="toile extension")

    @field_validator("stream")
    @classmethod
    def _no_streaming(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("streaming is not supported; use POST /v1/jobs and its events")
        return value


class GenerationBody(ImageOptions):
    """``POST /v1/images/generations``."""

    style: Literal["vivid", "natural"] | None = Field(None, description="accepted and ignored")


class EditFields(ImageOptions):
    """The text fields of ``POST /v1/images/edits`` (the files are ``image`` and ``mask``)."""

    input_fidelity: Literal["high", "low"] | None = Field(None, description="ignored")
    strength: float | None = Field(None, gt=0.0, le=1.0, description="toile extension")
    image_guidance: float | None = Field(
        None, ge=0.0, le=MAX_GUIDANCE, description="toile extension: an instruction edit's "
        "image guidance")


def _model(name: str | None) -> str | None:
    if name is not None and name.lower().startswith(OPENAI_MODEL_PREFIXES):
        return None  # OpenAI's model names: the server's default model
    return name


def _fields(options: ImageOptions) -> dict[str, Any]:
    """The JobCreate fields every OpenAI request maps to."""
    width, height = parse_size(options.size)
    return {
        "prompt": options.prompt,
        "negative_prompt": options.negative_prompt,
        "model": _model(options.model),
        "width": width,
        "height": height,
        "steps": options.steps,
        "guidance": float(options.guidance) if options.guidance is not None else None,
        "seed": options.seed,
        "num_images": options.n or 1,
    }


def _finish(
    request: Request, service: JobService, job: schemas.Job, response_format: str | None
) -> dict[str, Any]:
    """The finished job as an ImagesResponse, or the OpenAI error for a job that did not
    succeed."""
    if job.status is JobStatus.CANCELLED:
        raise OpenAIError(
            409,
            f"job {job.id} was cancelled before it finished",
            type="cancelled",
            code="job_cancelled",
            job_id=job.id,
        )
    if job.status is not JobStatus.SUCCEEDED:
        error = job.error or schemas.ErrorInfo(message=f"job {job.id} ended as {job.status}")
        if error.field:
            param = renamed(RequestError(error.field, error.message), OPENAI_NAMES).field
            raise OpenAIError(400, error.message, param=param, code="invalid_value", job_id=job.id)
        raise OpenAIError(
            500, error.message, type="server_error", code="generation_failed", job_id=job.id
        )
    data = []
    for image in job.images:
        if response_format == "url":
            item: dict[str, Any] = {"url": str(request.url_for("get_image", image_id=image.id))}
        else:
            item = {"b64_json": read_png_b64(service, image.id)}
        item["seed"] = image.record.get("seed")  # toile extension: what reproduces it
        data.append(item)
    first = job.images[0].record if job.images else {}
    return {
        "created": int(job.finished_at or time.time()),
        "data": data,
        "output_format": "png",
        "size": f"{first.get('width')}x{first.get('height')}" if first else None,
        "job_id": job.id,  # toile extension: GET /v1/jobs/{job_id} has the full records
    }


@router.post("/images/generations", responses=ERRORS)
async def create_images(body: GenerationBody, request: Request, service: Service) -> dict[str, Any]:
    """OpenAI's ``images.generate``: waits for the job and returns its images."""
    job = await run_to_end(service, job_body(_fields(body), OPENAI_NAMES), request, OPENAI_NAMES)
    return await run_in_threadpool(_finish, request, service, job, body.response_format)


# ---------------------------------------------------------------------------- edits
def _edit_schema() -> dict[str, Any]:
    schema = EditFields.model_json_schema()
    schema["properties"] = {
        "image": {"type": "string", "format": "binary"},
        "mask": {"type": "string", "format": "binary"},
        **schema["properties"],
    }
    schema["required"] = ["image", *schema.get("required", [])]
    return schema


async def _read_file(upload: Any, field: str, max_bytes: int) -> bytes:
    if not hasattr(upload, "read"):
        raise RequestError(field, "must be a file part of the multipart form")
    data = await upload.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise RequestError(field, f"is larger than the server's limit of {max_bytes} bytes")
    return data


def _decode(data: bytes, field: str, max_pixels: int) -> Image.Image:
    """Format sniffed and pixels counted from the header before decoding (uploads.py's
    checks); unlike the native API's uploads, the alpha channel is kept: it is the mask."""
    from toile.io.images import open_image

    check_image_bytes(data, field=field, max_pixels=max_pixels)
    return open_image(data, field=field, max_pixels=max_pixels)


def _alpha(image: Image.Image) -> Image.Image | None:
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        return image.convert("RGBA").getchannel("A")
    return None


def edit_inputs(
    image: Image.Image, mask: Image.Image | None, size: tuple[int | None, int | None]
) -> tuple[Image.Image, Image.Image | None]:
    """OpenAI's image (+ RGBA mask, transparent = edit) -> toile's RGB image and L mask
    (white = repaint), resized to ``size`` when one is given."""
    from PIL import Image as PILImage
    from PIL import ImageOps

    if mask is not None:
        alpha = _alpha(mask)
        if alpha is None:
            raise RequestError(
                "mask", "must have an alpha channel (RGBA PNG): transparent pixels mark the edit"
            )
        if mask.size != image.size:
            raise RequestError(
                "mask",
                f"is {mask.size[0]}x{mask.size[1]} but the image is "
                f"{image.size[0]}x{image.size[1]}; they must match",
            )
    else:
        alpha = _alpha(image)
        if alpha is not None and alpha.getextrema()[0] == 255:
            alpha = None  # an opaque image: nothing marked, so img2img
    rgb = image.convert("RGB")
    toile_mask = ImageOps.invert(alpha) if alpha is not None else None
    width, height = size
    if width is not None and height is not None and (width, height) != rgb.size:
        rgb = rgb.resize((width, height), PILImage.Resampling.LANCZOS)
        if toile_mask is not None:
            toile_mask = toile_mask.resize((width, height), PILImage.Resampling.BILINEAR)
    return rgb, toile_mask


def instruction_edit(service: JobService, model: str | None, *, masked: bool) -> bool:
    """Whether an edit on ``model`` (None: the default) is an instruction edit: the model's
    family serves the edit task, and the request is not an inpaint it can do (a mask, on a
    model that also generates). From configs; nothing is loaded."""
    try:
        entry = service.registry.resolve(model or service.registry.default_id, allow_paths=False)
        tasks = served_tasks(entry.path)
    except (ToileError, OSError):
        return False  # an unknown or unreadable model: the job's own checks say what is wrong
    return Task.EDIT in tasks and not (masked and Task.GENERATE in tasks)


@router.post(
    "/images/edits",
    responses=ERRORS,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"multipart/form-data": {"schema": _edit_schema()}},
        }
    },
)
async def edit_images(request: Request, service: Service) -> dict[str, Any]:
    """OpenAI's ``images.edit`` (multipart): on an edit model (InstructPix2Pix, Kontext...) the
    prompt is the instruction; on other models inpainting with a mask, img2img without one."""
    config = service.config
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise RequestError("image", "send multipart/form-data with the image as a file part")
    form = await request.form(max_files=4, max_fields=64)
    try:
        images = [*form.getlist("image"), *form.getlist("image[]")]
        mask_part = form.get("mask")
        text = {
            key: value
            for key, value in form.multi_items()
            if key not in ("image", "image[]", "mask")
        }
        try:
            options = EditFields.model_validate(text)
        except ValidationError as exc:
            raise RequestValidationError(exc.errors()) from None
        if len(images) != 1:
            raise RequestError("image", f"toile edits exactly one image, got {len(images)}")
        data = await _read_file(images[0], "image", config.max_image_bytes)
        mask_data = (
            await _read_file(mask_part, "mask", config.max_image_bytes)
            if mask_part is not None
            else None
        )
    finally:
        await form.close()

    def prepare() -> tuple[schemas.JobCreate, dict[str, Upload]]:
        size = parse_size(options.size)
        model = _model(options.model)
        if size[0] is not None and size[1] is not None:  # before any resizing work
            service.check_output_size(model, (size[0], size[1]), "size")
        image = _decode(data, "image", config.max_image_pixels)
        mask = _decode(mask_data, "mask", config.max_image_pixels) if mask_data else None
        rgb, toile_mask = edit_inputs(image, mask, size)
        fields = {**_fields(options), "width": None, "height": None}  # the image sets the size
        fields["strength"] = options.strength
        fields["image_guidance"] = options.image_guidance
        if instruction_edit(service, model, masked=toile_mask is not None):
            if mask is not None:
                raise RequestError("mask", f"{model or 'the default model'} edits by the "
                                   "instruction in the prompt and takes no mask; leave it out")
            fields["task"] = "edit"
            toile_mask = None  # transparent pixels: the instruction says what to change
        uploads = {"image": upload_of(rgb)}  # decoded once here; the job takes them as they are
        if toile_mask is not None:
            uploads["mask"] = upload_of(toile_mask)
        return job_body(fields, OPENAI_NAMES), uploads

    body, uploads = await run_in_threadpool(prepare)
    job = await run_to_end(service, body, request, OPENAI_NAMES, uploads)
    return await run_in_threadpool(_finish, request, service, job, options.response_format)
