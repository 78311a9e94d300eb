"""Upscaling by a resampling filter (no weights): AUTOMATIC1111's "Lanczos" and "Nearest"
upscalers, and bicubic for comparisons. The built-in model ids ``lanczos``, ``bicubic`` and
``nearest`` are folders holding one ``toile_resize.json`` (``{"filter": NAME}``), so they are
listed, chosen and recorded like any other model.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from toile.errors import ModelFormatError
from toile.families.base import LoadedModel
from toile.request import Mode
from toile.resolve import FamilyDefaults

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from toile.progress import RunContext
    from toile.resolve import ResolvedRequest

MARKER = "toile_resize.json"
FILTERS = ("lanczos", "bicubic", "bilinear", "nearest")


def read_filter(path: Path) -> str:
    from toile.io.weights import read_json_object

    value = read_json_object(path / MARKER).get("filter")
    if value not in FILTERS:
        raise ModelFormatError(
            f"{path / MARKER}: filter must be one of {', '.join(FILTERS)}, got {value!r}")
    return str(value)


class ResizeFamily:
    name = "resize"
    title = "Resampling filter (no model)"
    capabilities: ClassVar[dict[str, frozenset[Mode]]] = {
        name: frozenset({Mode.UPSCALE}) for name in FILTERS}
    lora = False

    def detect(self, path: Path) -> bool:
        return path.is_dir() and (path / MARKER).is_file()

    def variant(self, path: Path) -> str:
        return read_filter(path)

    def load(self, path: Path, device: str, dtype: torch.dtype) -> LoadedModel:
        variant = read_filter(path)
        return LoadedModel(
            family=self.name,
            path=path,
            # One pass reaches any scale: the filter resizes straight to the size asked for.
            defaults=FamilyDefaults(modes=self.capabilities[variant], width=0, height=0,
                                    steps=0, guidance=0.0, size_multiple=1, min_side=1,
                                    upscale_factor=1),
            device=device,
            dtype=dtype,
            variant=variant,
        )

    def run(
        self, loaded: LoadedModel, request: ResolvedRequest, ctx: RunContext
    ) -> list[Image.Image]:
        from PIL import Image

        assert request.request.image is not None
        ctx.check_cancelled()
        resample = Image.Resampling[loaded.variant.upper()]
        image = request.request.image.convert("RGB")
        resized = image.resize((request.width, request.height), resample)
        ctx.on_step(1, 1, stage="resize")
        return [resized.copy() for _ in request.seeds]
