"""toile's U-Net in plain PyTorch: the subset of diffusers' ``UNet2DConditionModel`` toile uses.

Why not diffusers' class: importing it costs seconds (diffusers pulls in torch._dynamo, scipy,
peft and transformers), several times what a 64×64 image takes to generate. This module is the
same network, module for module, so its ``state_dict`` keys are diffusers' and a saved ``unet/``
folder (``config.json`` + ``diffusion_pytorch_model.safetensors``) loads into either class.

The subset (what ``denoiser.unet_kwargs`` builds; any other value of a config field is refused by
name in :func:`unet_config`, never silently run differently):

    conv_in              3×3 conv, in_channels -> C0
    time_embedding       sinusoid(t) [B, C0] -> MLP -> emb [B, 4·C0]
    class_embedding      pooled text [B, D] -> MLP -> added to emb   (class_embed_type "projection")
    down_blocks[i]       layers_per_block × (ResNet [+ transformer]), then a stride-2 conv
                         (not on the last level); transformer = self-attn, cross-attn on the text
                         tokens, GEGLU MLP, with linear projections in and out
    mid_block            ResNet, transformer, ResNet
    up_blocks[i]         (layers_per_block + 1) × (concat skip, ResNet [+ transformer]), then
                         nearest ×2 + 3×3 conv (not on the last level)
    conv_norm_out/conv_out   GroupNorm, SiLU, 3×3 conv -> out_channels

Shapes below are for toile-mini (x [B, 12, 32, 32], widths 64/128/192, text [B, 24, 384]).
Note diffusers' naming quirk, kept here: ``attention_head_dim`` is the number of heads (diffusers
reads it as ``num_attention_heads``), so each head is ``width / attention_head_dim`` wide.

LoRA and fine-tuning use diffusers' own ``PeftAdapterMixin`` methods (``add_adapter``,
``load_lora_adapter``, ``set_adapters``, ``unload_lora``, ...): they act on module names, which
are diffusers', and are mixed into the instance on first use only (see :func:`_with_peft`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
CLASS_NAME = "UNet2DConditionModel"

# Every field of diffusers' UNet2DConditionModel config with diffusers' default (0.42): a saved
# config.json that leaves a field out gets this value, as diffusers' from_pretrained gives it.
DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "sample_size": None,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                         "DownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                       "CrossAttnUpBlock2D"],
    "only_cross_attention": False,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "dropout": 0.0,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-05,
    "cross_attention_dim": 1280,
    "transformer_layers_per_block": 1,
    "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "attention_head_dim": 8,
    "num_attention_heads": None,
    "dual_cross_attention": False,
    "use_linear_projection": False,
    "class_embed_type": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "num_class_embeds": None,
    "upcast_attention": False,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "addition_embed_type_num_heads": 64,
}
# Fields this module implements for one value only: any other value is refused by name.
FIXED: dict[str, Any] = {
    "center_input_sample": False,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "downsample_padding": 1,
    "dropout": 0.0,
    "act_fn": "silu",
    "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "num_attention_heads": None,
    "dual_cross_attention": False,
    "use_linear_projection": True,
    "addition_embed_type": None,
    "num_class_embeds": None,
    "upcast_attention": False,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
}
# Any value passes for the fields that change nothing given FIXED (addition_time_embed_dim and
# addition_embed_type_num_heads: diffusers reads them for other addition_embed_types only) and
# for sample_size, which diffusers' U-Net only records.
DOWN_TYPES = ("DownBlock2D", "CrossAttnDownBlock2D")
UP_TYPES = ("UpBlock2D", "CrossAttnUpBlock2D")


class UnsupportedConfigError(ValueError):
    """A U-Net config field has a value this module does not implement."""


class UNetConfig(dict):
    """A full diffusers U-Net config (every field of ``DIFFUSERS_DEFAULTS``), read like diffusers'
    ``unet.config``: ``config.in_channels``."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def unet_config(data: Mapping[str, Any]) -> UNetConfig:
    """The checked config: diffusers' defaults, overridden by ``data`` (a ``config.json`` or
    ``denoiser.unet_kwargs``). Keys starting with ``_`` (``_class_name``, ...) are bookkeeping.

    Raises :class:`UnsupportedConfigError` naming the field for anything not implemented here.
    """
    class_name = data.get("_class_name", CLASS_NAME)
    if class_name != CLASS_NAME:
        raise UnsupportedConfigError(f"_class_name is {class_name!r}, not {CLASS_NAME!r}")
    unknown = sorted(k for k in data if not k.startswith("_") and k not in DIFFUSERS_DEFAULTS)
    if unknown:
        raise UnsupportedConfigError(f"unknown U-Net config field(s) {unknown}")
    config = UNetConfig(DIFFUSERS_DEFAULTS)
    config.update({k: list(v) if isinstance(v, tuple) else v
                   for k, v in data.items() if not k.startswith("_")})

    def refuse(name: str, why: str) -> UnsupportedConfigError:
        return UnsupportedConfigError(
            f"U-Net config field {name} = {config[name]!r} is not supported by toile's U-Net "
            f"({why})")

    for name, value in FIXED.items():
        if config[name] != value:
            raise refuse(name, f"it implements {value!r} only")
    if config["class_embed_type"] not in (None, "projection"):
        raise refuse("class_embed_type", "it implements None and 'projection'")
    widths = config["block_out_channels"]
    if not isinstance(widths, list) or not widths or not all(_is_int(w, 1) for w in widths):
        raise refuse("block_out_channels", "a list of positive integers")
    levels = len(widths)
    if config["only_cross_attention"] not in (False, [False] * levels):
        raise refuse("only_cross_attention", "it implements False only")
    for name, kinds in (("down_block_types", DOWN_TYPES), ("up_block_types", UP_TYPES)):
        types = config[name]
        if not isinstance(types, list) or len(types) != levels or not all(
                t in kinds for t in types):
            raise refuse(name, f"one of {list(kinds)} per entry of block_out_channels")
    for name in ("layers_per_block", "attention_head_dim", "transformer_layers_per_block"):
        value = config[name]
        if not (_is_int(value, 1) or (isinstance(value, list) and len(value) == levels
                                      and all(_is_int(v, 1) for v in value))):
            raise refuse(name, "a positive integer, or one per level")
    for name in ("in_channels", "out_channels", "cross_attention_dim", "norm_num_groups"):
        if not _is_int(config[name], 1):
            raise refuse(name, "a positive integer")
    if config["class_embed_type"] == "projection" and not _is_int(
            config["projection_class_embeddings_input_dim"], 1):
        raise refuse("projection_class_embeddings_input_dim",
                     "class_embed_type 'projection' needs a positive integer")
    for name in ("norm_eps", "freq_shift", "mid_block_scale_factor", "resnet_out_scale_factor"):
        if isinstance(config[name], bool) or not isinstance(config[name], int | float):
            raise refuse(name, "a number")
    if not isinstance(config["flip_sin_to_cos"], bool):
        raise refuse("flip_sin_to_cos", "true or false")
    groups = config["norm_num_groups"]
    if any(w % groups for w in widths):
        raise refuse("norm_num_groups", "every width in block_out_channels must divide by it")
    heads = _per_level(config["attention_head_dim"], levels)
    if any(w % h for w, h in zip(widths, heads, strict=True)):
        raise refuse("attention_head_dim", "the number of heads must divide every width")
    return config


