"""AUTOMATIC1111's web UI API (``/sdapi/v1/...``) over the job queue, so scripts and tools
written for A1111 (e.g. the ``webuiapi`` client) drive toile unchanged.

Like the OpenAI routes, ``txt2img`` and ``img2img`` submit a job through
:class:`~toile.serve.jobs.JobService` and wait for it (A1111's calls block until the images are
done); the job is queued, recorded and cancellable like any other.

Mapping (see README "Serve"):

- ``prompt``, ``negative_prompt``, ``steps``, ``cfg_scale`` -> guidance, ``width``/``height``,
  ``seed`` (-1 = random), ``batch_size`` x ``n_iter`` -> num_images (seeds seed, seed+1, ... as
  in A1111). ``<lora:ID:SCALE>`` in the prompt names a LoRA id from the server's ``[loras]``.
- img2img: ``init_images[0]`` -> image, resized to ``width`` x ``height`` (``resize_mode`` 0
  "just resize" or 1 "crop and resize"), ``denoising_strength`` -> strength, ``mask`` (white =
  repaint, as toile) with ``inpainting_mask_invert`` and ``mask_blur`` (a Gaussian blur of that
  radius, as A1111 does) applied here.
- The model: ``override_settings.sd_model_checkpoint``, else the one chosen with
  ``POST /sdapi/v1/options`` (kept in memory until restart), else the server's default.
  ``refiner_checkpoint`` (a title or id) with ``refiner_switch_at`` -> refiner and
  refiner_switch: SDXL's base -> refiner hand-off (txt2img; img2img with a refiner is a 422).
- ``sampler_name`` (or the deprecated ``sampler_index``): toile runs each model with the
  scheduler its checkpoint declares, so ``"Default"``, the empty string, and that scheduler's
  A1111 name (``DDIMScheduler`` -> ``"DDIM"``, ``EulerDiscreteScheduler`` -> ``"Euler"``...) or
  diffusers class name are accepted; anything else is a 422 naming ``sampler_name``.
  ``scheduler`` must be ``"automatic"``.
- Refused with a 422 naming the field unless left at A1111's "off" value: ``enable_hr``,
  ``restore_faces``, ``tiling``, ``subseed_strength``, ``styles``, ``script_name``,
  ``alwayson_scripts``, other ``override_settings``, more than one
  init image, ``resize_mode`` 2/3.
- Accepted and ignored (sampler tuning and saving options with no toile equivalent):
  ``eta``, ``s_churn``, ``s_tmin``, ``s_tmax``, ``s_noise``, ``subseed``, ``seed_resize_*``,
  ``hr_*``/``firstphase_*`` while ``enable_hr`` is off, ``inpainting_fill``,
  ``inpaint_full_res*``, ``image_cfg_scale``, ``initial_noise_multiplier``,
  ``do_not_save_*``, ``save_images``, and unknown fields (A1111 ignores them too); ``info``
  lists the unknown ones under ``toile_ignored``.

Errors keep toile's shape (``{"error": {"type", "field", "message"}}``): 422 naming the A1111
field, 409 when the job was interrupted, 500 when it failed.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from toile.errors import ModelNotFoundError, RequestError
from toile.request import MAX_GUIDANCE, MAX_IMAGES, MAX_PROMPT_CHARS, MAX_SEED, MAX_SIDE, MAX_STEPS
from toile.serve import schemas
from toile.serve.jobs import JobService
from toile.serve.routes.deps import jobs
from toile.serve.routes.openai import encode_png_b64, job_body, read_png_b64, run_to_end

if TYPE_CHECKING:
    from PIL import Image

router = APIRouter(prefix="/sdapi/v1", tags=["a1111"])
Service = Annotated[JobService, Depends(jobs)]
ERRORS: dict[int | str, dict[str, Any]] = {
    422: {"model": schemas.ErrorBody, "description": "a field is invalid; `error.field` names it"},
    409: {"model": schemas.ErrorBody, "description": "the job was interrupted"},
    500: {"model": schemas.ErrorBody, "description": "the job failed"},
}
# JobCreate's field names -> A1111's.
A1111_NAMES = {
    "num_images": "batch_size",
    "guidance": "cfg_scale",
    "strength": "denoising_strength",
    "image": "init_images",
    "model": "sd_model_checkpoint",
    "loras": "prompt",
    "refiner": "refiner_checkpoint",
    "refiner_switch": "refiner_switch_at",
}
# diffusers scheduler class -> the name A1111 gives the same sampler.
A1111_SAMPLERS = {
    "EulerDiscreteScheduler": "Euler",
    "FlowMatchEulerDiscreteScheduler": "Euler",
    "EulerAncestralDiscreteScheduler": "Euler a",
    "DPMSolverMultistepScheduler": "DPM++ 2M",
    "DPMSolverSinglestepScheduler": "DPM++ SDE",
    "KDPM2DiscreteScheduler": "DPM2",
    "KDPM2AncestralDiscreteScheduler": "DPM2 a",
    "HeunDiscreteScheduler": "Heun",
    "LMSDiscreteScheduler": "LMS",
    "DDIMScheduler": "DDIM",
    "PNDMScheduler": "PLMS",
    "UniPCMultistepScheduler": "UniPC",
    "LCMScheduler": "LCM",
    "DDPMScheduler": "DDPM",
}
DEFAULT_SAMPLER = "Default"
LORA_TAG = re.compile(r"<lora:([^:>]+)(?::([^>]*))?>")
TITLE_HASH = re.compile(r"\s*\[[0-9a-fA-F]{6,64}\]$")


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


# --------------------------------------------------------------------------- bodies
class Processing(BaseModel):
    """Fields common to txt2img and img2img. Lax types and unknown fields ignored, as A1111's
    own API does; every value toile uses is range-checked."""

    model_config = ConfigDict(extra="allow")
    prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    styles: list[str] = Field(default_factory=list, description="must be empty")
    seed: int = Field(-1, ge=-1, le=MAX_SEED, description="-1 = random")
    subseed: int = Field(-1, description="ignored")
    subseed_strength: float = Field(0.0, ge=0.0, le=1.0, description="must be 0")
    seed_resize_from_h: int = Field(-1, description="ignored")
    seed_resize_from_w: int = Field(-1, description="ignored")
    sampler_name: str | None = Field(None, max_length=64)
    sampler_index: str | None = Field(None, max_length=64, description="deprecated alias")
    scheduler: str | None = Field(None, max_length=64, description='"automatic" only')
    batch_size: int = Field(1, ge=1, le=MAX_IMAGES)
    n_iter: int = Field(1, ge=1, le=MAX_IMAGES)
    steps: int = Field(50, ge=1, le=MAX_STEPS)
    cfg_scale: float = Field(7.0, ge=0.0, le=MAX_GUIDANCE)
    width: int = Field(512, ge=8, le=MAX_SIDE)
    height: int = Field(512, ge=8, le=MAX_SIDE)
    restore_faces: bool | None = Field(None, description="must be off")
    tiling: bool | None = Field(None, description="must be off")
    eta: float | None = Field(None, description="ignored")
    s_churn: float | None = Field(None, description="ignored")
    s_tmax: float | None = Field(None, description="ignored")
    s_tmin: float | None = Field(None, description="ignored")
    s_noise: float | None = Field(None, description="ignored")
    override_settings: dict[str, Any] = Field(default_factory=dict)
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str | None = Field(None, max_length=200, description="an SDXL refiner")
    refiner_switch_at: float | None = Field(None, gt=0.0, lt=1.0, description="default 0.8")
    script_name: str | None = Field(None, description="must be unset")
    script_args: list[Any] = Field(default_factory=list, description="ignored")
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict, description="must be empty")
    send_images: bool = True
    save_images: bool = Field(False, description="ignored: toile always keeps its images")
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False


class Txt2ImgBody(Processing):
    """``POST /sdapi/v1/txt2img``."""

    enable_hr: bool = Field(False, description="hires fix: must be off")
    denoising_strength: float | None = Field(None, description="hires fix only: ignored")


class Img2ImgBody(Processing):
    """``POST /sdapi/v1/img2img``."""

    init_images: list[str] = Field(min_length=1, description="base64 PNG, JPEG or WebP")
    resize_mode: int = Field(0, ge=0, le=3, description="0 just resize, 1 crop and resize")
    denoising_strength: float = Field(0.75, ge=0.0, le=1.0)
    mask: str | None = Field(None, description="white = repaint")
    mask_blur: int = Field(4, ge=0, le=64)
    inpainting_mask_invert: int = Field(0, ge=0, le=1)
    inpainting_fill: int = Field(0, ge=0, le=3, description="ignored")
    inpaint_full_res: bool | int = Field(True, description="ignored")
    inpaint_full_res_padding: int = Field(0, ge=0, description="ignored")
    image_cfg_scale: float | None = Field(None, description="ignored")
    initial_noise_multiplier: float | None = Field(None, description="ignored")
    include_init_images: bool = Field(False, description="ignored")


class A1111Response(BaseModel):
    images: list[str]
    parameters: dict[str, Any]
    info: str = Field(description="JSON: seed, all_seeds, infotexts, toile_records, ...")


# --------------------------------------------------------------------------- models
def scheduler_class(path: Path) -> str | None:
    """The diffusers scheduler class a model folder declares (read from its config, so no
    model is loaded to list samplers). None for single files or unknown layouts."""
    if not path.is_dir():
        return None
    candidates = [path / "scheduler", *sorted(path.glob("*/scheduler"))]
    for folder in candidates:
        config = folder / "scheduler_config.json"
        try:
            name = json.loads(config.read_text()).get("_class_name")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(name, str):
            return name
    return None


def sampler_title(scheduler: str | None) -> str:
    return A1111_SAMPLERS.get(scheduler or "", scheduler or DEFAULT_SAMPLER)


def _model_id(title: str) -> str:
    """An A1111 checkpoint title (``"name [hash]"``) or a toile id -> the id."""
    return TITLE_HASH.sub("", title.strip())


def _entry(service: JobService, title: str, field: str) -> Any:
    try:
        return service.registry.resolve(_model_id(title), allow_paths=False)
    except ModelNotFoundError as exc:
        raise RequestError(field, str(exc)) from None


def _check_sampler(body: Processing, path: Path, model: str) -> str:
    """The request's sampler must be the model's own; returns its A1111 name."""
    own = scheduler_class(path)
    title = sampler_title(own)
    name = (body.sampler_name or body.sampler_index or "").strip()
    accepted = {"", DEFAULT_SAMPLER.lower(), title.lower(), (own or "").lower()}
    if name.lower() not in accepted:
        raise RequestError(
            "sampler_name",
            f"{name!r} is not available: toile runs {model} with the scheduler its checkpoint "
            f"declares ({title}); send {title!r} or {DEFAULT_SAMPLER!r}",
        )
    if (body.scheduler or "automatic").lower() != "automatic":
        raise RequestError("scheduler", f"must be 'automatic', got {body.scheduler!r}")
    return title


def _check_off(body: Processing) -> None:
    """Features toile does not have must be off: asking for them is an error, not a silent
    no-op that would return a different picture than the client expects."""
    flags = {
        "enable_hr": getattr(body, "enable_hr", False),
        "restore_faces": body.restore_faces,
        "tiling": body.tiling,
        "subseed_strength": body.subseed_strength,
        "styles": body.styles,
        "script_name": body.script_name,
    }
    for name, value in flags.items():
        if value:
            raise RequestError(name, f"is not supported by toile; leave it off (got {value!r})")
    for name in body.alwayson_scripts:
        raise RequestError(f"alwayson_scripts.{name}", "scripts and extensions are not supported")
    for name in body.override_settings:
        if name != "sd_model_checkpoint":
            raise RequestError(
                f"override_settings.{name}", "only sd_model_checkpoint can be overridden"
            )


def _loras(prompt: str) -> tuple[str, list[dict[str, Any]]]:
    """A1111's ``<lora:ID:SCALE>`` prompt tags -> (prompt without them, LoRA ids + scales)."""
    loras = []
    for match in LORA_TAG.finditer(prompt):
        scale_text = (match.group(2) or "1").split(":")[0]
        try:
            scale = float(scale_text)
        except ValueError:
            raise RequestError("prompt", f"{match.group(0)}: the scale must be a number") from None
        loras.append({"id": match.group(1).strip(), "scale": scale})
    return LORA_TAG.sub("", prompt).strip(), loras


