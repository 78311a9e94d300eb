"""Small assertions shared by the family tests."""

from __future__ import annotations

import numpy as np
from PIL import Image

PARITY_TOLERANCE = 2  # uint8 levels: "the same pixels within 2/255"


def max_abs_diff(a: Image.Image, b: Image.Image) -> int:
    assert a.size == b.size, f"sizes differ: {a.size} vs {b.size}"
    x = np.asarray(a.convert("RGB"), dtype=np.int16)
    y = np.asarray(b.convert("RGB"), dtype=np.int16)
    return int(np.abs(x - y).max())


def assert_same_image(a: Image.Image, b: Image.Image, tolerance: int = PARITY_TOLERANCE) -> None:
    diff = max_abs_diff(a, b)
    assert diff <= tolerance, f"max abs pixel difference {diff} > {tolerance}"


def gradient_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A deterministic non-trivial RGB image for img2img/inpaint inputs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack(
        [
            xx * 255 // max(width - 1, 1),
            yy * 255 // max(height - 1, 1),
            (xx + yy) * 127 // max(width + height - 2, 1),
        ],
        axis=-1,
    )
    noise = rng.integers(0, 30, size=base.shape)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def center_mask(width: int, height: int) -> Image.Image:
    """White (repaint) square in the middle half, black elsewhere."""
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = 255
    return Image.fromarray(mask, mode="L")


def unmasked_diff(a: Image.Image, b: Image.Image, mask: Image.Image) -> float:
    """Mean abs difference (0-255) over the pixels the mask keeps (black)."""
    keep = np.asarray(mask) < 128
    x = np.asarray(a.convert("RGB"), dtype=np.float32)[keep]
    y = np.asarray(b.convert("RGB"), dtype=np.float32)[keep]
    return float(np.abs(x - y).mean())
