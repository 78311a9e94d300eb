"""The denoiser: a ``UNet2DConditionModel`` on pixel-unshuffled images.

Why a U-Net: on a 2-core CPU it gave the most spatial structure per training minute of the
designs we measured (notes/calibration.md) — convolutions are a strong spatial prior that a
small transformer with learned positions lacks. Two implementations of the one network share
``unet_kwargs`` and every state-dict key, so a saved ``unet/`` folder loads into either:

- ``build_unet``: diffusers' class, for training (gradient checkpointing, EMA, FSDP as diffusers
  does them) and for ``UNet2DConditionModel.from_pretrained`` users;
- ``build_plain_unet`` / ``unet.load_unet``: toile's plain-PyTorch copy (``unet.py``), for
  inference, which never imports diffusers (its import alone costs seconds).

Shapes for the default ``toile-mini`` (64×64 RGB, patch 2, widths 64/128/192):

    x        [B, 12, 32, 32]   packed noisy image (pipeline packs, see ``pipeline.pack``)
    t        [B]               flow time in [0, 1], fed to the U-Net as 1000·t
    tokens   [B, 24, 384]      MiniLM token states   -> cross-attention at 16² and 8²
    mask     [B, 24]           1 = real token, 0 = padding (padding is masked out)
    pooled   [B, 384]          normalised sentence embedding -> added to the time embedding
    v        [B, 12, 32, 32]   predicted velocity (noise − x0)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel

    from toile.families.toile.config import ToileModelConfig
    from toile.families.toile.unet import ToileUNet

    # Either implementation: same modules, keys, call signature and outputs.
    Denoiser = UNet2DConditionModel | ToileUNet

# Flow time t ∈ [0, 1] is scaled to the [0, 1000] range the sinusoidal embedding was designed
# for (as SD3 and Flux do), so neighbouring timesteps get distinguishable embeddings.
TIME_SCALE = 1000.0


@dataclass
class TextCondition:
    """The text side of one batch: what the denoiser attends to."""

    tokens: torch.Tensor  # [B, L, D] token states
    mask: torch.Tensor  # [B, L] 1 = token, 0 = padding
    pooled: torch.Tensor  # [B, D] normalised mean-pooled embedding

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def to(self, device: torch.device | str, dtype: torch.dtype) -> TextCondition:
        return TextCondition(
            self.tokens.to(device, dtype), self.mask.to(device), self.pooled.to(device, dtype)
        )

    def select(self, index: torch.Tensor | slice) -> TextCondition:
        return TextCondition(self.tokens[index], self.mask[index], self.pooled[index])

    @staticmethod
    def cat(parts: list[TextCondition]) -> TextCondition:
        return TextCondition(
            torch.cat([p.tokens for p in parts]),
            torch.cat([p.mask for p in parts]),
            torch.cat([p.pooled for p in parts]),
        )

    def where(self, keep: torch.Tensor, other: TextCondition) -> TextCondition:
        """Per-sample choice: ``self`` where ``keep`` [B] is True, else ``other`` (broadcast)."""
        k3, k2 = keep[:, None, None], keep[:, None]
        return TextCondition(
            torch.where(k3, self.tokens, other.tokens.expand_as(self.tokens)),
            torch.where(k2, self.mask, other.mask.expand_as(self.mask)),
            torch.where(k2, self.pooled, other.pooled.expand_as(self.pooled)),
        )


def unet_kwargs(config: ToileModelConfig) -> dict:
    """The ``UNet2DConditionModel`` constructor arguments for ``config`` (all choices here)."""
    d = config.denoiser
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in d.attention)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(d.attention))
    return {
        "sample_size": config.packing.packed_size,
        "in_channels": config.packing.packed_channels,
        "out_channels": config.packing.packed_channels,
        "down_block_types": down,
        "up_block_types": up,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "block_out_channels": tuple(d.widths),
        "layers_per_block": d.layers_per_block,
        "attention_head_dim": d.attention_head_dim,
        "norm_num_groups": d.norm_groups,
        "cross_attention_dim": config.text.dim,
        # Pooled sentence embedding -> MLP -> added to the time embedding: a global "what is in
        # the picture" signal for every ResNet block, on top of per-location cross-attention.
        "class_embed_type": "projection",
        "projection_class_embeddings_input_dim": config.text.dim,
        # Linear (not 1×1 conv) projections in the transformer blocks: same maths, faster on CPU.
        "use_linear_projection": True,
    }


def build_unet(config: ToileModelConfig, *, seed: int | None = None) -> UNet2DConditionModel:
    """A freshly initialised U-Net. All init decisions live here.

    diffusers' defaults (PyTorch's Kaiming-uniform for convs/linears, ones/zeros for norms) are
    kept, except that ``conv_out`` is zeroed when ``zero_init_output`` (see the config).
    """
    from diffusers import UNet2DConditionModel

    if seed is not None:
        torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_kwargs(config))
    if config.denoiser.zero_init_output:
        torch.nn.init.zeros_(unet.conv_out.weight)
        torch.nn.init.zeros_(unet.conv_out.bias)
    return unet


def build_plain_unet(config: ToileModelConfig, *, seed: int | None = None) -> ToileUNet:
    """``build_unet``'s network as toile's plain-PyTorch U-Net: same config and init rule
    (PyTorch's default init, ``conv_out`` zeroed when ``zero_init_output``), though not the same
    random draws for a seed (the modules are created in another order)."""
    from toile.families.toile.unet import ToileUNet

    if seed is not None:
        torch.manual_seed(seed)
    unet = ToileUNet(unet_kwargs(config))
    if config.denoiser.zero_init_output:
        torch.nn.init.zeros_(unet.conv_out.weight)
        torch.nn.init.zeros_(unet.conv_out.bias)
    return unet


def predict_velocity(
    unet: Denoiser, x: torch.Tensor, t: torch.Tensor, cond: TextCondition
) -> torch.Tensor:
    """The model contract used by training and sampling: v = f(x_t [B,C,h,w], t [B], text)."""
    return unet(
        x,
        t * TIME_SCALE,
        encoder_hidden_states=cond.tokens,
        encoder_attention_mask=cond.mask,
        class_labels=cond.pooled,
        return_dict=False,
    )[0]


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
