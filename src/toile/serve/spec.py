"""What the server keeps for a job: its :class:`JobSpec` (the request, built once at submit,
stored as JSON, read back by the worker) and its :class:`JobStatus`.

Why a typed spec rather than a dict: the submit path, the store, the worker and the job view
all read the same fields, so a field added to one is added to all (and a stored row that no
longer parses is reported as damaged instead of failing somewhere deep in the worker). Input
images are not in the spec: it names the upload files the server wrote for the job, and LoRAs
by their server ids, looked up again when the job runs.

The JSON is the shape schema 2 stored (``image``/``mask`` file names, ``outpaint`` as a dict,
``loras`` as ``[{"id", "scale"}]``) plus the task fields, so rows written before tasks read as
``task=generate`` jobs.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from toile.errors import RequestError
from toile.request import Detail, Outpaint, Task, parse_enum

if TYPE_CHECKING:
    from PIL import Image

    from toile.request import GenerationRequest

UPLOAD_FIELDS = ("image", "mask")


class JobStatus(enum.StrEnum):
    """A job's state: ``queued -> running -> succeeded | failed | cancelled``, or
    ``queued -> cancelled``. The values are the wire format (JSON, SQLite)."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})


@dataclass(frozen=True)
class LoraRef:
    """A LoRA by the id the server serves it under (never a path) and its scale."""

    id: str
    scale: float = 1.0


def upload_name(job_id: str, field: str, suffix: str) -> str:
    """The file name an upload of ``field`` is saved under in the uploads folder."""
    return f"{job_id}-{field}{suffix}"


@dataclass(frozen=True)
class JobSpec:
    """Everything a job runs with, concrete where the server decided (``model`` and ``seed``
    are fixed at submit, so a job re-run after a crash makes the same result).

    ``image`` and ``mask`` are names of files in the server's uploads folder (never a path);
    the other fields are :class:`~toile.request.GenerationRequest`'s.
    """

    prompt: str
    model: str
    seed: int
    negative_prompt: str = ""
    task: Task = Task.GENERATE
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance: float | None = None
    num_images: int = 1
    strength: float | None = None
    outpaint: Outpaint | None = None
    loras: tuple[LoraRef, ...] = ()
    refiner: str | None = None
    refiner_switch: float | None = None
    sampler: str | None = None
    schedule: str | None = None
    question: str | None = None
    detail: Detail = Detail.SHORT
    scale: float | None = None
    image_guidance: float | None = None
    noise_level: int | None = None
    hires_scale: float | None = None
    hires_upscaler: str | None = None
    hires_steps: int | None = None
    hires_strength: float | None = None
    hires_sampler: str | None = None
    hires_prompt: str | None = None
    hires_negative_prompt: str | None = None
    tiling: bool = False
    image: str | None = None
    mask: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "task", parse_enum(Task, self.task, "task"))
        object.__setattr__(self, "detail", parse_enum(Detail, self.detail, "detail"))
        for name in UPLOAD_FIELDS:
            value = getattr(self, name)
            # Only names the server made: a stored path would let a row point anywhere.
            if value is not None and (not isinstance(value, str) or Path(value).name != value
                                      or value in ("", ".", "..")):
                raise RequestError(name, "stored upload name is invalid")

    # -- JSON -------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["task"] = self.task.value
        data["detail"] = self.detail.value
        data["loras"] = [{"id": lora.id, "scale": lora.scale} for lora in self.loras]
        return data  # asdict already made outpaint a dict (or left it None)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JobSpec:
        """The spec from its JSON object; unknown keys are ignored (a newer server's extras),
        a missing or malformed field raises (ValueError, TypeError or RequestError)."""
        known = {f.name for f in fields(cls)}
        values = {key: value for key, value in data.items() if key in known}
        if values.get("outpaint") is not None:
            values["outpaint"] = Outpaint(**values["outpaint"])
        values["loras"] = tuple(
            LoraRef(str(lora["id"]), float(lora["scale"])) for lora in values.get("loras") or ()
        )
        return cls(**values)

    @classmethod
    def from_json(cls, text: str) -> JobSpec:
        value = json.loads(text)
        if not isinstance(value, dict):
            raise ValueError("not a JSON object")
        return cls.from_dict(value)

    # -- use --------------------------------------------------------------------------------

    def uploads(self) -> dict[str, str]:
        """``{field: file name}`` of the inputs this job has."""
        return {name: getattr(self, name) for name in UPLOAD_FIELDS if getattr(self, name)}

    def view(self) -> dict[str, Any]:
        """The spec as the job view shows it: input images as ``true`` (present) or ``false``,
        never the server's file names."""
        data = self.to_dict()
        for name in UPLOAD_FIELDS:
            data[name] = data[name] is not None
        return data

    def request(
        self,
        images: Mapping[str, Image.Image],
        lora_path: Callable[[str, str], Path],
    ) -> GenerationRequest:
        """The engine's request: ``images`` holds the decoded uploads by field, ``lora_path(id,
        field)`` finds a LoRA id's file (raising RequestError naming ``field``). Raises
        RequestError naming the field when the request is not valid."""
        from toile.request import GenerationRequest, LoraSpec

        for name in self.uploads():
            if name not in images:
                raise RequestError(name, "the uploaded image is no longer available")
        loras = tuple(
            LoraSpec(str(lora_path(lora.id, f"loras[{index}].id")), lora.scale)
            for index, lora in enumerate(self.loras)
        )
        return GenerationRequest(
            **{name: getattr(self, name) for name in passed_fields()},
            image=images.get("image") if self.image else None,
            mask=images.get("mask") if self.mask else None,
            loras=loras,
        )


def passed_fields() -> tuple[str, ...]:
    """The spec's fields that are :class:`~toile.request.GenerationRequest` fields of the same
    name and value (all but the uploads and the LoRAs, which name server files and ids), so a
    field added to both passes through without a third list to keep in step."""
    return tuple(f.name for f in fields(JobSpec) if f.name not in (*UPLOAD_FIELDS, "loras"))
