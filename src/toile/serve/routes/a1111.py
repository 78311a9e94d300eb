"""AUTOMATIC1111's web UI API (``/sdapi/v1/...``) over the job queue, so scripts and tools
written for A1111 (e.g. the ``webuiapi`` client) drive toile unchanged.

Like the OpenAI routes, ``txt2img`` and ``img2img`` submit a job through
:class:`~toile.serve.jobs.JobService` and wait for it (A1111's calls block until the images are
done); the job is queued, recorded and cancellable like any other. How A1111's fields map onto
toile's (and which are refused or ignored) is in :mod:`toile.serve.routes.a1111_payload`.

Errors keep toile's shape (``{"error": {"type", "field", "message"}}``): 422 naming the A1111
field, 409 when the job was interrupted, 500 when it failed.
"""

from __future__ import annotations

import asyncio
import html
import json
import threading
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from toile.errors import RequestError
from toile.samplers import ALL_NAMES, DEFAULT_SAMPLER, SCHEDULE_LABELS, SamplerMenu, Schedule
from toile.serve import schemas
from toile.serve.jobs import JobService
from toile.serve.routes.a1111_payload import (
    A1111_NAMES,
    EXTRAS_NAMES,
    INTERROGATE_NAMES,
    ExtrasBatchBody,
    ExtrasBody,
    ExtrasSingleBody,
    Img2ImgBody,
    InterrogateBody,
    Processing,
    Txt2ImgBody,
    caption_model,
    check_extras,
    crop_to,
    extras_scale,
    img2img_inputs,
    request_fields,
    resolve_model,
    upscaler_model,
    upscalers,
)
from toile.serve.routes.common import encode_png_b64, job_body, read_png_b64, run_to_end
from toile.serve.routes.deps import caller, jobs
from toile.serve.spec import JobStatus
from toile.serve.uploads import Upload, read_upload

router = APIRouter(prefix="/sdapi/v1", tags=["a1111"])
Service = Annotated[JobService, Depends(jobs)]
ERRORS: dict[int | str, dict[str, Any]] = {
    422: {"model": schemas.ErrorBody, "description": "a field is invalid; `error.field` names it"},
    409: {"model": schemas.ErrorBody, "description": "the job was interrupted"},
    500: {"model": schemas.ErrorBody, "description": "the job failed"},
}


# --------------------------------------------------------------------------- state
class A1111State:
    """What A1111 keeps between calls: the options (only ``sd_model_checkpoint`` is ours to
    set) and the last preview, so ``/progress`` still shows one between preview steps. In
    memory, per app: options are a client convenience, not durable server configuration."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.checkpoint: str | None = None
        self.preview: tuple[str, str] | None = None  # (job id, base64 PNG)


_STATE_LOCK = threading.Lock()


def _state(request: Request) -> A1111State:
    with _STATE_LOCK:  # created on first use, once per app, whichever thread gets here first
        state = getattr(request.app.state, "a1111", None)
        if state is None:
            state = request.app.state.a1111 = A1111State()
    return state


# --------------------------------------------------------------------------- response
class A1111Response(BaseModel):
    images: list[str]
    parameters: dict[str, Any]
    info: str = Field(description="JSON: seed, all_seeds, infotexts, toile_records, ...")


# --------------------------------------------------------------------------- running
def _failure(job: schemas.Job, names: dict[str, str] = A1111_NAMES) -> JSONResponse | None:
    """toile's error body for a job that did not succeed (None if it did): 409 interrupted,
    422 naming the A1111 field (``names``) its request was refused on, 500 failed."""
    if job.status is JobStatus.SUCCEEDED:
        return None
    if job.status is JobStatus.CANCELLED:
        return JSONResponse(
            {
                "error": {
                    "type": "interrupted",
                    "field": None,
                    "message": f"job {job.id} was interrupted before it finished",
                    "job_id": job.id,
                }
            },
            status_code=409,
        )
    error = job.error or schemas.ErrorInfo(message=f"job {job.id} ended as {job.status}")
    field = names.get(error.field or "", error.field)
    status = 422 if field else 500
    kind = "invalid_request" if field else "generation_failed"
    return JSONResponse(
        {"error": {"type": kind, "field": field, "message": error.message, "job_id": job.id}},
        status_code=status,
    )


def _answer(service: JobService, body: Processing, job: schemas.Job) -> Any:
    """A1111's response for a finished job, or toile's error body for one that did not."""
    from toile.io.metadata import a1111_parameters
    from toile.result import ImageRecord

    failure = _failure(job)
    if failure is not None:
        return failure
    records = [image.record for image in job.images]
    first = records[0] if records else {}
    info = {
        "prompt": body.prompt,
        "all_prompts": [body.prompt] * len(records),
        "negative_prompt": body.negative_prompt,
        "all_negative_prompts": [body.negative_prompt] * len(records),
        "seed": first.get("seed"),
        "all_seeds": [r.get("seed") for r in records],
        "subseed": -1,
        "all_subseeds": [-1] * len(records),
        "subseed_strength": 0,
        "width": first.get("width"),
        "height": first.get("height"),
        "sampler_name": first.get("sampler") or DEFAULT_SAMPLER,  # what ran, by its one name
        "scheduler": SCHEDULE_LABELS.get(first.get("schedule") or "automatic", "Automatic"),
        "cfg_scale": first.get("guidance"),
        "steps": first.get("steps"),
        "batch_size": body.batch_size,
        "n_iter": body.n_iter,
        "restore_faces": False,
        "sd_model_name": first.get("model_id"),
        "sd_model_hash": (first.get("model_hash") or "")[:10] or None,
        "denoising_strength": first.get("strength"),
        "extra_generation_params": {},
        "index_of_first_image": 0,
        "infotexts": [a1111_parameters(ImageRecord.from_dict(r)) for r in records],
        "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.created_at)),
        "clip_skip": 1,
        "is_using_inpainting_conditioning": first.get("mode") == "inpaint",
        "version": f"toile {first.get('software', {}).get('toile', '')}".strip(),
        "toile_job_id": job.id,
        "toile_records": records,
        "toile_ignored": sorted(body.model_extra or {}),
    }
    images = [read_png_b64(service, image.id) for image in job.images] if body.send_images else []
    parameters = body.model_dump(exclude={"init_images", "mask"}, exclude_none=False)
    for name in ("init_images", "mask"):
        if name in type(body).model_fields:
            parameters[name] = None  # A1111 leaves inputs out of the echo unless asked
    return A1111Response(images=images, parameters=parameters, info=json.dumps(info))


async def _generate(request: Request, service: JobService, body: Processing) -> Any:
    state = _state(request)

    def prepare() -> tuple[schemas.JobCreate, dict[str, Any]]:
        with state.lock:
            checkpoint = state.checkpoint
        fields = request_fields(service, checkpoint, body)
        uploads: dict[str, Any] = {}
        if isinstance(body, Img2ImgBody):
            uploads = img2img_inputs(service, body, fields["model"])
            fields.update(width=None, height=None, strength=body.denoising_strength)
        return job_body(fields, A1111_NAMES), uploads

    job_create, uploads = await run_in_threadpool(prepare)
    job = await run_to_end(service, job_create, request, A1111_NAMES, uploads)
    return await run_in_threadpool(_answer, service, body, job)


@router.post("/txt2img", response_model=A1111Response, responses=ERRORS)
async def txt2img(body: Txt2ImgBody, request: Request, service: Service) -> Any:
    """Generate from text; blocks until the images are done (A1111's behaviour)."""
    return await _generate(request, service, body)


@router.post("/img2img", response_model=A1111Response, responses=ERRORS)
async def img2img(body: Img2ImgBody, request: Request, service: Service) -> Any:
    """img2img, or inpainting with ``mask``; blocks until the images are done."""
    return await _generate(request, service, body)


# --------------------------------------------------------------------------- extras
class ExtrasSingleResponse(BaseModel):
    image: str = Field(description="base64 PNG")
    html_info: str


class ExtrasBatchResponse(BaseModel):
    images: list[str] = Field(description="base64 PNGs, in imageList order")
    html_info: str


async def _upscale(
    request: Request, service: JobService, body: ExtrasBody, text: str, field: str
) -> tuple[str, str] | JSONResponse:
    """One image of an extras call: (base64 PNG, A1111's infotext), or the error body. With
    ``upscaler_1`` None the image comes back as it is, as A1111 does."""
    config = service.config

    def prepare() -> tuple[Upload, str | None, float]:
        check_extras(body)
        model = upscaler_model(service, body.upscaler_1)
        upload = read_upload(text, field=field, max_bytes=config.max_image_bytes,
                             max_pixels=config.max_image_pixels)
        return upload, model, extras_scale(body, upload.image.size)

    upload, model, scale = await run_in_threadpool(prepare)
    if model is None:
        return encode_png_b64(upload.image), ""
    fields = {"task": "upscale", "model": model, "scale": scale}
    job = await run_to_end(service, job_body(fields, EXTRAS_NAMES), request, EXTRAS_NAMES,
                           {"image": upload})
    failure = _failure(job, EXTRAS_NAMES)
    if failure is not None:
        return failure
    info = f"Postprocess upscale by: {scale:.4g}, Postprocess upscaler: {body.upscaler_1}"
    if body.resize_mode == 1:
        size = (body.upscaling_resize_w, body.upscaling_resize_h)
        info += f", Postprocess upscale to: {size[0]}x{size[1]}"
        if body.upscaling_crop:
            return await run_in_threadpool(_cropped, service, job, size), info
    return await run_in_threadpool(read_png_b64, service, job.images[0].id), info


def _cropped(service: JobService, job: schemas.Job, size: tuple[int, int]) -> str:
    """The job's image cropped to ``size`` (A1111's ``upscaling_crop``), as base64 PNG; as it
    came (its record chunks kept) when it already has that size."""
    from PIL import Image

    path, _record = service.image(job.images[0].id)
    with Image.open(path) as image:
        if image.size == size:
            return read_png_b64(service, job.images[0].id)
        return encode_png_b64(crop_to(image.convert("RGB"), size))


def _html(info: str) -> str:
    return f"<p>{html.escape(info)}</p>" if info else ""


@router.post("/extra-single-image", response_model=ExtrasSingleResponse, responses=ERRORS)
async def extra_single_image(body: ExtrasSingleBody, request: Request, service: Service) -> Any:
    """Upscale one image with ``upscaler_1`` (an upscale job; blocks until it is done)."""
    done = await _upscale(request, service, body, body.image, "image")
    if isinstance(done, JSONResponse):
        return done
    image, info = done
    return ExtrasSingleResponse(image=image, html_info=_html(info))


@router.post("/extra-batch-images", response_model=ExtrasBatchResponse, responses=ERRORS)
async def extra_batch_images(body: ExtrasBatchBody, request: Request, service: Service) -> Any:
    """Upscale each image of ``imageList`` (one upscale job each, in order)."""
    images, infos = [], []
    for index, item in enumerate(body.imageList):
        done = await _upscale(request, service, body, item.data, f"imageList[{index}].data")
        if isinstance(done, JSONResponse):
            return done
        images.append(done[0])
        infos.append(done[1])
    return ExtrasBatchResponse(images=images, html_info=_html(infos[0]))


@router.get("/upscalers")
def list_upscalers(service: Service) -> list[dict[str, Any]]:
    """``None``, A1111's ``Lanczos`` and ``Nearest`` (toile's built-in filters), and every
    other model that serves upscale, by id. ``scale`` is the model's own factor once the
    server has loaded it (null before, and for filters, which reach any scale); paths and
    URLs are never shown."""
    known = service.worker.known_models if service.worker is not None else {}
    listing = []
    for name, model in upscalers(service).items():
        info = known.get(model) if model is not None else None
        factor = info.defaults.upscale_factor if info is not None and info.family != "resize" \
            else None
        listing.append({"name": name, "model_name": model, "model_path": None,
                        "model_url": None, "scale": factor})
    return listing


# --------------------------------------------------------------------------- interrogate
class InterrogateResponse(BaseModel):
    caption: str


@router.post("/interrogate", response_model=InterrogateResponse, responses=ERRORS)
async def interrogate(body: InterrogateBody, request: Request, service: Service) -> Any:
    """Describe an image in words: a caption job on the model :func:`caption_model` picks
    (A1111's ``clip`` and ``deepdanbooru`` mean the server's caption model); blocks until it
    is done."""
    config = service.config

    def prepare() -> tuple[schemas.JobCreate, dict[str, Upload]]:
        fields = {"task": "caption", "model": caption_model(service, body.model)}
        upload = read_upload(body.image, field="image", max_bytes=config.max_image_bytes,
                             max_pixels=config.max_image_pixels)
        return job_body(fields, INTERROGATE_NAMES), {"image": upload}

    job_create, uploads = await run_in_threadpool(prepare)
    job = await run_to_end(service, job_create, request, INTERROGATE_NAMES, uploads)
    failure = _failure(job, INTERROGATE_NAMES)
    if failure is not None:
        return failure
    return InterrogateResponse(caption=job.texts[0].text if job.texts else "")


# --------------------------------------------------------------------------- progress
def _live_preview(service: JobService, job_id: str, loop: asyncio.AbstractEventLoop) -> Any:
    """The running job's latest progress event (with its preview, if it had one), read from
    the event hub the same way an SSE subscriber's first events are."""
    captured: dict[str, Any] = {}

    def snapshot(live: dict[str, Any]) -> list[Any]:
        captured.update(live)
        return []

    service.hub.subscribe(job_id, loop, snapshot).close()
    return captured.get("progress")


@router.get("/progress")
async def progress(
    request: Request,
    service: Service,
    skip_current_image: Annotated[bool, Query()] = False,
) -> dict[str, Any]:
    """The running job (whichever API submitted it): progress 0-1, ETA in seconds, a preview
    (base64 PNG) and A1111's ``state``. Idle: progress 0 and ``job_count`` 0."""
    state = _state(request)
    listing = await run_in_threadpool(service.list, [JobStatus.RUNNING], 10, caller(request).scope)
    job_count = len(listing.jobs) + listing.queue_length
    idle_state = {
        "skipped": False,
        "interrupted": False,
        "stopping_generation": False,
        "job": "",
        "job_count": job_count,
        "job_timestamp": "0",
        "job_no": 0,
        "sampling_step": 0,
        "sampling_steps": 0,
    }
    if not listing.jobs:
        return {
            "progress": 0.0,
            "eta_relative": 0.0,
            "state": idle_state,
            "current_image": None,
            "textinfo": None,
        }
    job = listing.jobs[-1]
    event = _live_preview(service, job.id, asyncio.get_running_loop())
    step = int(event.data.get("step", 0)) if event else 0
    total = int(event.data.get("total", 0)) if event else 0
    with state.lock:
        if event is not None and event.data.get("preview_png"):
            state.preview = (job.id, event.data["preview_png"])
        preview = state.preview[1] if state.preview and state.preview[0] == job.id else None
    fraction = min(step / total, 1.0) if total else 0.0
    elapsed = time.time() - (job.started_at or time.time())
    eta = elapsed * (1 - fraction) / fraction if fraction > 0 else 0.0
    return {
        "progress": round(fraction, 4),
        "eta_relative": round(max(eta, 0.0), 3),
        "state": {
            **idle_state,
            "job": f"toile job {job.id}",
            "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.created_at)),
            "sampling_step": step,
            "sampling_steps": total,
        },
        "current_image": None if skip_current_image else preview,
        "textinfo": f"step {step} of {total}" if total else "starting",
        "toile_job_id": job.id,
    }


@router.post("/interrupt")
def interrupt(request: Request, service: Service) -> dict[str, Any]:
    """Stop the running job within one denoising step, as A1111's Interrupt button does (queued
    jobs stay queued). Its waiting txt2img/img2img call answers 409. A client stops only its
    own job."""
    listing = service.list([JobStatus.RUNNING], 10, caller(request).scope)
    cancelled = [service.cancel(job.id).id for job in listing.jobs]
    return {"interrupted": cancelled}


# --------------------------------------------------------------------------- listings
@router.get("/sd-models")
def sd_models(service: Service) -> list[dict[str, Any]]:
    """Registered models in A1111's shape. ``title`` and ``model_name`` are the toile id (ids,
    never paths: ``filename`` is the id too); hashes are left out because computing them reads
    every weight file."""
    return [
        {
            "title": entry.id,
            "model_name": entry.id,
            "hash": None,
            "sha256": None,
            "filename": entry.id,
            "config": None,
        }
        for entry in service.registry.entries()
    ]


@router.get("/samplers")
def samplers(service: Service) -> list[dict[str, Any]]:
    """Every sampler a registered model can use, by its one name (aliases: the diffusers class
    names and A1111's old ``k_`` names), after ``Default`` (each model's own)."""
    found: dict[str, set[str]] = {}
    for menu in _menus(service):
        for sampler in menu.samplers() or (menu.own(),):
            found.setdefault(sampler.name, set()).update(
                {sampler.scheduler_class, *sampler.aliases}
            )
    listing = [{"name": DEFAULT_SAMPLER, "aliases": ["default"], "options": {}}]
    order = {name: i for i, name in enumerate(ALL_NAMES)}
    listing += [
        {"name": name, "aliases": sorted(aliases), "options": {}}
        for name, aliases in sorted(found.items(), key=lambda item: order.get(item[0], 99))
    ]
    return listing


@router.get("/schedulers")
def schedulers(service: Service) -> list[dict[str, Any]]:
    """The schedule types any registered model can use (``automatic``: the checkpoint's own)."""
    found = {Schedule.AUTOMATIC}
    for menu in _menus(service):
        for sampler in menu.samplers():
            found.update(menu.schedules(sampler))
    return [
        {
            "name": schedule.value,
            "label": SCHEDULE_LABELS[schedule],
            "aliases": None,
            "default_rho": -1,
            "need_inner_model": False,
        }
        for schedule in Schedule
        if schedule in found
    ]


def _menus(service: JobService) -> list[SamplerMenu]:
    """The sampler menus of the registered models, from their configs (nothing is loaded; a
    model that cannot be identified, or a single file, is left out)."""
    from toile.errors import ToileError
    from toile.families.registry import checkpoint_samplers

    menus = []
    for entry in service.registry.entries():
        try:
            menu = checkpoint_samplers(entry.path)
        except ToileError:
            continue
        if menu is not None:
            menus.append(menu)
    return menus


@router.get("/loras")
def loras(service: Service) -> list[dict[str, Any]]:
    """The server's LoRA ids, for ``<lora:ID:SCALE>`` in prompts."""
    return [
        {"name": lora_id, "alias": lora_id, "path": lora_id, "metadata": {}}
        for lora_id in service.loras.ids()
    ]


@router.get("/scripts")
def scripts() -> dict[str, list[str]]:
    """No scripts or extensions (clients probe this to decide what to send)."""
    return {"txt2img": [], "img2img": []}


# --------------------------------------------------------------------------- options
def _options(service: JobService, state: A1111State) -> dict[str, Any]:
    with state.lock:
        chosen = state.checkpoint
    return {
        "sd_model_checkpoint": chosen or service.registry.default_id,
        "sd_checkpoint_hash": None,
        "samples_format": "png",
        "CLIP_stop_at_last_layers": 1,
        "sd_vae": "Automatic",
    }


@router.get("/options")
def get_options(request: Request, service: Service) -> dict[str, Any]:
    """A1111's options that mean something here; ``sd_model_checkpoint`` is the model A1111
    requests use."""
    return _options(service, _state(request))


@router.post("/options", responses=ERRORS)
def set_options(request: Request, service: Service, body: dict[str, Any]) -> dict[str, Any]:
    """Set ``sd_model_checkpoint`` (a model id or A1111 title). Other keys may be sent back
    unchanged (clients often post the whole GET); changing them is a 422 naming the key."""
    state = _state(request)
    current = _options(service, state)
    chosen = None
    for key, value in body.items():
        if key == "sd_model_checkpoint":
            if not isinstance(value, str):
                raise RequestError(key, "must be a model id from GET /sdapi/v1/sd-models")
            chosen = resolve_model(service, value, key).id
        elif key not in current or current[key] != value:
            raise RequestError(key, "is not an option toile can change; only sd_model_checkpoint")
    if chosen is not None:
        with state.lock:
            state.checkpoint = chosen
    return {}