def _fields(service: JobService, state: A1111State, body: Processing) -> dict[str, Any]:
    """The native job fields for an A1111 request (after every check that can be done here)."""
    _check_off(body)
    override = body.override_settings.get("sd_model_checkpoint")
    if override is not None:
        entry = _entry(service, str(override), "override_settings.sd_model_checkpoint")
    else:
        with state.lock:
            chosen = state.checkpoint
        entry = _entry(service, chosen or service.registry.default_id, "sd_model_checkpoint")
    _check_sampler(body, entry.path, entry.id)
    num_images = body.batch_size * body.n_iter
    if num_images > service.config.max_images:
        raise RequestError(
            "batch_size",
            f"batch_size x n_iter = {num_images}; this server makes at most "
            f"{service.config.max_images} images per request",
        )
    prompt, loras = _loras(body.prompt)
    refiner = None
    if body.refiner_checkpoint:  # A1111 sends "" or None for "no refiner"
        refiner = _entry(service, body.refiner_checkpoint, "refiner_checkpoint").id
    return {
        "refiner": refiner,
        "refiner_switch": body.refiner_switch_at if refiner is not None else None,
        "prompt": prompt,
        "negative_prompt": body.negative_prompt,
        "model": entry.id,
        "width": body.width,
        "height": body.height,
        "steps": body.steps,
        "guidance": float(body.cfg_scale),
        "seed": None if body.seed == -1 else body.seed,
        "num_images": num_images,
        "loras": loras,
    }


