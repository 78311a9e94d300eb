"""Stable Diffusion 3 / 3.5: diffusers ``StableDiffusion3Pipeline`` folders and single files.

An MMDiT transformer under rectified flow, conditioned on two CLIP encoders (with projection)
and T5. The T5 slot may be ``null`` in ``model_index.json`` (a common way to save ~10 GB of
memory); diffusers then feeds zeros in its place, and toile runs the checkpoint as it is instead
of refusing it.

Single files in Stability's layout (``model.diffusion_model.joint_blocks.*``,
``first_stage_model.*``, ``text_encoders.clip_l|clip_g|t5xxl.*``) load through
``from_single_file`` with the diffusers configs found beside them
(:mod:`toile.families.single_file`). Components the file lacks come from that folder when it
holds their weights (``sd3_medium.safetensors`` has no text encoders). A file without T5 whose
folder has no T5 weights either (``sd3_medium_incl_clips.safetensors``) runs without T5, as
ComfyUI runs it: the ``no-t5`` variant.

Sizes must be multiples of the VAE scale times the transformer's patch size, because the image
is cut into whole patches of latents.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from toile.errors import ModelFormatError, UnsafeFileError
from toile.families.base import LoadedModel
from toile.families.diffusers_common import (
    derive,
    load_pipeline,
    pipeline_class_name,
    read_component_config,
    read_model_index,
    sampler_menu,
)
from toile.families.sd import ALL_MODES, INPAINT_MODES, run_unet_pipeline
from toile.families.single_file import (
    SingleFileLayout,
    configs_of,
    is_single_file,
    load_file_pipeline,
    tensor_names,
)
from toile.io.weights import ALLOWED_LIBRARIES
from toile.request import Mode
from toile.resolve import FamilyDefaults

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from toile.progress import RunContext
    from toile.resolve import ResolvedRequest

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
SD3_SINGLE_FILE = SingleFileLayout(
    title="SD3",
    required=("model.diffusion_model.joint_blocks.",),
    reference="stable-diffusion-3-medium-diffusers",
    denoiser="transformer",
)
# Where Stability's single files keep each text encoder, by diffusers component.
TEXT_ENCODER_PREFIXES = {
    "text_encoder": "text_encoders.clip_l.",
    "text_encoder_2": "text_encoders.clip_g.",
    "text_encoder_3": "text_encoders.t5xxl.",
}
T5_PREFIX = TEXT_ENCODER_PREFIXES["text_encoder_3"]


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
    """Whether the checkpoint runs with T5: its configs name a T5 encoder and, for a single
    file, the file or the config folder holds its weights."""
    config = configs_of(path, SD3_SINGLE_FILE)
    slot = (read_model_index(config) or {}).get("text_encoder_3")
    if not (isinstance(slot, list) and slot[0] is not None):
        return False
    if path.is_dir():
        return True
    in_file = any(name.startswith(T5_PREFIX) for name in tensor_names(path))
    return in_file or any((config / "text_encoder_3").glob("*.safetensors"))


def folder_text_encoders(path: Path, config: Path, dtype: torch.dtype) -> dict[str, Any]:
    """The text encoders a single file lacks, loaded from its config folder's weights.

    diffusers' ``from_single_file`` only looks in that folder for diffusers-named weights, never
    for transformers' ``model.safetensors``, so toile loads them and passes them in. T5 may be
    missing (the checkpoint then runs without it); a missing CLIP is an error naming the folder.
    """
    import importlib

    names = tensor_names(path)
    index = read_model_index(config) or {}
    found: dict[str, Any] = {}
    for component, prefix in TEXT_ENCODER_PREFIXES.items():
        slot = index.get(component)
        if not (isinstance(slot, list) and slot[0]) or any(n.startswith(prefix) for n in names):
            continue
        folder = config / component
        if not any(folder.glob("*.safetensors")):
            if component == "text_encoder_3":
                continue  # runs without T5 (has_t5 is False)
            raise ModelFormatError(
                f"{path} holds no {component} ({prefix}*) and {folder}/ has no .safetensors "
                f"weights for it; put the encoder's model.safetensors there"
            )
        library, class_name = slot
        if library not in ALLOWED_LIBRARIES:  # never import a module a model folder names
            raise UnsafeFileError(
                f"{config}/model_index.json names library {library!r} for {component}; toile "
                "loads only diffusers and transformers classes"
            )
        try:
            cls = getattr(importlib.import_module(library), class_name)
            found[component] = cls.from_pretrained(
                str(folder), dtype=dtype, use_safetensors=True, local_files_only=True
            )
        except (ImportError, AttributeError, OSError, ValueError) as exc:
            raise ModelFormatError(
                f"cannot load {component} of {path} from {folder}/ as {library}.{class_name}: "
                f"{exc}"
            ) from None
    return found


class SD3Family:
    name = "sd3"
    typical_scheduler = "FlowMatchEulerDiscreteScheduler"  # what its published checkpoints declare
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
    # Its MMDiT places patches by position (its only conv, the patch embedding, has no
    # padding): a circular VAE alone would not make the picture wrap around (tiling.py).
    tiling = False

    def detect(self, path: Path) -> bool:
        if path.is_file():
            return is_single_file(path, SD3_SINGLE_FILE)
        return pipeline_class_name(path) in SD3_PIPELINES

    def variant(self, path: Path) -> str:
        inpainting = is_inpaint_checkpoint(configs_of(path, SD3_SINGLE_FILE))
        parts = (["inpainting"] if inpainting else []) + ([] if has_t5(path) else ["no-t5"])
        return "-".join(parts)

    def load(self, path: Path, device: str, dtype: torch.dtype) -> LoadedModel:
        from diffusers import (
            StableDiffusion3Img2ImgPipeline,
            StableDiffusion3InpaintPipeline,
            StableDiffusion3Pipeline,
        )

        config = configs_of(path, SD3_SINGLE_FILE)
        variant = self.variant(path)
        # Passing None explicitly is how diffusers runs SD3 without T5 (zeros in its place);
        # from_pretrained refuses a null slot otherwise.
        options: dict[str, Any] = {}
        if not has_t5(path):
            options = {"text_encoder_3": None, "tokenizer_3": None}

        if path.is_file():
            options |= folder_text_encoders(path, config, dtype)

        def load(cls: Any) -> Any:
            if path.is_file():
                return load_file_pipeline(cls, path, config, device, dtype, **options)
            return load_pipeline(cls, path, device, dtype, **options)

        if is_inpaint_checkpoint(config):
            base = load(StableDiffusion3InpaintPipeline)
            pipelines: dict[Mode, Any] = {Mode.INPAINT: base}
        else:
            base = load(StableDiffusion3Pipeline)
            pipelines = {
                Mode.TXT2IMG: base,
                Mode.IMG2IMG: derive(StableDiffusion3Img2ImgPipeline, base),
                Mode.INPAINT: derive(StableDiffusion3InpaintPipeline, base),
            }
        return LoadedModel(
            family=self.name,
            path=path,
            defaults=sd3_defaults(config, self.capabilities[variant]),
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
        # SD3's img2img resizes its input to the default size unless told the size, so every
        # mode passes it (for img2img/inpaint it is the input image's own size).
        return run_unet_pipeline(loaded, request, ctx, width=request.width, height=request.height)
