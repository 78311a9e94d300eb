"""Stable Diffusion 3 / 3.5 (diffusers ``StableDiffusion3Pipeline`` folders).

An MMDiT transformer under rectified flow, conditioned on two CLIP encoders (with projection)
and T5. The T5 slot may be ``null`` in ``model_index.json`` (a common way to save ~10 GB of
memory); diffusers then feeds zeros in its place, and toile runs the checkpoint as it is instead
of refusing it.

Sizes must be multiples of the VAE scale times the transformer's patch size, because the image
is cut into whole patches of latents.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from toile.families.base import LoadedModel
from toile.families.diffusers_common import (
    derive,
    load_pipeline,
    pipeline_class_name,
    read_component_config,
    read_model_index,
    scheduler_name,
)
from toile.families.sd import ALL_MODES, INPAINT_MODES, run_unet_pipeline
from toile.request import FamilyDefaults, Mode

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from toile.progress import RunContext
    from toile.request import ResolvedRequest

SD3_PIPELINES = frozenset(
    {
        "StableDiffusion3Pipeline",
        "StableDiffusion3Img2ImgPipeline",
        "StableDiffusion3InpaintPipeline",
    }
)
# diffusers' StableDiffusion3Pipeline defaults, which match Stability's reference settings.
DEFAULT_STEPS = 28
DEFAULT_GUIDANCE = 7.0


def sd3_defaults(path: Path, modes: frozenset[Mode] = ALL_MODES) -> FamilyDefaults:
    """Size from the checkpoint's configs, computed as diffusers computes its default size."""
    transformer = read_component_config(path, "transformer")
    vae = read_component_config(path, "vae")
    scale = 2 ** (len(vae.get("block_out_channels", [0, 0, 0, 0])) - 1)
    sample = transformer.get("sample_size", 128)
    side = (sample if isinstance(sample, int) else sample[0]) * scale
    multiple = scale * int(transformer.get("patch_size", 2))
    return FamilyDefaults(
        modes=modes,
        width=side,
        height=side,
        steps=DEFAULT_STEPS,
        guidance=DEFAULT_GUIDANCE,
        size_multiple=multiple,
        min_side=multiple,
    )


def is_inpaint_checkpoint(path: Path) -> bool:
    """A 33-channel transformer (16 latent + 1 mask + 16 masked-image channels) inpaints only:
    diffusers' SD3 inpaint pipeline runs it, the txt2img and img2img pipelines cannot."""
    return read_component_config(path, "transformer").get("in_channels") == 33


def has_t5(path: Path) -> bool:
    slot = (read_model_index(path) or {}).get("text_encoder_3")
    return isinstance(slot, list) and slot[0] is not None


class SD3Family:
    name = "sd3"
    title = "Stable Diffusion 3 / 3.5"
    # Without T5 the model runs the same modes; the variant is recorded because it changes the
    # images (zeros stand in for the T5 tokens).
    capabilities: ClassVar[dict[str, frozenset[Mode]]] = {
        "": ALL_MODES,
        "no-t5": ALL_MODES,
        "inpainting": INPAINT_MODES,
        "inpainting-no-t5": INPAINT_MODES,
    }
    lora = True

    def detect(self, path: Path) -> bool:
        return pipeline_class_name(path) in SD3_PIPELINES

    def variant(self, path: Path) -> str:
        inpainting = is_inpaint_checkpoint(path)
        parts = (["inpainting"] if inpainting else []) + ([] if has_t5(path) else ["no-t5"])
        return "-".join(parts)

    def load(self, path: Path, device: str, dtype: torch.dtype) -> LoadedModel:
        from diffusers import (
            StableDiffusion3Img2ImgPipeline,
            StableDiffusion3InpaintPipeline,
            StableDiffusion3Pipeline,
        )

        variant = self.variant(path)
        # Passing None explicitly is how diffusers runs SD3 without T5 (zeros in its place);
        # from_pretrained refuses a null slot otherwise.
        options: dict[str, Any] = {}
        if not has_t5(path):
            options = {"text_encoder_3": None, "tokenizer_3": None}
        if is_inpaint_checkpoint(path):
            base = load_pipeline(StableDiffusion3InpaintPipeline, path, device, dtype, **options)
            pipelines: dict[str, Any] = {"inpaint": base}
        else:
            base = load_pipeline(StableDiffusion3Pipeline, path, device, dtype, **options)
            pipelines = {
                "txt2img": base,
                "img2img": derive(StableDiffusion3Img2ImgPipeline, base),
                "inpaint": derive(StableDiffusion3InpaintPipeline, base),
            }
        return LoadedModel(
            family=self.name,
            path=path,
            defaults=sd3_defaults(path, self.capabilities[variant]),
            device=device,
            dtype=dtype,
            pipelines=pipelines,
            scheduler=scheduler_name(base),
            supports_lora=True,
            variant=variant,
        )

    def run(
        self, loaded: LoadedModel, request: ResolvedRequest, ctx: RunContext
    ) -> list[Image.Image]:
        # SD3's img2img resizes its input to the default size unless told the size, so every
        # mode passes it (for img2img/inpaint it is the input image's own size).
        return run_unet_pipeline(loaded, request, ctx, width=request.width, height=request.height)
