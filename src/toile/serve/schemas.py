"""Request and response bodies of the native API (pydantic: they are also the OpenAPI schema).

``JobCreate`` carries :class:`~toile.request.GenerationRequest`'s fields by name. Types are
strict (``"5"`` is not a number of steps) and unknown fields are refused, so a typo is a 422
naming the field rather than a silently ignored option. The ranges shown here are the request
type's own; :class:`GenerationRequest` checks them again, with the server's tighter caps.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from toile.request import (
    MAX_GUIDANCE,
    MAX_IMAGES,
    MAX_LORA_SCALE,
    MAX_PROMPT_CHARS,
    MAX_QUESTION_CHARS,
    MAX_SCALE,
    MAX_SEED,
    MAX_SIDE,
    MAX_STEPS,
)
from toile.serve.spec import JobStatus

# toile.request.Task's and Detail's values: Literal rather than the enums because strict
# validation of a Python dict (the compatibility routes build one) takes only enum members.
TaskName = Literal["generate", "edit", "caption", "answer", "upscale"]
DetailName = Literal["short", "long"]
STRICT = ConfigDict(extra="forbid", strict=True)


class OutpaintIn(BaseModel):
    model_config = STRICT
    left: int = Field(0, ge=0, le=MAX_SIDE)
    top: int = Field(0, ge=0, le=MAX_SIDE)
    right: int = Field(0, ge=0, le=MAX_SIDE)
    bottom: int = Field(0, ge=0, le=MAX_SIDE)


class LoraIn(BaseModel):
    """A LoRA registered in the server's config (``[loras]``), by id: never a file path."""

    model_config = STRICT
    id: str = Field(min_length=1, max_length=64)
    scale: float = Field(1.0, ge=-MAX_LORA_SCALE, le=MAX_LORA_SCALE)


class JobCreate(BaseModel):
    """A job. Images are base64 (or ``data:image/...;base64,`` URLs): PNG, JPEG or WebP.
    ``null`` fields take the model's defaults.

    ``task`` says what it is for: ``generate`` (from the prompt; ``image``/``mask``/``outpaint``
    make it img2img, inpaint, outpaint), ``edit`` (``image`` changed by the instruction in
    ``prompt``), ``caption`` (``image`` described in words, ``detail`` short or long),
    ``answer`` (``question`` about ``image``) or ``upscale`` (``image`` made ``scale`` times
    larger). Caption and answer jobs return ``texts`` instead of ``images``. With no ``model``
    a task other than generate runs on the server's model for that task."""

    model_config = STRICT
    task: TaskName = Field("generate", description="generate, edit, caption, answer, upscale")
    prompt: str = Field("", max_length=MAX_PROMPT_CHARS,
                        description="what to make; an edit's instruction; optional otherwise")
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    model: str | None = Field(None, max_length=64, description="a model id from GET /v1/models")
    width: int | None = Field(None, ge=8, le=MAX_SIDE)
    height: int | None = Field(None, ge=8, le=MAX_SIDE)
    steps: int | None = Field(None, ge=1, le=MAX_STEPS)
    guidance: float | None = Field(None, ge=0.0, le=MAX_GUIDANCE)
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="chosen by the server if null")
    num_images: int = Field(1, ge=1, le=MAX_IMAGES)
    image: str | None = Field(
        None, description="input image: img2img, inpaint, outpaint; required by edit, caption, "
        "answer and upscale")
    strength: float | None = Field(None, gt=0.0, le=1.0)
    mask: str | None = Field(None, description="inpainting mask; white = repaint")
    outpaint: OutpaintIn | None = None
    loras: list[LoraIn] = Field(default_factory=list, max_length=8)
    refiner: str | None = Field(
        None, max_length=64, description="model id of an SDXL refiner that finishes txt2img"
    )
    refiner_switch: float | None = Field(
        None, gt=0.0, lt=1.0, description="fraction of the schedule the base runs (0.8)"
    )
    sampler: str | None = Field(
        None, max_length=64, description="A1111's sampler name (Euler, DPM++ 2M, ...); null = "
        "the model's own; GET /sdapi/v1/samplers lists them"
    )
    schedule: str | None = Field(
        None, max_length=64, description="automatic (null), karras, exponential, beta, sgm_uniform"
    )
    question: str | None = Field(
        None, max_length=MAX_QUESTION_CHARS, description="answer: what to ask about the image"
    )
    detail: DetailName = Field("short", description="caption: one sentence or a longer one")
    scale: float | None = Field(
        None, ge=1.0, le=MAX_SCALE, description="upscale: output side / input side (1-8); "
        "null = the model's own factor"
    )
    image_guidance: float | None = Field(
        None, ge=0.0, le=MAX_GUIDANCE, description="edit: how closely to keep the input image"
    )
    noise_level: int | None = Field(
        None, ge=0, le=1000, description="upscale: noise added to the input (diffusion upscalers)"
    )
    hires_scale: float | None = Field(
        None, gt=1.0, le=MAX_SCALE, description="hires fix (txt2img): upscale the image this "
        "many times, then img2img it at that size; null = off"
    )
    hires_upscaler: str | None = Field(
        None, max_length=64, description="hires fix: upscale model id (default lanczos)"
    )
    hires_steps: int | None = Field(
        None, ge=1, le=MAX_STEPS, description="hires fix: steps of the second pass (= steps)"
    )
    hires_strength: float | None = Field(
        None, ge=0.0, le=1.0, description="hires fix: denoising strength (0.7; 0 = upscale only)"
    )
    hires_sampler: str | None = Field(
        None, max_length=64, description="hires fix: the second pass's sampler (= sampler)"
    )
    hires_prompt: str | None = Field(
        None, max_length=MAX_PROMPT_CHARS, description="hires fix: the second pass's prompt"
    )
    hires_negative_prompt: str | None = Field(
        None, max_length=MAX_PROMPT_CHARS, description="hires fix: its negative prompt"
    )
    tiling: bool = Field(False, description="seamless tiling (A1111's Tiling): edges wrap around")
    webhook: str | None = Field(
        None, max_length=2048, description="http(s) URL called with the job as JSON when it ends"
    )


