"""One request type for every family and every mode.

``GenerationRequest`` is what a user asks for (fields left ``None`` take the model's defaults);
``resolve`` combines it with a family's declared capabilities into a ``ResolvedRequest`` where
every value is concrete, so records and parity checks see exactly what ran.
"""

from __future__ import annotations

import enum
import secrets
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

from toile.errors import ImageInputError, RequestError, UnsupportedModeError
from toile.prompt_syntax import check_supported
from toile.samplers import Choice, SamplerMenu, check_sampler_name, parse_schedule

if TYPE_CHECKING:
    from PIL import Image

MAX_SEED = 2**63 - 1
MAX_IMAGES = 16
MAX_STEPS = 1000
MAX_GUIDANCE = 100.0
MAX_SIDE = 8192
MAX_PROMPT_CHARS = 10_000
MAX_LORA_SCALE = 10.0
MAX_QUESTION_CHARS = 1000
MAX_SCALE = 8.0
DEFAULT_SCALE = 4  # upscale with a filter and no scale given (AUTOMATIC1111's extras default)


class Task(enum.StrEnum):
    """What a request is for. ``generate`` makes images from a prompt (with an optional image,
    mask or margins); ``edit`` changes an image by an instruction (the prompt); ``caption``
    and ``answer`` describe an image in words; ``upscale`` makes an image ``scale`` times
    larger."""

    GENERATE = "generate"
    EDIT = "edit"
    CAPTION = "caption"
    ANSWER = "answer"
    UPSCALE = "upscale"

    @property
    def makes_text(self) -> bool:
        return self in (Task.CAPTION, Task.ANSWER)


class Mode(enum.StrEnum):
    """What one model run does; the four generate modes follow from the inputs present, the
    other tasks are one mode each. A family's capability table lists these."""

    TXT2IMG = "txt2img"
    IMG2IMG = "img2img"
    INPAINT = "inpaint"
    OUTPAINT = "outpaint"
    EDIT = "edit"
    UPSCALE = "upscale"
    CAPTION = "caption"
    ANSWER = "answer"

    @property
    def task(self) -> Task:
        return _MODE_TASK.get(self, Task.GENERATE)


_MODE_TASK = {Mode.EDIT: Task.EDIT, Mode.UPSCALE: Task.UPSCALE, Mode.CAPTION: Task.CAPTION,
              Mode.ANSWER: Task.ANSWER}
GENERATE_MODES = frozenset({Mode.TXT2IMG, Mode.IMG2IMG, Mode.INPAINT, Mode.OUTPAINT})


class Detail(enum.StrEnum):
    """How much a caption says: one sentence, or a longer description."""

    SHORT = "short"
    LONG = "long"


def parse_enum(kind: type[enum.StrEnum], value: Any, field_name: str) -> Any:
    """``value`` as a member of ``kind`` (its own members pass), or an error listing them."""
    try:
        return kind(value)
    except ValueError:
        allowed = ", ".join(member.value for member in kind)
        raise RequestError(field_name, f"must be one of {allowed}, got {value!r}") from None