def _is_int(value: Any, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _per_level(value: int | list[int], levels: int) -> list[int]:
    return list(value) if isinstance(value, list) else [value] * levels


def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool, shift: float
                       ) -> torch.Tensor:
    """Sinusoidal embedding [B] -> [B, dim] (float32), diffusers' ``get_timestep_embedding``."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device)
                      / (half - shift))  # [half]
    args = t[:, None].float() * freqs[None, :]  # [B, half]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1, 0, 0))
    return emb


class EmbeddingMLP(nn.Module):
    """[B, in] -> Linear, SiLU, Linear -> [B, out] (diffusers' ``TimestepEmbedding``)."""

    def __init__(self, dim_in: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(dim_in, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock(nn.Module):
    """[B, c_in, h, w] + emb [B, E] -> [B, c_out, h, w] (diffusers' ``ResnetBlock2D``)."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, groups: int, eps: float,
                 out_scale: float) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in, eps=eps)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time_emb_proj = nn.Linear(emb_dim, c_out)
        self.norm2 = nn.GroupNorm(groups, c_out, eps=eps)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None
        self.out_scale = out_scale

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(emb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        skip = self.conv_shortcut(x.contiguous()) if self.conv_shortcut is not None else x
        return (skip + h) / self.out_scale


class Attention(nn.Module):
    """Multi-head attention [B, N, dim] x context [B, L, ctx_dim] -> [B, N, dim] (diffusers'
    ``Attention`` with ``AttnProcessor2_0``); self-attention when ``context`` is None."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None) -> None:
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=False)
        # [Linear, Dropout(0)] as in diffusers, so the keys are to_out.0.*
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Identity()])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        """``bias`` [B, 1, L]: additive (0 or −10000 per context token), shared by all queries."""
        context = x if context is None else context
        b, heads = x.shape[0], self.heads
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)  # [B, N|L, dim]
        head_dim = k.shape[-1] // heads
        q, k, v = (t.view(b, -1, heads, head_dim).transpose(1, 2) for t in (q, k, v))
        if bias is not None:  # [B, 1, L] -> [B, heads, 1, L], laid out as diffusers does
            bias = bias.repeat_interleave(heads, dim=0).view(b, heads, -1, bias.shape[-1])
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # [B, heads, N, head_dim]
        out = out.transpose(1, 2).reshape(b, -1, heads * head_dim).to(q.dtype)
        return self.to_out[0](out)


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """[B, N, dim] -> GEGLU to 4·dim -> Linear -> [B, N, dim]."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        # diffusers' [GEGLU, Dropout(0), Linear]: the middle slot keeps net.2's key
        self.net = nn.ModuleList([GEGLU(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


class TransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention, GEGLU MLP (``BasicTransformerBlock``)."""

    def __init__(self, dim: int, heads: int, context_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, bias: torch.Tensor | None
                ) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x  # [B, h·w, C]
        x = self.attn2(self.norm2(x), context, bias) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """[B, C, h, w] -> tokens [B, h·w, C] -> transformer blocks -> [B, C, h, w] + residual
    (diffusers' ``Transformer2DModel``, continuous input, linear projections)."""

    def __init__(self, channels: int, heads: int, depth: int, context_dim: int, groups: int
                 ) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList(
            [TransformerBlock(channels, heads, context_dim) for _ in range(depth)])
        self.proj_out = nn.Linear(channels, channels)
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, context: torch.Tensor, bias: torch.Tensor | None
                ) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).permute(0, 2, 3, 1).reshape(b, h * w, c)
        tokens = self.proj_in(tokens)
        for block in self.transformer_blocks:
            tokens = _maybe_checkpoint(self, block, tokens, context, bias)
        tokens = self.proj_out(tokens)
        return tokens.reshape(b, h, w, c).permute(0, 3, 1, 2).contiguous() + x


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)  # [B, C, h, w] -> [B, C, h/2, w/2]


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: torch.Size | None = None) -> torch.Tensor:
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # [B, C, 2h, 2w]
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)


