"""``toile finetune``: teach a model new images — LoRA or full, DreamBooth-style.

    toile finetune --model ID_OR_PATH --images DIR --out my-lora.safetensors
                   [--prompt TEXT] [--method lora|full] [--steps N] [--rank R] [--lr F]
                   [--batch-size N] [--train-text-encoder] [--resume] [--checkpoint-every N]
                   [--prior-preservation --class-prompt TEXT --num-class-images N
                    --prior-weight F] [--resolution N] [--buckets] [--seed N]

DIR holds images, each optionally captioned by NAME.txt beside NAME.png; images without one take
--prompt. The LoRA file then works with ``toile generate --lora my-lora.safetensors`` and with
diffusers' ``pipe.load_lora_weights``. Runs unchanged under ``accelerate launch`` (as
``python -m toile.cli.finetune_cmd ...``); --batch-size is per process.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from typing import Any


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "finetune",
        help="fine-tune a model on a folder of images (LoRA or full)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(run=run)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="model id or path (default: the built-in model)")
    parser.add_argument("--images", required=True, metavar="DIR",
                        help="folder of images (+ optional NAME.txt captions)")
    parser.add_argument("--out", required=True, metavar="PATH",
                        help="the LoRA .safetensors file (or the model folder with --method full)")
    parser.add_argument("--prompt", metavar="TEXT",
                        help="caption for images without a .txt (DreamBooth instance prompt)")
    parser.add_argument("--method", choices=("lora", "full"), default="lora")
    parser.add_argument("--steps", type=int, default=500, help="optimizer steps (default 500)")
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank (default 4)")
    parser.add_argument("--lora-alpha", type=float, help="LoRA alpha (default: the rank)")
    parser.add_argument("--lr", type=float,
                        help="learning rate (default 1e-4 for LoRA, 5e-6 for full)")
    parser.add_argument("--text-encoder-lr", type=float, help="default: --lr")
    parser.add_argument("--batch-size", type=int, default=1, help="images per step per process")
    parser.add_argument("--train-text-encoder", action="store_true",
                        help="also train the CLIP text encoder(s)")
    parser.add_argument("--prior-preservation", action="store_true",
                        help="mix in class images from the base model (DreamBooth)")
    parser.add_argument("--class-prompt", metavar="TEXT", help="prompt of the class images")
    parser.add_argument("--num-class-images", type=int, default=100)
    parser.add_argument("--prior-weight", type=float, default=1.0)
    parser.add_argument("--class-steps", type=int, help="sampling steps for class images")
    parser.add_argument("--resolution", type=int, help="training size (default: the model's)")
    parser.add_argument("--buckets", action="store_true",
                        help="aspect-ratio buckets instead of square centre crops")
    parser.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                        help="steps between checkpoints in OUT.checkpoints/ (default: at the end)")
    parser.add_argument("--resume", action="store_true",
                        help="continue exactly from the newest checkpoint of OUT")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mixed-precision", choices=("auto", "no", "bf16", "fp16"),
                        default="auto")
    parser.add_argument("--device", help="device for class-image generation")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--json", action="store_true", help="print a JSON summary at the end")


def config_from_args(args: argparse.Namespace) -> Any:
    from toile.train.finetune.config import FinetuneConfig

    return FinetuneConfig(
        images=args.images, out=args.out, model=args.model, prompt=args.prompt,
        method=args.method, steps=args.steps, rank=args.rank, lora_alpha=args.lora_alpha,
        lr=args.lr, text_encoder_lr=args.text_encoder_lr, batch_size=args.batch_size,
        train_text_encoder=args.train_text_encoder, prior_preservation=args.prior_preservation,
        class_prompt=args.class_prompt, num_class_images=args.num_class_images,
        prior_weight=args.prior_weight, class_steps=args.class_steps,
        checkpoint_every=args.checkpoint_every, resume=args.resume, seed=args.seed,
        resolution=args.resolution, buckets=args.buckets,
        mixed_precision=args.mixed_precision, device=args.device, threads=args.threads,
        progress_bar=not args.no_progress,
    )


def run(args: argparse.Namespace) -> int:
    from toile.train.finetune.runner import FinetuneRunner

    config = config_from_args(args)
    command = "toile finetune " + shlex.join(sys.argv[2:] if sys.argv[1:2] == ["finetune"]
                                             else sys.argv[1:])
    runner = FinetuneRunner(config, command=command)
    result = runner.run()
    if runner.accelerator.is_main_process:
        summary = {
            "out": str(result.out), "steps": result.steps, "seconds": round(result.seconds, 2),
            "first_loss": result.losses[0] if result.losses else None,
            "last_loss": result.losses[-1] if result.losses else None,
            "skipped": result.skipped, "trainable_parameters": result.trainable_parameters,
        }
        print(json.dumps(summary) if args.json else f"wrote {result.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m toile.cli.finetune_cmd ...`` (e.g. under ``accelerate launch``)."""
    from toile.errors import ToileError

    parser = argparse.ArgumentParser(prog="toile finetune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except ToileError as exc:
        print(f"toile finetune: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
