"""``toile models``: list, add, remove and pull (install) registered models."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "models", help="list the models toile knows; add, remove or pull (install) one")
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
    pull = sub.add_parser(
        "pull", help="install a model: download a Hugging Face Hub repository (safetensors, "
        "configs and tokenizers only; every file's hash checked) or one .safetensors URL, then "
        "register it")
    pull.add_argument("source", metavar="REPO_ID[@REVISION]|URL",
                      help="a hub repository, e.g. owner/name or owner/name@COMMIT, or the URL "
                      "of one .safetensors file (with --sha256)")
    pull.add_argument("--id", help="the id to register it under (default: the repository's or "
                      "file's name, lowercased)")
    pull.add_argument("--dir", type=Path, help="where to put it (default: "
                      "$TOILE_HOME/models/ID)")
    pull.add_argument("--sha256", help="the SHA-256 the file at URL must have (required with "
                      "a URL; a repository's files are checked against the hub's own hashes)")
    pull.set_defaults(run=run_pull)


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


def run_pull(args: argparse.Namespace) -> int:
    """Install, then register only what toile can identify; a failed pull registers nothing."""
    from toile.io.hub_install import is_url

    try:
        return pull_url(args) if is_url(args.source) else pull_hub(args)
    except KeyboardInterrupt:
        print("toile models pull: run the same command again to resume; complete files are "
              "kept and a partial one is continued", file=sys.stderr)
        raise


def pull_hub(args: argparse.Namespace) -> int:
    from toile.errors import RequestError, one_line
    from toile.io.hub_install import InstallError, pull_repo

    if args.sha256:
        raise RequestError("--sha256", "is for a URL; a repository's files are checked "
                           "against the hashes the hub lists")
    repo_id, _, revision = args.source.partition("@")
    model_id = pull_id(args.id, repo_id.rsplit("/", 1)[-1])
    report = pull_repo(repo_id, revision or None, pull_dir(args.dir, model_id))
    for name, reason in report.skipped:
        print(f"skipped {one_line(name, 200)}: {reason}")
    if not report.downloaded and not report.reused:
        raise InstallError(f"{repo_id} has no file toile can load: nothing was registered")
    print(f"{repo_id}@{report.commit[:12]}: {len(report.downloaded)} files downloaded, "
          f"{len(report.reused)} already there, all verified -> {report.dest}")
    register(model_id, report.dest)
    return 0


def pull_url(args: argparse.Namespace) -> int:
    from toile.errors import RequestError
    from toile.io.hub_install import check_file_url, pull_file, url_file_stem

    if not args.sha256:
        raise RequestError("--sha256", "is required with a URL: toile keeps a downloaded file "
                           "only if it is the one you meant (its SHA-256 from a source you trust)")
    check_file_url(args.source)
    model_id = pull_id(args.id, url_file_stem(args.source))
    target = pull_dir(args.dir, None) / f"{model_id}.safetensors"
    pull_file(args.source, args.sha256, target)
    print(f"{target.name}: SHA-256 verified -> {target}")
    register(model_id, target)
    return 0


def pull_id(given: str | None, name: str) -> str:
    """The id to register under, checked before anything is downloaded."""
    from toile.engine.models import BUILTIN_IDS, MODEL_ID
    from toile.errors import RequestError

    model_id = given or name.lower()
    if not MODEL_ID.match(model_id):
        raise RequestError("--id", f"{model_id[:80]!r} is not a model id (1-64 letters, digits, "
                           "'.', '_' or '-'); choose one with --id")
    if model_id in BUILTIN_IDS:
        raise RequestError("--id", f"{model_id!r} is a built-in model's id; choose another")
    return model_id


def pull_dir(given: Path | None, model_id: str | None) -> Path:
    """--dir, else toile's models folder (a repository gets a folder of its own)."""
    from toile.config import toile_home

    if given is not None:
        return given.expanduser()
    models = toile_home() / "models"
    return models if model_id is None else models / model_id


def register(model_id: str, path: Path) -> None:
    from toile.engine.models import ModelRegistry
    from toile.errors import ToileError
    from toile.families.registry import detect_family
    from toile.io.hub_install import InstallError

    try:
        family = detect_family(path)  # like `toile models add`: only what toile can load
    except ToileError as exc:
        raise InstallError(f"downloaded and verified to {path}, but not registered: {exc}"
                           ) from None
    entry = ModelRegistry().add(model_id, path)
    print(f"added {entry.id} ({family.name}) -> {entry.path}")
