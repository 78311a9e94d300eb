"""Every command in the README works as written.

Commands that need only the built-in model and no input files are run for real (in a scratch
folder, with a fresh toile home); the rest (other models, the user's own folders, long runs such
as train and serve) are parsed by toile's own argument parsers, so a renamed or missing option
fails here. Python blocks compile; those that need only the built-in model run, and the OpenAI
client example runs against a real server with the built-in model.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from test_cli import TOILE

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
# Commands run for real: cheap with the built-in model (training, serving and benchmarks are
# long-running and parsed only).
RUNNABLE = {"generate", "models", "families", "info", "loras", "samplers"}


def blocks(lang: str) -> list[str]:
    return [body for kind, body in BLOCK.findall(README.read_text()) if kind == lang]


def shell_commands() -> list[list[str]]:
    """Each command of the README's sh blocks as argv (continuations joined, comments gone)."""
    commands = []
    for body in blocks("sh"):
        for line in body.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if argv:
                commands.append(argv)
    return commands


def toile_commands() -> list[list[str]]:
    return [argv[1:] for argv in shell_commands() if Path(argv[0]).name == "toile"]


def parse(argv: list[str]) -> argparse.Namespace:
    from toile.cli.main import build_parser

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return build_parser().parse_args(argv)
    except SystemExit:
        raise AssertionError(f"README: toile {shlex.join(argv)}: {err.getvalue()}") from None


def runs_with_the_built_in_model(argv: list[str], folder: Path) -> bool:
    if argv[0] not in RUNNABLE or argv[1:2] in (["add"], ["remove"], ["default"], ["pull"]):
        return False
    args = parse(argv)
    if getattr(args, "model", None) not in (None, "toile-mini"):
        return False
    if getattr(args, "refiner", None) or getattr(args, "lora", None):
        return False
    files = [getattr(args, name, None) for name in ("image", "mask", "path", "policy")]
    return all(f is None or (folder / f).exists() for f in files)


def test_the_readme_has_examples():
    assert len(toile_commands()) >= 20 and len(blocks("python")) >= 2


def test_every_toile_command_parses():
    for argv in toile_commands():
        args = parse(argv)
        if argv[0] == "finetune":
            from toile.cli.finetune_cmd import config_from_args

            config_from_args(args)  # the settings' own checks (e.g. what --method full needs)


def test_python_module_commands_exist_and_parse():
    import importlib

    modules = [argv for argv in shell_commands() if argv[:2] == ["python", "-m"]]
    assert modules
    for argv in modules:
        module = importlib.import_module(argv[2])
        with pytest.raises(SystemExit) as info:
            module.main(["--help"])
        assert info.value.code == 0, argv


def test_make_targets_exist():
    makefile = (README.parent / "Makefile").read_text()
    for argv in shell_commands():
        if argv[0] == "make":
            for target in (a for a in argv[1:] if "=" not in a):
                assert re.search(rf"^{target}:", makefile, re.M), target


def test_commands_that_need_only_the_built_in_model_run(tmp_path, toile_home):
    env = dict(os.environ, TOILE_HOME=str(toile_home), HF_HUB_OFFLINE="1")
    ran = []
    for argv in toile_commands():
        if not runs_with_the_built_in_model(argv, tmp_path):
            continue
        proc = subprocess.run([TOILE, *argv], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, f"toile {shlex.join(argv)}:\n{proc.stderr}"
        ran.append(argv[0])
    assert {"generate", "models", "families"} <= set(ran), ran
    assert list(tmp_path.glob("toile-*.png")), "the built-in generate wrote no image"


def test_python_examples_compile_and_the_built_in_one_runs(tmp_path, monkeypatch):
    for body in blocks("python"):
        compile(body, "README.md", "exec")
    built_in = [b for b in blocks("python") if "toile.load()" in b]
    assert built_in
    monkeypatch.chdir(tmp_path)
    for body in built_in:
        exec(compile(body, "README.md", "exec"), {})
    assert (tmp_path / "circle.png").is_file()


def test_the_openai_example_runs_against_the_built_in_model(tmp_path):
    from serve_helpers import live_server
    from toile.engine.engine import Engine

    [example] = [b for b in blocks("python") if "from openai import OpenAI" in b]
    assert "http://127.0.0.1:7860/v1" in example
    engine = Engine(device="cpu", allow_paths=False)
    with live_server(engine, tmp_path / "data") as port:
        code = example.replace("127.0.0.1:7860", f"127.0.0.1:{port}")
        scope: dict = {"TOKEN": None}
        exec(compile(code, "README.md", "exec"), scope)
    assert scope["img"].data[0].b64_json

