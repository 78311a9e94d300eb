"""Hires fix as a plan (base txt2img -> upscaler -> img2img at the larger size), checked
against running the three steps by hand on a tiny SD model."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from test_cli import toile
from toile.engine.engine import Engine
from toile.errors import RequestError
from toile.io.metadata import a1111_parameters
from toile.request import GenerationRequest

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_hires_fix_equals_its_three_steps(tiny_models):
    model = str(tiny_models("sd"))
    engine = Engine(policy=None)
    common = {"model": model, "seed": 7, "steps": 2}
    result = engine.run(GenerationRequest("a red cat", width=32, height=32, hires_scale=1.5,
                                          hires_steps=3, hires_strength=0.6, **common))
    base = engine.run(GenerationRequest("a red cat", width=32, height=32, **common)).images[0]
    big = base.resize((48, 48), Image.Resampling.LANCZOS)
    second = engine.run(GenerationRequest("a red cat", image=big, strength=0.6, model=model,
                                          seed=7, steps=3)).images[0]
    assert result.images[0].size == (48, 48)
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(second))
    record = result.records[0]
    assert (record.width, record.height) == (32, 32)  # the first pass's size, as A1111's
    assert record.hires == {"scale": 1.5, "upscaler": "lanczos", "width": 48, "height": 48,
                            "steps": 3, "strength": 0.6}
    assert [s["role"] for s in record.stages] == ["base", "upscale", "hires"]
    assert [s["model_id"] for s in record.stages][1] == "lanczos"
    info = a1111_parameters(record)
    assert "Hires upscale: 1.5" in info and "Hires upscaler: lanczos" in info


def test_hires_batch_equals_singles(tiny_models):
    model = str(tiny_models("sd"))
    engine = Engine(policy=None)
    fields = {"model": model, "steps": 2, "width": 32, "height": 32, "hires_scale": 2.0}
    batch = engine.run(GenerationRequest("a cat", seed=3, num_images=2, **fields)).images
    single = engine.run(GenerationRequest("a cat", seed=4, **fields)).images[0]
    assert np.array_equal(np.asarray(batch[1]), np.asarray(single))


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"hires_steps": 3}, "hires_steps"),
        ({"hires_scale": 1.0}, "hires_scale"),
        ({"hires_scale": 9.0}, "hires_scale"),
        ({"hires_scale": 2.0, "hires_strength": -0.1}, "hires_strength"),
        ({"hires_scale": 2.0, "refiner": "x"}, "hires_scale"),
        ({"hires_scale": 2.0, "hires_upscaler": ""}, "hires_upscaler"),
    ],
)
def test_hires_bad_input(fields, field):
    with pytest.raises(RequestError) as err:
        GenerationRequest("a cat", **fields)
    assert err.value.field == field


def test_no_step_left_is_refused_before_running(tiny_models):
    engine = Engine(policy=None)
    model = str(tiny_models("sd"))
    with pytest.raises(RequestError) as err:
        engine.run(GenerationRequest("a cat", model=model, steps=2, width=32, height=32,
                                     hires_scale=2.0, hires_strength=0.4))
    assert err.value.field == "hires_strength"
    with pytest.raises(RequestError) as err:
        engine.run(GenerationRequest("a cat", model=model, steps=3, strength=0.2,
                                     image=Image.new("RGB", (32, 32))))
    assert err.value.field == "strength" and "at least" in str(err.value)


def test_hires_on_img2img_and_unknown_upscaler_are_refused(tiny_models):
    with pytest.raises(RequestError) as err:
        GenerationRequest("a cat", image=Image.new("RGB", (32, 32)), hires_scale=2.0)
    assert err.value.field == "hires_scale"
    engine = Engine(policy=None)
    with pytest.raises(Exception, match="nope"):
        engine.run(GenerationRequest("a cat", model=str(tiny_models("sd")), steps=2, width=32,
                                     height=32, hires_scale=2.0, hires_upscaler="nope"))


def test_cli_hires(tiny_models, toile_home, tmp_path):
    out = tmp_path / "hr.png"
    proc = toile("generate", "a cat", "--model", str(tiny_models("sd")), "--steps", "2",
                 "--width", "32", "--height", "32", "--hires-scale", "2", "--seed", "1",
                 "-o", str(out), "--json", home=toile_home)
    assert Image.open(out).size == (64, 64)
    image = json.loads(proc.stdout)["images"][0]
    assert image["record"]["hires"]["upscaler"] == "lanczos"
    assert (image["width"], image["height"]) == (64, 64)


def test_hires_with_an_upscaler_model_runs_its_passes(tiny_models):
    """A 2x upscaler asked for 3x in hires fix: two passes, then resized to the hires size."""
    from toile.engine.models import ModelRegistry

    registry = ModelRegistry()
    registry.add("x2", tiny_models("sd_latent_x2"))
    engine = Engine(registry, policy=None)
    result = engine.run(GenerationRequest("a cat", model=str(tiny_models("sd")), steps=2,
                                          width=16, height=16, seed=2, hires_scale=3.0,
                                          hires_upscaler="x2"))
    assert result.images[0].size == (48, 48)
    assert [s["role"] for s in result.records[0].stages] == ["base", "upscale", "hires"]


def test_hires_strength_zero_upscales_only(tiny_models):
    model = str(tiny_models("sd"))
    engine = Engine(policy=None)
    fields = {"model": model, "seed": 5, "steps": 2, "width": 32, "height": 32}
    result = engine.run(GenerationRequest("a cat", hires_scale=2.0, hires_strength=0.0,
                                          **fields))
    base = engine.run(GenerationRequest("a cat", **fields)).images[0]
    expected = base.resize((64, 64), Image.Resampling.LANCZOS)
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(expected))
    assert [s["role"] for s in result.records[0].stages] == ["base", "upscale"]


def test_hires_pass_with_its_own_prompt_and_sampler(tiny_models):
    """A1111's hr_prompt / hr_sampler_name: the second pass runs with them."""
    model = str(tiny_models("sd"))
    engine = Engine(policy=None)
    common = {"model": model, "seed": 7, "steps": 2}
    result = engine.run(GenerationRequest(
        "a red cat", width=32, height=32, hires_scale=1.5, hires_strength=0.6,
        hires_prompt="a blue dog", hires_negative_prompt="blurry", hires_sampler="Euler",
        **common))
    base = engine.run(GenerationRequest("a red cat", width=32, height=32, **common)).images[0]
    second = engine.run(GenerationRequest(
        "a blue dog", negative_prompt="blurry", sampler="Euler", strength=0.6, model=model,
        seed=7, steps=2, image=base.resize((48, 48), Image.Resampling.LANCZOS))).images[0]
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(second))
    hires = result.records[0].hires
    assert (hires["prompt"], hires["sampler"]) == ("a blue dog", "Euler")
    assert 'Hires prompt: "a blue dog"' in a1111_parameters(result.records[0])
    with pytest.raises(RequestError) as err:  # refused before the first pass runs
        engine.run(GenerationRequest("a cat", hires_scale=2.0, hires_sampler="DDIM",
                                     schedule="karras", sampler="Euler", **common))
    assert err.value.field == "hires_sampler"  # DDIM takes no Karras sigmas
