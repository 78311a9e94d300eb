"""``toile demo``: a few images from the built-in model, from varied prompts."""

from __future__ import annotations

import argparse
import os
from typing import Any

DEMO_PROMPTS = (
    "a red circle on a blue background",
    "a large yellow square on a black background",
    "a green triangle to the left of a white circle on a purple background",
    "three orange circles on a blue background",
)


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("demo", help="generate demo images with the built-in model")
    p.add_argument("--out", default="demo", help="output folder (default demo/)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from toile.cli.progress_bar import TerminalProgress
    from toile.engine.engine import Engine
    from toile.request import GenerationRequest

    engine = Engine()
    os.makedirs(args.out, exist_ok=True)
    for index, prompt in enumerate(DEMO_PROMPTS):
        bar = TerminalProgress()
        try:
            result = engine.run(
                GenerationRequest(prompt, seed=args.seed, num_images=4), progress=bar
            )
        finally:
            bar.close()
        stem = os.path.join(args.out, f"{index}-" + "-".join(prompt.split()[:6]))
        for path in result.save(f"{stem}.png"):
            print(f"{path}  ({prompt})")
    return 0
