"""Resolution: a request checked against what a loaded model declares, with every default
filled in.

``FamilyDefaults`` is what a loaded model declares (its modes and the values a request's
``None`` becomes); ``resolve`` combines a :class:`~toile.request.GenerationRequest` with it into
a ``ResolvedRequest`` where every value is concrete, so records and parity checks see exactly
what ran.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from toile.errors import RequestError, UnsupportedModeError
from toile.request import (
    DEFAULT_SCALE,
    MAX_SEED,
    GenerationRequest,
    Mode,
    Task,
)
from toile.samplers import Choice, SamplerMenu


@dataclass(frozen=True)
class Cascade:
    """A base model that reaches larger sizes through super-resolution stages, the way
    DeepFloyd IF does: the base draws with ``native`` px on its longer side, then ``upscaler``
    (a model id, ``factor``× a pass) takes the image up; the last pass is resized to the size
    asked for. Applies to txt2img without hires fix or tiling."""

    upscaler: str
    factor: int
    native: int
    default_side: int
    max_pixels: int

    def base_size(self, width: int, height: int, multiple: int) -> tuple[int, int]:
        """The base's size for a ``width`` x ``height`` output: the same aspect, the longer side
        ``native`` (each side rounded to ``multiple``)."""
        longer = max(width, height)
        return tuple(max(multiple, round(side * self.native / longer / multiple) * multiple)
                     for side in (width, height))  # type: ignore[return-value]

    def passes(self, width: int, height: int) -> int:
        """SR passes from the base to at least ``width`` x ``height`` (0: the base alone)."""
        longer, reach, count = max(width, height), self.native, 0
        while reach < longer:
            reach *= self.factor
            count += 1
        return count


@dataclass(frozen=True)
class FamilyDefaults:
    """What a loaded model declares: its modes and the values a request's ``None`` becomes."""

    modes: frozenset[Mode]
    width: int
    height: int
    steps: int
    guidance: float
    strength: float = 0.8
    inpaint_strength: float = 1.0
    size_multiple: int = 8
    max_pixels: int = 2048 * 2048
    min_side: int = 8
    refiner_switch: float = 0.8  # diffusers' ensemble-of-experts example, A1111's default
    hires_strength: float = 0.7  # A1111's hires-fix denoising strength
    # img2img/inpaint run int(steps x strength) of the steps (diffusers' convention); False
    # for a model that runs all its steps from t = strength (toile's own)
    partial_steps: bool = True
    # edit: InstructPix2Pix's default image guidance; None: the model takes none (Kontext)
    image_guidance: float | None = 1.5
    # upscale: how much larger one pass of the model makes an image (1: any size in one pass)
    upscale_factor: int = 4
    noise_level: int | None = None  # upscale: the pipeline's default noise on the low-res input
    cascade: Cascade | None = None  # txt2img above the base's size: SR stages (toile-mini)


@dataclass(frozen=True)
class Hires:
    """A resolved hires fix: the upscaler (a model id), the second pass's size (the first
    pass's times ``scale``, rounded to the model's multiple), steps and strength."""

    scale: float
    upscaler: str
    width: int
    height: int
    steps: int
    strength: float
    sampler: str | None = None  # None: the first pass's
    prompt: str | None = None
    negative_prompt: str | None = None


DEFAULT_HIRES_UPSCALER = "lanczos"  # a built-in filter (A1111 defaults to its latent resize)


@dataclass(frozen=True)
class ResolvedRequest:
    """A request with every default filled in: exactly what runs and what the record says."""

    request: GenerationRequest
    mode: Mode
    width: int
    height: int
    steps: int
    guidance: float
    strength: float | None
    seeds: tuple[int, ...] = field(default_factory=tuple)
    refiner_switch: float | None = None  # set exactly when request.refiner is
    sampler: Choice | None = None  # what samples (None: a model with one fixed sampler)
    image_guidance: float | None = None  # set for edits by a model that takes it
    scale: float | None = None  # upscale: output side / input side
    noise_level: int | None = None  # upscale: set when the model takes it
    hires: Hires | None = None  # set exactly when request.hires_scale is

    @property
    def task(self) -> Task:
        return self.request.task

    @property
    def prompt(self) -> str:
        return self.request.prompt

    @property
    def negative_prompt(self) -> str:
        return self.request.negative_prompt


def resolve_budget(width: int, height: int, budget: int, field: str, where: str = "") -> None:
    """Refuse ``width x height`` over ``budget`` pixels (``where`` says whose budget)."""
    if width * height > budget:
        raise RequestError(
            field,
            f"{width}x{height} = {width * height} pixels exceeds the budget of {budget} "
            f"pixels{where}",
        )


