"""``toile train``: train toile's own model from scratch, on the scene world or your data.

    toile train --preset toile-mini --out runs/toile-mini [--steps N] [--batch-size N]
                [--gradient-accumulation-steps N] [--gradient-checkpointing] [--resume]
                [--lr F] [--seed N] [--threads N] [--checkpoint-minutes M]
                [--data FOLDER_OR_SHARDS [--buckets]] [--fsdp]

Without --data the model learns the procedural scene world (how the built-in model is made).
--data streams an image-caption folder (NAME.png + NAME.txt, nested folders, any size) or
WebDataset tar shards (a .tar, a quoted glob 'shards/*.tar', or a folder of .tar files); bad
samples are skipped and counted, --buckets keeps non-square images whole (aspect buckets).

Also runnable as ``python -m toile.cli.train_cmd ...`` (e.g. under nohup or accelerate launch).
"""

from __future__ import annotations

import argparse
import shlex
import sys

from toile.cli.text import plain


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train",
        help="train toile's own model from scratch (scene world, or --data)",
        description=plain(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_arguments(parser)
    parser.set_defaults(run=run)
    return parser


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="toile-mini", help="toile-mini (default) or tiny")
    parser.add_argument("--out", required=True, help="run folder (checkpoints, samples, logs)")
    parser.add_argument("--steps", type=int, help="total optimizer steps")
    parser.add_argument("--batch-size", type=int, help="images per step per process")
    parser.add_argument("--gradient-accumulation-steps", type=int, metavar="N",
                        help="micro-batches of --batch-size per optimizer step (default 1)")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="recompute activations in the backward pass (less memory)")
    parser.add_argument("--lr", type=float, help="peak learning rate (AdamW)")
    parser.add_argument("--cooldown-steps", type=int, metavar="N",
                        help="decay the learning rate linearly to 0 over the last N steps")
    parser.add_argument("--ema-decay", type=float, help="EMA decay cap (default 0.999)")
    parser.add_argument("--seed", type=int, help="seed for init, data, t and noise")
    parser.add_argument(
        "--resume", action="store_true", help="continue exactly from the newest checkpoint in --out"
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--data", metavar="PATH",
                        help="image-caption folder or WebDataset .tar shards (default: scenes)")
    parser.add_argument("--buckets", action="store_true",
                        help="with --data: aspect-ratio buckets instead of square crops")
    parser.add_argument("--opt-out", metavar="FILE",
                        help="with --data: TOML opt-out list (sha256, phash, caption terms) of "
                        "samples to leave out; counted in log.jsonl and the model card")
    parser.add_argument("--filter-checker", metavar="FOLDER",
                        help="with --data: leave out images this safety checker (a local "
                        "folder, or module:callable) flags")
    parser.add_argument(
        "--checkpoint-minutes",
        type=float,
        help="wall-clock minutes between checkpoints (default 5)",
    )
    parser.add_argument("--checkpoint-every", type=int, help="steps between checkpoints")
    parser.add_argument(
        "--snapshot-every",
        type=int,
        metavar="N",
        help="keep the EMA weights of every Nth step under OUT/snapshots (learning curves)",
    )
    parser.add_argument("--mixed-precision", choices=("auto", "no", "bf16", "fp16"))
    parser.add_argument("--fsdp", action="store_true",
                        help="under several processes, shard weights, gradients and optimizer "
                        "state across them (FSDP) instead of replicating them (DDP)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    parser.add_argument(
        "--export",
        metavar="DIR",
        help="after training, write the inference folder (EMA weights) here",
    )


def run(args: argparse.Namespace) -> int:
    from toile.train.config import preset

    overrides = {
        "out_dir": args.out,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "gradient_checkpointing": args.gradient_checkpointing or None,
        "lr": args.lr,
        "cooldown_steps": args.cooldown_steps,
        "ema_decay": args.ema_decay,
        "seed": args.seed,
        "num_threads": args.threads,
        "checkpoint_minutes": args.checkpoint_minutes,
        "checkpoint_every": args.checkpoint_every,
        "snapshot_every": args.snapshot_every,
        "mixed_precision": args.mixed_precision,
        "resume": bool(args.resume),
        "data": args.data,
        "fsdp": args.fsdp or None,
        "opt_out": args.opt_out,
        "filter_checker": args.filter_checker,
    }
    if (args.opt_out or args.filter_checker) and not args.data:
        print("toile train: error: --opt-out and --filter-checker apply to --data",
              file=sys.stderr)
        return 2
    if args.buckets:
        if not args.data:
            print("toile train: error: --buckets applies to --data", file=sys.stderr)
            return 2
        overrides["data_buckets"] = True
    if args.no_progress:
        overrides["progress_bar"] = False
    try:
        config = preset(args.preset, **{k: v for k, v in overrides.items() if v is not None})
    except ValueError as exc:
        print(f"toile train: error: {exc}", file=sys.stderr)
        return 2
    from toile.train.trainer import Trainer

    command = _command_line()
    trainer = Trainer(config, command=command)
    out = trainer.train()
    if args.export:
        trainer.export(args.export)  # every process: the EMA is gathered under FSDP
        if trainer.accelerator.is_main_process:
            print(f"exported to {args.export}")
    print(f"run folder: {out}")
    return 0


def _command_line() -> str:
    """The command as the user typed it, for the run's record and the model card."""
    if sys.argv and sys.argv[0].endswith("train_cmd.py"):
        return "python -m toile.cli.train_cmd " + shlex.join(sys.argv[1:])
    return "toile " + shlex.join(sys.argv[1:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="toile train",
        description=plain(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
