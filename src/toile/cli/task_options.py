"""Options and output shared by the task commands (edit, upscale, caption, ask)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from toile.engine.engine import Engine
    from toile.request import GenerationRequest, Task
    from toile.result import GenerationResult


def add_model_options(p: argparse.ArgumentParser, task: str) -> None:
    p.add_argument(
        "--model",
        help=f"model id from `toile models`, or a checkpoint folder on disk (default: the "
        f"{task} task's default model: `toile models default ID --task {task}`, else the one "
        "registered model that serves it)",
    )
    p.add_argument(
        "--device", choices=("cpu", "cuda", "mps"), help="default: cuda, else mps, else cpu"
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        help="default: float32 on cpu; on a GPU the family's half type",
    )
    p.add_argument("--no-policy", action="store_true",
                   help="run without the prompt policy (your own machine)")
    p.add_argument("--json", action="store_true", help="print one JSON object with the results")


def add_image_options(p: argparse.ArgumentParser) -> None:
    """The options of the tasks that make images (edit, upscale)."""
    p.add_argument("-o", "--output",
                   help="output PNG (default toile-<timestamp>.png; several: NAME-0.png, ...)")
    p.add_argument("--seed", type=int, help="random seed (default: a random one, printed)")
    p.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
    p.add_argument("--guidance", type=float, help="guidance scale (default: the model's)")
    p.add_argument("--negative", default="", help="negative prompt (default: none)")
    p.add_argument("-n", "--num-images", type=int, default=1,
                   help="images, seeds seed, seed+1... (default 1)")
    p.add_argument("--no-watermark", action="store_true",
                   help="leave images unmarked (default: an invisible watermark)")


def engine_for(args: argparse.Namespace) -> Engine:
    from toile.engine.engine import Engine
    from toile.safety.watermark import WatermarkConfig, default_config

    watermark = (WatermarkConfig(enabled=False) if getattr(args, "no_watermark", False)
                 else default_config())
    return Engine(device=args.device, dtype=args.dtype,
                  policy=None if args.no_policy else "default", watermark=watermark)


def run_with_bar(engine: Engine, request: GenerationRequest) -> GenerationResult:
    from toile.cli.progress_bar import TerminalProgress

    bar = TerminalProgress()
    try:
        return engine.run(request, progress=bar)
    finally:
        bar.close()


def image_fields(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    """The request fields among ``names`` the user set (None: the model's default)."""
    fields: dict[str, Any] = {"negative_prompt": args.negative, "num_images": args.num_images}
    for name in ("seed", "steps", "guidance", *names):
        value = getattr(args, name)
        if value is not None:
            fields[name] = value
    return fields


def save_images(args: argparse.Namespace, result: GenerationResult, task: Task) -> int:
    """Write the PNGs (with records, provenance label) and print what was written."""
    output = args.output or f"toile-{time.strftime('%Y%m%d-%H%M%S')}.png"
    paths = result.save(output)
    if args.json:
        images = [{"path": path, "seed": rec.seed, "width": rec.width, "height": rec.height,
                   "record": rec.to_dict()}
                  for path, rec in zip(paths, result.records, strict=True)]
        print(json.dumps({"task": task.value, "paths": paths, "images": images,
                          "timings": result.timings}))
        return 0
    for path, rec in zip(paths, result.records, strict=True):
        print(f"{path}  seed={rec.seed} {rec.width}x{rec.height}")
    print_policy_warnings(result, task)
    return 0


def print_policy_warnings(result: GenerationResult, task: Task) -> None:
    for warning in result.records[0].safety.get("policy", {}).get("warnings", []):
        print(f"toile {task.value}: warning: the input matches policy rule {warning['rule']} "
              f"({warning['category']})", file=sys.stderr)
