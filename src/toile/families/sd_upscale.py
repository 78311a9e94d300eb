"""Stable Diffusion's upscalers: the x4 upscaler and the latent x2 upscaler, used alone.

- **x4** (``StableDiffusionUpscalePipeline``, stabilityai/stable-diffusion-x4-upscaler, also
  DeepFloyd IF's stage III): diffuses latents at the input's size, conditioned on the input
  with ``noise_level`` noise added (diffusers' default 20, at most the checkpoint's
  ``max_noise_level``), and its VAE decodes them at 4x.
- **latent-x2** (``StableDiffusionLatentUpscalePipeline``, stabilityai/sd-x2-latent-upscaler):
  encodes the input with its VAE, doubles the latents and diffuses them; it takes no noise
  level (a ``noise_level`` asked of it is a RequestError).

Both take the prompt (optional: "" upscales without a description) and the negative prompt
through their own CLIP encoder. Steps and guidance default to the pipelines' own call defaults.

**Sizes.** diffusers' image processor silently resizes an input to a multiple of the VAE's
scale, and the latent upscaler's K-diffusion U-Net fails on latents its levels do not divide
(or that leave under 2 pixels at its deepest level, where it pads by reflection). So any other
input is padded on the right and bottom by repeating its edge pixels, upscaled, and cropped
back: the output is always exactly the factor times the input (``input_geometry``).

**Samplers.** Each keeps its own scheduler: the latent upscaler's loop reads Euler's sigmas and
preconditions the U-Net for them itself, so no other sampler fits it; the x4 one keeps its DDIM
as DeepFloyd IF's cascade does.

**Batches.** Image ``i`` is its own prompt/image pair with its own seeded CPU generator, so a
batch equals singles (diffusers would otherwise draw one shared noise for the x4 input).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from toile.errors import RequestError
from toile.families.base import LoadedModel, cpu_generators
from toile.families.deepfloyd_if import NO_SAFETY, call_default, stage_callback
from toile.families.diffusers_common import (
    load_pipeline,
    pipeline_class_name,
    sampler_menu,
    vae_preview,
)
from toile.request import Mode
from toile.resolve import FamilyDefaults

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from toile.progress import RunContext
    from toile.resolve import ResolvedRequest

X4 = "x4"
LATENT_X2 = "latent-x2"
VARIANTS = {"StableDiffusionUpscalePipeline": X4, "StableDiffusionLatentUpscalePipeline": LATENT_X2}
FACTORS = {X4: 4, LATENT_X2: 2}
TITLES = {X4: "the SD x4 upscaler", LATENT_X2: "the SD latent x2 upscaler"}
UPSCALE = frozenset({Mode.UPSCALE})


def pipeline_class(variant: str) -> Any:
    from diffusers import StableDiffusionLatentUpscalePipeline, StableDiffusionUpscalePipeline

    return StableDiffusionUpscalePipeline if variant == X4 else StableDiffusionLatentUpscalePipeline


def level_factor(model: Any) -> int:
    """How much a U-Net (or VAE) downsamples: 2 ** (levels - 1)."""
    return 2 ** (len(model.config.block_out_channels) - 1)


def input_geometry(pipe: Any, variant: str) -> tuple[int, int]:
    """(multiple, minimum) an input side must be for ``pipe`` to upscale it exactly.

    x4: latents are the input's size, so the side must divide by the VAE scale (the image
    processor would resize it otherwise) and by the U-Net's levels. latent-x2: the latents
    (side / VAE scale) are doubled and must divide by the U-Net's levels and keep 2 pixels at
    its deepest one (its K blocks pad by reflection, which needs 2).
    """
    vae, unet = pipe.vae_scale_factor, level_factor(pipe.unet)
    if variant == X4:
        multiple = math.lcm(vae, unet)
        return multiple, multiple
    multiple = math.lcm(vae, max(1, vae * unet // 2))
    return multiple, max(multiple, vae * unet)


def pad_to_geometry(image: Image.Image, multiple: int, minimum: int) -> Image.Image:
    """``image`` extended on the right and bottom (edge pixels repeated, so the model sees no
    artificial border) to sides that are multiples of ``multiple`` and at least ``minimum``."""
    import numpy as np
    from PIL import Image

    def side(value: int) -> int:
        return math.ceil(max(value, minimum) / multiple) * multiple

    width, height = image.size
    target = (side(width), side(height))
    if target == image.size:
        return image
    pixels = np.asarray(image.convert("RGB"))
    padded = np.pad(pixels, ((0, target[1] - height), (0, target[0] - width), (0, 0)), "edge")
    return Image.fromarray(padded)


def crop_outputs(images: list[Image.Image], size: tuple[int, int]) -> list[Image.Image]:
    """The top-left ``size`` of each output (what the unpadded input upscales to), as RGB."""
    return [image.convert("RGB").crop((0, 0, *size)) for image in images]


def check_noise_level(pipe: Any, variant: str, noise_level: int | None) -> None:
    """The latent upscaler takes no noise level; the x4 one at most its ``max_noise_level``."""
    if noise_level is None:
        return
    if variant != X4:
        raise RequestError("noise_level", f"does not apply to {TITLES[variant]} (it adds no "
                           "noise to its input); leave noise_level unset")
    highest = int(pipe.config.max_noise_level)
    if noise_level > highest:
        raise RequestError("noise_level", f"must be at most {highest} for this x4 upscaler "
                           f"(its max_noise_level), got {noise_level}")


class SDUpscaleFamily:
    name = "sd-upscale"
    title = "Stable Diffusion upscalers"
    typical_scheduler = "DDIMScheduler"  # the x4 upscaler's (the latent one's is Euler)
    fixed_sampler = True  # each runs its own scheduler (see the module docstring)
    capabilities: ClassVar[dict[str, frozenset[Mode]]] = {X4: UPSCALE, LATENT_X2: UPSCALE}
    lora = False

    def detect(self, path: Path) -> bool:
        return pipeline_class_name(path) in VARIANTS

    def variant(self, path: Path) -> str:
        return VARIANTS[str(pipeline_class_name(path))]

    def load(self, path: Path, device: str, dtype: torch.dtype) -> LoadedModel:
        variant = self.variant(path)
        cls = pipeline_class(variant)
        # No safety checker or watermarker (toile's own safety layer decides): the x4 one's
        # optional slots are passed empty, as for IF's stage III.
        extra = NO_SAFETY if variant == X4 else {}
        pipe = load_pipeline(cls, path, device, dtype, **extra)
        defaults = FamilyDefaults(
            modes=UPSCALE,
            width=0,  # an upscale's size is its input's times the scale
            height=0,
            steps=call_default(cls, "num_inference_steps"),
            guidance=call_default(cls, "guidance_scale"),
            size_multiple=1,  # any input: run() pads it to what the model needs
            min_side=1,
            upscale_factor=FACTORS[variant],
            noise_level=call_default(cls, "noise_level") if variant == X4 else None,
        )
        return LoadedModel(
            family=self.name,
            path=path,
            defaults=defaults,
            device=device,
            dtype=dtype,
            pipelines={Mode.UPSCALE: pipe},
            samplers=sampler_menu(pipe, self),
            supports_lora=self.lora,
            variant=variant,
        )

    def run(
        self, loaded: LoadedModel, request: ResolvedRequest, ctx: RunContext
    ) -> list[Image.Image]:
        variant = loaded.variant
        pipe = loaded.pipelines[Mode.UPSCALE]
        check_noise_level(pipe, variant, request.noise_level)
        assert request.request.image is not None  # the upscale task requires one
        image = request.request.image.convert("RGB")
        source = pad_to_geometry(image, *input_geometry(pipe, variant))
        count = len(request.seeds)
        kwargs: dict[str, Any] = {
            "prompt": [request.prompt] * count,
            "negative_prompt": [request.negative_prompt] * count if request.negative_prompt
            else None,
            "image": [source] * count,
            "num_inference_steps": request.steps,
            "guidance_scale": request.guidance,
            "generator": cpu_generators(request.seeds),
            "output_type": "pil",
            # Both pipelines only have the older per-step callback API.
            "callback": stage_callback(ctx, "upscale", request.steps,
                                       lambda latents: vae_preview(pipe, latents)),
            "callback_steps": 1,
        }
        if variant == X4:
            kwargs["noise_level"] = request.noise_level
        factor = FACTORS[variant]
        return crop_outputs(pipe(**kwargs).images, (image.width * factor, image.height * factor))
