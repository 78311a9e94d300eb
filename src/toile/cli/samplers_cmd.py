"""``toile samplers [MODEL]``: the samplers and schedules a model can use (the names the CLI's
``--sampler``/``--schedule``, the APIs and the web page take)."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("samplers", help="list the samplers and schedules a model can use")
    p.add_argument("model", nargs="?", help="model id or path (default: the default model)")
    p.add_argument("--markdown", action="store_true",
                   help="print the README's table: every family's samplers")
    p.set_defaults(run=run)


def family_rows() -> list[tuple[str, str, str]]:
    """(family, samplers, schedules) for each family as its published checkpoints come, the
    samplers grouped by the schedules they take."""
    from toile.families.registry import available_families, get_family
    from toile.samplers import menu_for

    rows = []
    for name in available_families():
        family = get_family(name)
        typical = getattr(family, "typical_scheduler", None)
        if typical is None:  # no sampling at all (a resampling filter, an image reader)
            continue
        menu = menu_for(family, typical)
        groups: dict[str, list[str]] = {}
        for sampler in menu.samplers() or (menu.own(),):
            schedules = ", ".join(s.value for s in menu.schedules(sampler))
            groups.setdefault(schedules, []).append(sampler.name)
        rows += [(name, ", ".join(samplers), schedules) for schedules, samplers in groups.items()]
    return rows


def markdown_table() -> str:
    lines = ["| family | samplers | schedules |", "|---|---|---|"]
    lines += [f"| `{family}` | {samplers} | {schedules} |"
              for family, samplers, schedules in family_rows()]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from toile.cli.text import table

    if args.markdown:
        print(markdown_table())
        return 0
    from toile.engine.models import ModelRegistry
    from toile.families.registry import checkpoint_samplers

    entry = ModelRegistry().resolve(args.model)
    menu = checkpoint_samplers(entry.path)
    if menu is None:  # a single file: its scheduler is known once loaded
        from toile.engine.engine import Engine

        menu = Engine(device="cpu").model_info(args.model).samplers
    if menu is None:
        print(f"{entry.id}: one fixed sampler")
        return 0
    own = menu.own()
    rows = [("*" if s == own else "", s.name, s.scheduler_class,
             ", ".join(x.value for x in menu.schedules(s))) for s in menu.samplers() or (own,)]
    print(table(("DEFAULT", "SAMPLER", "DIFFUSERS CLASS", "SCHEDULES"), rows))
    return 0
