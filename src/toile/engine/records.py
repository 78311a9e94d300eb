"""The record of one image or text: everything needed to make it again."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from toile.request import Task
from toile.result import ImageRecord
from toile.samplers import DEFAULT_SAMPLER

if TYPE_CHECKING:
    from toile.engine.loaded import CachedModel
    from toile.engine.plan import StageRole
    from toile.families.base import Family
    from toile.request import GenerationRequest
    from toile.resolve import ResolvedRequest


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
    syntax = prompt_syntax(cached.family, request, resolved.steps)
    text_task = resolved.task.makes_text
    return ImageRecord(
        task=resolved.task.value,
        inputs=input_hashes(request),
        question=request.question,
        detail=request.detail.value if resolved.task is Task.CAPTION else None,
        scale=resolved.scale,
        image_guidance=resolved.image_guidance,
        noise_level=resolved.noise_level,
        hires=hires_record(resolved),
        tiling=request.tiling,
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
        prompt_schedule=syntax.schedule,
        negative_prompt_schedule=syntax.negative_schedule,
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
    applies them), or ``plain`` (prompt, negative) words for one that cannot, with ``note``;
    with prompt editing, the (last step, text) ``schedule`` and ``negative_schedule``."""

    weights: tuple[tuple[str, float], ...] = ()
    plain: tuple[str, str] | None = None
    note: str = ""
    schedule: tuple[tuple[int, str], ...] = ()
    negative_schedule: tuple[tuple[int, str], ...] = ()


def prompt_syntax(
    family: Family, request: GenerationRequest, steps: int | None = None
) -> PromptSyntax:
    """Families whose text encoders are CLIP (``prompt_weights = True``: SD, SDXL) weight the
    tokens; the others (T5, toile's sentence encoder) get the words without the syntax, never
    literal brackets, and the record says so.

    Prompt editing and alternation go to the family as written when it switches the
    conditioning between steps itself (``prompt_editing = True``); a family that samples from
    the prompt without that (SD3, FLUX.1, IF, ...) refuses them. With ``steps`` (the resolved
    count, for the record) the schedules are filled in, and the weights are the first run's.
    """
    from toile import prompt_syntax as syntax

    prompt, negative = request.prompt, request.negative_prompt
    follows_editing = getattr(family, "prompt_editing", False)
    if syntax.has_editing(prompt) or syntax.has_editing(negative):
        if follows_editing:
            return scheduled_syntax(family, request, steps)
        refuse_prompt_editing(family, request)
    if not (syntax.has_syntax(prompt) or syntax.has_syntax(negative)):
        return PromptSyntax()
    if getattr(family, "prompt_weights", False):
        pieces = syntax.parse(prompt)
        return PromptSyntax(weights=tuple((p.text, p.weight) for p in pieces))
    plain = (syntax.plain_text(prompt), syntax.plain_text(negative))
    return PromptSyntax(
        # A family that follows editing takes every prompt as written and drops the syntax
        # itself: plain words can look like editing ("\\[a:b:2\\]" once unescaped).
        plain=None if follows_editing else plain,
        note=f"A1111 emphasis syntax removed: the {family.name} family's text encoders take no "
        f"weights; the model was given the prompt {plain[0]!r}",
    )


def scheduled_syntax(
    family: Family, request: GenerationRequest, steps: int | None
) -> PromptSyntax:
    """A prompt with editing, for a family that follows it: nothing for the engine to change
    (the family reads the schedule), and with ``steps`` what the record keeps."""
    from toile import prompt_syntax as syntax

    if steps is None:
        return PromptSyntax()
    prompt, negative_prompt = request.prompt, request.negative_prompt
    schedule = negative = ()
    if syntax.has_editing(prompt):
        schedule = tuple(syntax.prompt_schedule(prompt, steps))
    if syntax.has_editing(negative_prompt):
        negative = tuple(syntax.prompt_schedule(negative_prompt, steps, "negative_prompt"))
    # The texts the model is given, step by step (a prompt without editing: itself).
    texts = [text for _, text in schedule] or [prompt]
    texts += [text for _, text in negative] or [negative_prompt]
    weights: tuple[tuple[str, float], ...] = ()
    note = ""
    if getattr(family, "prompt_weights", False):
        if syntax.has_syntax(texts[0]):
            weights = tuple((p.text, p.weight) for p in syntax.parse(texts[0]))
    elif any(syntax.has_syntax(text) for text in texts):
        note = (f"A1111 emphasis syntax removed: the {family.name} family's text encoders take "
                "no weights; each step's prompt was given as plain words")
    return PromptSyntax(weights=weights, note=note, schedule=schedule, negative_schedule=negative)


def refuse_prompt_editing(family: Family, request: GenerationRequest) -> None:
    """Refuse prompt editing for a family that samples from the prompt (it has a scheduler) but
    takes its conditioning once for every step; one that does not sample (an upscaling filter,
    a reader) never sees a prompt schedule at all."""
    from toile.errors import RequestError
    from toile.prompt_syntax import has_editing

    if getattr(family, "typical_scheduler", None) is None:
        return
    field = "prompt" if has_editing(request.prompt) else "negative_prompt"
    raise RequestError(
        field,
        f"A1111 prompt editing [from:to:when] and alternation [a|b] switch the conditioning "
        f"between steps, which the {family.name} family's pipeline cannot do (it takes its text "
        "conditioning once for all steps); remove them (escape literal brackets as \\[ \\])",
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


def hires_record(resolved: ResolvedRequest) -> dict[str, Any] | None:
    """The hires fix as the record keeps it: only what was set (None: no hires fix)."""
    if resolved.hires is None:
        return None
    return {key: value for key, value in asdict(resolved.hires).items() if value is not None}
