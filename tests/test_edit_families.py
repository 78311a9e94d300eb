"""The edit task on real families: InstructPix2Pix (SD 1.x, SDXL) and FLUX.1 Kontext.

Parity: toile's engine against the diffusers pipeline loaded from the same tiny folder and
called with the same settings. InstructPix2Pix is called with diffusers' own defaults (toile
reads them from the pipeline); Kontext with every value given, because toile's guidance (2.5,
the model card's) is not the pipeline's call default (3.5), and with ``max_area`` equal to the
output size, since diffusers otherwise rescales every Kontext run to 1024² pixels.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from helpers import assert_same_image, gradient_image, max_abs_diff
from test_lora import make_sd_lora
from toile.engine.engine import Engine
from toile.engine.models import served_tasks
from toile.errors import RequestError, UnsupportedModeError
from toile.families.registry import detect_family
from toile.request import GenerationRequest, LoraSpec

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STEPS = 2
SEED = 3
INSTRUCTION = "make it blue"
# Not a multiple of either tiny size multiple (2 for the 2-level SD/SDXL VAEs, 4 for Flux's
# packed latents): the edit's output is this rounded down.
ODD = (35, 29)
FLOORED = {"sd_ip2p": (34, 28), "sdxl_ip2p": (34, 28), "flux_kontext": (32, 28)}
EDIT_MODELS = tuple(FLOORED)


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(policy=None, device="cpu", cache_size=3)


@pytest.fixture(scope="module")
def references(tiny_models):
    """diffusers' own pipeline for each edit model, loaded once from the same folder."""
    from diffusers import (
        FluxKontextPipeline,
        StableDiffusionInstructPix2PixPipeline,
        StableDiffusionXLInstructPix2PixPipeline,
    )

    classes = {
        "sd_ip2p": StableDiffusionInstructPix2PixPipeline,
        "sdxl_ip2p": StableDiffusionXLInstructPix2PixPipeline,
        "flux_kontext": FluxKontextPipeline,
    }
    loaded: dict[str, Any] = {}

    def get(name: str) -> Any:
        if name not in loaded:
            pipe = classes[name].from_pretrained(str(tiny_models(name)))
            pipe.set_progress_bar_config(disable=True)
            loaded[name] = pipe
        return loaded[name]

    return get