def _maybe_checkpoint(owner: nn.Module, fn: nn.Module, *args: Any) -> torch.Tensor:
    """``fn(*args)``, recomputed in the backward pass when ``owner`` checkpoints (training)."""
    if owner.gradient_checkpointing and torch.is_grad_enabled():
        from torch.utils.checkpoint import checkpoint

        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


class DownBlock(nn.Module):
    """One encoder level: ``layers`` × (ResNet [+ transformer]) then a stride-2 conv.

    ``CrossAttnDownBlock2D`` with ``heads``, ``DownBlock2D`` without."""

    def __init__(self, c_in: int, c_out: int, layers: int, heads: int | None, depth: int,
                 downsample: bool, cfg: UNetConfig, emb_dim: int) -> None:
        super().__init__()
        groups, eps, scale = cfg.norm_num_groups, cfg.norm_eps, cfg.resnet_out_scale_factor
        if heads is not None:  # (registered first: diffusers' key order)
            self.attentions = nn.ModuleList([SpatialTransformer(
                c_out, heads, depth, cfg.cross_attention_dim, groups) for _ in range(layers)])
        self.resnets = nn.ModuleList([ResnetBlock(c_in if i == 0 else c_out, c_out, emb_dim,
                                                  groups, eps, scale) for i in range(layers)])
        if downsample:
            self.downsamplers = nn.ModuleList([Downsample(c_out)])
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor,
                bias: torch.Tensor | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """-> (output, skips): one skip per layer and one after the downsampling."""
        attentions = getattr(self, "attentions", [None] * len(self.resnets))
        skips = []
        for resnet, attn in zip(self.resnets, attentions, strict=True):
            x = _maybe_checkpoint(self, resnet, x, emb)
            if attn is not None:
                x = attn(x, context, bias)
            skips.append(x)
        if hasattr(self, "downsamplers"):
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UpBlock(nn.Module):
    """One decoder level: ``layers`` × (concat a skip, ResNet [+ transformer]), then nearest ×2
    and a conv. ``CrossAttnUpBlock2D`` with ``heads``, ``UpBlock2D`` without.

    ``c_prev`` is the incoming width, ``c_skip_last`` the width of the last (shallowest) skip."""

    def __init__(self, c_prev: int, c_out: int, c_skip_last: int, layers: int, heads: int | None,
                 depth: int, upsample: bool, cfg: UNetConfig, emb_dim: int) -> None:
        super().__init__()
        groups, eps, scale = cfg.norm_num_groups, cfg.norm_eps, cfg.resnet_out_scale_factor
        if heads is not None:
            self.attentions = nn.ModuleList([SpatialTransformer(
                c_out, heads, depth, cfg.cross_attention_dim, groups) for _ in range(layers)])
        self.resnets = nn.ModuleList([ResnetBlock(
            (c_prev if i == 0 else c_out) + (c_skip_last if i == layers - 1 else c_out), c_out,
            emb_dim, groups, eps, scale) for i in range(layers)])
        if upsample:
            self.upsamplers = nn.ModuleList([Upsample(c_out)])
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor], emb: torch.Tensor,
                context: torch.Tensor, bias: torch.Tensor | None,
                size: torch.Size | None) -> torch.Tensor:
        """``skips``: this level's, deepest last (consumed from the end)."""
        attentions = getattr(self, "attentions", [None] * len(self.resnets))
        for resnet, attn in zip(self.resnets, attentions, strict=True):
            x = torch.cat([x, skips.pop()], dim=1)
            x = _maybe_checkpoint(self, resnet, x, emb)
            if attn is not None:
                x = attn(x, context, bias)
        if hasattr(self, "upsamplers"):
            x = self.upsamplers[0](x, size)
        return x


