"""``toile verify IMAGE``: is toile's (or SDXL's) invisible watermark in an image?"""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "verify",
        help="check an image for toile's or SDXL's invisible watermark",
        description=(
            "Read the invisible DWT-DCT watermark (the invisible-watermark package's, which SDXL "
            "uses) and say whether toile's or SDXL's 48-bit message is there and how many bits "
            "match. Exits 0 either way; 2 when the file is not a readable image."
        ),
    )
    p.add_argument("image")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from toile.io.images import open_image
    from toile.safety.watermark import detect

    result = detect(open_image(args.image, field="image"))
    if args.json:
        print(json.dumps({"image": args.image, **result.to_dict()}, sort_keys=True))
    elif result.reason:
        print(f"{args.image}: no watermark read: {result.reason}")
    elif result.found:
        print(
            f"{args.image}: {result.message} watermark found "
            f"({result.bits_matched}/{result.bits_total} bits match)"
        )
    else:
        print(
            f"{args.image}: no watermark found (closest: the {result.message} message, "
            f"{result.bits_matched}/{result.bits_total} bits match, {result.threshold} needed)"
        )
    if result.note and not args.json:
        print(f"note: {result.note}")
    return 0
