"""AUTOMATIC1111's request bodies (``/sdapi/v1/txt2img`` and ``/img2img``) and their
translation into a toile job; the routes that use them are in :mod:`toile.serve.routes.a1111`.

Mapping (see README "Serve"):

- ``prompt``, ``negative_prompt``, ``steps``, ``cfg_scale`` -> guidance, ``width``/``height``,
  ``seed`` (-1 = random), ``batch_size`` x ``n_iter`` -> num_images (seeds seed, seed+1, ... as
  in A1111). ``<lora:ID:SCALE>`` in the prompt names a LoRA id the server serves (its
  ``[loras]`` or the ``toile loras`` registry).
- img2img: ``init_images[0]`` -> image, resized to ``width`` x ``height`` (``resize_mode`` 0
  "just resize" or 1 "crop and resize"), ``denoising_strength`` -> strength, ``mask`` (white =
  repaint, as toile) with ``inpainting_mask_invert`` and ``mask_blur`` (a Gaussian blur of that
  radius, as A1111 does) applied here.
- The model: ``override_settings.sd_model_checkpoint``, else the one chosen with
  ``POST /sdapi/v1/options`` (kept in memory until restart), else the server's default.
  ``refiner_checkpoint`` (a title or id) with ``refiner_switch_at`` -> refiner and
  refiner_switch: SDXL's base -> refiner hand-off (txt2img and img2img, as A1111).
- ``sampler_name`` (or the deprecated ``sampler_index``): toile runs each model with the
  scheduler its checkpoint declares, so ``"Default"``, the empty string, and that scheduler's
  A1111 name (``DDIMScheduler`` -> ``"DDIM"``, ``EulerDiscreteScheduler`` -> ``"Euler"``...) or
  diffusers class name are accepted; anything else is a 422 naming ``sampler_name``.
  ``scheduler`` must be ``"automatic"``.
- Hires fix (``enable_hr``): ``hr_scale`` (or ``hr_resize_x/y`` in the same aspect ratio),
  ``hr_upscaler`` (an upscaler of ``GET /sdapi/v1/upscalers``; A1111's ``Latent*`` upscalers
  resize latents, which toile's pixel-space hires fix cannot, so they run as Lanczos and the
  record's ``hires.upscaler`` says ``lanczos``), ``hr_second_pass_steps``,
  ``denoising_strength``, ``hr_sampler_name``, ``hr_prompt`` and ``hr_negative_prompt`` -> the
  job's ``hires_*`` fields. A different checkpoint for the second pass is a 422.
- ``tiling`` -> tiling: seamless tiles, by circular padding as A1111 (SD, SDXL and toile
  models; other families answer a 422 naming it).
- Refused with a 422 naming the field unless left at A1111's "off" value:
  ``restore_faces``, ``subseed_strength``, ``styles``, ``script_name``,
  ``alwayson_scripts``, other ``override_settings``, more than one
  init image, ``resize_mode`` 2/3.
- Accepted and ignored (sampler tuning and saving options with no toile equivalent):
  ``eta``, ``s_churn``, ``s_tmin``, ``s_tmax``, ``s_noise``, ``subseed``, ``seed_resize_*``,
  ``hr_*`` while ``enable_hr`` is off, ``inpainting_fill``,
  ``inpaint_full_res*``, ``image_cfg_scale``, ``initial_noise_multiplier``,
  ``do_not_save_*``, ``save_images``, and unknown fields (A1111 ignores them too); ``info``
  lists the unknown ones under ``toile_ignored``.

Extras (``extra-single-image``, ``extra-batch-images``) are upscale jobs: ``upscaler_1`` names
the model (:func:`upscaler_model`), ``upscaling_resize`` is the scale, or with ``resize_mode`` 1
the scale that covers ``upscaling_resize_w`` x ``upscaling_resize_h`` (cropped to it when
``upscaling_crop``). Face restoration (``gfpgan_visibility``, ``codeformer_visibility``) and a
blended second upscaler (``upscaler_2`` with ``extras_upscaler_2_visibility``) are refused
unless off. ``interrogate`` is a caption job (:func:`caption_model` says which model).

Every refusal is a :class:`~toile.errors.RequestError` naming the A1111 field (a 422 once the
routes answer it).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from toile.errors import ModelNotFoundError, RequestError
from toile.request import (
    MAX_GUIDANCE,
    MAX_IMAGES,
    MAX_PROMPT_CHARS,
    MAX_SCALE,
    MAX_SEED,
    MAX_SIDE,
    MAX_STEPS,
    Task,
)
from toile.samplers import DEFAULT_SAMPLER, check_sampler_name, parse_schedule
from toile.serve.jobs import JobService
from toile.serve.uploads import Upload, read_upload, upload_of

if TYPE_CHECKING:
    from PIL import Image

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
    "sampler": "sampler_name",
    "schedule": "scheduler",
    "hires_scale": "hr_scale",
    "hires_upscaler": "hr_upscaler",
    "hires_steps": "hr_second_pass_steps",
    "hires_strength": "denoising_strength",
    "hires_sampler": "hr_sampler_name",
    "hires_prompt": "hr_prompt",
    "hires_negative_prompt": "hr_negative_prompt",
}
# JobCreate's field names -> the extras' and interrogate's.
EXTRAS_NAMES = {"scale": "upscaling_resize", "model": "upscaler_1", "width": "upscaling_resize"}
INTERROGATE_NAMES: dict[str, str] = {}
# A1111's built-in resampling upscalers -> toile's built-in models of the same filter.
A1111_UPSCALERS = {"Lanczos": "lanczos", "Nearest": "nearest"}
NO_UPSCALER = "None"
# A1111's interrogators; both mean "the server's caption model" here (see caption_model).
A1111_INTERROGATORS = ("clip", "deepdanbooru")
LORA_TAG = re.compile(r"<lora:([^:>]+)(?::([^>]*))?>")
TITLE_HASH = re.compile(r"\s*\[[0-9a-fA-F]{6,64}\]$")


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
    scheduler: str | None = Field(None, max_length=64, description="schedule type: automatic, "
                                  "karras, exponential, beta, sgm_uniform")
    batch_size: int = Field(1, ge=1, le=MAX_IMAGES)
    n_iter: int = Field(1, ge=1, le=MAX_IMAGES)
    steps: int = Field(50, ge=1, le=MAX_STEPS)
    cfg_scale: float = Field(7.0, ge=0.0, le=MAX_GUIDANCE)
    width: int = Field(512, ge=8, le=MAX_SIDE)
    height: int = Field(512, ge=8, le=MAX_SIDE)
    restore_faces: bool | None = Field(None, description="must be off")
    tiling: bool | None = Field(None, description="seamless tiling (the job's tiling)")
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

    enable_hr: bool = Field(False, description="hires fix: txt2img, upscale, img2img")
    denoising_strength: float | None = Field(None, ge=0.0, le=1.0, description="hires fix's "
                                             "strength (0.7; 0 = upscale only); else ignored")
    hr_scale: float = Field(2.0, description="hires fix: upscale factor")
    hr_upscaler: str | None = Field(None, max_length=200, description="hires fix: upscaler "
                                    "(GET /sdapi/v1/upscalers; Latent* -> Lanczos, see docs)")
    hr_second_pass_steps: int = Field(0, ge=0, le=MAX_STEPS, description="0 = steps")
    hr_resize_x: int = Field(0, ge=0, le=MAX_SIDE, description="hires size instead of hr_scale")
    hr_resize_y: int = Field(0, ge=0, le=MAX_SIDE, description="hires size instead of hr_scale")
    hr_checkpoint_name: str | None = Field(None, description="must be unset (the same model)")
    hr_sampler_name: str | None = Field(None, max_length=64,
                                        description="the second pass's sampler (= sampler)")
    hr_prompt: str = Field("", max_length=MAX_PROMPT_CHARS,
                           description="the second pass's prompt (empty = prompt)")
    hr_negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS,
                                    description="its negative prompt (empty = negative_prompt)")
    firstphase_width: int = Field(0, description="deprecated: must be 0")
    firstphase_height: int = Field(0, description="deprecated: must be 0")


# A1111's latent upscalers resize the latents; toile's hires fix upscales pixels, so they run as
# Lanczos, and the job's record names the upscaler that ran (never silently: see docs).
LATENT_UPSCALERS = ("Latent", "Latent (antialiased)", "Latent (bicubic)",
                    "Latent (bicubic antialiased)", "Latent (nearest)", "Latent (nearest-exact)")


def hires_fields(service: JobService, body: Txt2ImgBody) -> dict[str, Any]:
    """A1111's hires fix (``enable_hr`` and its ``hr_*`` fields) as the job's hires fields."""
    if not body.enable_hr:
        return {}
    checkpoint = body.hr_checkpoint_name
    if checkpoint and checkpoint != "Use same checkpoint":
        raise RequestError("hr_checkpoint_name", "toile's hires pass uses the first pass's "
                           "model; leave it unset")
    sampler = body.hr_sampler_name
    same_sampler = not sampler or sampler == "Use same sampler"
    if body.firstphase_width or body.firstphase_height:
        raise RequestError("firstphase_width", "deprecated; use width/height and hr_scale")
    scale = body.hr_scale
    if body.hr_resize_x or body.hr_resize_y:
        ratios = {round(size / side, 4) for size, side in
                  ((body.hr_resize_x, body.width), (body.hr_resize_y, body.height)) if size}
        if len(ratios) != 1:
            raise RequestError("hr_resize_x", "toile's hires fix scales both sides alike; give "
                               "hr_resize_x/y in the first pass's aspect ratio, or hr_scale")
        scale = ratios.pop()
    name = body.hr_upscaler or "Latent"
    upscaler = None if name in LATENT_UPSCALERS else hires_upscaler(service, name)
    return {"hires_scale": scale, "hires_upscaler": upscaler,
            "hires_steps": body.hr_second_pass_steps or None,
            "hires_strength": body.denoising_strength,
            "hires_sampler": None if same_sampler else sampler,
            # A1111: an empty hires prompt means the first pass's
            "hires_prompt": body.hr_prompt or None,
            "hires_negative_prompt": body.hr_negative_prompt or None}


def hires_upscaler(service: JobService, name: str) -> str:
    try:
        model = upscaler_model(service, name)
    except RequestError as exc:
        raise RequestError("hr_upscaler", exc.message) from None
    if model is None:
        raise RequestError("hr_upscaler", "hires fix needs an upscaler; None is not one")
    return model


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


# --------------------------------------------------------------------------- models
def _model_id(title: str) -> str:
    """An A1111 checkpoint title (``"name [hash]"``) or a toile id -> the id."""
    return TITLE_HASH.sub("", title.strip())


def resolve_model(service: JobService, title: str, field: str) -> Any:
    """The registry entry for an A1111 title or toile id; an unknown one is a RequestError
    naming ``field``."""
    try:
        return service.registry.resolve(_model_id(title), allow_paths=False)
    except ModelNotFoundError as exc:
        raise RequestError(field, str(exc)) from None


def _sampler_fields(body: Processing) -> dict[str, str | None]:
    """A1111's ``sampler_name`` (or its deprecated ``sampler_index``) and ``scheduler`` as the
    job's ``sampler`` and ``schedule``; ``Default`` / ``automatic`` / empty mean the model's
    own. Whether the model can use them is checked with the model (422 listing what it can)."""
    name = (body.sampler_name or body.sampler_index or "").strip()
    schedule = (body.scheduler or "").strip()
    check_sampler_name(name or None, "sampler_name")
    parse_schedule(schedule or None, "scheduler")
    return {
        "sampler": None if name.lower() in ("", DEFAULT_SAMPLER.lower()) else name,
        "schedule": None if schedule.lower() in ("", "automatic") else schedule,
    }


def _check_off(body: Processing) -> None:
    """Features toile does not have must be off: asking for them is an error, not a silent
    no-op that would return a different picture than the client expects."""
    flags = {
        "restore_faces": body.restore_faces,
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


def request_fields(service: JobService, checkpoint: str | None, body: Processing) -> dict[str, Any]:
    """The native job fields for an A1111 request (after every check that can be done here).
    ``checkpoint`` is the model chosen with ``POST /sdapi/v1/options`` (None: the default)."""
    _check_off(body)
    override = body.override_settings.get("sd_model_checkpoint")
    if override is not None:
        entry = resolve_model(service, str(override), "override_settings.sd_model_checkpoint")
    else:
        default = checkpoint or service.registry.default_id
        entry = resolve_model(service, default, "sd_model_checkpoint")
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
        refiner = resolve_model(service, body.refiner_checkpoint, "refiner_checkpoint").id
    hires = hires_fields(service, body) if isinstance(body, Txt2ImgBody) else {}
    return {
        **hires,
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
        "tiling": bool(body.tiling),
        **_sampler_fields(body),
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


def img2img_inputs(
    service: JobService, body: Img2ImgBody, model: str
) -> dict[str, Upload]:
    """init image and mask as toile wants them: at the requested size (toile's img2img keeps
    its input's size), mask inverted/blurred as asked. Decoded once, with the server's upload
    checks (format sniffing, pixel cap before decoding); the job takes them as they are."""
    from PIL import ImageFilter, ImageOps

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
    service.check_output_size(model, size, "width")  # before any decoding or resizing work
    limits = {"max_bytes": config.max_image_bytes, "max_pixels": config.max_image_pixels}
    init = read_upload(body.init_images[0], field="init_images[0]", **limits)
    uploads = {"image": init}
    if init.image.size != size:
        uploads["image"] = upload_of(_resized(init.image, size, body.resize_mode, smooth=True))
    if body.mask is None:
        return uploads
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
    uploads["mask"] = upload_of(mask)
    return uploads


# --------------------------------------------------------------------------- extras
class ExtrasBody(BaseModel):
    """Fields common to ``extra-single-image`` and ``extra-batch-images`` (A1111's
    ``ExtrasBaseRequest``). Lax types and unknown fields ignored, as A1111's API does."""

    model_config = ConfigDict(extra="allow")
    resize_mode: int = Field(0, ge=0, le=1, description="0: scale by upscaling_resize; 1: to "
                             "upscaling_resize_w x upscaling_resize_h")
    show_extras_results: bool = Field(True, description="ignored")
    gfpgan_visibility: float = Field(0.0, ge=0.0, le=1.0, description="must be 0")
    codeformer_visibility: float = Field(0.0, ge=0.0, le=1.0, description="must be 0")
    codeformer_weight: float = Field(0.0, ge=0.0, le=1.0, description="ignored")
    upscaling_resize: float = Field(2.0, ge=1.0, le=MAX_SCALE, description="the scale")
    upscaling_resize_w: int = Field(512, ge=1, le=MAX_SIDE)
    upscaling_resize_h: int = Field(512, ge=1, le=MAX_SIDE)
    upscaling_crop: bool = Field(True, description="resize_mode 1: crop to exactly w x h")
    upscaler_1: str = Field(NO_UPSCALER, max_length=200, description="GET /sdapi/v1/upscalers")
    upscaler_2: str = Field(NO_UPSCALER, max_length=200, description="must be None (or have "
                            "visibility 0)")
    extras_upscaler_2_visibility: float = Field(0.0, ge=0.0, le=1.0)
    upscale_first: bool = Field(False, description="ignored: there is no face restoration")


class ExtrasSingleBody(ExtrasBody):
    """``POST /sdapi/v1/extra-single-image``."""

    image: str = Field(description="base64 PNG, JPEG or WebP (or a data URL)")


class ImageData(BaseModel):
    """One entry of ``imageList`` (A1111's ``FileData``)."""

    model_config = ConfigDict(extra="allow")
    data: str = Field(description="base64 PNG, JPEG or WebP (or a data URL)")
    name: str = Field("", max_length=1000)


class ExtrasBatchBody(ExtrasBody):
    """``POST /sdapi/v1/extra-batch-images``."""

    imageList: list[ImageData] = Field(min_length=1, max_length=MAX_IMAGES)


def check_extras(body: ExtrasBody) -> None:
    """Refuse what toile does not do, rather than return a picture the client did not ask
    for: face restoration, and a second upscaler blended into the first."""
    for name in ("gfpgan_visibility", "codeformer_visibility"):
        if getattr(body, name):
            raise RequestError(name, "face restoration is not supported by toile; leave it 0")
    if body.upscaler_2 != NO_UPSCALER and body.extras_upscaler_2_visibility:
        raise RequestError("upscaler_2", "blending a second upscaler is not supported; leave it "
                           "None or set extras_upscaler_2_visibility to 0")


def upscalers(service: JobService) -> dict[str, str | None]:
    """The upscalers as A1111 lists them, name -> toile model id (None for ``None``): A1111's
    names for the built-in filters, every other model that serves upscale by its id."""
    serving = service.models_for(Task.UPSCALE)
    named = {name: model for name, model in A1111_UPSCALERS.items() if model in serving}
    others = {model: model for model in serving if model not in named.values()}
    return {NO_UPSCALER: None, **named, **others}


def upscaler_model(service: JobService, name: str) -> str | None:
    """The model id ``upscaler_1`` names (None: ``None``, no upscaling); a built-in filter may
    be named by its id too. An unknown name is a RequestError listing the known ones."""
    listed = upscalers(service)
    if name in listed:
        return listed[name]
    if name in A1111_UPSCALERS.values() and name in service.models_for(Task.UPSCALE):
        return name
    raise RequestError("upscaler_1", f"unknown upscaler {name!r}; this server has: "
                       f"{', '.join(listed)}")


def extras_scale(body: ExtrasBody, size: tuple[int, int]) -> float:
    """The upscale factor: ``upscaling_resize``, or with ``resize_mode`` 1 the factor that
    covers ``upscaling_resize_w`` x ``upscaling_resize_h`` (as A1111: the larger ratio)."""
    if body.resize_mode == 0:
        return float(body.upscaling_resize)
    width, height = size
    scale = max(body.upscaling_resize_w / width, body.upscaling_resize_h / height)
    if not 1.0 <= scale <= MAX_SCALE:
        raise RequestError(
            "upscaling_resize_w", f"{body.upscaling_resize_w}x{body.upscaling_resize_h} is "
            f"{scale:.3g} times the {width}x{height} image; toile upscales 1 to {MAX_SCALE:g} "
            "times")
    return scale


def crop_to(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """The centre ``size`` of ``image``, black where it is smaller (A1111's upscaling_crop)."""
    width, height = size
    left, top = image.width // 2 - width // 2, image.height // 2 - height // 2
    return image.crop((left, top, left + width, top + height))


# --------------------------------------------------------------------------- interrogate
class InterrogateBody(BaseModel):
    """``POST /sdapi/v1/interrogate``."""

    model_config = ConfigDict(extra="allow")
    image: str = Field(description="base64 PNG, JPEG or WebP (or a data URL)")
    model: str = Field("clip", max_length=64, description="clip, deepdanbooru or a model id")


def caption_model(service: JobService, name: str) -> str | None:
    """The model an ``interrogate`` call captions with. A registered model id is itself;
    A1111's interrogator names, ``clip`` (BLIP caption + CLIP) and ``deepdanbooru`` (tags),
    both mean the server's caption model (None: the job picks the task's default, ``toile
    models default ID --task caption``), whose caption then comes back as A1111's
    ``caption``. Anything else is a RequestError naming ``model``."""
    if any(entry.id == name for entry in service.registry.entries()):
        return name
    if name.lower() in A1111_INTERROGATORS:
        return None
    raise RequestError("model", f"unknown interrogator {name!r}; use clip, deepdanbooru or a "
                       "model id from GET /sdapi/v1/sd-models")
