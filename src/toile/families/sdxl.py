"""Stable Diffusion XL: base, refiner and inpainting checkpoints.

Three layouts share one family because they share one set of diffusers pipelines:

- **base** (``StableDiffusionXLPipeline``, two text encoders): txt2img, img2img, inpaint and
  outpaint (diffusers blends latents for inpainting with a regular 4-channel U-Net);
- **refiner** (no ``text_encoder``, ``requires_aesthetics_score``): it was trained only on the
  low-noise end of the schedule to polish existing images, so it runs img2img / inpaint /
  outpaint and txt2img is refused by its declared modes instead of producing mush;
- **inpainting** (9-channel U-Net): inpaint and outpaint only, like SD's inpainting checkpoints.
- **instruct-pix2pix** (``StableDiffusionXLInstructPix2PixPipeline``, 8-channel U-Net: latents +
  the input image's latents): the edit task only, with that pipeline's own call defaults.

A request with a ``refiner`` runs SDXL's ensemble of expert denoisers: the base takes the
high-noise part of the schedule and hands its latents to the refiner for the rest
(:meth:`SDXLFamily.run_with_refiner`), in txt2img, img2img, inpaint and outpaint.

Besides diffusers folders, a single ``.safetensors`` file in the original Stability layout (the
one A1111 and ComfyUI share: ``conditioner.embedders.*``, ``model.diffusion_model.*``,
``first_stage_model.*``) is loaded through diffusers' ``from_single_file`` with the configs
found beside it (:mod:`toile.families.single_file`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from toile.errors import RequestError
from toile.families.base import LoadedModel
from toile.families.clip_prompts import scheduled_prompt_kwargs, steps_run
from toile.families.diffusers_common import (
    base_kwargs,
    derive,
    load_pipeline,
    loras_applied,
    mode_kwargs,
    read_component_config,
    read_model_index,
    sampler_menu,
    step_callback,
    vae_preview,
)
from toile.families.sd import (
    ALL_MODES,
    EDIT_MODES,
    INPAINT_MODES,
    IP2P,
    edit_defaults,
    run_unet_pipeline,
    unet_defaults,
)
from toile.families.single_file import (
    SingleFileLayout,
    configs_of,
    is_single_file,
    load_file_pipeline,
)
from toile.families.tiling import tiled
from toile.request import Mode

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from toile.progress import RunContext
    from toile.resolve import ResolvedRequest

IP2P_PIPELINE = "StableDiffusionXLInstructPix2PixPipeline"
SDXL_PIPELINES = frozenset(
    {
        "StableDiffusionXLPipeline",
        "StableDiffusionXLImg2ImgPipeline",
        "StableDiffusionXLInpaintPipeline",
        IP2P_PIPELINE,
    }
)
REFINER_MODES = frozenset({Mode.IMG2IMG, Mode.INPAINT, Mode.OUTPAINT})
DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 5.0  # diffusers' StableDiffusionXLPipeline default

# The original SDXL layout: both prefixes must be present. SD 1.x/2.x files use
# ``cond_stage_model.`` instead of ``conditioner.``, SD3 files ``text_encoders.``.
SDXL_SINGLE_FILE = SingleFileLayout(
    title="SDXL",
    required=("conditioner.embedders.", "model.diffusion_model."),
    reference="stable-diffusion-xl-base-1.0",
)


def checkpoint_kind(config_folder: Path) -> str:
    """The base ("") or "refiner" / "inpainting" / "instruct-pix2pix", from a diffusers
    layout's model_index and U-Net config.

    The refiner is recognised the way diffusers builds it: no first text encoder, and time ids
    that carry an aesthetic score instead of a target size. InstructPix2Pix by its pipeline
    class, or its 8-channel U-Net.
    """
    index = read_model_index(config_folder) or {}
    in_channels = read_component_config(config_folder, "unet").get("in_channels")
    if index.get("_class_name") == IP2P_PIPELINE or in_channels == 8:
        return IP2P
    text_encoder = index.get("text_encoder")
    no_text_encoder = not isinstance(text_encoder, list) or text_encoder[0] is None
    if index.get("requires_aesthetics_score") or no_text_encoder:
        return "refiner"
    if in_channels == 9:
        return "inpainting"
    return ""


class SDXLFamily:
    name = "sdxl"
    # CLIP text encoders: A1111 emphasis weights and long prompts apply (clip_prompts).
    prompt_weights = True
    # A1111 prompt editing / alternation: embeddings switched between steps, the refiner's
    # steps continuing the base's count (clip_prompts).
    prompt_editing = True
    typical_scheduler = "EulerDiscreteScheduler"  # what its published checkpoints declare
    title = "Stable Diffusion XL"
    capabilities: ClassVar[dict[str, frozenset[Mode]]] = {
        "": ALL_MODES,
        "refiner": REFINER_MODES,
        "inpainting": INPAINT_MODES,
        IP2P: EDIT_MODES,
    }
    lora = True
    tiling = True  # U-Net and VAE are convolutional: circular padding tiles (tiling.py)

    def detect(self, path: Path) -> bool:
        if path.is_file():
            return is_single_file(path, SDXL_SINGLE_FILE)
        index = read_model_index(path)
        name = None if index is None else index.get("_class_name")
        return isinstance(name, str) and name in SDXL_PIPELINES

    def variant(self, path: Path) -> str:
        """The base ("") or "refiner" / "inpainting" / "instruct-pix2pix"; a single file is
        judged by its configs."""
        return checkpoint_kind(configs_of(path, SDXL_SINGLE_FILE))

    def load(self, path: Path, device: str, dtype: torch.dtype) -> LoadedModel:
        from diffusers import (
            StableDiffusionXLImg2ImgPipeline,
            StableDiffusionXLInpaintPipeline,
            StableDiffusionXLInstructPix2PixPipeline,
            StableDiffusionXLPipeline,
        )

        config = configs_of(path, SDXL_SINGLE_FILE)
        kind = checkpoint_kind(config)
        base_cls = {
            "": StableDiffusionXLPipeline,
            "refiner": StableDiffusionXLImg2ImgPipeline,
            "inpainting": StableDiffusionXLInpaintPipeline,
            IP2P: StableDiffusionXLInstructPix2PixPipeline,
        }[kind]
        # No invisible watermark from diffusers: toile's safety layer owns watermarking and
        # provenance, and a second, silent one would also break parity with plain diffusers.
        options: dict[str, Any] = {"add_watermarker": False}
        if path.is_file():
            base = load_file_pipeline(base_cls, path, config, device, dtype, **options)
        else:
            base = load_pipeline(base_cls, path, device, dtype, **options)

        def role(cls: Any) -> Any:
            # from_pipe shares the loaded weights; the base pipeline serves its own role.
            return base if type(base) is cls else derive(cls, base, **options)

        modes = self.capabilities[kind]
        defaults = unet_defaults(
            config, steps=DEFAULT_STEPS, guidance=DEFAULT_GUIDANCE, modes=modes
        )
        if kind == IP2P:
            # The 8-channel U-Net fits no other SDXL pipeline: the edit is its only role.
            pipelines: dict[Mode, Any] = {Mode.EDIT: base}
            defaults = edit_defaults(defaults, base_cls)
        else:
            pipelines = {Mode.INPAINT: role(StableDiffusionXLInpaintPipeline)}
        if kind == "":
            pipelines[Mode.TXT2IMG] = base
        if kind in ("", "refiner"):
            pipelines[Mode.IMG2IMG] = role(StableDiffusionXLImg2ImgPipeline)
        return LoadedModel(
            family=self.name,
            path=path,
            defaults=defaults,
            device=device,
            dtype=dtype,
            pipelines=pipelines,
            samplers=sampler_menu(base, self),
            supports_lora=True,
            variant=kind,
        )

    def run(
        self, loaded: LoadedModel, request: ResolvedRequest, ctx: RunContext
    ) -> list[Image.Image]:
        return run_unet_pipeline(loaded, request, ctx)

    def run_with_refiner(
        self, base: LoadedModel, refiner: LoadedModel, request: ResolvedRequest, ctx: RunContext
    ) -> list[Image.Image]:
        """SDXL's ensemble of expert denoisers (Podell et al. 2023, "SDXL", section 2.5).

        The base denoises the first ``request.refiner_switch`` of the schedule and returns
        latents (``denoising_end``); the refiner, trained on low noise levels only, continues
        from exactly that timestep (``denoising_start``) with the same generators, so a seed
        still fixes the image. Both use ``request.steps`` as the full schedule's length, as in
        diffusers' example, so the two together run about ``steps`` steps. LoRAs apply to the
        base only (a base LoRA does not fit the refiner's U-Net).

        img2img and inpaint hand off the same way, as diffusers documents them: the base runs
        its mode from ``strength`` down to the switch (resolve() refused a strength that would
        leave it no step), and the refiner's img2img (or inpaint, with the mask) finishes the
        latents; strength then no longer applies to the refiner.
        """
        if request.mode is Mode.EDIT:
            # An edit's latents are conditioned on the input image at every step; a refiner
            # (img2img / inpaint) would finish them without it.
            raise RequestError("refiner", "the edit task runs without a refiner; leave it unset")
        switch = request.refiner_switch
        assert switch is not None, "resolve() sets refiner_switch when a refiner is named"
        second_role = Mode.INPAINT if request.mode is Mode.INPAINT else Mode.IMG2IMG
        refiner_pipe = refiner.pipelines.get(second_role)
        if refiner_pipe is None:
            raise RequestError(
                "refiner",
                f"{refiner.path} is an SDXL {refiner.variant or 'base'} checkpoint without "
                f"{second_role}; the refiner must be an SDXL refiner (or base) checkpoint",
            )
        base_pipe = base.pipelines[request.mode]
        kwargs = base_kwargs(request)
        inputs = mode_kwargs(request)
        if request.mode is Mode.TXT2IMG:
            inputs = {"width": request.width, "height": request.height}
        # Tiling inside the LoRAs (their peft layers wrap the convolutions), and around both
        # models: the refiner must keep the wrap-around the base began.
        with loras_applied(base_pipe, request.request.loras), tiled(request, base_pipe):
            base_prompts, base_swap = scheduled_prompt_kwargs(base_pipe, kwargs, request.steps)
            latents = base_pipe(
                **base_prompts | inputs | {"output_type": "latent"},
                denoising_end=switch,
                callback_on_step_end=step_callback(ctx, "base", preview=vae_preview,
                                                   then=base_swap),
            ).images
        finish: dict[str, Any] = {"image": latents}
        if request.mode is Mode.INPAINT:
            finish |= {k: inputs[k] for k in ("mask_image", "width", "height")}
        # The prompt is encoded again by the refiner's own encoder; an editing schedule goes on
        # counting from the steps the base ran (A1111 switches models inside one count).
        refiner_prompts, refiner_swap = scheduled_prompt_kwargs(
            refiner_pipe, kwargs, request.steps, offset=steps_run(base_pipe))
        with tiled(request, refiner_pipe):
            output = refiner_pipe(
                # the same generator objects continue where the base left them
                **refiner_prompts,
                **finish,
                denoising_start=switch,
                callback_on_step_end=step_callback(ctx, "refiner", preview=vae_preview,
                                                   then=refiner_swap),
            )
        return [image.convert("RGB") for image in output.images]