class MidBlock(nn.Module):
    """ResNet, transformer, ResNet at the deepest level (``UNetMidBlock2DCrossAttn``)."""

    def __init__(self, c: int, heads: int, depth: int, cfg: UNetConfig, emb_dim: int) -> None:
        super().__init__()
        groups, eps, scale = cfg.norm_num_groups, cfg.norm_eps, cfg.mid_block_scale_factor
        self.attentions = nn.ModuleList([SpatialTransformer(c, heads, depth,
                                                            cfg.cross_attention_dim, groups)])
        self.resnets = nn.ModuleList([ResnetBlock(c, c, emb_dim, groups, eps, scale)
                                      for _ in range(2)])
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
        x = _maybe_checkpoint(self, self.resnets[0], x, emb)
        x = self.attentions[0](x, context, bias)
        return _maybe_checkpoint(self, self.resnets[1], x, emb)


class UNetOutput(NamedTuple):
    sample: torch.Tensor


class ToileUNet(nn.Module):
    """The U-Net: noisy x [B, C, h, w], timestep [B] (0..1000), text tokens [B, L, D] (+ mask
    [B, L], pooled [B, D]) -> [B, C_out, h, w]. Same modules and keys as diffusers' class."""

    _supports_gradient_checkpointing = True  # diffusers' flag, read by toile's fine-tuning

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__()
        cfg = config if isinstance(config, UNetConfig) else unet_config(config)
        self.config = cfg
        widths = cfg.block_out_channels
        levels = len(widths)
        layers = _per_level(cfg.layers_per_block, levels)
        heads = _per_level(cfg.attention_head_dim, levels)  # diffusers: attention_head_dim = heads
        depth = _per_level(cfg.transformer_layers_per_block, levels)
        emb_dim = 4 * widths[0]

        self.conv_in = nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1)
        self.time_embedding = EmbeddingMLP(widths[0], emb_dim)
        self.class_embedding = (EmbeddingMLP(cfg.projection_class_embeddings_input_dim, emb_dim)
                                if cfg.class_embed_type == "projection" else None)
        self.down_blocks = nn.ModuleList([DownBlock(
            widths[max(i - 1, 0)], widths[i], layers[i],
            heads[i] if kind == "CrossAttnDownBlock2D" else None, depth[i], i < levels - 1, cfg,
            emb_dim) for i, kind in enumerate(cfg.down_block_types)])
        rw, rl, rh, rd = (list(reversed(v)) for v in (widths, layers, heads, depth))
        self.up_blocks = nn.ModuleList([UpBlock(  # (before mid_block: diffusers' key order)
            rw[max(i - 1, 0)], rw[i], rw[min(i + 1, levels - 1)], rl[i] + 1,
            rh[i] if kind == "CrossAttnUpBlock2D" else None, rd[i], i < levels - 1, cfg,
            emb_dim) for i, kind in enumerate(cfg.up_block_types)])
        self.mid_block = MidBlock(widths[-1], heads[-1], depth[-1], cfg, emb_dim)
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, widths[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(widths[0], cfg.out_channels, 3, padding=1)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ToileUNet:
        return cls(config)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> UNetOutput | tuple[torch.Tensor]:
        """diffusers' call signature (the arguments toile passes):

        sample                  [B, C, h, w]   noisy packed image
        timestep                [B] or scalar  0..1000
        encoder_hidden_states   [B, L, D]      text tokens, attended by every transformer
        class_labels            [B, D']        pooled text (class_embed_type "projection")
        encoder_attention_mask  [B, L]         1 = token, 0 = padding
        """
        cfg, x = self.config, sample
        levels = len(self.up_blocks)
        # Sides that do not divide by 2^(levels−1): each upsampling matches its skip's size.
        match_sizes = any(s % 2 ** (levels - 1) for s in x.shape[-2:])
        bias = None
        if encoder_attention_mask is not None:  # [B, L] -> additive [B, 1, L]
            bias = ((1 - encoder_attention_mask.to(x.dtype)) * -10000.0).unsqueeze(1)

        t = timestep
        if not torch.is_tensor(t):  # 64-bit, but 32 where the device lacks it (as diffusers)
            wide = x.device.type not in ("mps", "npu", "neuron")
            kind = (torch.float64 if wide else torch.float32) if isinstance(t, float) else (
                torch.int64 if wide else torch.int32)
            t = torch.tensor([t], dtype=kind, device=x.device)
        elif t.dim() == 0:
            t = t[None].to(x.device)
        t = t.expand(x.shape[0])
        t_emb = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos,
                                   cfg.freq_shift).to(x.dtype)  # [B, C0]
        emb = self.time_embedding(t_emb)  # [B, 4·C0]
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError("class_labels should be provided when num_class_embeds > 0")
            emb = emb + self.class_embedding(class_labels).to(x.dtype)

        x = self.conv_in(x)  # [B, C0, h, w]
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, emb, encoder_hidden_states, bias)
            skips += block_skips
        x = self.mid_block(x, emb, encoder_hidden_states, bias)
        for i, block in enumerate(self.up_blocks):
            n = len(block.resnets)
            level_skips, skips = skips[-n:], skips[:-n]
            size = skips[-1].shape[2:] if match_sizes and i < levels - 1 else None
            x = block(x, level_skips, emb, encoder_hidden_states, bias, size)
        x = self.conv_out(F.silu(self.conv_norm_out(x)))  # [B, C_out, h, w]
        return UNetOutput(x) if return_dict else (x,)

    # -------------------------------------------------------------- diffusers' training API
    def enable_gradient_checkpointing(self) -> None:
        """Recompute ResNet and transformer activations in the backward pass (less memory)."""
        self._set_checkpointing(True)

    def disable_gradient_checkpointing(self) -> None:
        self._set_checkpointing(False)

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(getattr(m, "gradient_checkpointing", False) for m in self.modules())

    def _set_checkpointing(self, on: bool) -> None:
        for module in self.modules():
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = on


