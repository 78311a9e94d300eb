"""FLUX.1 (diffusers ``FluxPipeline`` / ``FluxFillPipeline`` / ``FluxKontextPipeline``
folders): dev, schnell, Fill and Kontext.

Which variant a folder holds is read from its configs, not from its name:

- **Kontext** — the model_index names ``FluxKontextPipeline`` (its transformer is shaped like
  dev's: the input image enters as extra tokens, not channels). The edit task, and txt2img
  (Kontext without an input image); 28 steps (the pipeline's default), guidance 2.5 (the
  FLUX.1-Kontext-dev model card's example), T5 sequence length 512.

- **Fill** — the transformer's ``in_channels`` is not 4 x the VAE's latent channels: besides the
  2x2-packed latents it takes the packed masked-image latents and the packed mask
  (16 x 4 + 16 x 4 + 8 x 8 x 4 = 384 for the real model). Inpaint and outpaint only; 50 steps,
  guidance 30, as diffusers' ``FluxFillPipeline`` and BFL's examples use it.
- **schnell** — ``guidance_embeds: false`` (timestep-distilled, no guidance input): 4 steps,
  guidance 0, T5 sequence length 256, as BFL ship it.
- **dev** — everything else: 28 steps, guidance 3.5, T5 sequence length 512.

dev and schnell run txt2img (``FluxPipeline``), img2img (``FluxImg2ImgPipeline``) and inpaint /
outpaint (``FluxInpaintPipeline``, which blends the re-noised input latents outside the mask at
every step), all sharing one set of weights.

Decisions:

- **No negative prompt.** FLUX.1's guidance is distilled into the model (a guidance embedding),
  not classifier-free guidance, so there is nothing for a negative prompt to steer. diffusers
  can run "true CFG" for the base pipelines (``true_cfg_scale`` with a negative prompt), but
  that doubles the cost, needs a second guidance value that the request has no field for (its
  ``guidance`` already means the distilled guidance) and is missing from ``FluxFillPipeline``.
  A request with a negative prompt is therefore a ``RequestError`` on ``negative_prompt``
  rather than silently ignored.
- **schnell ignores guidance**: it has no guidance input; the value is recorded as given.
- **Sizes**: the default is ``default_sample_size`` (128) x the VAE scale factor, as diffusers
  computes it (1024 for the real models); sizes must be multiples of the VAE scale x 2 because
  latents are packed in 2x2 patches.
- **Strength**: img2img defaults to 0.6 (``FluxImg2ImgPipeline``'s default); inpaint / outpaint
  default to 1.0 so the masked area is repainted from noise, as in toile's other families. Any
  strength > 0 runs at least one step (Flux counts ``steps - int(steps x (1 - strength))``).
- **Unmasked pixels** come back exactly: the engine overlays the input outside the mask for
  every family (neither the VAE round trip of ``FluxInpaintPipeline`` nor Fill, which repaints
  the whole image conditioned on the masked input, would keep them bit for bit).
- **Kontext sizes**: the edit's output is the resolved size (the input's, rounded down to the
  multiple, unless width/height are given) and the input image goes in at its own size rounded
  down (``_auto_resize=False``: no snapping to Kontext's preferred resolutions). diffusers
  also rescales every request to ``max_area`` pixels (default 1024²), so toile passes
  ``max_area = width x height``: the size asked for is the size made.
- **Previews**: the latents in the step callback are packed ``[B, tokens, C x 4]``; the preview
  unpacks them with the pipeline's own ``_unpack_latents``, undoes the VAE scaling and shift
  (``latents / scaling_factor + shift_factor``, as the pipeline does before decoding) and
  decodes the first image.
- **LoRA** through diffusers' ``FluxLoraLoaderMixin`` (diffusers / kohya / BFL key layouts).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from toile.errors import ModelFormatError, RequestError
from toile.families.base import LoadedModel
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
)
from toile.request import Mode
from toile.resolve import FamilyDefaults

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from toile.progress import RunContext
    from toile.resolve import ResolvedRequest

KONTEXT_PIPELINE = "FluxKontextPipeline"
FLUX_PIPELINES = frozenset(
    {
        "FluxPipeline",
        "FluxImg2ImgPipeline",
        "FluxInpaintPipeline",
        "FluxFillPipeline",
        KONTEXT_PIPELINE,
    }
)
ALL_MODES = frozenset({Mode.TXT2IMG, Mode.IMG2IMG, Mode.INPAINT, Mode.OUTPAINT})
INPAINT_MODES = frozenset({Mode.INPAINT, Mode.OUTPAINT})
KONTEXT_MODES = frozenset({Mode.TXT2IMG, Mode.EDIT})


@dataclass(frozen=True)
class VariantSettings:
    """What a FLUX.1 variant runs with by default (diffusers' and BFL's published settings)."""

    steps: int
    guidance: float
    max_sequence_length: int
    modes: frozenset[Mode]
    strength: float = 0.6


VARIANTS: dict[str, VariantSettings] = {
    "dev": VariantSettings(steps=28, guidance=3.5, max_sequence_length=512, modes=ALL_MODES),
    "schnell": VariantSettings(steps=4, guidance=0.0, max_sequence_length=256, modes=ALL_MODES),
    "fill": VariantSettings(steps=50, guidance=30.0, max_sequence_length=512, modes=INPAINT_MODES),
    "kontext": VariantSettings(
        steps=28, guidance=2.5, max_sequence_length=512, modes=KONTEXT_MODES
    ),
}


def flux_variant(path: Path) -> str:
    """``"kontext"`` (from the model_index's pipeline class), else ``"fill"``, ``"schnell"`` or
    ``"dev"``, from the transformer and VAE configs.

    The Fill transformer's input is the packed latents + the packed masked-image latents + the
    packed mask at full VAE resolution: ``8 x latent + 4 x scale**2`` channels. Anything that is
    neither that nor ``4 x latent`` (e.g. a Canny/Depth control transformer saved as a
    FluxPipeline) is refused by name instead of failing inside the transformer.
    """
    transformer = read_component_config(path, "transformer")
    vae = read_component_config(path, "vae")
    latent = int(vae.get("latent_channels", 16))
    scale = 2 ** (len(vae.get("block_out_channels", [0, 0, 0, 0])) - 1)
    in_channels = int(transformer.get("in_channels", 4 * latent))
    if in_channels == 4 * latent:
        if pipeline_class_name(path) == KONTEXT_PIPELINE:
            return "kontext"
        return "dev" if transformer.get("guidance_embeds", True) else "schnell"
    if in_channels == 8 * latent + 4 * scale * scale:
        return "fill"
    raise ModelFormatError(
        f"{path / 'transformer' / 'config.json'}: in_channels={in_channels} matches neither a "
        f"FLUX.1 dev/schnell transformer ({4 * latent}) nor FLUX.1 Fill "
        f"({8 * latent + 4 * scale * scale}) for a VAE with {latent} latent channels"
    )


def packed_preview(width: int, height: int) -> Callable[[Any, torch.Tensor], Image.Image | None]:
    """A step-callback preview for Flux's packed latents (see the module docstring)."""

    def preview(pipe: Any, latents: torch.Tensor) -> Image.Image | None:
        import torch

        if latents.ndim != 3:
            return None
        vae = pipe.vae
        with torch.no_grad():
            unpacked = pipe._unpack_latents(latents[:1], height, width, pipe.vae_scale_factor)
            unpacked = unpacked / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
            image = vae.decode(unpacked.to(vae.dtype), return_dict=False)[0]
        return pipe.image_processor.postprocess(image, output_type="pil")[0]

    return preview


class FluxFamily:
    name = "flux"
    typical_scheduler = "FlowMatchEulerDiscreteScheduler"  # what its published checkpoints declare
    # Its pipelines hand their own sigmas to set_timesteps: only schedulers taking them apply.
    pipeline_passes_sigmas = True
    title = "FLUX.1"
    capabilities: ClassVar[dict[str, frozenset[Mode]]] = {
        name: settings.modes for name, settings in VARIANTS.items()
    }
    lora = True
    gpu_dtype = "bfloat16"  # FLUX.1 activations overflow float16
    # Its transformer places patches by position (rotary embeddings; the patch embedding is a
    # linear layer): a circular VAE alone would not make the picture wrap around (tiling.py).
    tiling = False

    def detect(self, path: Path) -> bool:
        return pipeline_class_name(path) in FLUX_PIPELINES

    def variant(self, path: Path) -> str:
        return flux_variant(path)

    def load(self, path: Path, device: str, dtype: torch.dtype) -> LoadedModel:
        from diffusers import (
            FluxFillPipeline,
            FluxImg2ImgPipeline,
            FluxInpaintPipeline,
            FluxKontextPipeline,
            FluxPipeline,
        )

        variant = self.variant(path)
        settings = VARIANTS[variant]
        if variant == "fill":
            base = load_pipeline(FluxFillPipeline, path, device, dtype)
            pipelines: dict[Mode, Any] = {Mode.INPAINT: base}
        elif variant == "kontext":
            # One pipeline for both: without an input image Kontext generates from the prompt.
            base = load_pipeline(FluxKontextPipeline, path, device, dtype)
            pipelines = {Mode.TXT2IMG: base, Mode.EDIT: base}
        else:
            base = load_pipeline(FluxPipeline, path, device, dtype)
            pipelines = {
                Mode.TXT2IMG: base,
                Mode.IMG2IMG: derive(FluxImg2ImgPipeline, base),
                Mode.INPAINT: derive(FluxInpaintPipeline, base),
            }
        # The pipeline's own default size and packing multiple, so toile agrees with diffusers.
        scale = int(base.vae_scale_factor)
        side = int(getattr(base, "default_sample_size", 128)) * scale
        defaults = FamilyDefaults(
            modes=settings.modes,
            width=side,
            height=side,
            steps=settings.steps,
            guidance=settings.guidance,
            strength=settings.strength,
            inpaint_strength=1.0,
            size_multiple=scale * 2,
            min_side=scale * 2,
            image_guidance=None,  # Kontext's input image enters as tokens, not by a guidance
        )
        return LoadedModel(
            family=self.name,
            path=path,
            defaults=defaults,
            device=device,
            dtype=dtype,
            pipelines=pipelines,
            samplers=sampler_menu(base, self),
            supports_lora=self.lora,
            variant=variant,
        )

    def run(
        self, loaded: LoadedModel, request: ResolvedRequest, ctx: RunContext
    ) -> list[Image.Image]:
        refuse_unsupported(request)
        pipe = loaded.pipelines[request.mode]
        kwargs = base_kwargs(request, negative=False) | mode_kwargs(request)
        # Always pass the size: Flux's img2img pipeline would otherwise resize the input to
        # its 1024 default instead of keeping the image's own size.
        kwargs["width"], kwargs["height"] = request.width, request.height
        kwargs["max_sequence_length"] = VARIANTS[loaded.variant].max_sequence_length
        if loaded.variant == "kontext":
            kwargs |= kontext_kwargs(request)
        callback = step_callback(ctx, preview=packed_preview(request.width, request.height))
        with loras_applied(pipe, request.request.loras):
            output = pipe(**kwargs, callback_on_step_end=callback)
        return [image.convert("RGB") for image in output.images]


def refuse_unsupported(request: ResolvedRequest) -> None:
    """Inputs FLUX.1 has no use for are errors, not silently ignored (see the docstring)."""
    if request.negative_prompt:
        raise RequestError(
            "negative_prompt",
            "FLUX.1 has no negative prompt (its guidance is distilled into the model, not "
            "classifier-free); leave it empty and describe what you want in the prompt",
        )
    if request.request.image_guidance is not None:
        raise RequestError(
            "image_guidance",
            "FLUX.1 Kontext has no image guidance (the input image enters as tokens, not by "
            "a guidance scale); leave it unset",
        )


def kontext_kwargs(request: ResolvedRequest) -> dict[str, Any]:
    """FluxKontextPipeline's extra inputs: the image to edit (none for txt2img), kept at its
    own size, and ``max_area`` equal to the size asked for so that it is not rescaled (see the
    module docstring)."""
    kwargs: dict[str, Any] = {"max_area": request.width * request.height, "_auto_resize": False}
    if request.mode is Mode.EDIT:
        assert request.request.image is not None  # GenerationRequest checked it
        kwargs["image"] = request.request.image.convert("RGB")
    return kwargs
