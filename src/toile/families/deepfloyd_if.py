"""DeepFloyd IF, run as one cascade: stage I (64 px) -> stage II (x4) -> optional x4 upscaler.

**Layout.** IF ships as separate diffusers repositories per stage, so toile takes a *cascade
folder* holding one diffusers folder per stage::

    my-if/
      stage_1/   IFPipeline (T5 text encoder + 64 px U-Net)          required
      stage_2/   IFSuperResolutionPipeline (x4)                      optional
      stage_3/   StableDiffusionUpscalePipeline (the SD x4 upscaler) optional, needs stage_2

A plain ``IFPipeline`` folder (no cascade around it) is detected too and runs stage I alone.
A plain ``IFSuperResolutionPipeline`` folder (``stage_2`` of a cascade, or IF-II downloaded on
its own) is variant ``stage-ii``: an x4 upscaler of the input image (the upscale task). Used
alone it encodes the prompt itself, so its folder must hold the T5 ``text_encoder`` and
``tokenizer`` (the published IF-II repositories do); a stage II saved without them, as a
cascade's usually is, is refused at load naming what is missing. Its steps, guidance and noise
level default to ``IFSuperResolutionPipeline``'s (50, 4.0, 250); any input size is taken (padded
to what its U-Net divides, the output cropped back to exactly 4x). A standalone SD x4 upscaler
(a cascade's ``stage_3``) is the ``sd-upscale`` family's.
The img2img / inpainting variants of each stage (``IFImg2ImgPipeline``,
``IFInpaintingSuperResolutionPipeline``, ...) are built from the same weights with
``from_pipe``. Stage II's own text encoder is never loaded (``text_encoder=None``): the T5
embeddings are computed once by stage I and reused by stage II, as diffusers' IF docs do, which
saves loading the T5-XXL encoder twice. Stage III is the SD upscaler with its own CLIP text
encoder, so it gets the prompt text. No safety checker or watermarker is loaded (toile's own
safety layer decides); the ``None`` slots are passed explicitly.

**Sizes.** ``width``/``height`` name the *final* output size. Stage I runs at
``final / factor`` where ``factor`` is 4 with stage II and ``4 x the upscaler's VAE scale``
(16) with stage III; the final size must be a multiple of ``factor`` times whatever each stage's
U-Net needs to downsample evenly, computed from the stage configs (``cascade_geometry``). The
default is stage I's ``sample_size`` x ``factor`` (256 or 1024 px for the real models). For
img2img / inpaint the input image is that final size; toile resizes it (bicubic) to each stage's
size itself and hands the stages tensors, because diffusers' IF pipelines would otherwise resize
PIL inputs to their training size and ignore the requested size.

**Per-stage settings.** The request's ``steps``, ``guidance`` and ``strength`` are stage I's
(defaults: diffusers' ``IFPipeline`` 100 steps, guidance 7.0; ``IFImg2ImgPipeline`` strength
0.7, ``IFInpaintingPipeline`` strength 1.0). Later stages keep their pipelines' own guidance,
strength and noise level (stage II: guidance 4.0; stage III: guidance 9.0, and noise level 100
as diffusers' IF docs use for the upscaler instead of its generic 20). Their step counts scale
with the request: a stage whose diffusers default is ``d`` steps runs ``round(d x steps / 100)``
(at least 1, and at least enough for one step at its strength), so the defaults reproduce
diffusers' (100 / 50 / 75) and a quick 20-step draft speeds up the whole cascade, not just its
cheapest stage. ``later_stage_steps`` is the rule.

**Progress** is reported per stage as ``"stage k/N"`` through the IF pipelines' older
``callback(step, timestep, latents)`` API with ``callback_steps=1``. Previews are the stage's
current pixels (IF works in pixel space); stage III's latents go through its VAE.

**Batches.** Image ``i`` uses one seeded CPU generator for all stages, so a batch equals singles.

**Inpainting**: stages I and II reset the unmasked pixels to the input at every step; the SD
upscaler (stage III) is not mask-aware and repaints everything, so the cascade relies on the
engine's mask overlay (done for every family) to keep the unmasked input pixels exactly.

LoRA files are not supported for the cascade (a stage-I LoRA would not steer stage II).
"""

