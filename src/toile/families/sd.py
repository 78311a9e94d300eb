"""Stable Diffusion 1.x / 2.x: diffusers ``StableDiffusionPipeline`` folders and single files.

A 4-channel U-Net runs txt2img, img2img and inpaint (diffusers blends latents for inpainting
with a regular checkpoint); a 9-channel U-Net is an inpainting checkpoint and runs inpaint only.

A single ``.safetensors`` file in the CompVis layout (``model.diffusion_model.*``,
``first_stage_model.*``, ``cond_stage_model.*``: ``v1-5-pruned-emaonly.safetensors`` and most
community checkpoints) loads through ``from_single_file`` with the diffusers configs found
beside it (:mod:`toile.families.single_file`); the variant is read from those configs.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from toile.families.base import LoadedModel
from toile.families.clip_prompts import with_weighted_prompts
from toile.families.diffusers_common import (
    base_kwargs,
    derive,
    load_pipeline,
    loras_applied,
    mode_kwargs,
    pipeline_class_name,
    read_component_config,
    sampler_menu,
    step_callback,
    vae_preview,
)
from toile.families.single_file import (
    SingleFileLayout,
    configs_of,
    is_single_file,
    load_file_pipeline,
)
from toile.request import FamilyDefaults, Mode

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from toile.progress import RunContext
    from toile.request import ResolvedRequest

SD_PIPELINES = frozenset(
    {"StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline"}
)
ALL_MODES = frozenset({Mode.TXT2IMG, Mode.IMG2IMG, Mode.INPAINT, Mode.OUTPAINT})
INPAINT_MODES = frozenset({Mode.INPAINT, Mode.OUTPAINT})
# CompVis layout: SD 1.x has ``cond_stage_model.transformer.*`` (CLIP), 2.x
# ``cond_stage_model.model.*`` (OpenCLIP). SDXL files have ``conditioner.`` instead.
SD_SINGLE_FILE = SingleFileLayout(
    title="SD 1.x/2.x",
    required=("cond_stage_model.", "model.diffusion_model.input_blocks."),
    reference="stable-diffusion-v1-5",
)


def unet_defaults(
    path: Path, *, steps: int, guidance: float, modes: frozenset[Mode]
) -> FamilyDefaults:
    """Size from the checkpoint's own configs, as diffusers derives its default size."""
    unet = read_component_config(path, "unet")
    vae = read_component_config(path, "vae")
    scale = 2 ** (len(vae.get("block_out_channels", [0, 0, 0, 0])) - 1)
    sample = unet.get("sample_size", 64)
    side = (sample if isinstance(sample, int) else sample[0]) * scale
    return FamilyDefaults(
        modes=modes,
        width=side,
        height=side,
        steps=steps,
        guidance=guidance,
        size_multiple=scale,
        min_side=scale,
    )


class StableDiffusionFamily:
    name = "sd"
    # CLIP text encoders: A1111 emphasis weights and long prompts apply (clip_prompts).
    prompt_weights = True
    typical_scheduler = "PNDMScheduler"  # what its published checkpoints declare
    title = "Stable Diffusion 1.x / 2.x"
    capabilities: ClassVar[dict[str, frozenset[Mode]]] = {
        "": ALL_MODES,
        "inpainting": INPAINT_MODES,
    }
    lora = True

    def detect(self, path: Path) -> bool:
        if path.is_file():
            return is_single_file(path, SD_SINGLE_FILE)
        return pipeline_class_name(path) in SD_PIPELINES

    def variant(self, path: Path) -> str:
        unet = read_component_config(configs_of(path, SD_SINGLE_FILE), "unet")
        return "inpainting" if unet.get("in_channels") == 9 else ""

    def load(self, path: Path, device: str, dtype: torch.dtype) -> LoadedModel:
        from diffusers import (
            StableDiffusionImg2ImgPipeline,
            StableDiffusionInpaintPipeline,
            StableDiffusionPipeline,
        )

        config = configs_of(path, SD_SINGLE_FILE)
        variant = self.variant(path)
        inpaint_checkpoint = variant == "inpainting"
        modes = self.capabilities[variant]
        # No safety checker: toile's own safety layer decides; diffusers would black out images.
        base_cls = StableDiffusionInpaintPipeline if inpaint_checkpoint else StableDiffusionPipeline
        options: dict[str, Any] = {"safety_checker": None, "requires_safety_checker": False}
        if path.is_file():
            base = load_file_pipeline(base_cls, path, config, device, dtype, **options)
        else:
            base = load_pipeline(base_cls, path, device, dtype, **options)
        pipelines: dict[Mode, Any] = {Mode.INPAINT: derive(StableDiffusionInpaintPipeline, base)}
        if not inpaint_checkpoint:
            pipelines[Mode.TXT2IMG] = base
            pipelines[Mode.IMG2IMG] = derive(StableDiffusionImg2ImgPipeline, base)
        return LoadedModel(
            family=self.name,
            path=path,
            defaults=unet_defaults(config, steps=50, guidance=7.5, modes=modes),
            device=device,
            dtype=dtype,
            pipelines=pipelines,
            samplers=sampler_menu(base, self),
            supports_lora=True,
            variant=variant,
        )

    def run(
        self, loaded: LoadedModel, request: ResolvedRequest, ctx: RunContext
    ) -> list[Image.Image]:
        return run_unet_pipeline(loaded, request, ctx)


def run_unet_pipeline(
    loaded: LoadedModel, request: ResolvedRequest, ctx: RunContext, **extra: Any
) -> list[Image.Image]:
    """Run the pipeline for the request's mode (shared by SD and SDXL)."""
    pipe = loaded.pipelines[request.mode]
    kwargs = with_weighted_prompts(pipe, base_kwargs(request) | mode_kwargs(request) | extra)
    if request.mode is Mode.TXT2IMG:
        kwargs["width"], kwargs["height"] = request.width, request.height
    with loras_applied(pipe, request.request.loras):
        output = pipe(**kwargs, callback_on_step_end=step_callback(ctx, preview=vae_preview))
    return [image.convert("RGB") for image in output.images]
