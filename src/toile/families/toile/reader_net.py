"""toile's reader network: an image encoder and a text decoder that writes captions and answers.

The design is Donut's (Kim et al. 2022, "OCR-free Document Understanding Transformer"): one
encoder-decoder serves every task by the prompt it is given — ``caption``, ``describe in
detail``, or a question — and writes the text after it. Plain PyTorch (``nn.Transformer*``
layers) rather than transformers' ``VisionEncoderDecoderModel``: the conv encoder we chose by
measurement (model card) has no sequence-output class there, and the reader then loads without
importing transformers (about 2 s of every process's start).

Shapes (default config, B images, T text tokens):

    image    [B, 3, 64, 64]   RGB in [-1, 1]
    memory   [B, 64, 128]     8×8 image tokens with learned 2-D positions
    tokens   [B, T]           prompt [SEP] target so far (word ids)
    logits   [B, T, V]        next-word scores
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass

import torch
from torch import nn


class EncoderKind(enum.StrEnum):
    CONV = "conv"  # strided convolutions + residual blocks, then transformer layers
    PATCH = "patch"  # ViT: 8×8 patches, then transformer layers


@dataclass(frozen=True)
class ReaderNetConfig:
    vocab_size: int
    image_size: int = 64
    encoder: EncoderKind = EncoderKind.CONV
    width: int = 128
    heads: int = 4
    encoder_layers: int = 2
    decoder_layers: int = 3
    max_tokens: int = 96

    def to_json(self) -> dict[str, object]:
        return asdict(self) | {"encoder": str(self.encoder)}

    @classmethod
    def from_json(cls, data: dict[str, object]) -> ReaderNetConfig:
        fields = dict(data)
        fields["encoder"] = EncoderKind(str(fields["encoder"]))
        return cls(**fields)  # type: ignore[arg-type]


def _layer(width: int, heads: int, cross: bool) -> nn.Module:
    cls = nn.TransformerDecoderLayer if cross else nn.TransformerEncoderLayer
    return cls(width, heads, 4 * width, dropout=0.0, activation="gelu", batch_first=True,
               norm_first=True)


class _ResBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.GroupNorm(8, channels), nn.GELU(), nn.Conv2d(channels, channels, 3, padding=1),
            nn.GroupNorm(8, channels), nn.GELU(), nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def _conv_stem(width: int) -> nn.Module:
    # 64² -> 32² -> 16² (res) -> 8² (res): 64 tokens whose receptive fields cover whole
    # objects, so shape is read by the convolutions and not left to attention.
    return nn.Sequential(
        nn.Conv2d(3, 48, 4, stride=2, padding=1), nn.GELU(),
        nn.Conv2d(48, 64, 4, stride=2, padding=1), _ResBlock(64),
        nn.Conv2d(64, 128, 2, stride=2), _ResBlock(128),
        nn.Conv2d(128, width, 1))


class ImageEncoder(nn.Module):
    def __init__(self, config: ReaderNetConfig) -> None:
        super().__init__()
        grid = config.image_size // 8
        self.stem = (_conv_stem(config.width) if config.encoder is EncoderKind.CONV
                     else nn.Conv2d(3, config.width, 8, stride=8))
        self.position = nn.Parameter(torch.randn(1, grid * grid, config.width) * 0.02)
        self.layers = nn.ModuleList(_layer(config.width, config.heads, cross=False)
                                    for _ in range(config.encoder_layers))
        self.norm = nn.LayerNorm(config.width)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.stem(image).flatten(2).transpose(1, 2) + self.position  # [B, 64, W]
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


class TextDecoder(nn.Module):
    def __init__(self, config: ReaderNetConfig) -> None:
        super().__init__()
        self.embed = nn.Embedding(config.vocab_size, config.width)
        # GPT-2's init: with the output tied to it, N(0, 1) rows would start with logits of
        # std ~sqrt(width) and a loss far above log(V).
        nn.init.normal_(self.embed.weight, std=0.02)
        self.position = nn.Parameter(torch.randn(1, config.max_tokens, config.width) * 0.02)
        self.layers = nn.ModuleList(_layer(config.width, config.heads, cross=True)
                                    for _ in range(config.decoder_layers))
        self.norm = nn.LayerNorm(config.width)

    def forward(self, tokens: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        # Rows are right-padded, so the causal mask alone keeps real words from seeing padding.
        length = tokens.shape[1]
        x = self.embed(tokens) + self.position[:, :length]
        causal = nn.Transformer.generate_square_subsequent_mask(length, device=tokens.device,
                                                                dtype=x.dtype)
        for layer in self.layers:
            x = layer(x, memory, tgt_mask=causal, tgt_is_causal=True)
        return self.norm(x) @ self.embed.weight.T  # tied output embedding: [B, T, V]


class ReaderNet(nn.Module):
    def __init__(self, config: ReaderNetConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = ImageEncoder(config)
        self.decoder = TextDecoder(config)

    def forward(self, image: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.decoder(tokens, self.encoder(image))

    @torch.inference_mode()
    def greedy(self, image: torch.Tensor, prompt: torch.Tensor, end: int,
               max_new: int) -> list[list[int]]:
        """Greedy decoding of each row of ``prompt`` [B, P] (same length; no padding) until
        ``end`` or ``max_new`` words; returns the new words of each row, ``end`` excluded."""
        memory = self.encoder(image)
        tokens = prompt
        done = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
        limit = min(max_new, self.config.max_tokens - prompt.shape[1])
        for _ in range(limit):
            # Recomputing the whole (short) sequence each step costs less here than keeping
            # a key/value cache through nn.TransformerDecoderLayer, which has none.
            following = self.decoder(tokens, memory)[:, -1].argmax(-1)
            following = torch.where(done, torch.full_like(following, end), following)
            tokens = torch.cat([tokens, following[:, None]], dim=1)
            done |= following == end
            if bool(done.all()):
                break
        new = tokens[:, prompt.shape[1]:].tolist()
        return [row[:row.index(end)] if end in row else row for row in new]
