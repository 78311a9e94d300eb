"""The record of one image or text: everything needed to make it again."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from toile.request import Task
from toile.result import ImageRecord
from toile.samplers import DEFAULT_SAMPLER

if TYPE_CHECKING:
    from toile.engine.loaded import CachedModel
    from toile.engine.plan import StageRole
    from toile.families.base import Family
    from toile.request import GenerationRequest, ResolvedRequest


def build_record(
    cached: CachedModel,
    resolved: ResolvedRequest,
    seed: int,
    timings: dict[str, float],
    refiner: CachedModel | None = None,
) -> ImageRecord:
    from toile.io.weights import model_hash

    request = resolved.request
    outpaint = request.outpaint
    syntax = prompt_syntax(cached.family, request)
    text_task = resolved.task.makes_text
    return ImageRecord(
        task=resolved.task.value,
        inputs=input_hashes(request),
        question=request.question,
        detail=request.detail.value if resolved.task is Task.CAPTION else None,
        scale=resolved.scale,
        image_guidance=resolved.image_guidance,
        noise_level=resolved.noise_level,
        hires=asdict(resolved.hires) if resolved.hires is not None else None,
        model_id=cached.entry.id,
        family=cached.family.name,
        variant=cached.loaded.variant,
        model_hash=cached.model_hash,
        mode=resolved.mode.value,
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        width=resolved.width,
        height=resolved.height,
        steps=resolved.steps,
        guidance=resolved.guidance,
        seed=seed,
        strength=resolved.strength,
        outpaint=(
            (outpaint.left, outpaint.top, outpaint.right, outpaint.bottom) if outpaint else None
        ),
        loras=tuple(
            {"name": Path(lo.path).stem, "hash": model_hash(lo.path), "scale": lo.scale}
            for lo in request.loras
        ),
        refiner_id=refiner.entry.id if refiner is not None else None,
        refiner_hash=refiner.model_hash if refiner is not None else None,
        refiner_switch=resolved.refiner_switch,
        prompt_weights=syntax.weights,
        prompt_note=syntax.note,
        sampler=resolved.sampler.name if resolved.sampler is not None else (
            "" if text_task else DEFAULT_SAMPLER),
        schedule=resolved.sampler.schedule.value if resolved.sampler is not None else "",
        device=cached.loaded.device,
        dtype=str(cached.loaded.dtype).removeprefix("torch."),
        software=software_versions(),
        timings=timings,
    )




def input_hashes(request: GenerationRequest) -> dict[str, str]:
    """SHA-256 of each input image's pixels (mode, size and RGB(A)/L bytes), so a record names
    exactly which picture went in, whatever file format carried it."""
    import hashlib

    found = {}
    for name in ("image", "mask"):
        image = getattr(request, name)
        if image is not None:
            digest = hashlib.sha256(f"{image.mode}:{image.size[0]}x{image.size[1]}:".encode())
            digest.update(image.tobytes())
            found[name] = digest.hexdigest()
    return found


def stage_info(role: StageRole, model: CachedModel) -> dict[str, str]:
    return {"role": role.value, "model_id": model.entry.id, "family": model.family.name,
            "model_hash": model.model_hash}


@dataclass(frozen=True)
class PromptSyntax:
    """What became of a prompt's A1111 syntax: ``weights`` (the parsed pieces, for a family that
    applies them), or ``plain`` (prompt, negative) words for one that cannot, with ``note``."""

    weights: tuple[tuple[str, float], ...] = ()
    plain: tuple[str, str] | None = None
    note: str = ""


def prompt_syntax(family: Family, request: GenerationRequest) -> PromptSyntax:
    """Families whose text encoders are CLIP (``prompt_weights = True``: SD, SDXL) weight the
    tokens; the others (T5, toile's sentence encoder) get the words without the syntax, never
    literal brackets, and the record says so."""
    from toile import prompt_syntax as syntax

    prompt, negative = request.prompt, request.negative_prompt
    if not (syntax.has_syntax(prompt) or syntax.has_syntax(negative)):
        return PromptSyntax()
    if getattr(family, "prompt_weights", False):
        pieces = syntax.parse(prompt)
        return PromptSyntax(weights=tuple((p.text, p.weight) for p in pieces))
    plain = (syntax.plain_text(prompt), syntax.plain_text(negative))
    return PromptSyntax(
        plain=plain,
        note=f"A1111 emphasis syntax removed: the {family.name} family's text encoders take no "
        f"weights; the model was given the prompt {plain[0]!r}",
    )


def software_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("toile", "torch", "diffusers", "transformers", "peft"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found