def seeded(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def edit(engine: Engine, model, image, **fields: Any):
    fields = {"steps": STEPS, "seed": SEED} | fields
    return engine.run(
        GenerationRequest(INSTRUCTION, task="edit", image=image, model=str(model), **fields)
    )


def diffusers_edit(
    name: str, pipe: Any, image, size: tuple[int, int], seed: int = SEED, **options: Any
):
    """What diffusers makes of the same edit: its call defaults, the settings each pipeline
    needs to be told (SDXL's size, Kontext's size, guidance and sequence length)."""
    width, height = size
    kwargs: dict[str, Any] = {"num_inference_steps": STEPS, "generator": seeded(seed)}
    if name == "sdxl_ip2p":
        kwargs |= {"width": width, "height": height}
    if name == "flux_kontext":
        kwargs |= {
            "width": width,
            "height": height,
            "guidance_scale": 2.5,
            "max_sequence_length": 512,
            "_auto_resize": False,
            "max_area": width * height,
        }
    return pipe(prompt=INSTRUCTION, image=image, **kwargs | options).images[0]


@pytest.mark.parametrize(
    ("name", "family", "variant", "modes"),
    [
        ("sd_ip2p", "sd", "instruct-pix2pix", {"edit"}),
        ("sdxl_ip2p", "sdxl", "instruct-pix2pix", {"edit"}),
        ("flux_kontext", "flux", "kontext", {"txt2img", "edit"}),
    ],
)
def test_detected_with_their_modes(engine, tiny_models, name, family, variant, modes):
    path = tiny_models(name)
    found = detect_family(path)
    assert (found.name, found.variant(path)) == (family, variant)
    assert found.capabilities[variant] == frozenset(modes)
    # what `toile models` and the task defaults see, from configs alone
    assert "edit" in {task.value for task in served_tasks(path)}
    loaded = engine.load(str(path)).loaded
    assert loaded.variant == variant
    assert {mode.value for mode in loaded.defaults.modes} == modes
    assert {mode.value for mode in loaded.pipelines} == modes


@pytest.mark.parametrize(("name", "guidance"), [("sd_ip2p", 7.5), ("sdxl_ip2p", 5.0)])
def test_ip2p_defaults_are_the_pipelines_own(engine, tiny_models, name, guidance):
    defaults = engine.load(str(tiny_models(name))).loaded.defaults
    assert (defaults.steps, defaults.guidance, defaults.image_guidance) == (100, guidance, 1.5)


@pytest.mark.parametrize("name", EDIT_MODELS)
def test_edit_parity(engine, tiny_models, references, name):
    image = gradient_image(32, 32)
    ours = edit(engine, tiny_models(name), image)
    ref = diffusers_edit(name, references(name), image, (32, 32))
    assert_same_image(ours.images[0], ref)
    assert max_abs_diff(ours.images[0], image) > 0  # it did run, not hand the input back
    record = ours.records[0]
    assert (record.task, record.mode, record.prompt) == ("edit", "edit", INSTRUCTION)
    assert (record.width, record.height, record.steps, record.seed) == (32, 32, STEPS, SEED)


@pytest.mark.parametrize("name", EDIT_MODELS)
def test_edit_keeps_the_input_size_rounded_down(engine, tiny_models, references, name):
    image = gradient_image(*ODD, seed=1)
    ours = edit(engine, tiny_models(name), image)
    assert ours.images[0].size == FLOORED[name]
    assert (ours.records[0].width, ours.records[0].height) == FLOORED[name]
    # diffusers, given the same odd-sized input, rounds it down and resizes it the same way
    assert_same_image(ours.images[0], diffusers_edit(name, references(name), image, FLOORED[name]))


@pytest.mark.parametrize("name", EDIT_MODELS)
def test_explicit_size_is_honoured(engine, tiny_models, name):
    result = edit(engine, tiny_models(name), gradient_image(32, 32), width=24, height=16)
    assert result.images[0].size == (24, 16)
    assert (result.records[0].width, result.records[0].height) == (24, 16)


def test_ip2p_options_and_batch_match_diffusers(engine, tiny_models, references):
    """guidance, image_guidance and the negative prompt reach the pipeline; image i of a
    batch is the single run with seed + i."""
    image = gradient_image(32, 32, seed=2)
    options = {"guidance": 4.0, "image_guidance": 2.0, "negative_prompt": "red"}
    ours = edit(engine, tiny_models("sd_ip2p"), image, num_images=2, **options)
    assert len(ours.images) == 2
    for index, produced in enumerate(ours.images):
        ref = diffusers_edit(
            "sd_ip2p",
            references("sd_ip2p"),
            image,
            (32, 32),
            seed=SEED + index,
            guidance_scale=4.0,
            image_guidance_scale=2.0,
            negative_prompt="red",
        )
        assert_same_image(produced, ref)
    record = ours.records[1]
    assert (record.seed, record.guidance, record.image_guidance) == (SEED + 1, 4.0, 2.0)
    default_record = edit(engine, tiny_models("sd_ip2p"), image).records[0]
    assert (default_record.guidance, default_record.image_guidance) == (7.5, 1.5)


@pytest.mark.parametrize("name", EDIT_MODELS)
def test_batch_equals_single_runs(engine, tiny_models, name):
    model, image = tiny_models(name), gradient_image(32, 32, seed=3)
    batch = edit(engine, model, image, num_images=2).images
    assert_same_image(batch[1], edit(engine, model, image, seed=SEED + 1).images[0])


def test_ip2p_sampler_matches_diffusers(engine, tiny_models, references):
    """The sampler menu applies to the edit pipeline, as diffusers swaps a scheduler."""
    from diffusers import DPMSolverMultistepScheduler

    image = gradient_image(32, 32)
    ours = edit(engine, tiny_models("sd_ip2p"), image, sampler="DPM++ 2M")
    pipe = references("sd_ip2p")
    own = pipe.scheduler
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(own.config)
    try:
        ref = diffusers_edit("sd_ip2p", pipe, image, (32, 32))
    finally:
        pipe.scheduler = own
    assert_same_image(ours.images[0], ref)
    assert ours.records[0].sampler == "DPM++ 2M"
    assert max_abs_diff(ours.images[0], edit(engine, tiny_models("sd_ip2p"), image).images[0]) > 0


@pytest.mark.parametrize("name", ["sd_ip2p", "sdxl_ip2p"])
def test_edit_reports_progress(engine, tiny_models, name):
    """SD's pipeline reports through callback_on_step_end, SDXL's through its older callback;
    both give a preview when asked."""
    events = []
    engine.run(
        GenerationRequest(
            INSTRUCTION,
            task="edit",
            image=gradient_image(32, 32),
            model=str(tiny_models(name)),
            steps=STEPS,
            seed=SEED,
        ),
        progress=events.append,
        preview_every=STEPS,
    )
    assert [(event.step, event.total) for event in events] == [(1, STEPS), (2, STEPS)]
    assert events[0].preview is None and events[-1].preview.size == (32, 32)


def test_kontext_without_an_image_is_txt2img(engine, tiny_models, references):
    pipe = references("flux_kontext")
    ours = engine.run(
        GenerationRequest(
            INSTRUCTION,
            model=str(tiny_models("flux_kontext")),
            width=32,
            height=24,
            steps=STEPS,
            seed=SEED,
        )
    )
    ref = pipe(
        prompt=INSTRUCTION,
        width=32,
        height=24,
        num_inference_steps=STEPS,
        guidance_scale=2.5,
        max_sequence_length=512,
        max_area=32 * 24,
        generator=seeded(SEED),
    ).images[0]
    assert ours.images[0].size == (32, 24)
    assert_same_image(ours.images[0], ref)
    assert (ours.records[0].mode, ours.records[0].variant) == ("txt2img", "kontext")


@pytest.mark.parametrize(
    ("field", "value"), [("image_guidance", 2.0), ("negative_prompt", "blurry")]
)
def test_kontext_refuses_what_it_cannot_use(engine, tiny_models, field, value):
    with pytest.raises(RequestError) as info:
        edit(engine, tiny_models("flux_kontext"), gradient_image(32, 32), **{field: value})
    assert info.value.field == field


@pytest.mark.parametrize("name", ["sd_ip2p", "sdxl_ip2p"])
def test_generate_on_an_ip2p_model_is_refused(engine, tiny_models, name):
    with pytest.raises(UnsupportedModeError) as info:
        engine.run(GenerationRequest("a cat", model=str(tiny_models(name)), steps=STEPS))
    assert isinstance(info.value, RequestError)
    message = str(info.value)
    assert "txt2img" in message and "edit" in message, message


def test_edit_on_a_generate_model_is_refused(engine, tiny_models):
    with pytest.raises(UnsupportedModeError) as info:
        edit(engine, tiny_models("sd"), gradient_image(32, 32))
    assert info.value.field == "task"
    message = str(info.value)
    assert "edit task" in message and "sd family" in message, message


def test_lora_applies_to_an_ip2p_edit(engine, tiny_models, tmp_path):
    model = tiny_models("sd_ip2p")
    lora = make_sd_lora(model, tmp_path / "lora", seed=1)
    image = gradient_image(32, 32)
    plain = edit(engine, model, image).images[0]
    with_lora = edit(engine, model, image, loras=(LoraSpec(str(lora), 1.0),)).images[0]
    assert max_abs_diff(plain, with_lora) > 2
    assert max_abs_diff(edit(engine, model, image).images[0], plain) <= 2  # unloaded again
