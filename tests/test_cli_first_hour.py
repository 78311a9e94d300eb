"""What a new user meets in the first hour at the terminal: help texts, listings and the
errors for the usual first mistakes (each one line, naming what was wrong)."""

from __future__ import annotations

import pytest

from test_cli import toile

COMMANDS = ("generate", "models", "info", "families", "train", "eval", "bench", "demo",
            "serve", "finetune", "loras", "samplers", "verify")


@pytest.mark.parametrize("command", COMMANDS)
def test_help_is_plain_text(command, toile_home):
    out = toile(command, "--help", home=toile_home).stdout
    assert "``" not in out
    assert out.startswith("usage: toile " + command)


def test_generate_help_says_the_defaults(toile_home, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # one line per option, no wrapping
    lines = toile("generate", "--help", home=toile_home).stdout.splitlines()

    def help_of(option: str) -> str:
        """The option's line and its continuation lines (argparse may wrap after the name)."""
        start = next(i for i, line in enumerate(lines)
                     if line.lstrip().startswith("-") and f"{option} " in f"{line} ")
        block = [lines[start]]
        for line in lines[start + 1 :]:
            if not line.strip() or line.lstrip().startswith("-"):
                break
            block.append(line)
        return " ".join(block)

    for option in ("--seed", "--steps", "--guidance", "--width", "--strength", "--refiner-switch",
                   "--device", "--dtype", "--num-images", "--model"):
        assert "default" in help_of(option), help_of(option)
    refiner = help_of("--refiner")
    assert "img2img" in refiner and "inpaint" in refiner  # not "(txt2img)" only


def test_serve_help_names_the_default_data_folder(toile_home, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")
    assert str(toile_home / "serve") in toile("serve", "--help", home=toile_home).stdout


def test_listings_have_aligned_columns_under_a_header(toile_home):
    for command, header in (("families", "FAMILY"), ("models", "DEFAULT")):
        lines = toile(command, home=toile_home).stdout.splitlines()
        assert lines[0].startswith(header)
        # every column after the first starts at the same offset on every line
        second = lines[0].split()[1]
        offset = lines[0].index(second)
        for line in lines[1:]:
            assert line[offset - 2 : offset] == "  " and line[offset] != " ", (command, line)
    models = toile("models", home=toile_home).stdout.splitlines()
    assert models[1].split()[:3] == ["*", "toile-mini", "toile"]


def test_the_built_in_model_cannot_be_removed(toile_home):
    proc = toile("models", "remove", "toile-mini", home=toile_home, check=False)
    assert proc.returncode == 2
    assert "built-in model" in proc.stderr and "cannot be removed" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_a_hub_id_says_toile_loads_from_disk_and_how_to_get_it(toile_home, tmp_path):
    proc = toile("generate", "a cat", "--model", "someone/some-model-1.0",
                 "-o", str(tmp_path / "x.png"), home=toile_home, check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "loads models from disk" in proc.stderr
    assert "toile models pull someone/some-model-1.0" in proc.stderr
    proc = toile("models", "add", "x", "someone/some-model-1.0", home=toile_home, check=False)
    assert proc.returncode == 2 and "toile models pull" in proc.stderr


def test_a_file_that_is_not_an_image_is_named(toile_home, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("shopping: eggs, flour\n")
    proc = toile("generate", "a cat", "--image", str(notes), "-o", str(tmp_path / "x.png"),
                 home=toile_home, check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert f"image: {notes} is not an image file" in proc.stderr
    assert "BytesIO" not in proc.stderr
