"""The training loss of each family, as the model was trained (and as diffusers' DreamBooth
scripts fine-tune it):

- **SD 1.x/2.x, SDXL** — denoising diffusion (Ho et al. 2020): t ~ U{0..T−1}, x_t from the
  checkpoint's own noise schedule (its scheduler config loaded into ``DDPMScheduler``), and the
  U-Net regresses ε, or v = α_t·ε − σ_t·x0 (Salimans & Ho 2022) when the scheduler says
  ``prediction_type: v_prediction`` (SD 2.x 768). SDXL adds its micro-conditions (Podell et al.
  2023): pooled text + (original size, crop top-left, target size) time ids.
- **SD3, FLUX.1** — flow matching / rectified flow (Lipman et al. 2022; Liu et al. 2022) as in
  Esser et al. 2024: x_t = (1 − σ)·x0 + σ·ε with σ from the checkpoint's
  ``FlowMatchEulerDiscreteScheduler`` at a logit-normal index, target ε − x0, uniform weighting
  (diffusers' default ``weighting_scheme``). Latents are ``(z − shift) · scale``. FLUX.1 packs
  latents 2×2 into tokens and gets its distilled guidance embedding (3.5, the value diffusers'
  FLUX.1 DreamBooth script trains dev with).
- **toile** — rectified flow in packed pixel space with logit-normal t, the objective toile's
  models are trained with from scratch (``toile.train.trainer``).

Every random draw (t, ε, the VAE's posterior sample) comes from the sample's own CPU generator,
seeded from (seed, step, position in the global batch) by the runner: a step computes the same
loss whether its batch runs in one process or is split over several, and ``--resume`` repeats
exactly what a straight run would have done.

Text goes through each pipeline's own ``encode_prompt`` (the same code that generates), so
training sees exactly the conditioning that inference does. When the text encoders are frozen,
each caption is encoded once and cached.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from toile.errors import RequestError
from toile.request import Mode

if TYPE_CHECKING:
    from toile.families.base import LoadedModel

# Guidance value fed to FLUX.1-dev's guidance embedding while training (diffusers' default).
FLUX_TRAIN_GUIDANCE = 3.5


@dataclass
class TrainBatch:
    """What one process trains on in one step; everything already on the training device."""

    pixels: torch.Tensor  # [B, 3, H, W] in [−1, 1]
    captions: list[str]
    generators: list[torch.Generator]  # one CPU generator per sample
    original_sizes: list[tuple[int, int]]  # (h, w) before fitting (SDXL micro-conditioning)
    crops_top_left: list[tuple[int, int]]  # (top, left) of the crop (SDXL)

    def __len__(self) -> int:
        return len(self.captions)


def per_sample(generators: list[torch.Generator], draw: Callable[[torch.Generator], torch.Tensor]
               ) -> torch.Tensor:
    """Concatenate one draw per sample, each from the sample's own generator."""
    return torch.cat([draw(g) for g in generators])