# --------------------------------------------------------------------------- img2img inputs
def _resized(image: Image.Image, size: tuple[int, int], mode: int, *, smooth: bool) -> Any:
    from PIL import Image as PILImage
    from PIL import ImageOps

    if image.size == size:
        return image
    method = PILImage.Resampling.LANCZOS if smooth else PILImage.Resampling.BILINEAR
    if mode == 1:  # crop and resize: keep the aspect ratio, cut what overflows
        return ImageOps.fit(image, size, method)
    return image.resize(size, method)


def _img2img_inputs(service: JobService, body: Img2ImgBody) -> tuple[str, str | None]:
    """init image and mask as toile wants them: at the requested size (toile's img2img keeps
    its input's size), mask inverted/blurred as asked. Decoded with the server's upload checks
    (format sniffing, pixel cap before decoding)."""
    from PIL import ImageFilter, ImageOps

    from toile.serve.uploads import read_upload

    config = service.config
    if len(body.init_images) != 1:
        raise RequestError(
            "init_images", f"toile takes one init image, got {len(body.init_images)}"
        )
    if body.resize_mode not in (0, 1):
        raise RequestError(
            "resize_mode", "only 0 (just resize) and 1 (crop and resize) are supported"
        )
    if body.denoising_strength <= 0:
        raise RequestError("denoising_strength", "must be greater than 0 for img2img")
    size = (body.width, body.height)
    limits = {"max_bytes": config.max_image_bytes, "max_pixels": config.max_image_pixels}
    init = read_upload(body.init_images[0], field="init_images[0]", **limits)
    image_b64 = body.init_images[0]
    if init.image.size != size:
        image_b64 = encode_png_b64(_resized(init.image, size, body.resize_mode, smooth=True))
    if body.mask is None:
        return image_b64, None
    mask = read_upload(body.mask, field="mask", **limits).image  # "L", white = repaint
    if body.inpainting_mask_invert:
        mask = ImageOps.invert(mask)
    if mask.size != init.image.size and mask.size != size:
        raise RequestError(
            "mask", f"is {mask.size[0]}x{mask.size[1]}; it must match the init image's size"
        )
    mask = _resized(mask, size, body.resize_mode, smooth=False)
    if body.mask_blur:
        mask = mask.filter(ImageFilter.GaussianBlur(body.mask_blur))
    return image_b64, encode_png_b64(mask)


