"""What a generation returns: images, and for each image the record that reproduces it."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable

    from PIL import Image

    Finisher = Callable[[bytes, "ImageRecord"], bytes]

RECORD_VERSION = 1
SCHEDULES = ("prompt_schedule", "negative_prompt_schedule")  # ImageRecord's editing schedules


@dataclass(frozen=True)
class ImageRecord:
    """Everything needed to make one image (or text) again (the ``toile`` PNG chunk holds
    this as JSON).

    ``task`` says what the request was for; ``inputs`` the SHA-256 of each input image's
    pixels; ``text`` the caption or answer of a text task. ``stages`` lists each stage of the
    plan that ran (role, model id, family, hash). ``safety`` holds the verdicts of any output
    checks that ran; an empty dict means none ran.
    """

    model_id: str
    family: str
    model_hash: str
    mode: str
    prompt: str  # as written, A1111 syntax included
    negative_prompt: str
    width: int
    height: int
    steps: int
    guidance: float
    seed: int
    variant: str = ""
    strength: float | None = None
    outpaint: tuple[int, int, int, int] | None = None
    loras: tuple[dict[str, Any], ...] = ()
    refiner_id: str | None = None  # the second model of a base -> refiner hand-off
    refiner_hash: str | None = None
    refiner_switch: float | None = None
    # The prompt's parsed A1111 emphasis, (text, weight) pieces (BREAK as weight -1), when the
    # model applied weights; or a note saying what the model saw instead (encoders without
    # weights get the plain words).
    prompt_weights: tuple[tuple[str, float], ...] = ()
    prompt_note: str = ""
    # A1111 prompt editing / alternation: (last step, text) for each run of steps with one text,
    # steps counted from 1 (over the steps that run), for the prompt and the negative prompt;
    # empty when neither uses it. ``prompt_weights`` are then the first run's.
    prompt_schedule: tuple[tuple[int, str], ...] = ()
    negative_prompt_schedule: tuple[tuple[int, str], ...] = ()
    sampler: str = ""  # toile.samplers' name (A1111's), e.g. "Euler", "DPM++ 2M"
    schedule: str = ""  # "automatic" (the checkpoint's own spacing), "karras", ...
    device: str = "cpu"
    dtype: str = "float32"
    software: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    safety: dict[str, Any] = field(default_factory=dict)
    task: str = "generate"
    inputs: dict[str, str] = field(default_factory=dict)
    question: str | None = None
    detail: str | None = None
    scale: float | None = None
    image_guidance: float | None = None
    noise_level: int | None = None
    text: str | None = None
    stages: tuple[dict[str, str], ...] = ()
    # Hires fix: scale, upscaler, steps, strength and the second pass's width/height (the
    # record's width/height are the first pass's, as A1111's "Size" is).
    hires: dict[str, Any] | None = None
    tiling: bool = False  # seamless tiling (A1111's "Tiling") was on
    # What a reader did to the input image before reading it (padding, resizing), when the
    # family says (toile's reader does).
    input_note: str = ""
    version: int = RECORD_VERSION

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["loras"] = [dict(lora) for lora in self.loras]
        data["stages"] = [dict(stage) for stage in self.stages]
        data["prompt_weights"] = [list(piece) for piece in self.prompt_weights]
        for name in SCHEDULES:
            data[name] = [list(run) for run in getattr(self, name)]
        data["outpaint"] = list(self.outpaint) if self.outpaint is not None else None
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ImageRecord:
        known = set(cls.__dataclass_fields__)
        values = {k: v for k, v in data.items() if k in known}
        if "scheduler" in data and "sampler" not in data:  # records written before 0.2
            values["sampler"] = data["scheduler"]
        values["loras"] = tuple(dict(lora) for lora in values.get("loras", ()))
        values["stages"] = tuple(dict(stage) for stage in values.get("stages", ()))
        values["prompt_weights"] = tuple(
            (str(text), float(weight)) for text, weight in values.get("prompt_weights", ())
        )
        for name in SCHEDULES:
            values[name] = tuple((int(end), str(text)) for end, text in values.get(name, ()))
        if values.get("outpaint") is not None:
            values["outpaint"] = tuple(values["outpaint"])
        return cls(**values)

    @classmethod
    def from_json(cls, text: str) -> ImageRecord:
        return cls.from_dict(json.loads(text))


@dataclass
class GenerationResult:
    """The images of one request (PIL, RGB) — or, for caption and answer, its ``texts`` — and
    one record per image or text, in the same order."""

    images: list[Image.Image]
    records: list[ImageRecord]
    timings: dict[str, float] = field(default_factory=dict)
    texts: list[str] = field(default_factory=list)
    # (encoded PNG, record) -> bytes to write; the engine sets its provenance label here
    finish_png: Finisher | None = None

    def save(self, path: str, *, finish: Finisher | None = None) -> list[str]:
        """Write the images as PNGs carrying their records; returns the paths written.

        One image goes to ``path``; several go to ``NAME-0.png``, ``NAME-1.png``, ...
        ``finish`` (default: ``finish_png``, which the engine sets to the safety layer's
        provenance label) makes the final bytes of each, e.g. C2PA signing.
        """
        from toile.io.metadata import save_png

        last = finish or self.finish_png
        paths = output_paths(path, len(self.images))
        for image, record, out in zip(self.images, self.records, paths, strict=True):
            save_png(image, record, out,
                     finish=(lambda data, r=record: last(data, r)) if last else None)
        return paths


def output_paths(path: str, count: int) -> list[str]:
    if count == 1:
        return [path]
    stem, dot, ext = path.rpartition(".")
    if not dot or "/" in ext:
        stem, ext = path, "png"
    return [f"{stem}-{i}.{ext}" for i in range(count)]
