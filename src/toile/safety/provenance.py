"""What marks a written PNG as generated, applied as the last change to its bytes
(``toile.io.metadata.save_png``'s ``finish``): the IPTC "trained algorithmic media" label in
XMP always, and C2PA content credentials when a key and certificate are configured — an edit
naming its input image as ingredient. The invisible watermark is in the pixels already (the
engine adds it)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from toile.result import ImageRecord
    from toile.safety.c2pa_credentials import C2paConfig

# (encoded PNG, its record) -> the bytes to write
Finisher = Callable[[bytes, "ImageRecord"], bytes]


def label(data: bytes, record: ImageRecord) -> bytes:
    """The IPTC digital-source-type label only (no credentials configured)."""
    from toile.safety.c2pa_credentials import with_iptc_xmp

    return with_iptc_xmp(data)


def finisher(credentials: C2paConfig | None = None,
             ingredient: tuple[bytes, str] | None = None) -> Finisher:
    """:func:`label`, or signing with ``credentials`` (``ingredient``: the input image's bytes
    and MIME type, for edits)."""
    if credentials is None:
        return label

    def sign(data: bytes, record: ImageRecord) -> bytes:
        from toile.safety.c2pa_credentials import sign_png

        source, fmt = ingredient if ingredient is not None else (None, "image/png")
        return sign_png(data, record.to_dict(), credentials, ingredient=source,
                        ingredient_format=fmt)

    return sign
