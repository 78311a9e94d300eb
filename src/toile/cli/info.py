"""``toile info IMAGE``: the generation record stored in a PNG."""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("info", help="print the generation record stored in an image")
    p.add_argument("image")
    p.add_argument("--a1111", action="store_true", help="print the A1111 `parameters` text")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from toile.io.metadata import A1111_KEY, read_record, read_text_chunks

    if args.a1111:
        text = read_text_chunks(args.image).get(A1111_KEY)
        if text is None:
            from toile.errors import ImageInputError

            raise ImageInputError("image", f"{args.image} has no `parameters` text chunk")
        print(text)
        return 0
    print(json.dumps(read_record(args.image).to_dict(), indent=2, sort_keys=True))
    return 0
