"""Canvas work around inpainting: extending the canvas for outpainting, and compositing.

Both inpainting and outpainting keep the pixels the mask keeps *exactly*: the model's output is
blended over the original with the mask as alpha (as A1111's mask overlay does), because a VAE
round trip alters every pixel slightly and users expect what they did not mask to stay put.
"""

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


def composite(generated: Image.Image, original: Image.Image, mask: Image.Image) -> Image.Image:
    """``mask`` as alpha: white takes the generated pixel, black keeps the original exactly."""
    from PIL import Image

    return Image.composite(generated.convert("RGB"), original.convert("RGB"), mask.convert("L"))
