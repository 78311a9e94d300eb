"""toile's super-resolution stage: 4× up, conditioned on the low-resolution image and the prompt.

The cascade idea is DeepFloyd IF's (stage II: a 64² image and the prompt in, 256² out, with
noise augmentation of the input whose level is itself a condition). Unlike IF's stage II this
network is a single-pass regressor (L1 to the true render), not a diffusion model: the scene
world's pictures are flat colours whose edges are fixed by the anti-aliased low-resolution
pixels, so there is little left to sample, and one pass keeps 256² within CPU budgets
(model card: the measurement against Lanczos and bicubic).

Plain PyTorch (EDSR-style residual blocks at the low resolution, then pixel shuffle; Lim et al.
2017), with FiLM (Perez et al. 2018) from the pooled prompt embedding and the noise level.

Shapes (factor 4, C channels):

    low      [B, 3, h, w]      in [-1, 1]
    pooled   [B, 384]          normalised sentence embedding (zeros: no prompt)
    level    [B]               noise-augmentation std of ``low`` (0 at inference by default)
    high     [B, 3, 4h, 4w]    bilinear(low) + the predicted residual
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class SRNetConfig:
    factor: int = 4
    channels: int = 48
    blocks: int = 6
    text_dim: int = 384

    def to_json(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, int]) -> SRNetConfig:
        return cls(**data)


class _FiLMBlock(nn.Module):
    """conv-GELU-conv residual block whose features are scaled and shifted by the condition."""

    def __init__(self, channels: int, cond_dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.film = nn.Linear(cond_dim, 2 * channels)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.film(cond)[:, :, None, None].chunk(2, dim=1)  # [B, C, 1, 1] each
        h = F.gelu(self.conv1(x)) * (1 + scale) + shift
        return x + self.conv2(h)


class SRNet(nn.Module):
    def __init__(self, config: SRNetConfig) -> None:
        super().__init__()
        self.config = config
        width = config.channels
        self.cond = nn.Sequential(nn.Linear(config.text_dim + 16, width), nn.GELU())
        self.head = nn.Conv2d(3, width, 3, padding=1)
        self.blocks = nn.ModuleList(_FiLMBlock(width, width) for _ in range(config.blocks))
        self.tail = nn.Conv2d(width, 3 * config.factor ** 2, 3, padding=1)
        nn.init.zeros_(self.tail.weight)  # starts as plain bilinear upsampling
        nn.init.zeros_(self.tail.bias)

    @staticmethod
    def level_features(level: torch.Tensor) -> torch.Tensor:
        """[B] noise std -> [B, 16] sinusoidal features (levels are small: scaled by 100)."""
        freqs = torch.exp(torch.linspace(0.0, 4.0, 8, device=level.device))  # 1 .. e^4
        angles = level.float()[:, None] * 100.0 * freqs[None] / 10.0
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    def forward(self, low: torch.Tensor, pooled: torch.Tensor,
                level: torch.Tensor) -> torch.Tensor:
        cond = self.cond(torch.cat([pooled, self.level_features(level).to(pooled.dtype)], 1))
        x = self.head(low)
        for block in self.blocks:
            x = block(x, cond)
        residual = F.pixel_shuffle(self.tail(x), self.config.factor)
        base = F.interpolate(low, scale_factor=self.config.factor, mode="bilinear",
                             align_corners=False)
        return base + residual