def resolve(
    request: GenerationRequest,
    defaults: FamilyDefaults,
    family: str,
    samplers: SamplerMenu | None = None,
) -> ResolvedRequest:
    """Check ``request`` against what the family can do and fill in its defaults
    (``samplers``: what the loaded checkpoint can sample with)."""
    mode = request.mode
    if samplers is not None:
        choice: Choice | None = samplers.choose(request.sampler, request.schedule)
    elif request.sampler is not None or request.schedule is not None:
        raise RequestError(
            "sampler" if request.sampler is not None else "schedule",
            f"the {family} family runs one fixed sampler; leave sampler and schedule unset",
        )
    else:
        choice = None
    if mode not in defaults.modes:
        allowed = ", ".join(m.value for m in Mode if m in defaults.modes)
        what = f"the {mode.value} task" if mode.task is not Task.GENERATE else mode.value
        raise UnsupportedModeError(
            "task" if mode.task is not Task.GENERATE else "mode",
            f"{what} is not supported by the {family} family (it supports: {allowed})",
        )
    if request.task is not Task.GENERATE:
        return _resolve_task(request, defaults, family, mode, choice)
    if request.image is not None and (request.width is not None or request.height is not None):
        # The output size follows the input image (plus outpaint margins); a different size
        # would silently resample the user's picture.
        raise RequestError("width", "width/height cannot be set with an input image")
    if request.image is not None:
        width, height = request.image.size
        if request.outpaint is not None:
            width += request.outpaint.left + request.outpaint.right
            height += request.outpaint.top + request.outpaint.bottom
    else:
        width = request.width if request.width is not None else defaults.width
        height = request.height if request.height is not None else defaults.height
    for name, value in (("width", width), ("height", height)):
        if value % defaults.size_multiple or value < defaults.min_side:
            source = " (the input image's size plus margins)" if request.image is not None else ""
            raise RequestError(
                name,
                f"{value}{source} must be a multiple of {defaults.size_multiple} and at least "
                f"{defaults.min_side} for the {family} family",
            )
    budget = defaults.max_pixels
    if cascades(request, mode, defaults):
        assert defaults.cascade is not None
        budget = defaults.cascade.max_pixels
    resolve_budget(width, height, budget, "width", f" for the {family} family")
    strength: float | None = None
    if mode is Mode.IMG2IMG:
        strength = request.strength if request.strength is not None else defaults.strength
    elif mode in (Mode.INPAINT, Mode.OUTPAINT):
        strength = request.strength if request.strength is not None else defaults.inpaint_strength
    steps = request.steps if request.steps is not None else defaults.steps
    switch = None if request.refiner is None else (
        request.refiner_switch or defaults.refiner_switch)
    if switch is not None and strength is not None and strength <= 1 - switch:
        # The base denoises from `strength` of the schedule down to the switch; at or below it
        # the base would hand over before its first step.
        raise RequestError(
            "refiner_switch",
            f"with strength {strength:g} the base starts at {1 - strength:g} of the schedule, "
            f"at or after the switch to the refiner ({switch:g}); use a strength above "
            f"{1 - switch:g} or a refiner_switch above {1 - strength:g}",
        )
    check_steps_left(steps, strength, defaults, "strength")
    base_seed = request.seed if request.seed is not None else secrets.randbelow(2**32)
    seeds = tuple((base_seed + i) % (MAX_SEED + 1) for i in range(request.num_images))
    return ResolvedRequest(
        request=request,
        mode=mode,
        width=width,
        height=height,
        hires=_resolve_hires(request, defaults, family, (width, height), steps, samplers),
        steps=steps,
        guidance=request.guidance if request.guidance is not None else defaults.guidance,
        strength=strength,
        seeds=seeds,
        refiner_switch=switch,
        sampler=choice,
    )


def cascades(request: GenerationRequest, mode: Mode, defaults: FamilyDefaults) -> bool:
    """Whether the model's cascade serves this request (txt2img, no hires fix, no tiling)."""
    return (defaults.cascade is not None and mode is Mode.TXT2IMG
            and request.hires_scale is None and not request.tiling)


