"""``toile models``: list, add and remove registered models."""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("models", help="list the models toile knows; add or remove one")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=run_list)
    sub = p.add_subparsers(dest="models_command", metavar="ACTION")
    add = sub.add_parser("add", help="register a checkpoint folder or .safetensors file by id")
    add.add_argument("id")
    add.add_argument("path")
    add.set_defaults(run=run_add)
    remove = sub.add_parser("remove", help="forget a registered id (files are left alone)")
    remove.add_argument("id")
    remove.set_defaults(run=run_remove)
    default = sub.add_parser(
        "default", help="make a model the default (of one task with --task)")
    default.add_argument("id")
    default.add_argument("--task", choices=("generate", "edit", "caption", "answer", "upscale"),
                         help="the task it becomes the default for (default: the model used "
                         "when --model is left out, for every task it serves)")
    default.set_defaults(run=run_default)


def describe(entry: Any) -> dict[str, Any]:
    """id, family, path and modes; a model that cannot be identified says why instead."""
    from toile.errors import ToileError
    from toile.families.registry import detect_family

    row: dict[str, Any] = {"id": entry.id, "path": str(entry.path)}
    try:
        family = detect_family(entry.path)
        variant = family.variant(entry.path)
        row["family"] = family.name
        row["variant"] = variant
        row["modes"] = [m.value for m in sorted_modes(family.capabilities[variant])]
    except ToileError as exc:
        row["family"] = None
        row["error"] = str(exc)
    return row


def sorted_modes(modes: frozenset) -> list:
    from toile.request import Mode

    return [mode for mode in Mode if mode in modes]


def run_list(args: argparse.Namespace) -> int:
    from toile.engine.models import ModelRegistry

    registry = ModelRegistry()
    rows = [describe(entry) for entry in registry.entries()]
    default = registry.default_id
    if args.json:
        print(json.dumps({"default": default, "models": rows}, indent=2))
        return 0
    from toile.cli.text import table

    lines = [
        (
            "*" if row["id"] == default else "",
            row["id"],
            row["family"] or "?",
            row.get("variant") or "—" if row["family"] else "?",
            ",".join(row.get("modes", [])) or row.get("error", ""),
            row["path"],
        )
        for row in rows
    ]
    print(table(("DEFAULT", "ID", "FAMILY", "VARIANT", "MODES", "PATH"), lines))
    return 0


def run_add(args: argparse.Namespace) -> int:
    from toile.engine.models import ModelRegistry
    from toile.families.registry import detect_family

    family = detect_family(args.path)  # refuse what toile could not load, before registering
    entry = ModelRegistry().add(args.id, args.path)
    print(f"added {entry.id} ({family.name}) -> {entry.path}")
    return 0


def run_default(args: argparse.Namespace) -> int:
    from toile.engine.models import ModelRegistry, served_tasks
    from toile.errors import RequestError
    from toile.request import Task

    registry = ModelRegistry()
    task = Task(args.task) if args.task else None
    tasks = served_tasks(registry.get(args.id).path)
    if task is not None and task not in tasks:
        raise RequestError("task", f"{args.id} does not serve the {task.value} task (it "
                           f"serves: {', '.join(t.value for t in Task if t in tasks)})")
    registry.set_default(args.id, task)
    print(f"default{'' if task is None else ' for ' + task.value}: {args.id}")
    return 0


def run_remove(args: argparse.Namespace) -> int:
    from toile.engine.models import ModelRegistry

    ModelRegistry().remove(args.id)  # the built-in model is refused there, with the reason
    print(f"removed {args.id}")
    return 0
