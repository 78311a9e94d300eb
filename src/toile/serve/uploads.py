"""Image inputs sent as base64: capped, format-sniffed and pixel-counted before decoding.

Why sniff the magic bytes ourselves: Pillow can open dozens of formats, each a parser exposed to
the network. The server accepts the three that clients actually send (PNG, JPEG, WebP) and
refuses the rest before Pillow sees the bytes. The pixel count is read from the header and
checked against the server's cap before any pixel is decoded (decompression bombs).

Accepted uploads are written under ``uploads/`` with a name the server makes up; the client's
file name (if any) is never used.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from toile.errors import ImageInputError, one_line

if TYPE_CHECKING:
    from PIL import Image

FORMATS = ("png", "jpeg", "webp")


@dataclass(frozen=True)
class Upload:
    """A checked, decoded upload: the original bytes (saved as they came) and the image."""

    data: bytes
    format: str
    image: Image.Image

    @property
    def suffix(self) -> str:
        return ".jpg" if self.format == "jpeg" else f".{self.format}"


def sniff_format(data: bytes) -> str | None:
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def decode_base64(text: str, *, field: str, max_bytes: int) -> bytes:
    """Base64 (or a ``data:image/...;base64,`` URL) to bytes, refusing oversize input before
    decoding it."""
    if text.startswith("data:"):
        header, comma, text = text.partition(",")
        if not comma or not header.endswith(";base64"):
            raise ImageInputError(field, "a data URL must be data:image/...;base64,<data>")
    if len(text) > (max_bytes * 4) // 3 + 4:
        raise ImageInputError(field, f"is larger than the server's limit of {max_bytes} bytes")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ImageInputError(field, "is not valid base64") from None
    if len(data) > max_bytes:
        raise ImageInputError(field, f"is larger than the server's limit of {max_bytes} bytes")
    return data


def check_image_bytes(data: bytes, *, field: str, max_pixels: int) -> str:
    """Format and pixel count from the header only; returns the format."""
    from PIL import Image

    found = sniff_format(data)
    if found is None:
        raise ImageInputError(field, f"must be a {', '.join(FORMATS).upper()} image")
    try:
        with Image.open(io.BytesIO(data), formats=[found.upper()]) as probe:
            width, height = probe.size  # header only: nothing decoded yet
    except Image.DecompressionBombError:
        raise ImageInputError(
            field, f"is refused as a decompression bomb; at most {max_pixels} pixels are allowed"
        ) from None
    except Exception as exc:  # Pillow's parsers fail on broken headers in
        # many ways (OSError, SyntaxError, ValueError, struct.error...): all the upload's fault
        raise ImageInputError(
            field, f"is not a readable {found.upper()} image ({one_line(exc)})"
        ) from None
    if width * height > max_pixels:
        raise ImageInputError(
            field,
            f"is {width}x{height} = {width * height} pixels; the server allows at most "
            f"{max_pixels} (decompression bombs are refused before decoding)",
        )
    return found


def read_upload(text: str, *, field: str, max_bytes: int, max_pixels: int) -> Upload:
    """Decode one base64 image field. ``field="mask"`` gives a single-channel mask."""
    from toile.io.images import load_mask, load_rgb

    data = decode_base64(text, field=field, max_bytes=max_bytes)
    found = check_image_bytes(data, field=field, max_pixels=max_pixels)
    image = load_mask(data, field=field) if field == "mask" else load_rgb(data, field=field)
    return Upload(data=data, format=found, image=image)


def upload_of(image: Image.Image) -> Upload:
    """An image a route already decoded (and resized) as the PNG upload the job stores: the
    service then takes it as is, so an upload is decoded once per request."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return Upload(data=buffer.getvalue(), format="png", image=image)


def load_saved(path: Path, *, field: str) -> Image.Image:
    """An upload saved earlier, decoded the same way as when it was accepted."""
    from toile.io.images import load_mask, load_rgb

    return (
        load_mask(str(path), field=field) if field == "mask" else load_rgb(str(path), field=field)
    )


def write_durably(path: Path, data: bytes) -> None:
    """Write, fsync the file, rename into place, fsync the folder: after this returns the file
    survives a crash (the job row that names it is committed only afterwards)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    # 0600: uploads are a client's own images, for the server's user only
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
