"""A toile super-resolution folder: load it and upscale images 4× (with their prompt).

Folder layout (written by ``python -m toile.train.sr_train --export``)::

    toile_sr.json       {"net": SRNetConfig, "text": TextEncoderConfig, "noise_level": ...}
    sr.safetensors      weights (float16 on disk; cast to the run dtype on load)
    MODEL_CARD.md
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from toile.families.toile.sr_net import SRNet, SRNetConfig

if TYPE_CHECKING:
    import torch
    from PIL import Image

CONFIG_FILE = "toile_sr.json"
WEIGHTS_FILE = "sr.safetensors"


class ToileSR:
    """``upscale(images, prompts)``: each image ``factor`` times larger, same seed-free result
    every time (one deterministic pass)."""

    def __init__(self, net: SRNet, text_encoder, noise_level: float) -> None:
        self.net = net.eval()
        self.text_encoder = text_encoder
        self.noise_level = noise_level

    @classmethod
    def load(cls, folder: Path, device: str = "cpu",
             dtype: torch.dtype | None = None) -> ToileSR:
        import torch
        from safetensors.torch import load_file

        from toile.families.toile.config import TextEncoderConfig
        from toile.families.toile.text import TextEncoder

        meta = json.loads((folder / CONFIG_FILE).read_text())
        net = SRNet(SRNetConfig.from_json(meta["net"]))
        net.load_state_dict({k: v.float() for k, v in load_file(folder / WEIGHTS_FILE).items()})
        net = net.to(device, dtype or torch.float32)
        encoder = TextEncoder(TextEncoderConfig(**meta["text"]), model_folder=folder,
                              device=device)
        return cls(net, encoder, float(meta.get("noise_level", 0.0)))

    @property
    def factor(self) -> int:
        return self.net.config.factor

    def upscale(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[Image.Image]:
        import numpy as np
        import torch
        from PIL import Image as PILImage

        parameter = next(self.net.parameters())
        low = torch.stack([
            torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32).copy())
            .permute(2, 0, 1) / 127.5 - 1.0 for image in images]).to(parameter.device,
                                                                     parameter.dtype)
        with torch.inference_mode():
            pooled = self.text_encoder.encode(list(prompts)).pooled.float()
            keep = torch.tensor([bool(p.strip()) for p in prompts])[:, None]
            pooled = (pooled * keep).to(parameter.device, parameter.dtype)
            level = torch.full((len(images),), self.noise_level, device=parameter.device)
            high = self.net(low, pooled, level)  # [B, 3, 4h, 4w]
        pixels = ((high.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return [PILImage.fromarray(p.permute(1, 2, 0).cpu().numpy()) for p in pixels]