# diffusers' PeftAdapterMixin API, run by diffusers' own code on first use (see _with_peft).
PEFT_METHODS = (
    "add_adapter", "set_adapter", "set_adapters", "disable_adapters", "enable_adapters",
    "active_adapters", "load_lora_adapter", "save_lora_adapter", "unload_lora", "delete_adapters",
    "fuse_lora", "unfuse_lora", "disable_lora", "enable_lora",
)
_PEFT_CLASSES: dict[type, type] = {}


def _with_peft(unet: ToileUNet) -> ToileUNet:
    """``unet``, its class extended by diffusers' ``PeftAdapterMixin`` (imported here, on first
    use of a LoRA method: an explicit LoRA run or fine-tune, never plain generation).

    The mixin's methods work on module names and peft's layers, which are diffusers' here, so
    LoRA files load, scale and unload exactly as on diffusers' own U-Net."""
    from diffusers.loaders.peft import PeftAdapterMixin

    cls = type(unet)
    if not issubclass(cls, PeftAdapterMixin):
        if cls not in _PEFT_CLASSES:
            _PEFT_CLASSES[cls] = type(cls.__name__, (PeftAdapterMixin, cls),
                                      {"__module__": cls.__module__})
        unet.__class__ = _PEFT_CLASSES[cls]
    return unet