from __future__ import annotations

import enum
import inspect
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from toile.errors import ModelFormatError, RequestError
from toile.families.base import LoadedModel, cpu_generators
from toile.families.diffusers_common import (
    load_pipeline,
    pipeline_class_name,
    read_component_config,
    read_model_index,
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

STAGE1_PIPELINES = frozenset({"IFPipeline", "IFImg2ImgPipeline", "IFInpaintingPipeline"})
STAGE2_PIPELINES = frozenset(
    {
        "IFSuperResolutionPipeline",
        "IFImg2ImgSuperResolutionPipeline",
        "IFInpaintingSuperResolutionPipeline",
    }
)
STAGE3_PIPELINES = frozenset({"StableDiffusionUpscalePipeline"})
STAGE_FOLDERS = ("stage_1", "stage_2", "stage_3")
ALL_MODES = frozenset({Mode.TXT2IMG, Mode.IMG2IMG, Mode.INPAINT, Mode.OUTPAINT})
SR_FACTOR = 4  # IF stage II: 64 -> 256 px
UPSCALER_NOISE_LEVEL = 100  # diffusers' IF docs (and DeepFloyd's README) for stage III
NO_SAFETY = {"safety_checker": None, "feature_extractor": None, "watermarker": None}
STAGE2_ALONE = "stage-ii"  # the variant of a standalone stage II folder (an x4 upscaler)


class IFStage(enum.IntEnum):
    """The cascade's stages; the family's pipelines are keyed ``(IFStage, Mode)``."""

    I = 1  # noqa: E741 - the stages' own names (IF's paper and diffusers' docs)
    II = 2
    III = 3


def stage_folders(path: Path) -> list[Path]:
    """The stage folders of an IF checkpoint, in order; raises on an inconsistent cascade."""
    if pipeline_class_name(path) in STAGE1_PIPELINES:
        return [path]
    folders = [path / name for name in STAGE_FOLDERS if (path / name).exists()]
    expected = (STAGE1_PIPELINES, STAGE2_PIPELINES, STAGE3_PIPELINES)
    for index, (folder, classes) in enumerate(zip(folders, expected, strict=False)):
        if folder.name != STAGE_FOLDERS[index]:
            raise ModelFormatError(
                f"{folder} needs {path / STAGE_FOLDERS[index]} as well: IF stages run in order"
            )
        found = pipeline_class_name(folder)
        if found not in classes:
            raise ModelFormatError(
                f"{folder} should be a diffusers {' / '.join(sorted(classes))} folder, "
                f"found pipeline class {found!r}"
            )
    return folders


def unet_factor(folder: Path, component: str = "unet") -> int:
    """How much a stage's U-Net (or VAE) downsamples: 2 ** (levels - 1)."""
    config = read_component_config(folder, component)
    return 2 ** (len(config.get("block_out_channels", [0])) - 1)


def cascade_geometry(folders: list[Path]) -> tuple[int, int, int]:
    """(stage I sample size, final / stage-I factor, final size multiple) from the configs.

    Stage I's side must divide by its U-Net's factor; stage II's and the upscaler's (which both
    run at 4 x stage I) by theirs; the upscaler's image processor also rounds its input down to
    its VAE scale.
    """
    sample = read_component_config(folders[0], "unet").get("sample_size", 64)
    sample = int(sample if isinstance(sample, int) else sample[0])
    factor, multiple = 1, unet_factor(folders[0])
    if len(folders) > 1:
        factor = SR_FACTOR
        unet2 = unet_factor(folders[1])
        multiple = math.lcm(multiple, unet2 // math.gcd(unet2, 4))
    if len(folders) > 2:
        unet3, vae3 = unet_factor(folders[2]), unet_factor(folders[2], "vae")
        factor *= vae3
        multiple = math.lcm(multiple, unet3 // math.gcd(unet3, 4), vae3 // math.gcd(vae3, 4))
    return sample, factor, multiple * factor


def call_default(pipeline_cls: Any, name: str) -> Any:
    """A default of a diffusers pipeline's ``__call__``, so toile follows diffusers' values."""
    return inspect.signature(pipeline_cls.__call__).parameters[name].default


def later_stage_steps(request_steps: int, stage_default: int, stage1_default: int,
                      strength: float | None = None) -> int:
    """Steps for stage II/III: their diffusers default scaled like the request's stage-I steps.

    At least 1, and at least enough that ``int(steps x strength)`` (how diffusers' img2img and
    inpainting super-resolution pipelines count steps) is one.
    """
    steps = max(1, math.floor(stage_default * request_steps / stage1_default + 0.5))
    if strength is not None and strength > 0:
        while int(steps * strength) < 1:
            steps += 1
    return steps


def image_tensor(image: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """An RGB image at ``size`` as a ``[1, 3, H, W]`` tensor in [-1, 1] (IF's pixel space)."""
    import numpy as np
    import torch
    from PIL import Image

    rgb = image.convert("RGB")
    if rgb.size != size:
        rgb = rgb.resize(size, Image.Resampling.BICUBIC)
    pixels = np.asarray(rgb, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(pixels).permute(2, 0, 1)[None].contiguous()


def mask_tensor(mask: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """A mask at ``size`` as ``[1, 1, H, W]`` in [0, 1]; the IF pipelines binarize it at 0.5."""
    import numpy as np
    import torch
    from PIL import Image

    gray = mask.convert("L")
    if gray.size != size:
        gray = gray.resize(size, Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(gray, dtype=np.float32) / 255.0)[None, None].contiguous()


def pixel_preview(sample: torch.Tensor) -> Image.Image:
    """The first image of an IF stage's current sample ([-1, 1] pixels) as a PIL image."""
    import torch
    from PIL import Image

    first = ((sample[:1].float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return Image.fromarray(first[0].permute(1, 2, 0).cpu().numpy())


def stage_callback(
    ctx: RunContext, stage: str, total: int, preview: Callable[[torch.Tensor], Image.Image | None]
) -> Callable[[int, Any, torch.Tensor], None]:
    """A ``callback(step, timestep, latents)`` for the IF / upscaler pipelines' older API."""

    def callback(step: int, timestep: Any, latents: torch.Tensor) -> None:
        ctx.on_step(step + 1, total, stage, lambda: preview(latents), state=latents)

    return callback


def check_own_text_encoder(path: Path) -> None:
    """A standalone stage II encodes its prompt itself: its folder must name and hold a T5
    ``text_encoder`` and ``tokenizer`` (a cascade's stage II borrows stage I's instead)."""
    index = read_model_index(path) or {}
    missing = [
        name for name in ("text_encoder", "tokenizer")
        if not isinstance(index.get(name), list) or None in index[name]
        or not (path / name).is_dir()
    ]
    if missing:
        raise ModelFormatError(
            f"{path} is a DeepFloyd IF stage II folder without its own {' and '.join(missing)}: "
            "used alone it needs the T5 text encoder and tokenizer (IF-II checkpoints ship them; "
            "a cascade's stage II borrows stage I's). Copy stage I's text_encoder/ and "
            "tokenizer/ folders into it and name them in its model_index.json, or run the "
            "cascade folder (stage_1/ + stage_2/) instead"
        )


def upscale_with_stage2(
    pipe: Any, request: ResolvedRequest, ctx: RunContext
) -> list[Image.Image]:
    """Stage II alone: the input image is its low-res image, upscaled 4x with the prompt.

    The prompt is encoded without diffusers' caption cleaning, as the cascade encodes it (the
    same words give the same embeddings either way). The input goes in as a [-1, 1] tensor
    (padded to the U-Net's multiple, the output cropped back), one per image, so image ``i``
    draws all its noise from its own generator and a batch equals singles.
    """
    from toile.families.sd_upscale import crop_outputs, level_factor, pad_to_geometry

    limit = pipe.image_noising_scheduler.config.num_train_timesteps
    if request.noise_level is not None and request.noise_level >= limit:
        raise RequestError("noise_level", f"must be below {limit} for IF stage II (its noising "
                           f"schedule's length), got {request.noise_level}")
    assert request.request.image is not None  # the upscale task requires one
    image = request.request.image.convert("RGB")
    # Stage II runs at 4 x the input's side, which its U-Net's levels must divide.
    unet = level_factor(pipe.unet)
    multiple = unet // math.gcd(unet, SR_FACTOR)
    source = pad_to_geometry(image, multiple, multiple)
    count = len(request.seeds)
    images = pipe(
        prompt=[request.prompt] * count,
        negative_prompt=[request.negative_prompt] * count if request.negative_prompt else None,
        image=image_tensor(source, source.size).repeat(count, 1, 1, 1),
        width=source.width * SR_FACTOR,
        height=source.height * SR_FACTOR,
        num_inference_steps=request.steps,
        guidance_scale=request.guidance,
        noise_level=request.noise_level,
        generator=cpu_generators(request.seeds),
        output_type="pil",
        callback=stage_callback(ctx, "upscale", request.steps, pixel_preview),
        callback_steps=1,
        clean_caption=False,
    ).images
    return crop_outputs(images, (image.width * SR_FACTOR, image.height * SR_FACTOR))


class IFFamily:
    name = "if"
    typical_scheduler = "DDPMScheduler"  # what its published checkpoints declare
    # Each stage keeps its own scheduler (DDPM with learned variance): no sampler choice.
    fixed_sampler = True
    title = "DeepFloyd IF"
    # Variants name how many stages the folder holds; every cascade runs every mode. A stage II
    # folder alone is an x4 upscaler.
    capabilities: ClassVar[dict[str, frozenset[Mode]]] = {
        **{f"{count}-stage": ALL_MODES for count in (1, 2, 3)},
        STAGE2_ALONE: frozenset({Mode.UPSCALE}),
    }
    lora = False
    # Its stages are U-Nets, but the cascade enlarges each stage's image for the next with
    # filters that do not wrap around, so the final image would show a seam (tiling.py).
    tiling = False

    def detect(self, path: Path) -> bool:
        if pipeline_class_name(path) in STAGE1_PIPELINES | STAGE2_PIPELINES:
            return True
        return path.is_dir() and pipeline_class_name(path / "stage_1") in STAGE1_PIPELINES

    def variant(self, path: Path) -> str:
        if pipeline_class_name(path) in STAGE2_PIPELINES:
            return STAGE2_ALONE
        return f"{len(stage_folders(path))}-stage"

    def load(self, path: Path, device: str, dtype: torch.dtype) -> LoadedModel:
        from diffusers import (
            IFImg2ImgPipeline,
            IFImg2ImgSuperResolutionPipeline,
            IFInpaintingPipeline,
            IFInpaintingSuperResolutionPipeline,
            IFPipeline,
            IFSuperResolutionPipeline,
            StableDiffusionUpscalePipeline,
        )

        from toile.io.weights import check_folder_weights

        if pipeline_class_name(path) in STAGE2_PIPELINES:
            return self._load_stage2_alone(path, device, dtype)
        folders = stage_folders(path)
        for folder in folders:
            # The engine checks a top-level diffusers folder; a cascade's stages are checked here.
            check_folder_weights(folder)
        stage1 = load_pipeline(
            IFPipeline, folders[0], device, dtype, requires_safety_checker=False, **NO_SAFETY
        )
        pipelines: dict[tuple[IFStage, Mode], Any] = {
            (IFStage.I, Mode.TXT2IMG): stage1,
            (IFStage.I, Mode.IMG2IMG): _derive(IFImg2ImgPipeline, stage1),
            (IFStage.I, Mode.INPAINT): _derive(IFInpaintingPipeline, stage1),
        }
        if len(folders) > 1:
            stage2 = load_pipeline(
                IFSuperResolutionPipeline, folders[1], device, dtype, text_encoder=None,
                tokenizer=None, requires_safety_checker=False, **NO_SAFETY,
            )
            pipelines[IFStage.II, Mode.TXT2IMG] = stage2
            pipelines[IFStage.II, Mode.IMG2IMG] = _derive(IFImg2ImgSuperResolutionPipeline, stage2)
            pipelines[IFStage.II, Mode.INPAINT] = _derive(
                IFInpaintingSuperResolutionPipeline, stage2)
        if len(folders) > 2:
            pipelines[IFStage.III, Mode.UPSCALE] = load_pipeline(
                StableDiffusionUpscalePipeline, folders[2], device, dtype, **NO_SAFETY
            )
        sample, factor, multiple = cascade_geometry(folders)
        defaults = FamilyDefaults(
            modes=ALL_MODES,
            width=sample * factor,
            height=sample * factor,
            steps=call_default(IFPipeline, "num_inference_steps"),
            guidance=call_default(IFPipeline, "guidance_scale"),
            strength=call_default(IFImg2ImgPipeline, "strength"),
            inpaint_strength=call_default(IFInpaintingPipeline, "strength"),
            size_multiple=multiple,
            min_side=multiple,
        )
        return LoadedModel(
            family=self.name,
            path=path,
            defaults=defaults,
            device=device,
            dtype=dtype,
            pipelines=pipelines,
            samplers=sampler_menu(stage1, self),
            supports_lora=self.lora,
            variant=f"{len(folders)}-stage",
        )

    def _load_stage2_alone(self, path: Path, device: str, dtype: torch.dtype) -> LoadedModel:
        """A standalone stage II: an x4 upscaler with its own T5 encoder."""
        from diffusers import IFSuperResolutionPipeline

        check_own_text_encoder(path)
        pipe = load_pipeline(
            IFSuperResolutionPipeline, path, device, dtype, requires_safety_checker=False,
            **NO_SAFETY,
        )
        defaults = FamilyDefaults(
            modes=self.capabilities[STAGE2_ALONE],
            width=0,  # an upscale's size is its input's times the scale
            height=0,
            steps=call_default(IFSuperResolutionPipeline, "num_inference_steps"),
            guidance=call_default(IFSuperResolutionPipeline, "guidance_scale"),
            size_multiple=1,  # any input: it is padded to what the U-Net needs
            min_side=1,
            upscale_factor=SR_FACTOR,
            noise_level=call_default(IFSuperResolutionPipeline, "noise_level"),
        )
        return LoadedModel(
            family=self.name,
            path=path,
            defaults=defaults,
            device=device,
            dtype=dtype,
            pipelines={(IFStage.II, Mode.UPSCALE): pipe},
            samplers=sampler_menu(pipe, self),
            supports_lora=self.lora,
            variant=STAGE2_ALONE,
        )

    def run(
        self, loaded: LoadedModel, request: ResolvedRequest, ctx: RunContext
    ) -> list[Image.Image]:
        if request.mode is Mode.UPSCALE:
            return upscale_with_stage2(loaded.pipelines[IFStage.II, Mode.UPSCALE], request, ctx)
        role = request.mode
        stage3 = loaded.pipelines.get((IFStage.III, Mode.UPSCALE))
        stages = 1 + ((IFStage.II, Mode.TXT2IMG) in loaded.pipelines) + (stage3 is not None)
        factor = (SR_FACTOR if stages > 1 else 1) * (stage3.vae_scale_factor if stage3 else 1)
        size1 = (request.width // factor, request.height // factor)
        size2 = (size1[0] * SR_FACTOR, size1[1] * SR_FACTOR)
        req = request.request
        count = len(request.seeds)
        generators = cpu_generators(request.seeds)
        stage1_default = loaded.defaults.steps

        # Stage I. Embeddings are computed once, with the negative half always (stage II uses
        # classifier-free guidance even when stage I does not).
        pipe1 = loaded.pipelines[IFStage.I, role]
        steps1 = request.steps
        if request.strength is not None:  # at least 1: resolve refuses a strength leaving none
            steps1 = min(int(request.steps * request.strength), request.steps)
        positive, negative = pipe1.encode_prompt(
            request.prompt,
            do_classifier_free_guidance=True,
            num_images_per_prompt=1,
            negative_prompt=request.negative_prompt or None,
        )
        kwargs: dict[str, Any] = {
            "prompt_embeds": positive,
            "negative_prompt_embeds": negative,
            "num_inference_steps": request.steps,
            "guidance_scale": request.guidance,
            "num_images_per_prompt": count,
            "generator": generators,
            "output_type": "pil" if stages == 1 else "pt",
            "callback": stage_callback(ctx, f"stage 1/{stages}", steps1, pixel_preview),
            "callback_steps": 1,
        }
        if request.mode is Mode.TXT2IMG:
            kwargs["width"], kwargs["height"] = size1
        else:
            assert req.image is not None
            kwargs["image"] = image_tensor(req.image, size1)
            kwargs["strength"] = request.strength
        if request.mode is Mode.INPAINT:
            assert req.mask is not None
            kwargs["mask_image"] = mask_tensor(req.mask, size1)
        images = pipe1(**kwargs).images

        if stages > 1:
            # Stage II: the batch is already expanded, so the embeddings are repeated to match
            # (diffusers would otherwise repeat the images once more per prompt).
            pipe2 = loaded.pipelines[IFStage.II, role]
            strength2 = (
                None if request.mode is Mode.TXT2IMG else call_default(type(pipe2), "strength")
            )
            steps2 = later_stage_steps(
                request.steps, call_default(type(pipe2), "num_inference_steps"), stage1_default,
                strength2,
            )
            total2 = steps2 if strength2 is None else min(int(steps2 * strength2), steps2)
            kwargs = {
                "image": images,
                "prompt_embeds": positive.repeat_interleave(count, dim=0),
                "negative_prompt_embeds": negative.repeat_interleave(count, dim=0),
                "num_inference_steps": steps2,
                "num_images_per_prompt": 1,
                "generator": generators,
                "output_type": "pil" if stages == 2 else "pt",
                "callback": stage_callback(ctx, f"stage 2/{stages}", total2, pixel_preview),
                "callback_steps": 1,
            }
            if request.mode is Mode.TXT2IMG:
                kwargs["width"], kwargs["height"] = size2
            else:
                assert req.image is not None
                kwargs["original_image"] = image_tensor(req.image, size2).repeat(count, 1, 1, 1)
            if request.mode is Mode.INPAINT:
                assert req.mask is not None
                kwargs["mask_image"] = mask_tensor(req.mask, size2)
            images = pipe2(**kwargs).images

        if stage3 is not None:
            steps3 = later_stage_steps(
                request.steps, call_default(type(stage3), "num_inference_steps"), stage1_default
            )
            negative_text = [request.negative_prompt] * count if request.negative_prompt else None
            images = stage3(
                prompt=[request.prompt] * count,
                negative_prompt=negative_text,
                # As [0, 1]: the upscaler's image processor guesses the range of a tensor from
                # its minimum, which a bright [-1, 1] image would fool.
                image=(images.float() / 2 + 0.5).clamp(0, 1),
                num_inference_steps=steps3,
                noise_level=UPSCALER_NOISE_LEVEL,
                generator=generators,
                output_type="pil",
                callback=stage_callback(
                    ctx, f"stage 3/{stages}", steps3, lambda latents: vae_preview(stage3, latents)
                ),
                callback_steps=1,
            ).images
        return [image.convert("RGB") for image in images]


def _derive(pipeline_cls: Any, base: Any) -> Any:
    """``from_pipe`` for IF: the safety slots stay empty instead of being re-required."""
    pipe = pipeline_cls.from_pipe(base, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe

