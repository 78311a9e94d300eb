"""``toile generate PROMPT``: one request through the engine, PNGs with their records."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from toile.errors import RequestError


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "generate",
        help="generate images from a prompt",
        description="Generate images from a prompt (txt2img), or from --image (img2img, with "
        "--mask inpaint, with --outpaint outpaint). Options left out take the model's own "
        "defaults (toile-mini: 64x64, 16 steps, guidance 4.0).",
    )
    p.add_argument("prompt")
    p.add_argument(
        "-o",
        "--output",
        help="output PNG (default toile-<timestamp>.png; "
        "several images: NAME-0.png, NAME-1.png, ...)",
    )
    p.add_argument(
        "--model",
        help="model id from `toile models`, or a checkpoint folder or .safetensors file on disk "
        "(default: the default model, toile-mini unless `toile models` says otherwise)",
    )
    p.add_argument("--seed", type=int, help="random seed (default: a random one, printed)")
    p.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
    p.add_argument("--guidance", type=float, help="guidance scale (default: the model's)")
    p.add_argument("--width", type=int, help="pixels (default: the model's, or --image's)")
    p.add_argument("--height", type=int, help="pixels (default: the model's, or --image's)")
    p.add_argument("--negative", default="", help="negative prompt (default: none)")
    p.add_argument(
        "-n", "--num-images", type=int, default=1, help="images, seeds seed, seed+1... (default 1)"
    )
    p.add_argument("--image", help="input image (img2img; with --mask inpaint; with --outpaint)")
    p.add_argument(
        "--strength",
        type=float,
        help="how much of --image to change, (0, 1] (default: the model's; 1.0 to inpaint)",
    )
    p.add_argument("--mask", help="inpainting mask, same size as --image; white = repaint")
    p.add_argument(
        "--outpaint", metavar="LEFT,TOP,RIGHT,BOTTOM", help="pixels to add on each side of --image"
    )
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="PATH[:SCALE]",
        help="LoRA .safetensors file with optional scale (default scale 1.0); repeatable",
    )
    p.add_argument(
        "--sampler",
        metavar="NAME",
        help="sampler by A1111's name (Euler, Euler a, DPM++ 2M, UniPC, ...) or diffusers "
        "class name; `toile samplers MODEL` lists what a model can use (default: the model's)",
    )
    p.add_argument(
        "--schedule",
        metavar="NAME",
        help="noise schedule: automatic, karras, exponential, beta, sgm_uniform "
        "(default: automatic, the model's own)",
    )
    p.add_argument(
        "--refiner",
        metavar="MODEL",
        help="SDXL refiner (id or path) that finishes the last part of the schedule, in every "
        "mode (txt2img, img2img, inpaint, outpaint); default: none",
    )
    p.add_argument(
        "--refiner-switch",
        type=float,
        metavar="F",
        help="fraction of the schedule the base runs before the refiner takes over (default 0.8)",
    )
    p.add_argument(
        "--hires-scale", type=float, metavar="F",
        help="hires fix (txt2img): generate at --width x --height, upscale F times, then "
        "img2img at that size (default: off)",
    )
    p.add_argument("--hires-upscaler", metavar="MODEL",
                   help="upscale model id for hires fix (default: lanczos)")
    p.add_argument("--hires-steps", type=int, metavar="N",
                   help="steps of the hires pass (default: --steps)")
    p.add_argument("--hires-sampler", metavar="NAME",
                   help="sampler of the hires pass (default: --sampler)")
    p.add_argument("--hires-prompt", metavar="TEXT",
                   help="prompt of the hires pass (default: the prompt)")
    p.add_argument("--hires-negative", metavar="TEXT",
                   help="negative prompt of the hires pass (default: --negative)")
    p.add_argument("--hires-strength", type=float, metavar="F",
                   help="denoising strength of the hires pass, (0, 1] (default 0.7)")
    p.add_argument(  # default None: only passed to the request when given
        "--tiling", action="store_true", default=None,
        help="seamless tiling (A1111's Tiling): edges wrap around, so the image repeats "
        "without a seam (sd, sdxl and toile models)",
    )
    p.add_argument(
        "--device", choices=("cpu", "cuda", "mps"), help="default: cuda, else mps, else cpu"
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        help="default: float32 on cpu; on a GPU the family's half type (bfloat16 for FLUX.1)",
    )
    p.add_argument(
        "--policy",
        metavar="FILE",
        help="TOML file of prompt-policy rules added to (or replacing) toile's default ones",
    )
    p.add_argument(
        "--no-policy",
        action="store_true",
        help="run without the prompt policy (your own machine; a server decides in its config)",
    )
    p.add_argument(
        "--safety-checker",
        metavar="FOLDER",
        help="run every image through this Stable Diffusion safety checker (a local folder) "
        "or module:callable classifier (default: none)",
    )
    p.add_argument(
        "--on-flag",
        choices=("pass", "blur", "withhold", "flag"),
        default="withhold",
        help="what a flagged image becomes (default withhold: an error, no image)",
    )
    p.add_argument(
        "--c2pa-cert",
        metavar="PEM",
        help="sign each PNG with C2PA content credentials: the certificate chain (with "
        "--c2pa-key; default: not signed, only the IPTC AI-generated label)",
    )
    p.add_argument("--c2pa-key", metavar="PEM", help="the private key for --c2pa-cert")
    p.add_argument(
        "--no-watermark",
        action="store_true",
        help="leave images unmarked (default: an invisible watermark; `toile verify` reads it)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object with the results")
    p.set_defaults(run=run)


def request_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The CLI's options as request fields (files loaded and checked here)."""
    from toile.io.images import load_mask, load_rgb
    from toile.request import LoraSpec, Outpaint

    fields: dict[str, Any] = {
        "negative_prompt": args.negative,
        "num_images": args.num_images,
        "loras": tuple(LoraSpec.parse(text) for text in args.lora),
    }
    for name in (
        "seed", "steps", "guidance", "width", "height", "strength", "refiner", "refiner_switch",
        "sampler", "schedule", "hires_scale", "hires_upscaler", "hires_steps", "hires_strength",
        "hires_sampler", "hires_prompt",
        "tiling",
    ):
        value = getattr(args, name)
        if value is not None:
            fields[name] = value
    if args.hires_negative is not None:
        fields["hires_negative_prompt"] = args.hires_negative
    if args.outpaint is not None:
        fields["outpaint"] = Outpaint.parse(args.outpaint)
    if args.image is not None:
        fields["image"] = load_rgb(args.image, field="image")
    elif args.mask is not None or args.outpaint is not None:
        option = "--mask" if args.mask is not None else "--outpaint"
        raise RequestError("image", f"{option} needs an input image: pass --image PATH")
    if args.mask is not None:
        fields["mask"] = load_mask(args.mask, field="mask")
    return fields


