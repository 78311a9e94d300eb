"""``toile upscale IMAGE``: make an image larger with an upscaler model or a filter."""

from __future__ import annotations

import argparse
from typing import Any

from toile.cli.task_options import (
    add_image_options,
    add_model_options,
    engine_for,
    image_fields,
    run_with_bar,
    save_images,
)


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "upscale",
        help="upscale an image",
        description="Make IMAGE --scale times larger: with an upscaler model (SD x4, SD latent "
        "x2, DeepFloyd IF stage II; a model is run in passes until the size is reached, then "
        "resized to it exactly, as AUTOMATIC1111 does) or the built-in filters lanczos, "
        "bicubic, nearest (the default with no upscale model registered).",
    )
    p.add_argument("image")
    p.add_argument("--scale", type=float,
                   help="output side / input side, 1-8 (default: the model's own factor; "
                   "a filter's default is 4)")
    p.add_argument("--prompt", default="", help="what the image shows (text-conditioned "
                   "upscalers use it; default: none)")
    p.add_argument("--noise-level", type=int,
                   help="noise added to the input (SD x4 upscaler, IF stage II; default: the "
                   "model's)")
    add_model_options(p, "upscale")
    add_image_options(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from toile.io.images import load_rgb
    from toile.request import GenerationRequest, Task

    request = GenerationRequest(
        prompt=args.prompt, task=Task.UPSCALE, model=args.model,
        image=load_rgb(args.image, field="image"),
        **image_fields(args, "scale", "noise_level"),
    )
    return save_images(args, run_with_bar(engine_for(args), request), Task.UPSCALE)
