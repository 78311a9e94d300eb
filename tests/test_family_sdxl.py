"""Stable Diffusion XL (base, refiner, single file): detection, parity with diffusers,
properties, errors.

Parity calls pass diffusers every value explicitly (steps, guidance, strength), because the
SDXL pipelines disagree among themselves on defaults (inpaint: guidance 7.5, strength 0.9999)
while toile applies one set per checkpoint.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import assert_same_image, center_mask, gradient_image, max_abs_diff, unmasked_diff
from toile.engine.engine import Engine
from toile.errors import ModelFormatError, RequestError, UnsupportedModeError
from toile.request import GenerationRequest, Outpaint

STEPS = 3
GUIDANCE = 5.0


@pytest.fixture(scope="module")
def sdxl_path(tiny_models):
    return tiny_models("sdxl")


@pytest.fixture(scope="module")
def refiner_path(tiny_models):
    return tiny_models("sdxl_refiner")


@pytest.fixture(scope="module")
def single_file(tiny_models):
    return tiny_models("sdxl_single_file")


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(device="cpu", cache_size=3)


def diffusers_pipe(cls, path):
    pipe = cls.from_pretrained(str(path), add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def seeded(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def test_detected_and_defaults(engine, sdxl_path):
    cached = engine.load(str(sdxl_path))
    assert cached.family.name == "sdxl"
    assert cached.loaded.variant == cached.family.variant(sdxl_path) == ""
    assert cached.loaded.supports_lora and cached.family.lora
    defaults = cached.loaded.defaults
    # 16 latents x VAE scale 2, diffusers' SDXL defaults for steps and guidance.
    assert (defaults.width, defaults.height, defaults.steps, defaults.guidance) == (32, 32, 50, 5.0)
    assert defaults.size_multiple == 2


def test_txt2img_parity(engine, sdxl_path):
    from diffusers import StableDiffusionXLPipeline

    ours = engine.run(GenerationRequest("a red cat", model=str(sdxl_path), steps=STEPS, seed=7))
    pipe = diffusers_pipe(StableDiffusionXLPipeline, sdxl_path)
    ref = pipe("a red cat", num_inference_steps=STEPS, guidance_scale=GUIDANCE,
               generator=seeded(7)).images[0]
    assert_same_image(ours.images[0], ref)
    record = ours.records[0]
    assert (record.family, record.mode, record.seed, record.steps, record.guidance) == (
        "sdxl", "txt2img", 7, STEPS, GUIDANCE
    )
    assert (record.sampler, record.schedule) == ("Euler", "automatic")  # toile.samplers


def test_img2img_parity(engine, sdxl_path):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    init = gradient_image(32, 32)
    ours = engine.run(GenerationRequest("a blue dog", negative_prompt="green", model=str(sdxl_path),
                                        steps=STEPS, seed=3, image=init, strength=0.7))
    pipe = diffusers_pipe(StableDiffusionXLImg2ImgPipeline, sdxl_path)
    ref = pipe("a blue dog", negative_prompt="green", image=init, strength=0.7,
               num_inference_steps=STEPS, guidance_scale=GUIDANCE, generator=seeded(3)).images[0]
    assert_same_image(ours.images[0], ref)
    record = ours.records[0]
    assert (record.family, record.mode, record.seed, record.strength) == ("sdxl", "img2img", 3, 0.7)


def test_inpaint_parity_and_keeps_unmasked(engine, sdxl_path):
    from diffusers import StableDiffusionXLInpaintPipeline

    init, mask = gradient_image(32, 32), center_mask(32, 32)
    ours = engine.run(GenerationRequest("a cat", model=str(sdxl_path), steps=STEPS, seed=5,
                                        image=init, mask=mask))
    pipe = diffusers_pipe(StableDiffusionXLInpaintPipeline, sdxl_path)
    ref = pipe("a cat", image=init, mask_image=mask, strength=1.0, num_inference_steps=STEPS,
               guidance_scale=GUIDANCE, height=32, width=32, generator=seeded(5)).images[0]
    # toile keeps unmasked pixels exactly (mask overlay) and matches diffusers inside the mask.
    assert_same_image(ours.images[0], Image.composite(ref, init, mask))
    assert unmasked_diff(ours.images[0], init, mask) == 0.0
    record = ours.records[0]
    assert (record.family, record.mode, record.seed, record.strength) == ("sdxl", "inpaint", 5, 1.0)


def test_same_seed_same_image_and_batch_equals_singles(engine, sdxl_path):
    batch = engine.run(GenerationRequest("a cat", model=str(sdxl_path), steps=STEPS, seed=11,
                                         num_images=2))
    assert [r.seed for r in batch.records] == [11, 12]
    for image, record in zip(batch.images, batch.records, strict=True):
        single = engine.run(GenerationRequest("a cat", model=str(sdxl_path), steps=STEPS,
                                              seed=record.seed))
        assert_same_image(image, single.images[0])
    again = engine.run(GenerationRequest("a cat", model=str(sdxl_path), steps=STEPS, seed=11))
    assert max_abs_diff(again.images[0], batch.images[0]) <= 2
    assert max_abs_diff(batch.images[0], batch.images[1]) > 2  # different seeds differ


def test_outpaint_keeps_original_exactly(engine, sdxl_path):
    init = gradient_image(16, 24)
    result = engine.run(GenerationRequest("a cat", model=str(sdxl_path), steps=STEPS, seed=1,
                                          image=init, outpaint=Outpaint(8, 0, 8, 8)))
    out = result.images[0]
    assert out.size == (32, 32)
    assert np.array_equal(np.asarray(out)[0:24, 8:24], np.asarray(init))
    assert (result.records[0].mode, result.records[0].outpaint) == ("outpaint", (8, 0, 8, 8))


def test_progress_with_previews(engine, sdxl_path):
    events = []
    engine.run(GenerationRequest("a cat", model=str(sdxl_path), steps=STEPS, seed=1),
               progress=events.append, preview_every=2)
    assert [e.step for e in events] == [1, 2, 3]
    assert events[1].preview is not None and events[1].preview.size == (32, 32)


def test_size_errors(engine, sdxl_path):
    with pytest.raises(RequestError, match="width: 37 must be a multiple of 2") as info:
        engine.run(GenerationRequest("x", model=str(sdxl_path), width=37, steps=1))
    assert info.value.field == "width"


# --- refiner ----------------------------------------------------------------------------------


def test_refiner_detected_and_refuses_txt2img(engine, refiner_path):
    cached = engine.load(str(refiner_path))
    assert cached.family.name == "sdxl" and cached.loaded.variant == "refiner"
    assert cached.family.capabilities["refiner"] == cached.loaded.defaults.modes
    with pytest.raises(UnsupportedModeError, match="txt2img is not supported by the sdxl family"):
        engine.run(GenerationRequest("x", model=str(refiner_path), steps=1))


def test_refiner_img2img_parity(engine, refiner_path):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    init = gradient_image(32, 32, seed=1)
    ours = engine.run(GenerationRequest("a red cat", model=str(refiner_path), steps=STEPS, seed=9,
                                        image=init, strength=0.5))
    pipe = diffusers_pipe(StableDiffusionXLImg2ImgPipeline, refiner_path)
    ref = pipe("a red cat", image=init, strength=0.5, num_inference_steps=STEPS,
               guidance_scale=GUIDANCE, generator=seeded(9)).images[0]
    assert_same_image(ours.images[0], ref)
    record = ours.records[0]
    assert (record.family, record.variant, record.mode, record.seed) == (
        "sdxl", "refiner", "img2img", 9
    )


def test_refiner_inpaint_parity_and_outpaint(engine, refiner_path):
    from diffusers import StableDiffusionXLInpaintPipeline

    init, mask = gradient_image(32, 32, seed=2), center_mask(32, 32)
    ours = engine.run(GenerationRequest("a dog", model=str(refiner_path), steps=STEPS, seed=4,
                                        image=init, mask=mask))
    pipe = diffusers_pipe(StableDiffusionXLInpaintPipeline, refiner_path)
    ref = pipe("a dog", image=init, mask_image=mask, strength=1.0, num_inference_steps=STEPS,
               guidance_scale=GUIDANCE, height=32, width=32, generator=seeded(4)).images[0]
    assert_same_image(ours.images[0], Image.composite(ref, init, mask))
    outpainted = engine.run(GenerationRequest("a dog", model=str(refiner_path), steps=STEPS,
                                              seed=4, image=init, outpaint=Outpaint(right=8)))
    assert outpainted.images[0].size == (40, 32)
    assert np.array_equal(np.asarray(outpainted.images[0])[:, :32], np.asarray(init))


def test_base_to_refiner_handoff_parity(engine, sdxl_path, refiner_path):
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    from toile.io.metadata import a1111_parameters

    steps, switch = 5, 0.6
    events = []
    ours = engine.run(
        GenerationRequest("a red cat", model=str(sdxl_path), refiner=str(refiner_path),
                          refiner_switch=switch, steps=steps, seed=3, num_images=2),
        progress=events.append,
    )
    # diffusers' documented ensemble of experts, one seed at a time.
    base = diffusers_pipe(StableDiffusionXLPipeline, sdxl_path)
    refiner = diffusers_pipe(StableDiffusionXLImg2ImgPipeline, refiner_path)
    for image, seed in zip(ours.images, (3, 4), strict=True):
        generator = seeded(seed)
        latents = base("a red cat", num_inference_steps=steps, guidance_scale=GUIDANCE,
                       denoising_end=switch, output_type="latent", generator=generator).images
        ref = refiner("a red cat", image=latents, num_inference_steps=steps,
                      guidance_scale=GUIDANCE, denoising_start=switch,
                      generator=generator).images[0]
        assert_same_image(image, ref)
    # Progress runs through both stages; together they take the schedule's steps.
    stages = {}
    for event in events:
        stages[event.stage] = event.step
    assert list(stages) == ["base", "refiner"] and sum(stages.values()) == steps
    record = ours.records[0]
    assert record.refiner_id == str(refiner_path) and record.refiner_switch == switch
    assert record.refiner_hash and record.refiner_hash != record.model_hash
    assert f"Refiner switch at: {switch:g}" in a1111_parameters(record)
    # The hand-off changes the picture: the base alone (same seed) is a different image.
    alone = engine.run(GenerationRequest("a red cat", model=str(sdxl_path), steps=steps, seed=3))
    assert max_abs_diff(alone.images[0], ours.images[0]) > 0
    assert alone.records[0].refiner_id is None
    # The default switch is A1111's and diffusers' 0.8.
    default = engine.run(GenerationRequest("a red cat", model=str(sdxl_path), steps=steps,
                                           seed=3, refiner=str(refiner_path)))
    assert default.records[0].refiner_switch == 0.8


def test_img2img_and_inpaint_hand_off_to_the_refiner(engine, sdxl_path, refiner_path):
    """img2img and inpaint with a refiner, as diffusers documents them: the base's mode from
    ``strength`` down to the switch, returning latents; the refiner's img2img (inpaint with
    the mask) finishes them. Inpaint keeps the unmasked pixels; outpaint goes the same way."""
    from diffusers import (
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLInpaintPipeline,
    )

    steps, switch, strength = 5, 0.6, 0.9
    init, mask = gradient_image(32, 32, seed=2), center_mask(32, 32)
    common = {"model": str(sdxl_path), "refiner": str(refiner_path), "refiner_switch": switch,
              "steps": steps, "seed": 6, "image": init, "strength": strength}
    varied = engine.run(GenerationRequest("a red cat", **common))
    inpainted = engine.run(GenerationRequest("a red cat", mask=mask, **common))
    base_cls = {False: StableDiffusionXLImg2ImgPipeline, True: StableDiffusionXLInpaintPipeline}
    for ours, masked in ((varied, False), (inpainted, True)):
        generator = seeded(6)
        inputs = {"image": init, "strength": strength}
        if masked:
            inputs |= {"mask_image": mask, "width": 32, "height": 32}
        latents = diffusers_pipe(base_cls[masked], sdxl_path)(
            "a red cat", num_inference_steps=steps, guidance_scale=GUIDANCE,
            denoising_end=switch, output_type="latent", generator=generator, **inputs).images
        finish = {"image": latents}
        if masked:
            finish |= {"mask_image": mask, "width": 32, "height": 32}
        ref = diffusers_pipe(base_cls[masked], refiner_path)(
            "a red cat", num_inference_steps=steps, guidance_scale=GUIDANCE,
            denoising_start=switch, generator=generator, **finish).images[0]
        if masked:
            assert unmasked_diff(ours.images[0], init, mask) == 0
            ref = Image.composite(ref, init, mask.convert("L"))
        assert_same_image(ours.images[0], ref)
        record = ours.records[0]
        assert (record.mode, record.refiner_id) == (
            "inpaint" if masked else "img2img", str(refiner_path))
    outpainted = engine.run(GenerationRequest(
        "a red cat", **common | {"image": init.crop((0, 0, 24, 32))},
        outpaint=Outpaint(left=8)))
    assert outpainted.images[0].size == (32, 32) and outpainted.records[0].mode == "outpaint"


def test_refiner_errors(engine, sdxl_path, refiner_path, tiny_models):
    init = gradient_image(32, 32, seed=1)
    # The base would start at 0.8 of the schedule, after the switch at 0.6: nothing to do.
    with pytest.raises(RequestError, match="strength above 0.4") as info:
        engine.run(GenerationRequest("x", model=str(sdxl_path), refiner=str(refiner_path),
                                     refiner_switch=0.6, image=init, strength=0.2, steps=2))
    assert info.value.field == "refiner_switch"
    sd = str(tiny_models("sd"))
    with pytest.raises(RequestError, match="is a sd model; the refiner must be a sdxl model"):
        engine.run(GenerationRequest("x", model=str(sdxl_path), refiner=sd, steps=2))
    with pytest.raises(RequestError, match="the sd family has no refiner hand-off"):
        engine.run(GenerationRequest("x", model=sd, refiner=str(refiner_path), steps=2))
    with pytest.raises(RequestError, match="only applies with a refiner") as info:
        GenerationRequest("x", refiner_switch=0.5)
    assert info.value.field == "refiner_switch"
    for bad in (0.0, 1.0, 1.5, -0.2):
        with pytest.raises(RequestError) as info:
            GenerationRequest("x", refiner="r", refiner_switch=bad)
        assert info.value.field == "refiner_switch"


# --- single file ------------------------------------------------------------------------------


def test_single_file_matches_the_diffusers_folder(engine, single_file, sdxl_path):
    """The original-layout file holds the same weights as the tiny folder (both builders are
    seeded), so toile's single-file load must give diffusers' folder output."""
    from diffusers import StableDiffusionXLPipeline

    cached = engine.load(str(single_file))
    assert cached.family.name == "sdxl" and cached.loaded.variant == ""
    assert (cached.loaded.defaults.width, cached.loaded.defaults.height) == (32, 32)
    ours = engine.run(GenerationRequest("a red cat", model=str(single_file), steps=STEPS, seed=7))
    pipe = diffusers_pipe(StableDiffusionXLPipeline, sdxl_path)
    ref = pipe("a red cat", num_inference_steps=STEPS, guidance_scale=GUIDANCE,
               generator=seeded(7)).images[0]
    assert_same_image(ours.images[0], ref)
    assert ours.records[0].family == "sdxl"
    init = gradient_image(32, 32)
    img2img = engine.run(GenerationRequest("a red cat", model=str(single_file), steps=STEPS,
                                           seed=7, image=init, strength=0.6))
    assert img2img.records[0].mode == "img2img"


def test_single_file_without_configs_names_the_folder(tmp_path, single_file):
    lonely = tmp_path / "my-sdxl.safetensors"
    shutil.copy(single_file, lonely)
    with pytest.raises(ModelFormatError, match="my-sdxl/"):
        Engine(device="cpu").load(str(lonely))
    # The other convention: a ``config/`` folder beside the file.
    shutil.copytree(single_file.with_suffix(""), tmp_path / "config")
    cached = Engine(device="cpu").load(str(lonely))
    assert cached.family.name == "sdxl"


# --- inpainting checkpoint, LoRA --------------------------------------------------------------


def test_inpainting_checkpoint_runs_inpaint_only(tmp_path):
    from fixtures.models_sdxl_sd3 import make_sdxl

    path = make_sdxl(tmp_path / "sdxl-inpaint", in_channels=9)
    engine = Engine(device="cpu")
    assert engine.load(str(path)).loaded.variant == "inpainting"
    with pytest.raises(UnsupportedModeError, match="txt2img is not supported"):
        engine.run(GenerationRequest("x", model=str(path), steps=1))
    with pytest.raises(UnsupportedModeError, match="img2img is not supported"):
        engine.run(GenerationRequest("x", model=str(path), steps=1, image=gradient_image(32, 32)))
    init, mask = gradient_image(32, 32), center_mask(32, 32)
    result = engine.run(GenerationRequest("x", model=str(path), steps=2, seed=0, image=init,
                                          mask=mask))
    assert result.images[0].size == (32, 32)
    assert (result.records[0].mode, result.records[0].variant) == ("inpaint", "inpainting")


def test_lora_parity_and_unloaded_after(engine, sdxl_path, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from fixtures.models_sdxl_sd3 import make_lora
    from toile.request import LoraSpec

    lora = make_lora(StableDiffusionXLPipeline, sdxl_path, "unet", tmp_path, add_watermarker=False)
    request = GenerationRequest("a red cat", model=str(sdxl_path), steps=STEPS, seed=1)
    plain = engine.run(request).images[0]
    with_lora = engine.run(request.with_changes(loras=(LoraSpec(str(lora), 0.8),)))
    assert max_abs_diff(plain, with_lora.images[0]) > 2
    assert with_lora.records[0].loras[0]["scale"] == 0.8
    pipe = diffusers_pipe(StableDiffusionXLPipeline, sdxl_path)
    pipe.load_lora_weights(str(lora), adapter_name="lora")
    pipe.set_adapters(["lora"], adapter_weights=[0.8])
    ref = pipe("a red cat", num_inference_steps=STEPS, guidance_scale=GUIDANCE,
               generator=seeded(1)).images[0]
    assert_same_image(with_lora.images[0], ref)
    assert_same_image(engine.run(request).images[0], plain, tolerance=0)  # LoRA unloaded