def c2pa_credentials(args: argparse.Namespace) -> Any:
    """The C2PA signing configuration from --c2pa-cert/--c2pa-key, checked; None without."""
    if args.c2pa_cert is None and args.c2pa_key is None:
        return None
    if args.c2pa_cert is None or args.c2pa_key is None:
        raise RequestError("c2pa", "give both --c2pa-cert and --c2pa-key")
    from toile.safety.c2pa_credentials import load_c2pa_config

    return load_c2pa_config(args.c2pa_cert, args.c2pa_key)


def ingredient_of(args: argparse.Namespace) -> tuple[bytes, str] | None:
    """The input image as given (bytes and MIME type): the C2PA ingredient of an edit."""
    if args.image is None:
        return None
    from pathlib import Path

    from PIL import Image

    with Image.open(args.image) as probe:
        fmt = f"image/{(probe.format or 'png').lower()}"
    return Path(args.image).read_bytes(), fmt


def cli_policy(args: argparse.Namespace) -> Any:
    """The prompt policy for this run: the default, extended by --policy, or none."""
    from toile.errors import ToileError
    from toile.safety.policy import Policy

    if args.no_policy:
        if args.policy:
            raise ToileError("--policy and --no-policy contradict each other; give one")
        return None
    if args.policy:
        return Policy.from_file(args.policy, base=Policy.default())
    return "default"


def run(args: argparse.Namespace) -> int:
    from toile.cli.progress_bar import TerminalProgress
    from toile.engine.engine import Engine
    from toile.request import GenerationRequest

    request = GenerationRequest(prompt=args.prompt, model=args.model, **request_fields(args))
    from toile.safety.output_check import load_output_check

    check = load_output_check(args.safety_checker) if args.safety_checker else None
    from toile.safety.watermark import WatermarkConfig, default_config

    credentials = c2pa_credentials(args)  # a bad key or certificate fails before any work

    watermark = WatermarkConfig(enabled=False) if args.no_watermark else default_config()
    engine = Engine(device=args.device, dtype=args.dtype, policy=cli_policy(args),
                    output_check=check, on_flag=args.on_flag, watermark=watermark)
    bar = TerminalProgress()
    try:
        result = engine.run(request, progress=bar)
    finally:
        bar.close()
    output = args.output or f"toile-{time.strftime('%Y%m%d-%H%M%S')}.png"
    from toile.safety.provenance import finisher

    paths = result.save(output, finish=finisher(credentials, ingredient_of(args)))
    if args.json:
        images = [  # the file's size (a hires fix's record keeps the first pass's)
            {
                "path": path,
                "seed": rec.seed,
                "width": image.size[0],
                "height": image.size[1],
                "record": rec.to_dict(),
            }
            for path, rec, image in zip(paths, result.records, result.images, strict=True)
        ]
        print(json.dumps({"paths": paths, "images": images, "timings": result.timings}))
    else:
        for path, rec, image in zip(paths, result.records, result.images, strict=True):
            print(f"{path}  seed={rec.seed} {image.size[0]}x{image.size[1]}")
        for warning in result.records[0].safety.get("policy", {}).get("warnings", []):
            print(f"toile generate: warning: the prompt matches policy rule {warning['rule']} "
                  f"({warning['category']})", file=sys.stderr)
    return 0
