"""``toile edit IMAGE INSTRUCTION``: change an image as an instruction says (InstructPix2Pix,
FLUX.1 Kontext, ...)."""

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
        "edit",
        help="edit an image by an instruction",
        description="Edit IMAGE as INSTRUCTION says (e.g. \"make the sky bright blue\") with an "
        "edit model (InstructPix2Pix, FLUX.1 Kontext). The output keeps the input's size, "
        "rounded down to the model's multiple, unless --width/--height are given.",
    )
    p.add_argument("image")
    p.add_argument("instruction")
    add_model_options(p, "edit")
    add_image_options(p)
    p.add_argument("--image-guidance", type=float,
                   help="how closely to keep the input image (InstructPix2Pix; default: the "
                   "model's, 1.5)")
    p.add_argument("--width", type=int, help="output pixels (default: the input's)")
    p.add_argument("--height", type=int, help="output pixels (default: the input's)")
    p.add_argument("--sampler", metavar="NAME", help="sampler (default: the model's)")
    p.add_argument("--schedule", metavar="NAME", help="noise schedule (default: automatic)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from toile.io.images import load_rgb
    from toile.request import GenerationRequest, Task

    request = GenerationRequest(
        prompt=args.instruction, task=Task.EDIT, model=args.model,
        image=load_rgb(args.image, field="image"),
        **image_fields(args, "image_guidance", "width", "height", "sampler", "schedule"),
    )
    return save_images(args, run_with_bar(engine_for(args), request), Task.EDIT)
