"""Stable Diffusion 1.x / 2.x: diffusers ``StableDiffusionPipeline`` folders and single files.

A 4-channel U-Net runs txt2img, img2img and inpaint (diffusers blends latents for inpainting
with a regular checkpoint); a 9-channel U-Net is an inpainting checkpoint and runs inpaint only;
an 8-channel one (latents + the input image's latents) is InstructPix2Pix and runs the edit task
only, with ``StableDiffusionInstructPix2PixPipeline`` and that pipeline's own call defaults.

A single ``.safetensors`` file in the CompVis layout (``model.diffusion_model.*``,
``first_stage_model.*``, ``cond_stage_model.*``: ``v1-5-pruned-emaonly.safetensors`` and most
community checkpoints) loads through ``from_single_file`` with the diffusers configs found
beside it (:mod:`toile.families.single_file`); the variant is read from those configs.
"""

from __future__ import annotations

import inspect
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from toile.families.base import LoadedModel
from toile.families.clip_prompts import scheduled_prompt_kwargs, with_weighted_prompts
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
from toile.families.tiling import tiled
from toile.request import Mode
from toile.resolve import FamilyDefaults

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch
    from PIL import Image

    from toile.progress import RunContext
    from toile.resolve import ResolvedRequest

IP2P_PIPELINE = "StableDiffusionInstructPix2PixPipeline"
SD_PIPELINES = frozenset(
    {
        "StableDiffusionPipeline",
        "StableDiffusionImg2ImgPipeline",
        "StableDiffusionInpaintPipeline",
        IP2P_PIPELINE,
    }
)
ALL_MODES = frozenset({Mode.TXT2IMG, Mode.IMG2IMG, Mode.INPAINT, Mode.OUTPAINT})
INPAINT_MODES = frozenset({Mode.INPAINT, Mode.OUTPAINT})
EDIT_MODES = frozenset({Mode.EDIT})
IP2P = "instruct-pix2pix"  # the variant name, in SD and SDXL alike
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


def edit_defaults(defaults: FamilyDefaults, pipeline_cls: Any) -> FamilyDefaults:
    """``defaults`` with the edit pipeline's own ``__call__`` defaults (InstructPix2Pix: 100
    steps, guidance 7.5 or 5.0, image guidance 1.5), read from diffusers so toile follows it."""
    parameters = inspect.signature(pipeline_cls.__call__).parameters
    return replace(
        defaults,
        steps=parameters["num_inference_steps"].default,
        guidance=parameters["guidance_scale"].default,
        image_guidance=parameters["image_guidance_scale"].default,
    )


