"""Opening user images safely (size-capped, bomb-checked before decoding, fully loaded), and
labelled grids of images."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from toile.errors import ImageInputError, one_line

if TYPE_CHECKING:
    from PIL import Image

MAX_IMAGE_PIXELS = 8192 * 8192
MAX_IMAGE_BYTES = 64 * 1024 * 1024
# A progressive JPEG decodes scan by scan over the whole image; a camera's has about 10. A small
# file with thousands of (empty) scans holds a decoder for minutes, so it is refused unread.
MAX_JPEG_SCANS = 100


def check_jpeg_scans(data: bytes, name: str, field: str) -> None:
    """Count a JPEG's start-of-scan markers before decoding (entropy-coded data stuffs every
    0xFF byte, so 0xFF 0xDA appears only as a marker)."""
    if data[:2] == b"\xff\xd8":
        scans = data.count(b"\xff\xda")
        if scans > MAX_JPEG_SCANS:
            raise ImageInputError(
                field, f"{name} is a JPEG with {scans} scans; at most {MAX_JPEG_SCANS} are allowed"
            )


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
    check_jpeg_scans(data, name, field)
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
    except UnidentifiedImageError:
        # Pillow's own message names its BytesIO, not the user's file: say it in our words.
        raise ImageInputError(
            field, f"{name} is not an image file (PNG, JPEG, WebP, BMP, GIF, TIFF...)"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageInputError(field, f"{name} is truncated or corrupt ({one_line(exc)})") from None
    except Exception as exc:  # Pillow's plugins fail on broken files in many ways
        # (TypeError, struct.error, IndexError, ZeroDivisionError... from deep in a plugin):
        # all of them are the file's fault, since only its bytes reach the decoder.
        raise ImageInputError(
            field, f"{name} is a corrupt image file ({type(exc).__name__}: {one_line(exc)})"
        ) from None
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


LABEL_WIDTH = 256  # pixels of the text strip left of each row in labelled grids


def labelled_rows(
    rows: list[tuple[str, list[Image.Image]]], *, scale: int = 1, label_width: int = LABEL_WIDTH
) -> Image.Image:
    """One row per label: the label's text (wrapped) in a white strip on the left, then that
    row's images (equal size, nearest-neighbour ``scale``). Validation grids use it so each
    row says which prompt it shows."""
    from PIL import Image, ImageDraw, ImageFont

    w, h = rows[0][1][0].size
    w, h = w * scale, h * scale
    columns = max(len(images) for _, images in rows)
    font = ImageFont.load_default(size=13)
    row_height = max(h, 24)
    grid = Image.new("RGB", (label_width + columns * w, len(rows) * row_height), "white")
    draw = ImageDraw.Draw(grid)
    for r, (label, images) in enumerate(rows):
        top = r * row_height
        lines = _wrap(label, font, draw, label_width - 12)
        line_height = 16
        max_lines = max(1, (row_height - 8) // line_height)
        if len(lines) > max_lines:
            lines = [*lines[: max_lines - 1], lines[max_lines - 1] + " …"]
        for i, line in enumerate(lines[:max_lines]):
            draw.text((6, top + 4 + i * line_height), line, fill="black", font=font)
        for c, image in enumerate(images):
            if scale != 1:
                image = image.resize((w, h), Image.Resampling.NEAREST)
            grid.paste(image, (label_width + c * w, top))
    return grid


def _wrap(text: str, font: object, draw: object, width: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels as ``font`` draws the text."""
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:  # type: ignore[attr-defined]
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]