def _peft_method(name: str) -> Any:
    def method(self: ToileUNet, *args: Any, **kwargs: Any) -> Any:
        return getattr(_with_peft(self), name)(*args, **kwargs)

    method.__name__ = method.__qualname__ = name
    method.__doc__ = f"diffusers' ``PeftAdapterMixin.{name}`` (imports diffusers on first use)."
    return method


for _name in PEFT_METHODS:
    setattr(ToileUNet, _name, _peft_method(_name))


# --------------------------------------------------------------------------- folders on disk
def read_unet_config(folder: str | Path) -> UNetConfig:
    """``folder/config.json`` as a checked config (see :func:`unet_config`)."""
    data = json.loads((Path(folder) / CONFIG_FILE).read_text())
    if not isinstance(data, dict):
        raise UnsupportedConfigError(f"{CONFIG_FILE} must hold a JSON object")
    return unet_config(data)


class WeightsMismatchError(ValueError):
    """The weights file and the config disagree (a tensor missing, extra or of another shape)."""

    def __init__(self, message: str, missing: list[str]) -> None:
        super().__init__(message)
        self.missing = missing


def load_unet(folder: str | Path, *, dtype: torch.dtype = torch.float32,
              device: torch.device | str = "cpu") -> ToileUNet:
    """A saved diffusers ``unet/`` folder as a :class:`ToileUNet` in eval mode, weights cast to
    ``dtype``: built without initialising (meta tensors), then the file's tensors assigned.

    Raises :class:`UnsupportedConfigError` for a config this module does not implement and
    :class:`WeightsMismatchError` when the weights do not fit the config exactly."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config = read_unet_config(folder)
    with torch.device("meta"):
        unet = ToileUNet(config)
    state = load_file(str(folder / WEIGHTS_FILE), device=str(device))
    expected = {name: tuple(t.shape) for name, t in unet.state_dict().items()}
    missing = [name for name in expected if name not in state]
    extra = [name for name in state if name not in expected]
    if missing or extra:
        what = (f"lacks {len(missing)} of the U-Net's tensors, e.g. {missing[0]}" if missing
                else f"holds {len(extra)} tensors the U-Net does not have, e.g. {extra[0]}")
        raise WeightsMismatchError(f"{folder / WEIGHTS_FILE} {what}", missing)
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise WeightsMismatchError(
                f"{folder / WEIGHTS_FILE}: {name} has shape {list(state[name].shape)}, the "
                f"config needs {list(shape)}", [])
    unet.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    return unet.eval()


def save_unet(unet: ToileUNet, folder: str | Path, *, dtype: torch.dtype | None = None) -> Path:
    """Write ``unet`` as diffusers' ``save_pretrained`` does: ``config.json`` (every field,
    sorted, with ``_class_name`` and ``_diffusers_version``) and the weights (``dtype`` if
    given) in ``diffusion_pytorch_model.safetensors`` with ``{"format": "pt"}`` metadata."""
    from importlib.metadata import version

    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = dict(unet.config) | {"_class_name": CLASS_NAME,
                                "_diffusers_version": version("diffusers")}
    (folder / CONFIG_FILE).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    state = {name: (t if dtype is None else t.to(dtype)).detach().cpu().contiguous()
             for name, t in unet.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    return folder
