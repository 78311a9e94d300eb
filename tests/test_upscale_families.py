"""Upscalers: the SD x4 and latent x2 upscalers (family sd-upscale), DeepFloyd IF stage II used
alone (family if, variant stage-ii) and the built-in Lanczos resize (family resize).

Parity: toile's Engine against the diffusers pipeline called directly with the same prompt,
steps, seed and defaults (guidance, noise level: the pipelines' own). Then the engine's upscale
plans (several passes for a scale over the model's factor, an exact final size), inputs whose
size the models cannot take as they are (padded and cropped back), and the errors.

Tiny models: x4 16x16 -> 64x64, latent x2 16x16 -> 32x32, IF stage II 8x8 -> 32x32.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import assert_same_image, gradient_image, max_abs_diff
from toile.engine.engine import Engine
from toile.errors import ModelFormatError, RequestError, UnsupportedModeError
from toile.families.registry import available_families, detect_family, get_family
from toile.progress import ProgressEvent
from toile.request import GenerationRequest

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT = "a cat"
STEPS = 2
NO_SAFETY = {"safety_checker": None, "feature_extractor": None, "watermarker": None}


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(device="cpu", cache_size=4)


@pytest.fixture(scope="module")
def x4(tiny_models):
    return tiny_models("sd_x4")


@pytest.fixture(scope="module")
def latent_x2(tiny_models):
    return tiny_models("sd_latent_x2")


@pytest.fixture(scope="module")
def if_stage2(tiny_models):
    return tiny_models("if_stage2")


@pytest.fixture(scope="module")
def x4_pipe(x4):
    from diffusers import StableDiffusionUpscalePipeline

    return quiet(StableDiffusionUpscalePipeline.from_pretrained(x4))


@pytest.fixture(scope="module")
def latent_pipe(latent_x2):
    from diffusers import StableDiffusionLatentUpscalePipeline

    return quiet(StableDiffusionLatentUpscalePipeline.from_pretrained(latent_x2))


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def upscale(path, image: Image.Image, **changes) -> GenerationRequest:
    fields = {"prompt": PROMPT, "task": "upscale", "image": image, "model": str(path),
              "steps": STEPS, "seed": 1} | changes
    return GenerationRequest(**fields)


def generator(seed: int = 1) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


# Parity with diffusers


def test_x4_matches_diffusers(engine, x4, x4_pipe):
    image = gradient_image(16, 16)
    result = engine.run(upscale(x4, image, scale=4))
    expected = x4_pipe(prompt=PROMPT, image=image, num_inference_steps=STEPS,
                       generator=generator()).images[0]
    assert result.images[0].size == (64, 64)
    assert_same_image(result.images[0], expected, 2)
    record = result.records[0]
    assert (record.family, record.variant, record.noise_level) == ("sd-upscale", "x4", 20)
    assert (record.guidance, record.scale, record.sampler) == (9.0, 4.0, "DDIM")


def test_x4_noise_level_and_negative_prompt_reach_the_pipeline(engine, x4, x4_pipe):
    image = gradient_image(16, 16, seed=2)
    result = engine.run(upscale(x4, image, scale=4, noise_level=100, negative_prompt="blue",
                                guidance=5.0))
    expected = x4_pipe(prompt=PROMPT, image=image, num_inference_steps=STEPS, noise_level=100,
                       negative_prompt="blue", guidance_scale=5.0,
                       generator=generator()).images[0]
    assert_same_image(result.images[0], expected, 2)
    assert result.records[0].noise_level == 100


def test_latent_x2_matches_diffusers(engine, latent_x2, latent_pipe):
    image = gradient_image(16, 16)
    result = engine.run(upscale(latent_x2, image, scale=2))
    expected = latent_pipe(prompt=PROMPT, image=image, num_inference_steps=STEPS,
                           generator=generator()).images[0]
    assert result.images[0].size == (32, 32)
    assert_same_image(result.images[0], expected, 2)
    record = result.records[0]
    assert (record.family, record.variant, record.noise_level) == ("sd-upscale", "latent-x2", None)
    assert record.sampler == "Euler"


def test_if_stage2_alone_matches_diffusers(engine, if_stage2):
    from diffusers import IFSuperResolutionPipeline

    pipe = quiet(IFSuperResolutionPipeline.from_pretrained(
        if_stage2, requires_safety_checker=False, **NO_SAFETY))
    image = gradient_image(8, 8)
    result = engine.run(upscale(if_stage2, image, scale=4))
    expected = pipe(prompt=PROMPT, image=image, width=32, height=32, num_inference_steps=STEPS,
                    clean_caption=False, generator=generator()).images[0]
    assert result.images[0].size == (32, 32)
    assert_same_image(result.images[0], expected, 2)
    record = result.records[0]
    assert (record.family, record.variant, record.noise_level) == ("if", "stage-ii", 250)
    assert record.guidance == 4.0


def test_a_batch_equals_singles(engine, x4):
    image = gradient_image(16, 16, seed=3)
    batch = engine.run(upscale(x4, image, scale=4, num_images=2)).images
    single = engine.run(upscale(x4, image, scale=4, seed=2)).images[0]
    assert_same_image(batch[1], single)  # batched convolutions round a little differently
    assert max_abs_diff(batch[0], batch[1]) > 2


def test_an_empty_prompt_upscales(engine, latent_x2):
    result = engine.run(upscale(latent_x2, gradient_image(16, 16), prompt=""))
    assert result.images[0].size == (32, 32)


# Sizes the models cannot take as they are


def test_odd_sizes_are_padded_and_cropped_back(engine, latent_x2, latent_pipe):
    """The latent upscaler needs sides that are multiples of 8 and at least 16 here: a 20x12
    input is edge-padded to 24x16, upscaled, and cropped to exactly 40x24."""
    image = gradient_image(20, 12)
    result = engine.run(upscale(latent_x2, image))
    padded = Image.fromarray(np.pad(np.asarray(image), ((0, 4), (0, 4), (0, 0)), "edge"))
    expected = latent_pipe(prompt=PROMPT, image=padded, num_inference_steps=STEPS,
                           generator=generator()).images[0].crop((0, 0, 40, 24))
    assert result.images[0].size == (40, 24)
    assert_same_image(result.images[0], expected, 2)


@pytest.mark.parametrize(("name", "size", "scale"), [
    ("sd_x4", (18, 14), 4), ("sd_x4", (3, 5), 4), ("sd_latent_x2", (7, 9), 2),
    ("if_stage2", (5, 3), 4),
])
def test_any_input_size_gives_exactly_the_factor(engine, tiny_models, name, size, scale):
    result = engine.run(upscale(tiny_models(name), gradient_image(*size), scale=scale))
    assert result.images[0].size == (size[0] * scale, size[1] * scale)


# Plans: passes and the exact size asked for


def test_lanczos_equals_pil(engine):
    image = gradient_image(16, 12)
    result = engine.run(upscale("lanczos", image, scale=2))
    expected = image.resize((32, 24), Image.Resampling.LANCZOS)
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(expected))
    assert result.records[0].family == "resize"


def test_lanczos_fractional_scale(engine):
    image = gradient_image(13, 7)
    result = engine.run(upscale("lanczos", image, scale=2.5))
    size = (round(13 * 2.5), round(7 * 2.5))
    assert result.images[0].size == size
    expected = image.resize(size, Image.Resampling.LANCZOS)
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(expected))


def test_scale_8_on_x4_runs_two_passes(engine, x4):
    events: list[ProgressEvent] = []
    result = engine.run(upscale(x4, gradient_image(8, 8), scale=8), progress=events.append)
    assert result.images[0].size == (64, 64)
    stages = result.records[0].stages
    assert [stage["role"] for stage in stages] == ["base", "upscale"]
    assert all(stage["family"] == "sd-upscale" for stage in stages)
    assert [(e.stage, e.step) for e in events] == [("upscale", 1), ("upscale", 2)] * 2


def test_a_scale_between_factors_is_resized_exactly(engine, latent_x2):
    """3x on the x2 upscaler: two passes (x4), Lanczos down to exactly 3x."""
    result = engine.run(upscale(latent_x2, gradient_image(16, 16), scale=3))
    assert result.images[0].size == (48, 48)
    assert len(result.records[0].stages) == 2


# Errors


@pytest.mark.parametrize("scale", [0.5, 8.5, 100])
def test_scale_outside_1_to_8_is_refused(scale):
    with pytest.raises(RequestError) as caught:
        upscale("lanczos", gradient_image(8, 8), scale=scale)
    assert caught.value.field == "scale"


@pytest.mark.parametrize("name", ["sd_x4", "sd_latent_x2", "if_stage2"])
def test_generate_on_an_upscaler_is_unsupported(engine, tiny_models, name):
    with pytest.raises(UnsupportedModeError, match="upscale"):
        engine.run(GenerationRequest(prompt=PROMPT, model=str(tiny_models(name)), steps=STEPS))


def test_noise_level_on_the_latent_upscaler_is_refused(engine, latent_x2):
    with pytest.raises(RequestError, match="does not apply") as caught:
        engine.run(upscale(latent_x2, gradient_image(16, 16), noise_level=20))
    assert caught.value.field == "noise_level"


def test_noise_level_above_the_model_maximum_is_refused(engine, x4, if_stage2):
    with pytest.raises(RequestError, match="at most 350") as caught:
        engine.run(upscale(x4, gradient_image(16, 16), noise_level=351))
    assert caught.value.field == "noise_level"
    with pytest.raises(RequestError, match="below 1000") as caught:
        engine.run(upscale(if_stage2, gradient_image(8, 8), noise_level=1000))
    assert caught.value.field == "noise_level"


def test_a_sampler_is_refused_by_the_fixed_upscalers(engine, latent_x2):
    with pytest.raises(RequestError) as caught:
        engine.run(upscale(latent_x2, gradient_image(16, 16), sampler="DPM++ 2M"))
    assert caught.value.field == "sampler"


def test_stage2_without_a_text_encoder_names_what_is_missing(engine, tiny_models):
    """A cascade's stage_2 (saved without T5, as diffusers' docs load it) used alone."""
    stage2 = tiny_models("if") / "stage_2"
    with pytest.raises(ModelFormatError, match="text_encoder and tokenizer"):
        engine.run(upscale(stage2, gradient_image(8, 8)))


# Detection: each folder is exactly one family's


@pytest.mark.parametrize(("name", "sub", "family", "variant"), [
    ("sd_x4", "", "sd-upscale", "x4"),
    ("sd_latent_x2", "", "sd-upscale", "latent-x2"),
    ("if_stage2", "", "if", "stage-ii"),
    ("if_3stage", "stage_3", "sd-upscale", "x4"),
    ("if_3stage", "stage_2", "if", "stage-ii"),
    ("if_3stage", "", "if", "3-stage"),
    ("if", "", "if", "2-stage"),
])
def test_each_folder_is_one_familys(tiny_models, name, sub, family, variant):
    path = tiny_models(name) / sub if sub else tiny_models(name)
    claims = [f for f in available_families() if get_family(f).detect(path)]
    assert claims == [family]
    assert detect_family(path).variant(path) == variant
