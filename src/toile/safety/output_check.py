"""Output checks: a classifier run on every generated image before it is returned or written.

A check is anything with a ``name`` and ``check(images) -> list[OutputVerdict]``; toile brings
one, :class:`SDSafetyChecker` (diffusers' ``StableDiffusionSafetyChecker``, the checker SD 1.x
shipped with, loaded from a local folder), and a deployment may register its own
(``module:callable`` in the server config). What happens to a flagged image is the policy's
``FlagAction``: ``pass`` it, ``blur`` it, ``withhold`` it (the request fails with the reason,
never a silent black image, unlike diffusers' pipelines) or ``flag`` it (kept, marked). The
verdict goes into the image record's ``safety.output``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from toile.errors import ModelFormatError, ToileError

if TYPE_CHECKING:
    from PIL import Image


class FlagAction(StrEnum):
    PASS = "pass"
    BLUR = "blur"
    WITHHOLD = "withhold"
    FLAG = "flag"


@dataclass(frozen=True)
class OutputVerdict:
    flagged: bool
    detail: str = ""  # e.g. which concepts, for the operator's log and the record


class OutputCheck(Protocol):
    name: str

    def check(self, images: list[Image.Image]) -> list[OutputVerdict]: ...


class OutputWithheldError(ToileError):
    """A generated image was withheld by the output check."""


class SDSafetyChecker:
    """diffusers' ``StableDiffusionSafetyChecker`` with its CLIP image processor, from a local
    folder: an SD 1.x diffusers folder (``safety_checker/`` + ``feature_extractor/``) or the
    checker's own (``config.json``, weights and ``preprocessor_config.json`` together)."""

    name = "sd-safety-checker"

    def __init__(self, folder: str | Path, device: str = "cpu") -> None:
        from diffusers.pipelines.stable_diffusion.safety_checker import (
            StableDiffusionSafetyChecker,
        )
        from transformers import CLIPImageProcessor

        root = Path(folder)
        model_dir = root / "safety_checker" if (root / "safety_checker").is_dir() else root
        processor_dir = (
            root / "feature_extractor" if (root / "feature_extractor").is_dir() else root
        )
        try:
            self.model = StableDiffusionSafetyChecker.from_pretrained(
                str(model_dir), local_files_only=True, use_safetensors=True
            ).to(device).eval()
            self.processor = CLIPImageProcessor.from_pretrained(
                str(processor_dir), local_files_only=True
            )
        except (OSError, ValueError) as exc:
            raise ModelFormatError(
                f"cannot load a Stable Diffusion safety checker from {root}: {exc}"
            ) from None
        self.device = device

    def check(self, images: list[Image.Image]) -> list[OutputVerdict]:
        import numpy as np
        import torch

        clip_input = self.processor(images, return_tensors="pt").pixel_values.to(self.device)
        arrays = [np.asarray(image, dtype=np.float32) / 255.0 for image in images]
        with torch.no_grad():
            _, flags = self.model(images=arrays, clip_input=clip_input)
        return [OutputVerdict(bool(flag), "nsfw concept" if flag else "") for flag in flags]


def load_output_check(spec: str, device: str = "cpu") -> OutputCheck:
    """A check from the config: a folder (the SD safety checker) or ``module:callable`` (the
    deployment's own classifier: the callable returns an OutputCheck)."""
    path = Path(spec).expanduser()
    if path.exists():
        return SDSafetyChecker(path, device)
    module_name, _, attr = spec.partition(":")
    if not attr:
        raise ToileError(
            f"output checker {spec!r}: give a safety-checker folder or module:callable"
        )
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ToileError(f"output checker {spec!r} cannot be imported: {exc}") from None
    return factory()


def apply(
    check: OutputCheck | None, action: FlagAction, images: list[Image.Image]
) -> tuple[list[Image.Image], list[dict[str, Any]]]:
    """Run ``check`` on ``images`` and apply ``action`` to the flagged ones; returns the images
    to keep and, per image, the record's ``safety.output`` entry (empty without a check)."""
    if check is None:
        return images, [{} for _ in images]
    from PIL import ImageFilter

    verdicts = check.check(images)
    kept, entries = [], []
    for index, (image, verdict) in enumerate(zip(images, verdicts, strict=True)):
        taken = action.value if verdict.flagged else "none"
        if verdict.flagged and action is FlagAction.WITHHOLD:
            raise OutputWithheldError(
                f"image {index} was withheld: the output check ({check.name}) flagged it"
                f"{' (' + verdict.detail + ')' if verdict.detail else ''}; no image is returned"
            )
        if verdict.flagged and action is FlagAction.BLUR:
            image = image.filter(ImageFilter.GaussianBlur(max(image.size) / 12))
        kept.append(image)
        entries.append({"checker": check.name, "flagged": verdict.flagged, "action": taken})
    return kept, entries
