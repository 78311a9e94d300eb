"""Opening user images safely (size-capped, bomb-checked before decoding, fully loaded), and
tiling images into a grid."""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

from toile.errors import ImageInputError

if TYPE_CHECKING:
    from PIL import Image

MAX_IMAGE_PIXELS = 8192 * 8192
MAX_IMAGE_BYTES = 64 * 1024 * 1024


def open_image(
    source: str | bytes, *, field: str, max_pixels: int = MAX_IMAGE_PIXELS
) -> Image.Image:
    """Open and fully decode an image from a path or bytes.

    The header is read first and the pixel count checked *before* decoding, so a decompression
    bomb is refused without allocating it. Truncated or non-image data raises ImageInputError
    naming ``field``.
    """
    import io

    from PIL import Image, UnidentifiedImageError

    if isinstance(source, str):
        if not os.path.isfile(source):
            raise ImageInputError(field, f"file not found: {source}")
        if os.path.getsize(source) > MAX_IMAGE_BYTES:
            raise ImageInputError(field, f"{source} is larger than {MAX_IMAGE_BYTES} bytes")
        try:
            with open(source, "rb") as handle:
                data = handle.read()
        except OSError as exc:
            raise ImageInputError(field, f"cannot read {source}: {exc.strerror}") from None
        name = source
    else:
        if len(source) > MAX_IMAGE_BYTES:
            raise ImageInputError(field, f"upload is larger than {MAX_IMAGE_BYTES} bytes")
        data, name = source, "upload"
    try:
        with Image.open(io.BytesIO(data)) as probe:
            width, height = probe.size
            if width * height > max_pixels:
                raise ImageInputError(
                    field, f"{name} is {width}x{height}; at most {max_pixels} pixels are allowed"
                )
            probe.load()
            image = probe.copy()
            image.info.update(probe.info)
    except ImageInputError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageInputError(
            field,
            f"{name} is refused as a decompression bomb ({exc}); at most {max_pixels} "
            "pixels are allowed",
        ) from None
    except UnidentifiedImageError as exc:
        raise ImageInputError(field, f"{name} is not a readable image ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageInputError(field, f"{name} is truncated or corrupt ({exc})") from None
    return image


def load_rgb(source: str | bytes, *, field: str = "image") -> Image.Image:
    image = open_image(source, field=field)
    return image if image.mode == "RGB" else image.convert("RGB")


def load_mask(source: str | bytes, *, field: str = "mask") -> Image.Image:
    """A mask as single-channel "L": white (255) = repaint, black = keep."""
    image = open_image(source, field=field)
    if image.mode in ("RGBA", "LA") and image.getextrema()[-1][0] < 255:
        # A transparent-where-to-paint mask (as drawn in many editors): alpha 0 means repaint.
        from PIL import ImageOps

        return ImageOps.invert(image.getchannel("A"))
    return image.convert("L")


def image_grid(images: list[Image.Image], columns: int, scale: int = 1) -> Image.Image:
    """Tile equal-size PIL images into rows of ``columns``; nearest-neighbour ``scale``."""
    from PIL import Image

    w, h = images[0].size
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * w, rows * h), "gray")
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * w, (i // columns) * h))
    if scale != 1:
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST)
    return grid
