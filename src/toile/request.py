"""One request type for every family, task and mode.

``GenerationRequest`` is what a user asks for (fields left ``None`` take the model's defaults),
checked field by field here; :mod:`toile.resolve` combines it with what a loaded model declares.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any

from toile.errors import ImageInputError, RequestError
from toile.prompt_syntax import check_supported
from toile.samplers import check_sampler_name, parse_schedule

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
