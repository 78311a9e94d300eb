"""``toile verify IMAGE``: the provenance an image carries — toile's (or SDXL's) invisible
watermark, and C2PA content credentials (who signed what, and whether the file still matches)."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from typing import Any

from toile.cli.text import plain

MIME = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "TIFF": "image/tiff",
        "GIF": "image/gif"}


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "verify",
        help="check an image's invisible watermark and C2PA content credentials",
        description=plain(__doc__) + (
            " The watermark is the invisible-watermark package's DWT-DCT format, which SDXL "
            "uses: toile's or SDXL's 48-bit message, and how many bits match. Credentials are "
            "validated offline; --trust-anchors names the root certificates you trust. Exits 0 "
            "unless the credentials are present but invalid (1), or the file is not a readable "
            "image (2)."
        ),
    )
    p.add_argument("image")
    p.add_argument("--trust-anchors", metavar="PEM",
                   help="root certificates (PEM) whose signers count as trusted")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from toile.io.images import open_image
    from toile.safety.c2pa_credentials import verify
    from toile.safety.watermark import detect

    image = open_image(args.image, field="image")
    result = detect(image)
    report = verify(Path(args.image).read_bytes(), MIME.get(image.format or "PNG", "image/png"),
                    trust_anchors=args.trust_anchors)
    if args.json:
        print(json.dumps({"image": args.image, **result.to_dict(),
                          "c2pa": asdict(report)}, sort_keys=True, default=str))
    else:
        print(watermark_line(args.image, result))
        if result.note:
            print(f"note: {result.note}")
        for line in report.lines():
            print(line)
    return 1 if report.present and not report.valid else 0


def watermark_line(name: str, result: Any) -> str:
    if result.reason:
        return f"{name}: no watermark read: {result.reason}"
    if result.found:
        return (f"{name}: {result.message} watermark found "
                f"({result.bits_matched}/{result.bits_total} bits match)")
    return (f"{name}: no watermark found (closest: the {result.message} message, "
            f"{result.bits_matched}/{result.bits_total} bits match, {result.threshold} needed)")
