"""The Family contract: detect a checkpoint, load it, declare its modes, run one stage.

Every model family (the diffusers-based ones and toile's own) implements this; the engine knows
nothing else about them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from toile.progress import RunContext
    from toile.request import Mode
    from toile.resolve import FamilyDefaults, ResolvedRequest
    from toile.samplers import SamplerMenu


@dataclass
class LoadedModel:
    """A model ready to run. ``pipelines`` maps a typed key (a :class:`~toile.request.Mode`,
    or a family's own typed key such as IF's ``(IFStage, Mode)``) to the family's pipeline
    objects — the mode -> pipeline table of the family; ``defaults`` is what the loaded
    checkpoint declares."""

    family: str
    path: Path
    defaults: FamilyDefaults
    device: str
    dtype: torch.dtype
    pipelines: dict[Any, Any] = field(default_factory=dict)
    # The samplers and schedules this checkpoint can use (None: one fixed sampler).
    samplers: SamplerMenu | None = None
    supports_lora: bool = False
    variant: str = ""


class Family(Protocol):
    """A model family. Implementations are small classes registered in ``families.registry``.

    ``title`` names it for people; ``capabilities`` maps each variant the family tells apart
    ("" for the plain checkpoint) to the modes it runs — the generate modes (txt2img, img2img,
    inpaint, outpaint) and the other tasks' modes (edit, upscale, caption, answer) — and
    ``lora`` says whether LoRA files apply: the README's family and task tables are generated
    from these. ``gpu_dtype`` (optional,
    default "float16") is the half type used on GPUs when the user names none.
    """

    name: str
    title: str
    capabilities: dict[str, frozenset[Mode]]
    lora: bool

    def detect(self, path: Path) -> bool:
        """True when ``path`` (a folder or a .safetensors file) is a checkpoint of this family."""
        ...

    def variant(self, path: Path) -> str:
        """Which of ``capabilities``' variants the checkpoint at ``path`` is (cheap: configs)."""
        ...

    def load(self, path: Path, device: str, dtype: torch.dtype) -> LoadedModel:
        """Load from local files only (safetensors, no network)."""
        ...

    def run(
        self, loaded: LoadedModel, request: ResolvedRequest, ctx: RunContext
    ) -> list[Image.Image]:
        """Run one stage of an image mode (txt2img, img2img, inpaint — outpaint arrives as
        inpaint —, edit or upscale).

        Returns ``len(request.seeds)`` RGB images; image ``i`` uses noise from
        ``torch.Generator("cpu").manual_seed(request.seeds[i])``, so a batch equals singles.
        An upscaler returns its own factor's size; the engine resizes to the size asked for.
        """
        ...


@runtime_checkable
class RefinerHandoff(Protocol):
    """Optional: a family that can hand its latents to a second model of the same family
    part-way through the schedule (SDXL base -> refiner). The engine checks for it."""

    def run_with_refiner(
        self, base: LoadedModel, refiner: LoadedModel, request: ResolvedRequest, ctx: RunContext
    ) -> list[Image.Image]:
        """Run ``request`` (txt2img, img2img or inpaint — outpaint arrives as inpaint;
        ``request.refiner_switch`` set) on ``base`` up to the switch and finish it on
        ``refiner``; same image contract as ``Family.run``."""
        ...


@runtime_checkable
class TextReader(Protocol):
    """Optional: a family that writes text about an image (caption, answer)."""

    def read(self, loaded: LoadedModel, request: ResolvedRequest, ctx: RunContext) -> list[str]:
        """The caption (``request.request.detail``) or the answer to ``request.request.question``
        for ``request.request.image``: ``len(request.seeds)`` texts, reproducible (greedy
        decoding unless the family says otherwise)."""
        ...


@runtime_checkable
class InputNote(Protocol):
    """Optional, for text readers: what the family does to the input image before reading it
    (padding, resizing), for the record."""

    def input_note(self, loaded: LoadedModel, request: ResolvedRequest) -> str:
        ...


def cpu_generators(seeds: tuple[int, ...]) -> list[torch.Generator]:
    """One seeded CPU generator per image, as diffusers recommends for reproducibility."""
    import torch

    return [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