def mse_per_sample(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample [B], in float32."""
    return ((pred.float() - target.float()) ** 2).flatten(1).mean(1)


class Objective(ABC):
    """The family-specific part of fine-tuning: components, encoders and the loss.

    ``denoiser_name`` is the trained network's component name (also its LoRA key prefix);
    ``text_encoder_names`` are the encoders ``--train-text-encoder`` trains (as diffusers'
    scripts: the CLIP encoders, never T5).
    """

    family: ClassVar[str]
    denoiser_name: ClassVar[str] = "unet"
    text_encoder_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, loaded: LoadedModel) -> None:
        pipe = loaded.pipelines.get(Mode.TXT2IMG)
        if pipe is None:
            raise RequestError(
                "model",
                f"{loaded.path} is a {loaded.family} {loaded.variant or ''} checkpoint without "
                "text-to-image (an inpainting or refiner checkpoint); fine-tuning needs a base "
                "text-to-image checkpoint",
            )
        self.loaded = loaded
        self.pipe = pipe
        self.train_text = False
        self._text_cache: dict[str, tuple[torch.Tensor, ...]] = {}

    # ----------------------------------------------------------------------- components
    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipe, self.denoiser_name)

    def text_encoders(self) -> dict[str, torch.nn.Module]:
        return {
            name: getattr(self.pipe, name)
            for name in self.text_encoder_names
            if getattr(self.pipe, name, None) is not None
        }

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    def frozen_modules(self) -> list[torch.nn.Module]:
        """Every module of the pipeline, for freezing before the trainable part is chosen."""
        found = []
        for name in ("unet", "transformer", "vae", "text_encoder", "text_encoder_2",
                     "text_encoder_3"):
            module = getattr(self.pipe, name, None)
            if isinstance(module, torch.nn.Module):
                found.append(module)
        return found

    # ----------------------------------------------------------------------------- text
    def encode_text(self, captions: list[str]) -> tuple[torch.Tensor, ...]:
        """Batch-first conditioning tensors for ``captions``; cached per caption when frozen.

        Each caption is encoded on its own for the cache, so a caption's embedding does not
        depend on which batch it came in (batched matmuls may round differently).
        """
        if self.train_text:
            return self._encode(captions)
        missing = [c for c in dict.fromkeys(captions) if c not in self._text_cache]
        with torch.no_grad():
            for caption in missing:
                self._text_cache[caption] = tuple(t.detach() for t in self._encode([caption]))
        parts = [self._text_cache[c] for c in captions]
        return tuple(torch.cat(column) for column in zip(*parts, strict=True))

    @abstractmethod
    def _encode(self, captions: list[str]) -> tuple[torch.Tensor, ...]:
        """Encode a batch of captions with the pipeline's own encoder(s)."""

    # ---------------------------------------------------------------------------- loss
    def loss(self, denoiser: torch.nn.Module, batch: TrainBatch) -> torch.Tensor:
        """Per-sample loss [B] (float32). ``denoiser`` is the module to call: the pipeline's,
        or accelerate's wrapper of it (DDP), which must see the forward for its gradients."""
        return mse_per_sample(*self.predict(denoiser, batch))

    @abstractmethod
    def predict(self, denoiser: torch.nn.Module, batch: TrainBatch
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(prediction, regression target), batch first, for the family's noisy inputs: the
        inputs (t, noise, VAE sample) come from the batch's per-sample generators only, so the
        same batch with fresh generators of the same seeds gives the same inputs."""

    def save_full(self, out: Path, denoiser_state: dict[str, torch.Tensor] | None = None) -> None:
        """Save the whole fine-tuned model as a folder ``--model`` loads. ``denoiser_state``
        (full weights gathered from FSDP shards) is written in place of the denoiser's own."""
        pipe = self.pipe
        if denoiser_state is not None:
            pipe = type(pipe)(**(pipe.components | {self.denoiser_name: self.plain_denoiser(
                denoiser_state)}))
        pipe.save_pretrained(str(out), safe_serialization=True)

    def plain_denoiser(self, state: dict[str, torch.Tensor]) -> torch.nn.Module:
        """An unsharded copy of the denoiser (same class and config) holding ``state``."""
        denoiser = type(self.denoiser).from_config(self.denoiser.config)
        denoiser.load_state_dict(state)
        return denoiser.to(self.dtype)


class _VaeLatents:
    """Latents from a diffusers VAE, sampled from the posterior with per-sample generators."""

    pipe: Any

    def vae_latents(self, pixels: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        vae = self.pipe.vae
        config = vae.config
        with torch.no_grad():
            posterior = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
            z = posterior.sample(generator=generators)
        shift = getattr(config, "shift_factor", None) or 0.0
        return ((z - shift) * config.scaling_factor).float()


class DiffusionObjective(_VaeLatents, Objective):
    """SD 1.x/2.x: ε- or v-prediction under the checkpoint's DDPM noise schedule."""

    family = "sd"
    denoiser_name = "unet"
    text_encoder_names = ("text_encoder",)

    def __init__(self, loaded: LoadedModel) -> None:
        from diffusers import DDPMScheduler

        super().__init__(loaded)
        # The training-time schedule of the checkpoint (betas, prediction type), whatever
        # sampler its scheduler folder names; DreamBooth loads it the same way.
        self.scheduler = DDPMScheduler.from_config(self.pipe.scheduler.config)
        self.prediction_type = self.scheduler.config.prediction_type

    def _encode(self, captions: list[str]) -> tuple[torch.Tensor, ...]:
        embeds, _ = self.pipe.encode_prompt(captions, self.device, 1, False)
        return (embeds,)

    def _timesteps_and_noise(self, latents: torch.Tensor, gens: list[torch.Generator]
                             ) -> tuple[torch.Tensor, torch.Tensor]:
        steps = int(self.scheduler.config.num_train_timesteps)
        t = per_sample(gens, lambda g: torch.randint(0, steps, (1,), generator=g))
        noise = per_sample(gens, lambda g: torch.randn((1, *latents.shape[1:]), generator=g))
        return t.to(latents.device), noise.to(latents.device)

    def _target(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(latents, noise, t)
        if self.prediction_type == "sample":
            return latents
        raise RequestError("model", f"unknown prediction_type {self.prediction_type!r}")

    def _unet_inputs(self, batch: TrainBatch, cond: tuple[torch.Tensor, ...]) -> dict[str, Any]:
        return {"encoder_hidden_states": cond[0].to(self.dtype)}

    def predict(self, denoiser: torch.nn.Module, batch: TrainBatch
                ) -> tuple[torch.Tensor, torch.Tensor]:
        latents = self.vae_latents(batch.pixels, batch.generators)
        t, noise = self._timesteps_and_noise(latents, batch.generators)
        noisy = self.scheduler.add_noise(latents, noise, t)
        cond = self.encode_text(batch.captions)
        pred = denoiser(noisy.to(self.dtype), t, **self._unet_inputs(batch, cond),
                        return_dict=False)[0]
        return pred, self._target(latents, noise, t)


class SDXLObjective(DiffusionObjective):
    """SDXL: as SD, with two text encoders and the size/crop micro-conditions."""

    family = "sdxl"
    text_encoder_names = ("text_encoder", "text_encoder_2")

    def _encode(self, captions: list[str]) -> tuple[torch.Tensor, ...]:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=captions, device=self.device, num_images_per_prompt=1,
            do_classifier_free_guidance=False,
        )
        return embeds, pooled

    def _unet_inputs(self, batch: TrainBatch, cond: tuple[torch.Tensor, ...]) -> dict[str, Any]:
        height, width = batch.pixels.shape[-2:]
        time_ids = torch.tensor(
            [[*orig, *crop, height, width]
             for orig, crop in zip(batch.original_sizes, batch.crops_top_left, strict=True)],
            dtype=self.dtype, device=self.device,
        )
        return {
            "encoder_hidden_states": cond[0].to(self.dtype),
            "added_cond_kwargs": {"text_embeds": cond[1].to(self.dtype), "time_ids": time_ids},
        }


class FlowMatchingObjective(_VaeLatents, Objective):
    """SD3 (MMDiT): flow matching with the checkpoint's shifted sigma schedule."""

    family = "sd3"
    denoiser_name = "transformer"
    text_encoder_names = ("text_encoder", "text_encoder_2")
    max_sequence_length = 256  # StableDiffusion3Pipeline's default, so training = inference

    def __init__(self, loaded: LoadedModel) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler

        super().__init__(loaded)
        # A private copy: its (unset) timesteps / sigmas are the training schedule, including
        # the checkpoint's shift, which is what diffusers' SD3 / FLUX.1 scripts index into.
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.pipe.scheduler.config)

    def _encode(self, captions: list[str]) -> tuple[torch.Tensor, ...]:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=captions, prompt_2=None, prompt_3=None, device=self.device,
            num_images_per_prompt=1, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return embeds, pooled

    def sigmas_and_noise(self, x0: torch.Tensor, gens: list[torch.Generator]
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(timesteps [B], sigmas [B,1,1,1], noise); logit-normal indices (Esser et al. 2024)."""
        from diffusers.training_utils import compute_density_for_timestep_sampling

        u = per_sample(gens, lambda g: compute_density_for_timestep_sampling(
            "logit_normal", 1, logit_mean=0.0, logit_std=1.0, generator=g))
        index = (u * self.scheduler.config.num_train_timesteps).long()
        timesteps = self.scheduler.timesteps[index].to(x0.device)
        sigmas = self.scheduler.sigmas[index].to(x0.device, torch.float32).view(-1, 1, 1, 1)
        noise = per_sample(gens, lambda g: torch.randn((1, *x0.shape[1:]), generator=g))
        return timesteps, sigmas, noise.to(x0.device)

    def predict(self, denoiser: torch.nn.Module, batch: TrainBatch
                ) -> tuple[torch.Tensor, torch.Tensor]:
        x0 = self.vae_latents(batch.pixels, batch.generators)
        timesteps, sigmas, noise = self.sigmas_and_noise(x0, batch.generators)
        noisy = (1.0 - sigmas) * x0 + sigmas * noise
        embeds, pooled = self.encode_text(batch.captions)
        pred = denoiser(
            hidden_states=noisy.to(self.dtype), timestep=timesteps,
            encoder_hidden_states=embeds.to(self.dtype), pooled_projections=pooled.to(self.dtype),
            return_dict=False,
        )[0]
        return pred, noise - x0


class FluxObjective(FlowMatchingObjective):
    """FLUX.1 dev / schnell: flow matching on 2×2-packed latent tokens."""

    family = "flux"
    text_encoder_names = ("text_encoder",)

    def __init__(self, loaded: LoadedModel) -> None:
        from toile.families.flux import VARIANTS

        super().__init__(loaded)
        self.max_sequence_length = VARIANTS[loaded.variant].max_sequence_length

    def _encode(self, captions: list[str]) -> tuple[torch.Tensor, ...]:
        embeds, pooled, _text_ids = self.pipe.encode_prompt(
            prompt=captions, prompt_2=None, device=self.device, num_images_per_prompt=1,
            max_sequence_length=self.max_sequence_length,
        )
        return embeds, pooled

    def predict(self, denoiser: torch.nn.Module, batch: TrainBatch
                ) -> tuple[torch.Tensor, torch.Tensor]:
        pipe = self.pipe
        x0 = self.vae_latents(batch.pixels, batch.generators)  # [B, C, h, w]
        b, c, h, w = x0.shape
        timesteps, sigmas, noise = self.sigmas_and_noise(x0, batch.generators)
        noisy = (1.0 - sigmas) * x0 + sigmas * noise
        packed = pipe._pack_latents(noisy, b, c, h, w)  # [B, h/2·w/2, 4C]
        image_ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, self.device, self.dtype)
        embeds, pooled = self.encode_text(batch.captions)
        text_ids = torch.zeros(embeds.shape[1], 3, device=self.device, dtype=self.dtype)
        guidance = None
        if self.denoiser.config.guidance_embeds:
            guidance = torch.full((b,), FLUX_TRAIN_GUIDANCE, device=self.device,
                                  dtype=torch.float32)
        pred = denoiser(
            hidden_states=packed.to(self.dtype), timestep=(timesteps / 1000.0).to(self.dtype),
            guidance=guidance, pooled_projections=pooled.to(self.dtype),
            encoder_hidden_states=embeds.to(self.dtype), txt_ids=text_ids, img_ids=image_ids,
            return_dict=False,
        )[0]
        scale = int(pipe.vae_scale_factor)
        pred = pipe._unpack_latents(pred, h * scale, w * scale, scale)
        return pred, noise - x0


class ToileObjective(Objective):
    """toile's models: rectified flow on packed pixels, logit-normal t (as ``toile train``)."""

    family = "toile"
    denoiser_name = "unet"
    text_encoder_names = ()  # the sentence encoder stays frozen (Imagen-style conditioning)

    def frozen_modules(self) -> list[torch.nn.Module]:
        return [self.pipe.unet, self.pipe.text_encoder.model]

    def _encode(self, captions: list[str]) -> tuple[torch.Tensor, ...]:
        cond = self.pipe.encode_prompts(captions)
        return cond.tokens, cond.mask, cond.pooled

    def predict(self, denoiser: torch.nn.Module, batch: TrainBatch
                ) -> tuple[torch.Tensor, torch.Tensor]:
        from toile.families.toile.denoiser import TextCondition, predict_velocity
        from toile.families.toile.sampling import (
            forward_noise,
            sample_logit_normal,
            velocity_target,
        )

        gens = batch.generators
        x0 = self.pipe.pack(batch.pixels.to(self.device).float())  # [B, 3p², H/p, W/p]
        t = per_sample(gens, lambda g: sample_logit_normal(1, generator=g)).to(self.device)
        noise = per_sample(gens, lambda g: torch.randn((1, *x0.shape[1:]), generator=g))
        noise = noise.to(self.device)
        tokens, mask, pooled = self.encode_text(batch.captions)
        cond = TextCondition(tokens.to(self.dtype), mask, pooled.to(self.dtype))
        x_t = forward_noise(x0, noise, t)
        v = predict_velocity(denoiser, x_t.to(self.dtype), t.to(self.dtype), cond)
        return v, velocity_target(x0, noise)

    def save_full(self, out: Path, denoiser_state: dict[str, torch.Tensor] | None = None) -> None:
        from dataclasses import replace

        from toile.families.toile.pipeline import ToilePipeline

        config = self.pipe.config
        text = config.text
        if text.path is not None and not Path(text.path).expanduser().is_absolute():
            # A text encoder named relative to the base model's folder would not be found
            # from the new folder: point at the same files by absolute path.
            absolute = (Path(self.loaded.path) / text.path).resolve()
            config = replace(config, text=replace(text, path=str(absolute)))
        unet = self.pipe.unet if denoiser_state is None else self.plain_denoiser(denoiser_state)
        ToilePipeline(unet, self.pipe.text_encoder, config).save_pretrained(out)


OBJECTIVES: dict[str, type[Objective]] = {
    "sd": DiffusionObjective,
    "sdxl": SDXLObjective,
    "sd3": FlowMatchingObjective,
    "flux": FluxObjective,
    "toile": ToileObjective,
}


def objective_for(loaded: LoadedModel) -> Objective:
    """The objective of the loaded model's family; other families are a clear error."""
    cls = OBJECTIVES.get(loaded.family)
    if cls is None:
        raise RequestError(
            "model",
            f"fine-tuning supports {', '.join(OBJECTIVES)}; {loaded.path} is a "
            f"{loaded.family} model",
        )
    return cls(loaded)
