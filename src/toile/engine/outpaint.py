"""Outpainting as inpainting on an extended canvas, then the original pasted back exactly."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image

    from toile.request import Outpaint


def extend_canvas(image: Image.Image, margins: Outpaint) -> tuple[Image.Image, Image.Image]:
    """The canvas (margins filled by repeating the edge pixels, which gives the model colour
    context instead of a flat grey) and its mask (white = generate, black = original)."""
    import numpy as np
    from PIL import Image

    pixels = np.asarray(image.convert("RGB"))
    padded = np.pad(
        pixels,
        ((margins.top, margins.bottom), (margins.left, margins.right), (0, 0)),
        mode="edge",
    )
    mask = np.full(padded.shape[:2], 255, dtype=np.uint8)
    height, width = pixels.shape[:2]
    mask[margins.top : margins.top + height, margins.left : margins.left + width] = 0
    return Image.fromarray(padded), Image.fromarray(mask, mode="L")


def paste_original(generated: Image.Image, original: Image.Image, margins: Outpaint) -> Image.Image:
    """Put the original pixels back unchanged, so outpainting never alters what was there."""
    result = generated.convert("RGB").copy()
    result.paste(original.convert("RGB"), (margins.left, margins.top))
    return result
