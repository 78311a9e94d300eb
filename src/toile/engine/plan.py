"""Plans: the ordered stages the engine runs for one request.

Every multi-stage run is a plan — SDXL's base -> refiner hand-off, an upscaler applied in
passes, and (built on the same stages) hires fix and cascades — so the engine has one loop and
no special cases. A stage names its model, its role and how it receives the previous stage's
output: as decoded images (they become the next stage's input image) or, for a refiner, as the
family's latents part-way through the schedule (:class:`toile.families.base.RefinerHandoff`).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from toile.request import GenerationRequest, Mode, Task
from toile.resolve import cascades, resolve_budget

if TYPE_CHECKING:
    from PIL import Image

    from toile.resolve import FamilyDefaults, Hires, ResolvedRequest


class StageRole(enum.StrEnum):
    BASE = "base"  # the request's own model, on the request's own inputs
    REFINER = "refiner"  # finishes the low-noise end of the base's schedule
    UPSCALE = "upscale"  # one more pass of an upscaler on the previous stage's images
    HIRES = "hires"  # hires fix's second pass: img2img at the upscaled size


class Handoff(enum.StrEnum):
    """How a stage receives the previous stage's output."""

    IMAGES = "images"  # each output image becomes this stage's input image (same seed)
    LATENTS = "latents"  # the family hands its latents over mid-schedule (a refiner)


# A stage fed images: its request for one previous output image and that image's seed.
FollowUp = Callable[["Image.Image", int], "GenerationRequest"]


@dataclass(frozen=True)
class Stage:
    role: StageRole
    model: str | None  # a model id or path; None: the request's model
    request: GenerationRequest  # the first stage's (and a refiner's) request
    handoff: Handoff = Handoff.IMAGES
    follow: FollowUp | None = None  # a later IMAGES stage: its request per input image


@dataclass(frozen=True)
class Plan:
    stages: tuple[Stage, ...]
    # A cascade's base draws at this size (the request's is the output's); None: the request's
    base_size: tuple[int, int] | None = None

    def describe(self) -> list[str]:
        return [f"{stage.role.value}:{stage.model or 'request model'}" for stage in self.stages]


def upscale_passes(scale: float, factor: int) -> int:
    """How many passes of a ``factor``-times upscaler reach ``scale`` (AUTOMATIC1111 repeats
    its upscalers until the image is at least the target, then resizes down to it)."""
    if factor <= 1 or scale <= 1:
        return 1
    return max(1, math.ceil(math.log(scale) / math.log(factor) - 1e-9))


def plan_for(resolved: ResolvedRequest, defaults: FamilyDefaults) -> Plan:
    """The stages of ``resolved`` (its model's ``defaults`` already applied).

    - generate with a refiner: base, then the refiner by latent hand-off;
    - upscale by more than the model's ``upscale_factor``: that many passes of the model, each
      by its factor (the engine resizes the last output to the exact size asked for); the
      largest pass must fit the model's pixel budget too, checked before any pass runs;
    - txt2img above a cascade model's base size: the base at its size, then as many passes
      of its SR stage as reach the size asked for (the engine resizes the last to it);
    - everything else: one base stage.
    """
    request = resolved.request
    if cascades(request, resolved.mode, defaults):
        plan = cascade_plan(resolved, defaults)
        if plan is not None:
            return plan
    base = Stage(StageRole.BASE, request.model, request)
    stages = [base]
    if request.refiner is not None:
        stages.append(Stage(StageRole.REFINER, request.refiner, request, Handoff.LATENTS))
    upscale_factor = defaults.upscale_factor
    if resolved.mode is Mode.UPSCALE and resolved.scale is not None:
        passes = upscale_passes(resolved.scale, upscale_factor)
        assert request.image is not None
        reach = max(upscale_factor, 1) ** passes
        width, height = request.image.size
        resolve_budget(width * reach, height * reach, defaults.max_pixels, "scale",
                       f" ({passes} passes of a {upscale_factor}x upscaler make "
                       f"{width * reach}x{height * reach} before the final resize)")
        if passes > 1:
            step = replace(request, scale=float(upscale_factor), width=None, height=None)
            again = Stage(StageRole.UPSCALE, request.model, step, follow=lambda image, seed:
                          replace(step, image=image, seed=seed, num_images=1))
            stages = [Stage(StageRole.BASE, request.model, step), *[again] * (passes - 1)]
    if resolved.hires is not None:
        stages += hires_stages(request, resolved.hires)
    return Plan(tuple(stages))


def cascade_plan(resolved: ResolvedRequest, defaults: FamilyDefaults) -> Plan | None:
    """Base at the cascade's base size, then SR passes (None: the size needs none)."""
    cascade = defaults.cascade
    assert cascade is not None
    request = resolved.request
    passes = cascade.passes(resolved.width, resolved.height)
    if passes == 0:
        return None
    width, height = cascade.base_size(resolved.width, resolved.height, defaults.size_multiple)
    reach = cascade.factor ** passes
    resolve_budget(width * reach, height * reach, cascade.max_pixels, "width",
                   f" ({passes} passes of the {cascade.factor}x {cascade.upscaler} stage from "
                   f"{width}x{height} make {width * reach}x{height * reach} before the resize)")

    def upscale(image: Image.Image, seed: int) -> GenerationRequest:
        return GenerationRequest(prompt=request.prompt, task=Task.UPSCALE, image=image,
                                 scale=float(cascade.factor), seed=seed, model=cascade.upscaler)

    sr = Stage(StageRole.UPSCALE, cascade.upscaler, request, follow=upscale)
    return Plan((Stage(StageRole.BASE, request.model, request), *[sr] * passes),
                base_size=(width, height))


def hires_stages(request: GenerationRequest, hires: Hires) -> list[Stage]:
    """Hires fix after the base's txt2img (AUTOMATIC1111's "Hires. fix"): the upscaler takes
    each image to the second pass's size, then the base model runs img2img on it with the
    hires strength and steps — same prompt, seed, sampler and LoRAs."""

    def upscale(image: Image.Image, seed: int) -> GenerationRequest:
        return GenerationRequest(prompt=request.prompt, task=Task.UPSCALE, image=image,
                                 width=hires.width, height=hires.height, seed=seed,
                                 model=hires.upscaler)

    def second_pass(image: Image.Image, seed: int) -> GenerationRequest:
        own = {"prompt": hires.prompt, "negative_prompt": hires.negative_prompt,
               "sampler": hires.sampler}
        return replace(request, image=image, seed=seed, num_images=1, width=None, height=None,
                       steps=hires.steps, strength=hires.strength, hires_scale=None,
                       hires_upscaler=None, hires_steps=None, hires_strength=None,
                       hires_sampler=None, hires_prompt=None, hires_negative_prompt=None,
                       **{name: value for name, value in own.items() if value is not None})

    stages = [Stage(StageRole.UPSCALE, hires.upscaler, request, follow=upscale)]
    if hires.strength > 0:  # strength 0 changes nothing: the upscaled image is the result
        stages.append(Stage(StageRole.HIRES, request.model, request, follow=second_pass))
    return stages
