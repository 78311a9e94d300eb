"""The Python API and the README's promises about it."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import toile
from helpers import gradient_image
from toile.errors import RequestError

README = Path(__file__).resolve().parents[1] / "README.md"


def test_load_generate_with_fields(tiny_models):
    gen = toile.load(str(tiny_models("sd")), device="cpu")
    result = gen.generate("a cat", seed=4, steps=2, num_images=2, negative_prompt="dog")
    assert len(result.images) == 2 and len(result.records) == 2
    assert [r.seed for r in result.records] == [4, 5]
    assert result.records[0].negative_prompt == "dog"
    out = gen.generate(
        "a cat", seed=4, steps=2, image=gradient_image(32, 32), outpaint=(0, 8, 0, 8)
    )
    assert out.images[0].size == (32, 48)
    assert np.array_equal(np.asarray(out.images[0])[8:40], np.asarray(gradient_image(32, 32)))
    euler = gen.generate("a cat", seed=4, steps=2, sampler="euler", schedule="Karras")
    assert (euler.records[0].sampler, euler.records[0].schedule) == ("Euler", "karras")
    with pytest.raises(RequestError, match="sampler_name: unknown field"):
        gen.generate("a cat", sampler_name="euler")


def test_lazy_import_does_no_work():
    import subprocess
    import sys

    code = (
        "import sys, toile; print(any(m.startswith(('torch', 'diffusers')) for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_readme_first_commands_and_family_table():
    from toile.cli.families_cmd import markdown_table

    text = README.read_text()
    commands = re.findall(r"^(make \w+)", text, flags=re.M)
    assert commands[:2] == ["make demo", "make test"]
    table = text.split("<!-- families:start -->")[1].split("<!-- families:end -->")[0].strip()
    assert table == markdown_table(), (
        "README's family table is stale: run toile families --markdown"
    )


def test_readme_task_table_is_the_code():
    from toile.cli.families_cmd import tasks_markdown

    text = README.read_text()
    table = text.split("<!-- tasks:start -->")[1].split("<!-- tasks:end -->")[0].strip()
    assert table == tasks_markdown(), "stale: toile families --tasks --markdown"


def test_readme_sampler_table_is_the_code():
    from toile.cli.samplers_cmd import markdown_table

    text = README.read_text()
    table = text.split("<!-- samplers:start -->")[1].split("<!-- samplers:end -->")[0].strip()
    assert table == markdown_table(), "README's sampler table is stale: toile samplers --markdown"