def _resolve_task(
    request: GenerationRequest,
    defaults: FamilyDefaults,
    family: str,
    mode: Mode,
    choice: Choice | None,
) -> ResolvedRequest:
    """Sizes and defaults of the edit, upscale, caption and answer tasks."""
    assert request.image is not None  # GenerationRequest checked it
    in_w, in_h = request.image.size
    multiple = defaults.size_multiple
    scale = None
    if mode is Mode.EDIT:
        # The edit keeps the input's size, rounded down to the model's multiple, unless asked.
        width = request.width if request.width is not None else in_w // multiple * multiple
        height = request.height if request.height is not None else in_h // multiple * multiple
        for name, value in (("width", width), ("height", height)):
            if value % multiple or value < defaults.min_side:
                source = "" if getattr(request, name) is not None else " (from the input image)"
                raise RequestError(
                    name, f"{value}{source} must be a multiple of {multiple} and at least "
                    f"{defaults.min_side} for the {family} family")
        resolve_budget(width, height, defaults.max_pixels, "width", f" for the {family} family")
    elif mode is Mode.UPSCALE:
        # Default: the model's own factor (one pass); a filter (factor 1) enlarges 4 times.
        native = defaults.upscale_factor if defaults.upscale_factor > 1 else DEFAULT_SCALE
        if request.width is not None and request.height is not None:  # "scale to" a size
            width, height = request.width, request.height
            scale = max(width / in_w, height / in_h)
        else:
            scale = request.scale if request.scale is not None else float(native)
            width, height = max(1, round(in_w * scale)), max(1, round(in_h * scale))
        resolve_budget(width, height, defaults.max_pixels, "scale",
                       f" for the {family} family (input {in_w}x{in_h} times {scale:g})")
    else:
        width, height = in_w, in_h
    base_seed = request.seed if request.seed is not None else secrets.randbelow(2**32)
    seeds = tuple((base_seed + i) % (MAX_SEED + 1) for i in range(request.num_images))
    makes_text = mode.task.makes_text
    return ResolvedRequest(
        request=request,
        mode=mode,
        width=width,
        height=height,
        steps=0 if makes_text else (
            request.steps if request.steps is not None else defaults.steps),
        guidance=0.0 if makes_text else (
            request.guidance if request.guidance is not None else defaults.guidance),
        strength=None,
        seeds=seeds,
        sampler=None if makes_text else choice,
        image_guidance=_image_guidance(request, defaults, family) if mode is Mode.EDIT else None,
        scale=scale,
        noise_level=(request.noise_level if request.noise_level is not None
                     else defaults.noise_level) if mode is Mode.UPSCALE else None,
    )


def _image_guidance(request: GenerationRequest, defaults: FamilyDefaults,
                    family: str) -> float | None:
    if defaults.image_guidance is None:
        if request.image_guidance is not None:
            raise RequestError("image_guidance", f"the {family} family's edit model takes no "
                               "image guidance; leave it unset")
        return None
    return request.image_guidance if request.image_guidance is not None else (
        defaults.image_guidance)


def _resolve_hires(request: GenerationRequest, defaults: FamilyDefaults, family: str,
                   size: tuple[int, int], steps: int,
                   samplers: SamplerMenu | None) -> Hires | None:
    if request.hires_scale is None:
        return None
    width, height = size
    if request.hires_sampler is not None:  # checked now, not after the first pass ran
        if samplers is None:
            raise RequestError("hires_sampler", f"the {family} family runs one fixed sampler")
        try:
            samplers.choose(request.hires_sampler, request.schedule)
        except RequestError as exc:
            raise RequestError("hires_sampler", exc.message) from None
    if Mode.IMG2IMG not in defaults.modes:
        raise RequestError("hires_scale", f"hires fix needs img2img, which this {family} "
                           "model does not run")
    multiple = defaults.size_multiple
    # A1111 rounds the second pass's size to the model's multiple the same way.
    size = [max(multiple, round(side * request.hires_scale / multiple) * multiple)
            for side in (width, height)]
    resolve_budget(size[0], size[1], defaults.max_pixels, "hires_scale",
                   f" for the {family} family ({width}x{height} times {request.hires_scale:g})")
    hires_steps = request.hires_steps if request.hires_steps is not None else steps
    strength = request.hires_strength if request.hires_strength is not None else (
        defaults.hires_strength)
    if strength > 0:  # 0: no second pass at all
        check_steps_left(hires_steps, strength, defaults, "hires_strength")
    return Hires(
        scale=request.hires_scale,
        upscaler=request.hires_upscaler or DEFAULT_HIRES_UPSCALER,
        width=size[0],
        height=size[1],
        steps=hires_steps,
        strength=strength,
        sampler=request.hires_sampler,
        prompt=request.hires_prompt,
        negative_prompt=request.hires_negative_prompt,
    )


def check_steps_left(steps: int, strength: float | None, defaults: FamilyDefaults,
                     field_name: str) -> None:
    """diffusers' img2img and inpaint denoise int(steps x strength) steps: refuse a request
    that would run none (the pipeline would fail deep inside on an empty batch)."""
    if strength is not None and defaults.partial_steps and int(steps * strength) < 1:
        raise RequestError(field_name, f"with {steps} steps, strength {strength:g} leaves no "
                           f"step to run; use more steps or a strength of at least "
                           f"{1 / steps:g}")
