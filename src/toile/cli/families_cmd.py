"""``toile families``: what each family can do, from the code (the README's table is this)."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("families", help="list model families, variants, modes and LoRA")
    p.add_argument("--markdown", action="store_true", help="print the README's table")
    p.add_argument("--tasks", action="store_true",
                   help="the family x task table (generate, edit, caption, answer, upscale)")
    p.set_defaults(run=run)


def capability_rows() -> list[tuple[str, str, str, str, str]]:
    """(family id, title, variant, modes, lora) for every installed family and variant."""
    from toile.families.registry import available_families, get_family
    from toile.request import Mode

    rows = []
    for name in available_families():
        family = get_family(name)
        for variant, modes in family.capabilities.items():
            ordered = ", ".join(mode.value for mode in Mode if mode in modes)
            rows.append(
                (name, family.title, variant or "—", ordered, "yes" if family.lora else "no")
            )
    return rows


def markdown_table() -> str:
    lines = ["| family | id | variant | modes | LoRA |", "|---|---|---|---|---|"]
    lines += [
        f"| {title} | `{name}` | {variant} | {modes} | {lora} |"
        for name, title, variant, modes, lora in capability_rows()
    ]
    return "\n".join(lines)


def task_rows() -> list[tuple[str, str, str, list[bool]]]:
    """(family id, title, variant, [serves task] in Task order) for every family and variant."""
    from toile.families.registry import available_families, get_family
    from toile.request import Task

    rows = []
    for name in available_families():
        family = get_family(name)
        for variant, modes in family.capabilities.items():
            tasks = {mode.task for mode in modes}
            rows.append((name, family.title, variant or "—", [t in tasks for t in Task]))
    return rows


def tasks_markdown() -> str:
    from toile.request import Task

    names = [task.value for task in Task]
    lines = ["| family | id | variant | " + " | ".join(names) + " |",
             "|---|---|---|" + "---|" * len(names)]
    lines += [
        f"| {title} | `{name}` | {variant} | "
        + " | ".join("yes" if served else "" for served in serves) + " |"
        for name, title, variant, serves in task_rows()
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.tasks:
        if args.markdown:
            print(tasks_markdown())
            return 0
        from toile.cli.text import table
        from toile.request import Task

        rows = [(name, variant, *("yes" if s else "-" for s in serves))
                for name, _, variant, serves in task_rows()]
        print(table(("FAMILY", "VARIANT", *(t.value.upper() for t in Task)), rows))
        return 0
    if args.markdown:
        print(markdown_table())
        return 0
    from toile.cli.text import table

    rows = [
        (name, variant, modes, lora, title)
        for name, title, variant, modes, lora in capability_rows()
    ]
    print(table(("FAMILY", "VARIANT", "MODES", "LORA", "TITLE"), rows))
    return 0