# --------------------------------------------------------------------------- running
def _answer(service: JobService, body: Processing, job: schemas.Job, sampler: str) -> Any:
    """A1111's response for a finished job, or toile's error body for one that did not."""
    from toile.result import ImageRecord
    from toile.safety.metadata import a1111_parameters

    if job.status == "cancelled":
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
    if job.status != "succeeded":
        error = job.error or schemas.ErrorInfo(message=f"job {job.id} ended as {job.status}")
        field = A1111_NAMES.get(error.field or "", error.field)
        status = 422 if field else 500
        kind = "invalid_request" if field else "generation_failed"
        return JSONResponse(
            {"error": {"type": kind, "field": field, "message": error.message, "job_id": job.id}},
            status_code=status,
        )
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
        "sampler_name": sampler,
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

    def prepare() -> tuple[schemas.JobCreate, str]:
        fields = _fields(service, state, body)
        sampler = sampler_title(scheduler_class(service.registry.get(fields["model"]).path))
        if isinstance(body, Img2ImgBody):
            image, mask = _img2img_inputs(service, body)
            fields.update(
                image=image, mask=mask, width=None, height=None, strength=body.denoising_strength
            )
        return job_body(fields, A1111_NAMES), sampler

    job_create, sampler = await run_in_threadpool(prepare)
    job = await run_to_end(service, job_create, request, A1111_NAMES)
    return await run_in_threadpool(_answer, service, body, job, sampler)


