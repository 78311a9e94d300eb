"""A toile reader model folder: load it, prepare images, caption and answer.

Folder layout (written by ``python -m toile.train.reader_train --export``)::

    toile_reader.json      {"net": ReaderNetConfig, "max_new_tokens": ..., "training": ...}
    reader.safetensors     weights (float16 on disk; cast to the run dtype on load)
    tokenizer.json         a ``tokenizers`` word-level tokenizer
    MODEL_CARD.md

Any image is read the same way: converted to RGB, padded to a square with its border colour
(so shapes keep their proportions) and resized to the network's side; :class:`Prepared` says
what was done, for the record.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from toile.data.reader_text import CAPTION_PROMPT, LONG_CAPTION_PROMPT, SPECIALS, vocabulary
from toile.families.toile.reader_net import ReaderNet, ReaderNetConfig

if TYPE_CHECKING:
    import torch
    from PIL import Image
    from tokenizers import Tokenizer

CONFIG_FILE = "toile_reader.json"
WEIGHTS_FILE = "reader.safetensors"
TOKENIZER_FILE = "tokenizer.json"
PAD, UNK, BOS, SEP, EOS = range(len(SPECIALS))


def build_tokenizer(words: list[str] | None = None) -> Tokenizer:
    """A word-level tokenizer over ``words`` (default: :func:`vocabulary`); ids follow the
    list's order, so ``[PAD]`` is 0 ... ``[EOS]`` is 4."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    words = vocabulary() if words is None else words
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)},
                                           unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return tokenizer


def detokenize(words: list[str]) -> str:
    """Words back to text: spaces between words, none before punctuation."""
    text = " ".join(words)
    for mark in (" .", " ,", " ?", " '"):
        text = text.replace(mark, mark.strip())
    return text


@dataclass(frozen=True)
class Prepared:
    pixels: torch.Tensor  # [1, 3, S, S] in [-1, 1]
    note: str  # what was done to the input, for the record


def preparation_note(image: Image.Image, side: int) -> str:
    """What :func:`prepare_image` does to ``image`` (without doing it)."""
    width, height = image.size
    steps = [f"{image.mode} {width}x{height}"]
    if width != height:
        steps.append(f"padded to {max(width, height)}x{max(width, height)} with the border "
                     "colour")
    if max(width, height) != side:
        steps.append(f"resized to {side}x{side}")
    return "; ".join(steps)


def prepare_image(image: Image.Image, side: int) -> Prepared:
    import numpy as np
    import torch
    from PIL import Image as PILImage

    rgb = image.convert("RGB")
    width, height = rgb.size
    if width != height:
        border = np.concatenate([np.asarray(rgb)[[0, -1]].reshape(-1, 3),
                                 np.asarray(rgb)[:, [0, -1]].reshape(-1, 3)])
        fill = tuple(int(v) for v in np.median(border, axis=0))
        square = PILImage.new("RGB", (max(width, height),) * 2, fill)
        square.paste(rgb, ((square.width - width) // 2, (square.height - height) // 2))
        rgb = square
    if rgb.size != (side, side):
        rgb = rgb.resize((side, side), PILImage.Resampling.BOX if rgb.width > side
                         else PILImage.Resampling.BILINEAR)
    array = torch.from_numpy(np.asarray(rgb, dtype=np.float32).copy())
    pixels = (array.permute(2, 0, 1)[None] / 127.5) - 1.0
    return Prepared(pixels, preparation_note(image, side))


class ToileReader:
    """A loaded reader: ``caption(image)``, ``caption(image, long=True)``,
    ``answer(image, question)``."""

    def __init__(self, net: ReaderNet, tokenizer: Tokenizer, max_new_tokens: int) -> None:
        self.net = net.eval()
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens

    @classmethod
    def load(cls, folder: Path, device: str = "cpu",
             dtype: torch.dtype | None = None) -> ToileReader:
        import torch
        from safetensors.torch import load_file
        from tokenizers import Tokenizer

        meta = json.loads((folder / CONFIG_FILE).read_text())
        net = ReaderNet(ReaderNetConfig.from_json(meta["net"]))
        net.load_state_dict({k: v.float() for k, v in load_file(folder / WEIGHTS_FILE).items()})
        net = net.to(device, dtype or torch.float32)
        tokenizer = Tokenizer.from_file(str(folder / TOKENIZER_FILE))
        return cls(net, tokenizer, int(meta.get("max_new_tokens", 64)))

    @property
    def side(self) -> int:
        return self.net.config.image_size

    def prompt_ids(self, prompt: str) -> list[int]:
        """``[BOS] prompt [SEP]``, truncated so an answer still fits the network's window."""
        ids = self.tokenizer.encode(prompt).ids[: self.net.config.max_tokens // 2]
        return [BOS, *ids, SEP]

    def read(self, image: Image.Image, prompt: str) -> tuple[str, str]:
        """The text the model writes after ``prompt``, and how the image was prepared."""
        import torch

        prepared = prepare_image(image, self.side)
        parameter = next(self.net.parameters())
        pixels = prepared.pixels.to(parameter.device, parameter.dtype)
        prompt_tensor = torch.tensor([self.prompt_ids(prompt)], device=parameter.device)
        (ids,) = self.net.greedy(pixels, prompt_tensor, EOS, self.max_new_tokens)
        words = [self.tokenizer.id_to_token(i) for i in ids if i > EOS]
        return detokenize(words), prepared.note

    def caption(self, image: Image.Image, long: bool = False) -> str:
        return self.read(image, LONG_CAPTION_PROMPT if long else CAPTION_PROMPT)[0]

    def answer(self, image: Image.Image, question: str) -> str:
        return self.read(image, question)[0]