@dataclass(frozen=True)
class Outpaint:
    """Pixels to add on each side of the input image before filling them in."""

    left: int = 0
    top: int = 0
    right: int = 0
    bottom: int = 0

    def __post_init__(self) -> None:
        for name in ("left", "top", "right", "bottom"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_SIDE:
                raise RequestError(
                    f"outpaint.{name}", f"must be an integer in [0, {MAX_SIDE}], got {value!r}"
                )
        if self.left + self.top + self.right + self.bottom == 0:
            raise RequestError("outpaint", "at least one margin must be greater than 0")

    @classmethod
    def parse(cls, text: str) -> Outpaint:
        """Parse ``LEFT,TOP,RIGHT,BOTTOM`` (the CLI's ``--outpaint`` form)."""
        parts = text.split(",")
        if len(parts) != 4:
            raise RequestError("outpaint", f"expected LEFT,TOP,RIGHT,BOTTOM, got {text!r}")
        try:
            left, top, right, bottom = (int(p.strip()) for p in parts)
        except ValueError:
            raise RequestError(
                "outpaint", f"margins must be integers (LEFT,TOP,RIGHT,BOTTOM), got {text!r}"
            ) from None
        return cls(left, top, right, bottom)


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA file (safetensors) applied at generation time with a scale."""

    path: str
    scale: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path:
            raise RequestError("loras.path", "must be a non-empty path to a .safetensors file")
        if not -MAX_LORA_SCALE <= float(self.scale) <= MAX_LORA_SCALE:
            raise RequestError(
                "loras.scale", f"must be in [-{MAX_LORA_SCALE}, {MAX_LORA_SCALE}], got {self.scale}"
            )

    @classmethod
    def parse(cls, text: str) -> LoraSpec:
        """Parse ``PATH[:SCALE]`` (the CLI's ``--lora`` form)."""
        path, sep, scale = text.rpartition(":")
        if sep and path:
            try:
                return cls(path, float(scale))
            except ValueError:
                pass  # a colon that is part of the path, not a scale
        return cls(text, 1.0)


def _check_int(name: str, value: Any, low: int, high: int) -> None:
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise RequestError(name, f"must be an integer in [{low}, {high}], got {value!r}")


def _check_float(name: str, value: Any, low: float, high: float, *, open_low: bool = False) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RequestError(name, f"must be a number, got {value!r}")
    ok = (low < value if open_low else low <= value) and value <= high
    if not ok or value != value:  # value != value catches NaN
        bracket = "(" if open_low else "["
        raise RequestError(name, f"must be in {bracket}{low}, {high}], got {value!r}")


@dataclass(frozen=True)
class GenerationRequest:
    """Everything one request needs, for every family, task and mode.

    ``None`` means "the model's default". For ``task=generate`` the mode follows from the
    inputs: ``image`` alone is img2img, ``image`` + ``mask`` is inpaint (white = repaint),
    ``image`` + ``outpaint`` extends the canvas. ``edit`` takes ``image`` and the instruction
    as ``prompt``; ``caption`` takes ``image`` (and ``detail``); ``answer`` takes ``image`` and
    ``question``; ``upscale`` takes ``image``, ``scale`` and an optional ``prompt``. Invalid
    values raise :class:`RequestError` naming the field.
    """

    prompt: str
    negative_prompt: str = ""
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance: float | None = None
    seed: int | None = None
    num_images: int = 1
    image: Image.Image | None = None
    strength: float | None = None
    mask: Image.Image | None = None
    outpaint: Outpaint | None = None
    loras: tuple[LoraSpec, ...] = ()
    model: str | None = None
    # A second model that finishes the low-noise end of the schedule (SDXL's base -> refiner
    # hand-off; A1111's "Refiner" / "Switch at"): the fraction of the schedule the base runs.
    refiner: str | None = None
    refiner_switch: float | None = None
    # The sampler (A1111's name, or a diffusers scheduler class name) and schedule (A1111's
    # "Schedule type"); None = the checkpoint's own (toile.samplers).
    sampler: str | None = None
    schedule: str | None = None
    task: Task = Task.GENERATE
    question: str | None = None  # answer: what to ask about the image
    detail: Detail = Detail.SHORT  # caption: one sentence or a longer description
    scale: float | None = None  # upscale: output side / input side (1-8)
    image_guidance: float | None = None  # edit: InstructPix2Pix's image guidance scale
    noise_level: int | None = None  # upscale: noise added to the low-res input (SD x4, IF II)
    # Hires fix (A1111's enable_hr; txt2img only): generate at width x height, upscale the
    # result hires_scale times with hires_upscaler (a model id, default lanczos), then img2img
    # it at that size with hires_strength (A1111's denoising strength; 0 = no second pass,
    # the upscaled image as it is) for hires_steps.
    hires_scale: float | None = None
    hires_upscaler: str | None = None
    hires_steps: int | None = None
    hires_strength: float | None = None
    # The second pass's own sampler and prompts (A1111's hr_sampler_name, hr_prompt,
    # hr_negative_prompt); None = the first pass's.
    hires_sampler: str | None = None
    hires_prompt: str | None = None
    hires_negative_prompt: str | None = None
    # Seamless tiling (A1111's "Tiling"): the denoiser's and VAE's convolutions pad
    # circularly, so the image's edges continue each other (toile.families.tiling).
    tiling: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "task", parse_enum(Task, self.task, "task"))
        object.__setattr__(self, "detail", parse_enum(Detail, self.detail, "detail"))
        if not isinstance(self.prompt, str):
            raise RequestError("prompt", f"must be a string, got {type(self.prompt).__name__}")
        for name in ("prompt", "negative_prompt"):
            text = getattr(self, name)
            if not isinstance(text, str) or len(text) > MAX_PROMPT_CHARS:
                raise RequestError(name, f"must be a string of at most {MAX_PROMPT_CHARS} chars")
        _check_int("width", self.width, 8, MAX_SIDE)
        _check_int("height", self.height, 8, MAX_SIDE)
        _check_int("steps", self.steps, 1, MAX_STEPS)
        _check_float("guidance", self.guidance, 0.0, MAX_GUIDANCE)
        _check_int("seed", self.seed, 0, MAX_SEED)
        _check_int("num_images", self.num_images, 1, MAX_IMAGES)
        _check_float("strength", self.strength, 0.0, 1.0, open_low=True)
        if self.refiner is not None and (not isinstance(self.refiner, str) or not self.refiner):
            raise RequestError("refiner", "must be a model id or path (a non-empty string)")
        if self.refiner_switch is not None:
            if self.refiner is None:
                raise RequestError("refiner_switch", "only applies with a refiner: set refiner")
            _check_float("refiner_switch", self.refiner_switch, 0.0, 1.0, open_low=True)
            if self.refiner_switch == 1.0:
                raise RequestError("refiner_switch", "must be below 1 (the refiner needs steps)")
        check_supported(self.prompt, "prompt")
        check_supported(self.negative_prompt, "negative_prompt")
        for name in ("sampler", "schedule"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or len(value) > 64):
                raise RequestError(name, "must be a name (a string of at most 64 characters)")
        check_sampler_name(self.sampler)
        parse_schedule(self.schedule)
        if not isinstance(self.loras, tuple) or not all(
            isinstance(lora, LoraSpec) for lora in self.loras
        ):
            raise RequestError("loras", "must be a tuple of LoraSpec(path, scale)")
        self._check_images()
        self._check_task()
        self._check_hires()

    def _check_hires(self) -> None:
        others = ("hires_upscaler", "hires_steps", "hires_strength", "hires_sampler",
                  "hires_prompt", "hires_negative_prompt")
        if self.hires_scale is None:
            for name in others:
                if getattr(self, name) is not None:
                    raise RequestError(name, "only applies with hires fix: set hires_scale")
            return
        _check_float("hires_scale", self.hires_scale, 1.0, MAX_SCALE, open_low=True)
        if self.task is not Task.GENERATE or self.image is not None:
            raise RequestError("hires_scale", "hires fix applies to txt2img only (no input "
                               "image, task generate)")
        if self.refiner is not None:
            raise RequestError("hires_scale", "hires fix and a refiner cannot be combined yet; "
                               "use one of them")
        if self.hires_upscaler is not None and (not isinstance(self.hires_upscaler, str)
                                                or not self.hires_upscaler):
            raise RequestError("hires_upscaler", "must be a model id (a non-empty string)")
        _check_int("hires_steps", self.hires_steps, 1, MAX_STEPS)
        for name in ("hires_prompt", "hires_negative_prompt"):
            text = getattr(self, name)
            if text is not None:
                if not isinstance(text, str) or len(text) > MAX_PROMPT_CHARS:
                    raise RequestError(name, f"must be a string of at most {MAX_PROMPT_CHARS} "
                                       "chars")
                check_supported(text, name)
        if self.hires_sampler is not None:
            if not isinstance(self.hires_sampler, str) or len(self.hires_sampler) > 64:
                raise RequestError("hires_sampler", "must be a name (at most 64 characters)")
            check_sampler_name(self.hires_sampler, "hires_sampler")
        # 0: upscale only, no second pass (the upscaled image unchanged)
        _check_float("hires_strength", self.hires_strength, 0.0, 1.0)

    def _check_task(self) -> None:
        """Each task's own inputs, and no field that only another task uses."""
        task = self.task
        if not isinstance(self.tiling, bool):
            raise RequestError("tiling", f"must be true or false, got {self.tiling!r}")
        if self.tiling and task is not Task.GENERATE:
            raise RequestError("tiling", "tiling applies to the generate task")
        if task is not Task.GENERATE:
            if self.image is None:
                raise RequestError("image", f"the {task.value} task needs an input image")
            for name in ("mask", "outpaint", "strength", "refiner"):
                if getattr(self, name) is not None:
                    raise RequestError(name, f"does not apply to the {task.value} task")
        if task is Task.EDIT and not self.prompt.strip():
            raise RequestError("prompt", "an edit needs an instruction (the prompt), e.g. "
                               "'make the sky blue'")
        if task is Task.ANSWER:
            question = self.question
            if not isinstance(question, str) or not question.strip():
                raise RequestError("question", "the answer task needs a non-empty question")
            if len(question) > MAX_QUESTION_CHARS:
                raise RequestError(
                    "question", f"must be at most {MAX_QUESTION_CHARS} characters, got "
                    f"{len(question)}")
        elif self.question is not None:
            raise RequestError("question", "only applies to the answer task (task=answer)")
        if task.makes_text:
            for name in ("width", "height", "steps", "guidance", "refiner", "sampler",
                         "schedule"):
                if getattr(self, name) is not None:
                    raise RequestError(name, f"does not apply to the {task.value} task "
                                       "(it writes text)")
            if self.loras:
                raise RequestError("loras", f"do not apply to the {task.value} task")
        if task is Task.UPSCALE:
            _check_float("scale", self.scale, 1.0, MAX_SCALE)
            self._check_upscale_size()
        elif self.scale is not None:
            raise RequestError("scale", "only applies to the upscale task (task=upscale)")
        if self.image_guidance is not None:
            if task is not Task.EDIT:
                raise RequestError("image_guidance", "only applies to the edit task")
            _check_float("image_guidance", self.image_guidance, 0.0, MAX_GUIDANCE)
        if self.noise_level is not None:
            if task is not Task.UPSCALE:
                raise RequestError("noise_level", "only applies to the upscale task")
            _check_int("noise_level", self.noise_level, 0, 1000)

    def _check_upscale_size(self) -> None:
        """An upscale's size is ``scale`` times the input's, or exactly ``width`` x ``height``
        (both: AUTOMATIC1111's "scale to" size), each side 1 to 8 times the input's."""
        assert self.image is not None
        sizes = (self.width, self.height)
        if sizes == (None, None):
            return
        if None in sizes:
            raise RequestError("width" if self.width is None else "height",
                               "an upscale to a size needs both width and height")
        if self.scale is not None:
            raise RequestError("scale", "give scale or width/height, not both")
        for name, target, source in (("width", self.width, self.image.size[0]),
                                     ("height", self.height, self.image.size[1])):
            if not source <= target <= source * MAX_SCALE:
                raise RequestError(name, f"{target} must be 1 to {MAX_SCALE:g} times the "
                                   f"input's {source}")

    def _check_images(self) -> None:
        from PIL import Image

        for name in ("image", "mask"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Image.Image):
                raise ImageInputError(name, f"must be a PIL image, got {type(value).__name__}")
        if self.mask is not None and self.image is None:
            raise RequestError("mask", "inpainting needs an input image: set image as well")
        if self.outpaint is not None:
            if self.image is None:
                raise RequestError("outpaint", "outpainting needs an input image: set image")
            if self.mask is not None:
                raise RequestError("outpaint", "cannot be combined with mask; use one of them")
        if self.mask is not None and self.image is not None and self.mask.size != self.image.size:
            raise ImageInputError(
                "mask",
                f"size {self.mask.size[0]}x{self.mask.size[1]} differs from the image's "
                f"{self.image.size[0]}x{self.image.size[1]}; they must match",
            )
        if self.strength is not None and self.image is None:
            raise RequestError("strength", "only applies with an input image (img2img/inpaint)")

    @property
    def mode(self) -> Mode:
        if self.task is not Task.GENERATE:
            return Mode(self.task.value)
        if self.outpaint is not None:
            return Mode.OUTPAINT
        if self.mask is not None:
            return Mode.INPAINT
        if self.image is not None:
            return Mode.IMG2IMG
        return Mode.TXT2IMG

    def with_changes(self, **changes: Any) -> GenerationRequest:
        return replace(self, **changes)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


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
    resolve_budget(width, height, defaults.max_pixels, "width", f" for the {family} family")
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
