"""``toile loras``: list, register and forget LoRA files by id (``<toile home>/loras.json``).

    toile loras                       # id, base model, method, rank, steps, path
    toile loras add pink-star runs/pink-star.safetensors
    toile loras remove pink-star

A running ``toile serve`` with the same toile home serves a new registration at once (it
re-reads ``loras.json`` when the file changes); its clients name the LoRA by id.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from toile.cli.text import plain


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("loras", help="list, add or remove registered LoRA files",
                              description=plain(__doc__),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=run_list)
    sub = p.add_subparsers(dest="loras_command", metavar="ACTION")
    add = sub.add_parser("add", help="register a .safetensors LoRA file under an id")
    add.add_argument("id")
    add.add_argument("path")
    add.set_defaults(run=run_add)
    remove = sub.add_parser("remove", help="forget an id (the file is left alone)")
    remove.add_argument("id")
    remove.set_defaults(run=run_remove)


def describe(entry: Any) -> dict[str, Any]:
    from toile.errors import ToileError

    row: dict[str, Any] = {"id": entry.id, "path": str(entry.path)}
    if not entry.path.is_file():
        row["error"] = "file missing"
        return row
    try:
        info = entry.info()
    except ToileError as exc:
        row["error"] = str(exc)
        return row
    for key in ("base_model", "family", "method", "rank", "steps", "prompt"):
        if key in info:
            row[key] = info[key]
    return row


def run_list(args: argparse.Namespace) -> int:
    from toile.engine.models import LoraRegistry

    rows = [describe(entry) for entry in LoraRegistry().entries()]
    if args.json:
        print(json.dumps({"loras": rows}, indent=2))
        return 0
    if not rows:
        print("no LoRAs registered; add one with: toile loras add ID PATH")
    for row in rows:
        trained = (f"{row.get('family', '?')}/{row.get('base_model', '?')} rank "
                   f"{row.get('rank', '?')}, {row.get('steps', '?')} steps")
        detail = row.get("error") or (trained if "family" in row else "")
        print(f"{row['id']:<24} {detail:<40} {row['path']}")
    return 0


def run_add(args: argparse.Namespace) -> int:
    from toile.engine.models import LoraRegistry

    entry = LoraRegistry().add(args.id, args.path)
    print(f"added LoRA {entry.id} -> {entry.path}")
    return 0


def run_remove(args: argparse.Namespace) -> int:
    from toile.engine.models import LoraRegistry

    LoraRegistry().remove(args.id)
    print(f"removed LoRA {args.id}")
    return 0