class JobAccepted(BaseModel):
    id: str
    status: JobStatus
    url: str


class Progress(BaseModel):
    step: int
    total: int
    stage: str = "denoise"


class ImageOut(BaseModel):
    id: str
    url: str
    record: dict[str, Any]


class TextOut(BaseModel):
    """A caption or answer, with the record that reproduces it (its ``text`` included)."""

    index: int
    text: str
    record: dict[str, Any]


class ErrorInfo(BaseModel):
    message: str
    field: str | None = None


class Job(BaseModel):
    id: str
    status: JobStatus
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    queue_position: int | None = Field(None, description="1 = next to run; only while queued")
    progress: Progress | None = None
    attempts: int = 0
    images: list[ImageOut] = Field(default_factory=list, description="in batch order")
    texts: list[TextOut] = Field(
        default_factory=list, description="caption and answer jobs: the texts, in batch order"
    )
    error: ErrorInfo | None = None
    request: dict[str, Any] = Field(
        default_factory=dict, description="the stored request (image inputs shown as true)"
    )
    webhook_status: str | None = None


class JobList(BaseModel):
    jobs: list[Job]
    queue_length: int


class SamplerOption(BaseModel):
    """A sampler a model can use (A1111's name, as a job's ``sampler``) and the schedules it
    supports on that model (``automatic`` first: the checkpoint's own spacing)."""

    name: str
    schedules: list[str] = Field(default_factory=lambda: ["automatic"])
    default: bool = Field(False, description="the model's own: what a null `sampler` runs")


class ModelCard(BaseModel):
    """One model in OpenAI's Models API shape, so OpenAI clients can list toile's models."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(0, description="Unix time the model's files were last changed")
    owned_by: str = "toile"
    family: str | None = Field(
        None, description="toile's model family (sd, sdxl, ...); null if it cannot be read"
    )
    refiner: bool = Field(
        False, description="can be a job's `refiner` (for a model of the same family)"
    )
    tasks: list[TaskName] = Field(
        default_factory=list, description="the tasks a job on this model can have; empty if "
        "its family cannot be read"
    )
    samplers: list[SamplerOption] = Field(
        default_factory=list,
        description="the samplers a job on this model can name, with their schedules; empty "
        "when they cannot be read from its configs (a single file): then only the default",
    )


class ModelList(BaseModel):
    """Both shapes in one body: OpenAI's (``object``, ``data``) and toile's own (``default``,
    ``models``, ``loras``), so one ``GET /v1/models`` serves both kinds of client."""

    object: Literal["list"] = "list"
    data: list[ModelCard] = Field(default_factory=list)
    default: str
    # The model each task runs on when a job names none (null: none serves it, or several do
    # and none is set with `toile models default ID --task TASK`).
    task_defaults: dict[str, str | None] = Field(default_factory=dict)
    models: list[str]
    loras: list[str]


class Health(BaseModel):
    ok: bool
    queue_length: int
    running: int
    worker_alive: bool


class ErrorBody(BaseModel):
    error: dict[str, Any]
