"""The engine's tasks and plans, independent of any one family: validation of each task's
inputs, the built-in resampling upscalers, default models per task, records, the CLI."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from helpers import gradient_image
from test_cli import toile
from toile.engine.engine import Engine
from toile.engine.models import ModelRegistry
from toile.engine.plan import Handoff, StageRole, plan_for, upscale_passes
from toile.errors import RequestError, UnsupportedModeError
from toile.request import GenerationRequest, Task
from toile.resolve import resolve

IMAGE = gradient_image(20, 16)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"task": "edit", "prompt": "make it blue"}, "image"),
        ({"task": "edit", "prompt": "  ", "image": IMAGE}, "prompt"),
        ({"task": "answer", "image": IMAGE}, "question"),
        ({"task": "answer", "image": IMAGE, "question": "why?" * 300}, "question"),
        ({"task": "caption", "image": IMAGE, "question": "what?"}, "question"),
        ({"task": "caption", "image": IMAGE, "steps": 4}, "steps"),
        ({"task": "caption", "image": IMAGE, "detail": "medium"}, "detail"),
        ({"task": "upscale", "image": IMAGE, "scale": 9}, "scale"),
        ({"task": "upscale", "image": IMAGE, "scale": 0.5}, "scale"),
        ({"task": "upscale", "image": IMAGE, "width": 64}, "height"),
        ({"task": "upscale", "image": IMAGE, "width": 40, "height": 32, "scale": 2}, "scale"),
        ({"task": "upscale", "image": IMAGE, "width": 400, "height": 32}, "width"),
        ({"task": "upscale", "image": IMAGE, "width": 40, "height": 8}, "height"),
        ({"task": "generate", "scale": 2}, "scale"),
        ({"task": "generate", "image_guidance": 1.0}, "image_guidance"),
        ({"task": "upscale", "image": IMAGE, "mask": IMAGE.convert("L")}, "mask"),
        ({"task": "paint"}, "task"),
    ],
)
def test_each_task_checks_its_inputs(fields, field):
    with pytest.raises(RequestError) as err:
        GenerationRequest(**{"prompt": "", **fields})
    assert err.value.field == field
    assert "\n" not in str(err.value)


def test_builtin_lanczos_upscale_is_pils_resize_and_recorded():
    engine = Engine(policy=None)
    result = engine.run(GenerationRequest(prompt="", task="upscale", image=IMAGE, scale=2.5,
                                          seed=5, model="lanczos"))
    expected = IMAGE.resize((50, 40), Image.Resampling.LANCZOS)
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(expected))
    record = result.records[0]
    assert (record.task, record.model_id, record.family, record.variant) == (
        "upscale", "lanczos", "resize", "lanczos")
    assert record.scale == 2.5 and (record.width, record.height) == (50, 40)
    assert len(record.inputs["image"]) == 64
    assert [stage["role"] for stage in record.stages] == ["base"]


def test_upscale_to_a_size():
    result = Engine(policy=None).run(GenerationRequest(
        prompt="", task="upscale", image=IMAGE, width=50, height=32))
    assert result.images[0].size == (50, 32) and result.records[0].scale == 2.5
    assert result.records[0].model_id == "toile-sr"  # the upscale task's built-in default


@pytest.mark.parametrize("model", ["bicubic", "nearest"])
def test_other_filters(model):
    result = Engine(policy=None).run(GenerationRequest(
        prompt="", task=Task.UPSCALE, image=IMAGE, scale=3, model=model))
    resample = Image.Resampling[model.upper()]
    assert np.array_equal(np.asarray(result.images[0]),
                          np.asarray(IMAGE.resize((60, 48), resample)))


def test_upscale_passes_past_the_budget_are_refused_before_running():
    from toile.request import Mode
    from toile.resolve import FamilyDefaults

    defaults = FamilyDefaults(modes=frozenset({Mode.UPSCALE}), width=0, height=0, steps=2,
                              guidance=1.0, size_multiple=1, min_side=1, upscale_factor=4,
                              max_pixels=1024 * 1024)
    image = Image.new("RGB", (200, 200))
    resolved = resolve(GenerationRequest(prompt="", task="upscale", image=image, scale=5),
                       defaults, "x")  # 1000x1000 fits; the second 4x pass (3200x3200) not
    with pytest.raises(RequestError) as err:
        plan_for(resolved, defaults)
    assert err.value.field == "scale" and "2 passes" in str(err.value)


def test_upscale_past_the_pixel_budget_names_scale():
    big = Image.new("RGB", (4000, 4000))
    with pytest.raises(RequestError) as err:
        Engine(policy=None).run(GenerationRequest(prompt="", task="upscale", image=big, scale=8))
    assert err.value.field == "scale"


def test_task_a_model_does_not_serve_names_the_models_that_do():
    with pytest.raises(UnsupportedModeError) as err:
        Engine(policy=None).run(GenerationRequest(prompt="", task="upscale", image=IMAGE,
                                                  model="toile-mini"))
    assert "upscale" in str(err.value) and "lanczos" in str(err.value)
    assert "toile-sr" in str(err.value)
    with pytest.raises(UnsupportedModeError) as err:
        Engine(policy=None).run(GenerationRequest(prompt="a cat", model="lanczos"))
    assert "txt2img" in str(err.value)


def test_default_model_per_task(tiny_models):
    registry = ModelRegistry()
    engine = Engine(registry, policy=None)
    assert engine.default_model(Task.UPSCALE) == "toile-sr"
    assert engine.default_model(Task.GENERATE) == "toile-mini"
    assert engine.default_model(Task.CAPTION) == "toile-reader"
    assert engine.default_model(Task.ANSWER) == "toile-reader"
    with pytest.raises(RequestError) as err:
        engine.default_model(Task.EDIT)
    assert err.value.field == "model" and "edit" in str(err.value)
    registry.set_default("nearest", Task.UPSCALE)
    assert engine.default_model(Task.UPSCALE) == "nearest"
    result = engine.run(GenerationRequest(prompt="", task="upscale", image=IMAGE, scale=2))
    assert result.records[0].model_id == "nearest"


def test_plans():
    assert [upscale_passes(s, 4) for s in (1, 2, 4, 4.5, 8, 16, 17)] == [1, 1, 1, 2, 2, 2, 3]
    assert upscale_passes(3, 1) == 1
    from toile.request import Mode
    from toile.resolve import FamilyDefaults

    defaults = FamilyDefaults(modes=frozenset({Mode.UPSCALE}), width=0, height=0, steps=2,
                              guidance=1.0, size_multiple=1, min_side=1)
    resolved = resolve(GenerationRequest(prompt="", task="upscale", image=IMAGE, scale=8),
                       defaults, "x")
    plan = plan_for(resolved, replace(defaults, upscale_factor=4))
    assert [s.role for s in plan.stages] == [StageRole.BASE, StageRole.UPSCALE]
    assert all(s.request.scale == 4 for s in plan.stages)
    refined = resolve(GenerationRequest(prompt="a", refiner="r"), FamilyDefaults(
        modes=frozenset({Mode.TXT2IMG}), width=64, height=64, steps=2, guidance=1.0), "x")
    plan = plan_for(refined, replace(defaults, upscale_factor=1))
    assert [(s.role, s.handoff) for s in plan.stages] == [
        (StageRole.BASE, Handoff.IMAGES), (StageRole.REFINER, Handoff.LATENTS)]


def test_cli_upscale_and_models_default(toile_home, tmp_path):
    source = tmp_path / "in.png"
    IMAGE.save(source)
    out = tmp_path / "big.png"
    proc = toile("upscale", str(source), "--scale", "2", "-o", str(out), "--json",
                 home=toile_home)
    data = json.loads(proc.stdout)
    assert data["task"] == "upscale" and Image.open(out).size == (40, 32)
    assert data["images"][0]["record"]["model_id"] == "toile-sr"
    proc = toile("models", "default", "toile-mini", "--task", "upscale", home=toile_home,
                 check=False)
    assert proc.returncode == 2 and "does not serve the upscale task" in proc.stderr
    toile("models", "default", "bicubic", "--task", "upscale", home=toile_home)
    toile("upscale", str(source), "-o", str(out), home=toile_home)
    assert Image.open(out).size == (80, 64)  # a filter's default factor is 4
    for args in (("edit", str(source), "make it blue"), ("upscale", str(source), "--scale", "9"),
                 ("caption", str(source), "--model", "lanczos")):
        proc = toile(*args, home=toile_home, check=False)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    proc = toile("caption", str(tmp_path / "missing.png"), home=toile_home, check=False)
    assert proc.returncode == 2 and "does not exist" in proc.stderr


def test_families_tasks_table_lists_the_upscalers():
    from toile.cli.families_cmd import tasks_markdown

    table = tasks_markdown()
    assert "| generate | edit | caption | answer | upscale |" in table
    assert "| Resampling filter (no model) | `resize` | lanczos |  |  |  |  | yes |" in table