class StableDiffusionFamily:
    name = "sd"
    # CLIP text encoders: A1111 emphasis weights and long prompts apply (clip_prompts).
    prompt_weights = True
    # A1111 prompt editing / alternation: embeddings switched between steps (clip_prompts).
    prompt_editing = True
    typical_scheduler = "PNDMScheduler"  # what its published checkpoints declare
    title = "Stable Diffusion 1.x / 2.x"
    capabilities: ClassVar[dict[str, frozenset[Mode]]] = {
        "": ALL_MODES,
        "inpainting": INPAINT_MODES,
        IP2P: EDIT_MODES,
    }
    lora = True
    tiling = True  # U-Net and VAE are convolutional: circular padding tiles (tiling.py)

    def detect(self, path: Path) -> bool:
        if path.is_file():
            return is_single_file(path, SD_SINGLE_FILE)
        return pipeline_class_name(path) in SD_PIPELINES

    def variant(self, path: Path) -> str:
        config = configs_of(path, SD_SINGLE_FILE)
        in_channels = read_component_config(config, "unet").get("in_channels")
        # The pipeline class names InstructPix2Pix in a folder; its 8-channel U-Net (latents
        # + the input image's latents) tells it apart in any layout.
        if pipeline_class_name(config) == IP2P_PIPELINE or in_channels == 8:
            return IP2P
        return "inpainting" if in_channels == 9 else ""

    def load(self, path: Path, device: str, dtype: torch.dtype) -> LoadedModel:
        from diffusers import (
            StableDiffusionImg2ImgPipeline,
            StableDiffusionInpaintPipeline,
            StableDiffusionInstructPix2PixPipeline,
            StableDiffusionPipeline,
        )

        config = configs_of(path, SD_SINGLE_FILE)
        variant = self.variant(path)
        modes = self.capabilities[variant]
        base_cls = {
            "": StableDiffusionPipeline,
            "inpainting": StableDiffusionInpaintPipeline,
            IP2P: StableDiffusionInstructPix2PixPipeline,
        }[variant]
        # No safety checker: toile's own safety layer decides; diffusers would black out images.
        options: dict[str, Any] = {"safety_checker": None, "requires_safety_checker": False}
        if path.is_file():
            base = load_file_pipeline(base_cls, path, config, device, dtype, **options)
        else:
            base = load_pipeline(base_cls, path, device, dtype, **options)
        defaults = unet_defaults(config, steps=50, guidance=7.5, modes=modes)
        if variant == IP2P:
            # The 8-channel U-Net fits no other SD pipeline: the edit is its only role.
            pipelines: dict[Mode, Any] = {Mode.EDIT: base}
            defaults = edit_defaults(defaults, base_cls)
        else:
            pipelines = {Mode.INPAINT: derive(StableDiffusionInpaintPipeline, base)}
        if variant == "":
            pipelines[Mode.TXT2IMG] = base
            pipelines[Mode.IMG2IMG] = derive(StableDiffusionImg2ImgPipeline, base)
        return LoadedModel(
            family=self.name,
            path=path,
            defaults=defaults,
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
    if request.mode is Mode.EDIT:
        return run_edit_pipeline(loaded, request, ctx)
    pipe = loaded.pipelines[request.mode]
    kwargs = base_kwargs(request) | mode_kwargs(request) | extra
    if request.mode is Mode.TXT2IMG:
        kwargs["width"], kwargs["height"] = request.width, request.height
    # Tiling inside the LoRAs: their peft layers wrap the convolutions that must pad circularly.
    with loras_applied(pipe, request.request.loras), tiled(request, pipe):
        # Encoded with the LoRAs applied, as the pipeline encodes a plain prompt; a prompt
        # with A1111 editing gets its switch of embeddings after each step.
        kwargs, switch = scheduled_prompt_kwargs(pipe, kwargs, request.steps)
        callback = step_callback(ctx, preview=vae_preview, then=switch)
        output = pipe(**kwargs, callback_on_step_end=callback)
    return [image.convert("RGB") for image in output.images]


def run_edit_pipeline(
    loaded: LoadedModel, request: ResolvedRequest, ctx: RunContext
) -> list[Image.Image]:
    """InstructPix2Pix (SD's or SDXL's pipeline): the instruction is the prompt, the input
    image is given at the resolved size, and ``image_guidance`` is its image guidance scale."""
    refuse_prompt_editing(request, "the edit task (InstructPix2Pix)")
    pipe = loaded.pipelines[Mode.EDIT]
    kwargs = base_kwargs(request) | {
        # one copy per output image: diffusers deprecates repeating a single input itself
        "image": [edit_input(pipe, request)] * len(request.seeds),
        "image_guidance_scale": request.image_guidance,
    }
    parameters = inspect.signature(pipe.__call__).parameters
    if "height" in parameters:
        # SDXL's pipeline would otherwise resize the input to its default size (1024).
        kwargs["width"], kwargs["height"] = request.width, request.height
    if "callback_on_step_end" in parameters:
        kwargs["callback_on_step_end"] = step_callback(ctx, preview=vae_preview)
    else:  # SDXL's InstructPix2Pix still has only the older per-step callback
        kwargs["callback"] = legacy_step_callback(pipe, ctx, request.steps)
    kwargs = with_weighted_prompts(pipe, kwargs)
    with loras_applied(pipe, request.request.loras):
        output = pipe(**kwargs)
    return [image.convert("RGB") for image in output.images]


def refuse_prompt_editing(request: ResolvedRequest, where: str) -> None:
    """A RequestError naming the prompt that uses A1111 editing or alternation, for a run that
    cannot switch its conditioning between steps."""
    from toile.errors import RequestError
    from toile.prompt_syntax import has_editing

    req = request.request
    for name, text in (("prompt", req.prompt), ("negative_prompt", req.negative_prompt)):
        if has_editing(text):
            raise RequestError(
                name, f"A1111 prompt editing and alternation are not supported in {where}: its "
                "pipeline cannot switch the conditioning between steps; remove them (escape "
                "literal brackets as \\[ \\])",
            )


def edit_input(pipe: Any, request: ResolvedRequest) -> Image.Image:
    """The input image at the output size: InstructPix2Pix concatenates its latents with the
    noise latents, so the two sizes are one. Resized with the pipeline's own image processor,
    as diffusers resizes an input that is not a multiple of its VAE's scale (so the default
    size — the input's, rounded down — gives diffusers' pixels exactly)."""
    image = request.request.image
    assert image is not None  # GenerationRequest checked it
    image = image.convert("RGB")
    if image.size != (request.width, request.height):
        image = pipe.image_processor.resize(image, request.height, request.width)
    return image


def legacy_step_callback(
    pipe: Any, ctx: RunContext, total: int
) -> Callable[[int, Any, torch.Tensor], None]:
    """Progress, previews and cancellation through a pipeline's older ``callback(step,
    timestep, latents)`` (called once per step, ``step`` counted from 0)."""

    def callback(step: int, timestep: Any, latents: torch.Tensor) -> None:
        def make_preview() -> Image.Image | None:
            return vae_preview(pipe, latents)

        ctx.on_step(step + 1, total, "denoise", make_preview, state=latents)

    return callback
