"""``toile``: entry point. Only argparse is imported here, so ``toile --help`` is instant."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# command name -> module; each module has add_parser(subparsers) and run(args) -> int.
COMMANDS = {
    "generate": "toile.cli.generate",
    "edit": "toile.cli.edit_cmd",
    "caption": "toile.cli.caption_cmd",
    "ask": "toile.cli.ask_cmd",
    "upscale": "toile.cli.upscale_cmd",
    "models": "toile.cli.models",
    "info": "toile.cli.info",
    "families": "toile.cli.families_cmd",
    "samplers": "toile.cli.samplers_cmd",
    "train": "toile.cli.train_cmd",
    "eval": "toile.cli.eval_cmd",
    "bench": "toile.cli.bench",
    "demo": "toile.cli.demo",
    "serve": "toile.cli.serve_cmd",
    "worker": "toile.cli.worker_cmd",
    "finetune": "toile.cli.finetune_cmd",
    "loras": "toile.cli.loras_cmd",
    "verify": "toile.cli.verify_cmd",
}


def build_parser() -> argparse.ArgumentParser:
    from toile import __version__

    parser = argparse.ArgumentParser(
        prog="toile", description="Text-to-image generation, training and serving."
    )
    parser.add_argument("--version", action="version", version=f"toile {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMANDS.values():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue  # a command whose module is not part of this installation
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from toile.compat import check_versions
    from toile.errors import ToileError

    try:
        check_versions()
        return int(args.run(args) or 0)
    except ToileError as exc:
        print(f"toile {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"toile {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `toile families | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