@router.post("/txt2img", response_model=A1111Response, responses=ERRORS)
async def txt2img(body: Txt2ImgBody, request: Request, service: Service) -> Any:
    """Generate from text; blocks until the images are done (A1111's behaviour)."""
    return await _generate(request, service, body)


@router.post("/img2img", response_model=A1111Response, responses=ERRORS)
async def img2img(body: Img2ImgBody, request: Request, service: Service) -> Any:
    """img2img, or inpainting with ``mask``; blocks until the images are done."""
    return await _generate(request, service, body)


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
    listing = await run_in_threadpool(service.list, ["running"], 10)
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
def interrupt(service: Service) -> dict[str, Any]:
    """Stop the running job within one denoising step, as A1111's Interrupt button does (queued
    jobs stay queued). Its waiting txt2img/img2img call answers 409."""
    listing = service.list(["running"], 10)
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
    """The schedulers toile's registered models use, by A1111 name (aliases: the diffusers
    class names), plus ``Default`` (whatever the model declares)."""
    found: dict[str, set[str]] = {}
    for entry in service.registry.entries():
        own = scheduler_class(entry.path)
        if own is not None:
            found.setdefault(sampler_title(own), set()).add(own)
    listing = [{"name": DEFAULT_SAMPLER, "aliases": ["default"], "options": {}}]
    listing += [
        {"name": name, "aliases": sorted(classes), "options": {}}
        for name, classes in sorted(found.items())
    ]
    return listing


@router.get("/schedulers")
def schedulers() -> list[dict[str, Any]]:
    """Only ``automatic``: the noise schedule is the checkpoint's own."""
    return [
        {
            "name": "automatic",
            "label": "Automatic",
            "aliases": None,
            "default_rho": -1,
            "need_inner_model": False,
        }
    ]


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
            chosen = _entry(service, value, key).id
        elif key not in current or current[key] != value:
            raise RequestError(key, "is not an option toile can change; only sd_model_checkpoint")
    if chosen is not None:
        with state.lock:
            state.checkpoint = chosen
    return {}
