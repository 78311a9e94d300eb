"""DeepFloyd IF: cascade detection, parity with diffusers' stages run by hand, properties, errors.

The reference runs diffusers' stage pipelines in sequence as its IF docs do: T5 embeddings from
stage I's ``encode_prompt`` reused by stage II, one seeded CPU generator carried through every
stage, stage I/II outputs passed on as tensors. toile's documented choices are spelled out here
independently: the request's steps are stage I's and later stages scale their diffusers default
by steps / 100 (stage II: 50 -> 2 for 4 steps, the inpainting one 100 -> 4; the upscaler 75 ->
3), stage I's guidance default is IFPipeline's 7.0 in every mode (IFImg2ImgPipeline's own is
10.0), the upscaler gets noise level 100 and a [0, 1] image, and input images are resized
(bicubic) to each stage's size and passed as [-1, 1] tensors.

Tiny cascade: stage I 8 px -> stage II 32 px -> upscaler 128 px.
"""

from __future__ import annotations

import shutil
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import assert_same_image, center_mask, gradient_image, max_abs_diff, unmasked_diff
from toile.engine.engine import Engine
from toile.errors import CancelledError, ModelFormatError, RequestError
from toile.request import GenerationRequest, LoraSpec, Outpaint

STEPS = 4
PROMPT = "a red circle on the blue sky"
NONE = {"safety_checker": None, "feature_extractor": None, "watermarker": None}


@pytest.fixture(scope="module")
def cascade(tiny_models):
    return tiny_models("if")


@pytest.fixture(scope="module")
def cascade3(tiny_models):
    return tiny_models("if_3stage")


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(device="cpu", cache_size=3)


@pytest.fixture(scope="module")
def stages(cascade3):
    """diffusers' own pipelines for the three stages, loaded once."""
    from diffusers import IFPipeline, IFSuperResolutionPipeline, StableDiffusionUpscalePipeline

    loaded = (
        IFPipeline.from_pretrained(cascade3 / "stage_1", requires_safety_checker=False, **NONE),
        IFSuperResolutionPipeline.from_pretrained(
            cascade3 / "stage_2", text_encoder=None, requires_safety_checker=False, **NONE
        ),
        StableDiffusionUpscalePipeline.from_pretrained(cascade3 / "stage_3", **NONE),
    )
    for pipe in loaded:
        pipe.set_progress_bar_config(disable=True)
    return loaded


def derived(cls, base):
    pipe = cls.from_pipe(base, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def as_tensor(image: Image.Image, size: int) -> torch.Tensor:
    image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)[None]


def as_mask(mask: Image.Image, size: int) -> torch.Tensor:
    mask = mask.convert("L")
    if mask.size != (size, size):
        mask = mask.resize((size, size), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None, None]


def test_layouts_detected_with_their_defaults(engine, cascade, cascade3):
    expected = {
        cascade / "stage_1": ("1-stage", 8, 2),  # a plain IFPipeline folder: stage I alone
        cascade: ("2-stage", 32, 8),  # 8 x 4; stage I U-Net halves once -> 2 x 4
        cascade3: ("3-stage", 128, 32),  # 8 x 4 x 4 (the upscaler's VAE)
    }
    for path, (variant, side, multiple) in expected.items():
        cached = engine.load(str(path))
        assert cached.family.name == "if" and cached.loaded.variant == variant
        defaults = cached.loaded.defaults
        assert (defaults.width, defaults.height, defaults.size_multiple) == (side, side, multiple)
        # diffusers' IFPipeline / IFImg2ImgPipeline / IFInpaintingPipeline call defaults
        assert (defaults.steps, defaults.guidance) == (100, 7.0)
        assert (defaults.strength, defaults.inpaint_strength) == (0.7, 1.0)
        assert {m.value for m in defaults.modes} == {"txt2img", "img2img", "inpaint", "outpaint"}


def test_stage1_only_parity(engine, cascade, stages):
    ours = engine.run(
        GenerationRequest(PROMPT, model=str(cascade / "stage_1"), steps=STEPS, seed=9)
    )
    stage1 = stages[0]
    embeds, negative = stage1.encode_prompt(PROMPT)
    ref = stage1(
        prompt_embeds=embeds,
        negative_prompt_embeds=negative,
        num_inference_steps=STEPS,
        height=8,
        width=8,
        generator=torch.Generator("cpu").manual_seed(9),
    ).images[0]
    assert ours.images[0].size == (8, 8)
    assert_same_image(ours.images[0], ref)


def test_txt2img_parity_two_stages(engine, cascade, stages):
    ours = engine.run(
        GenerationRequest(PROMPT, model=str(cascade), steps=STEPS, guidance=6.0, seed=7)
    )
    stage1, stage2, _ = stages
    generator = torch.Generator("cpu").manual_seed(7)
    embeds, negative = stage1.encode_prompt(PROMPT)
    small = stage1(
        prompt_embeds=embeds,
        negative_prompt_embeds=negative,
        num_inference_steps=STEPS,
        guidance_scale=6.0,
        height=8,
        width=8,
        generator=generator,
        output_type="pt",
    ).images
    ref = stage2(
        image=small,
        prompt_embeds=embeds,
        negative_prompt_embeds=negative,
        num_inference_steps=2,
        height=32,
        width=32,
        generator=generator,
    ).images[0]
    assert ours.images[0].size == (32, 32)
    assert_same_image(ours.images[0], ref)
    record = ours.records[0]
    assert (record.family, record.variant, record.mode) == ("if", "2-stage", "txt2img")
    assert (record.seed, record.steps, record.guidance) == (7, STEPS, 6.0)


def test_txt2img_parity_three_stages_with_negative_prompt(engine, cascade3, stages):
    ours = engine.run(
        GenerationRequest(PROMPT, negative_prompt="green", model=str(cascade3), steps=STEPS,
                          seed=3)
    )
    stage1, stage2, stage3 = stages
    generator = torch.Generator("cpu").manual_seed(3)
    embeds, negative = stage1.encode_prompt(PROMPT, negative_prompt="green")
    small = stage1(
        prompt_embeds=embeds, negative_prompt_embeds=negative, num_inference_steps=STEPS,
        height=8, width=8, generator=generator, output_type="pt",
    ).images
    middle = stage2(
        image=small, prompt_embeds=embeds, negative_prompt_embeds=negative, num_inference_steps=2,
        height=32, width=32, generator=generator, output_type="pt",
    ).images
    ref = stage3(
        prompt=[PROMPT],
        negative_prompt=["green"],
        image=(middle / 2 + 0.5).clamp(0, 1),
        num_inference_steps=3,
        noise_level=100,
        generator=generator,
    ).images[0]
    assert ours.images[0].size == (128, 128)
    assert_same_image(ours.images[0], ref)
    assert (ours.records[0].variant, ours.records[0].negative_prompt) == ("3-stage", "green")


def test_img2img_parity(engine, cascade, stages):
    from diffusers import IFImg2ImgPipeline, IFImg2ImgSuperResolutionPipeline

    init = gradient_image(32, 32)
    ours = engine.run(
        GenerationRequest(PROMPT, model=str(cascade), steps=STEPS, seed=5, image=init)
    )
    stage1, stage2 = derived(IFImg2ImgPipeline, stages[0]), derived(
        IFImg2ImgSuperResolutionPipeline, stages[1]
    )
    generator = torch.Generator("cpu").manual_seed(5)
    embeds, negative = stage1.encode_prompt(PROMPT)
    small = stage1(
        image=as_tensor(init, 8), strength=0.7, prompt_embeds=embeds,
        negative_prompt_embeds=negative, num_inference_steps=STEPS, guidance_scale=7.0,
        generator=generator, output_type="pt",
    ).images
    ref = stage2(
        image=small, original_image=as_tensor(init, 32), prompt_embeds=embeds,
        negative_prompt_embeds=negative, num_inference_steps=2, generator=generator,
    ).images[0]
    assert_same_image(ours.images[0], ref)
    assert (ours.records[0].mode, ours.records[0].strength) == ("img2img", 0.7)


def test_inpaint_parity_and_keeps_unmasked(engine, cascade, stages):
    from diffusers import IFInpaintingPipeline, IFInpaintingSuperResolutionPipeline

    init, mask = gradient_image(32, 32, seed=1), center_mask(32, 32)
    ours = engine.run(
        GenerationRequest(PROMPT, model=str(cascade), steps=STEPS, seed=4, image=init, mask=mask)
    )
    stage1, stage2 = derived(IFInpaintingPipeline, stages[0]), derived(
        IFInpaintingSuperResolutionPipeline, stages[1]
    )
    generator = torch.Generator("cpu").manual_seed(4)
    embeds, negative = stage1.encode_prompt(PROMPT)
    small = stage1(
        image=as_tensor(init, 8), mask_image=as_mask(mask, 8), strength=1.0,
        prompt_embeds=embeds, negative_prompt_embeds=negative, num_inference_steps=STEPS,
        guidance_scale=7.0, generator=generator, output_type="pt",
    ).images
    ref = stage2(
        image=small, original_image=as_tensor(init, 32), mask_image=as_mask(mask, 32),
        prompt_embeds=embeds, negative_prompt_embeds=negative, num_inference_steps=4,
        generator=generator,
    ).images[0]
    assert_same_image(ours.images[0], ref)
    # IF works in pixel space and resets unmasked pixels every step: kept even before the
    # engine's overlay (within rounding), and exactly after it.
    assert unmasked_diff(ref, init, mask) <= 1.0
    assert unmasked_diff(ours.images[0], init, mask) == 0.0
    assert max_abs_diff(ours.images[0], init) > 10


def test_three_stage_inpaint_keeps_unmasked(engine, cascade3):
    init, mask = gradient_image(128, 128, seed=2), center_mask(128, 128)
    result = engine.run(
        GenerationRequest(PROMPT, model=str(cascade3), steps=2, seed=1, image=init, mask=mask)
    )
    assert result.images[0].size == (128, 128)
    assert unmasked_diff(result.images[0], init, mask) == 0.0
    assert max_abs_diff(result.images[0], init) > 10


def test_same_seed_same_image_and_batch_equals_singles(engine, cascade):
    def request(seed: int, num_images: int = 1) -> GenerationRequest:
        return GenerationRequest(
            PROMPT, model=str(cascade), steps=STEPS, seed=seed, num_images=num_images
        )

    batch = engine.run(request(11, num_images=2))
    assert [r.seed for r in batch.records] == [11, 12]
    for image, record in zip(batch.images, batch.records, strict=True):
        assert_same_image(image, engine.run(request(record.seed)).images[0])
    first, again = engine.run(request(11)), engine.run(request(11))
    assert max_abs_diff(first.images[0], again.images[0]) == 0
    assert max_abs_diff(batch.images[0], batch.images[1]) > 2


def test_batch_equals_singles_img2img(engine, cascade):
    init = gradient_image(32, 32, seed=3)

    def request(seed: int, num_images: int = 1) -> GenerationRequest:
        return GenerationRequest(
            PROMPT, model=str(cascade), steps=STEPS, seed=seed, num_images=num_images, image=init
        )

    batch = engine.run(request(20, num_images=2))
    for image, record in zip(batch.images, batch.records, strict=True):
        assert_same_image(image, engine.run(request(record.seed)).images[0])


def test_outpaint_keeps_original_exactly(engine, cascade):
    init = gradient_image(16, 24)
    result = engine.run(
        GenerationRequest(
            PROMPT, model=str(cascade), steps=STEPS, seed=1, image=init,
            outpaint=Outpaint(left=8, top=0, right=8, bottom=8),
        )
    )
    out = result.images[0]
    assert out.size == (32, 32)
    assert np.array_equal(np.asarray(out)[0:24, 8:24], np.asarray(init))
    assert (result.records[0].mode, result.records[0].outpaint) == ("outpaint", (8, 0, 8, 8))


def test_size_errors(engine, cascade, cascade3):
    with pytest.raises(RequestError, match="width: 36 must be a multiple of 8") as info:
        engine.run(GenerationRequest(PROMPT, model=str(cascade), width=36, height=32, steps=1))
    assert info.value.field == "width"
    with pytest.raises(RequestError, match="width: 48 must be a multiple of 32"):
        engine.run(GenerationRequest(PROMPT, model=str(cascade3), width=48, height=64, steps=1))


def test_strength_that_leaves_no_step_is_a_request_error(engine, cascade):
    init = gradient_image(32, 32)
    with pytest.raises(RequestError, match="with 2 steps, strength 0.3 leaves no step"):
        engine.run(
            GenerationRequest(PROMPT, model=str(cascade), steps=2, image=init, strength=0.3)
        )


def test_progress_names_each_stage(engine, cascade3):
    events = []
    result = engine.run(
        GenerationRequest(PROMPT, model=str(cascade3), steps=STEPS, seed=1),
        progress=events.append,
        preview_every=2,
    )
    seen = [(e.stage, e.step, e.total) for e in events]
    assert seen == (
        [("stage 1/3", step, 4) for step in (1, 2, 3, 4)]
        + [("stage 2/3", step, 2) for step in (1, 2)]
        + [("stage 3/3", step, 3) for step in (1, 2, 3)]
    )
    sizes = {e.stage: e.preview.size for e in events if e.preview is not None}
    assert sizes == {"stage 1/3": (8, 8), "stage 2/3": (32, 32), "stage 3/3": (128, 128)}
    assert_same_image(events[-1].preview, result.images[0])  # the upscaler's VAE preview


def test_cancel_in_a_later_stage(engine, cascade):
    cancel = threading.Event()
    seen = []

    def progress(event):
        seen.append(event.stage)
        if event.stage == "stage 2/2":
            cancel.set()

    with pytest.raises(CancelledError):
        engine.run(
            GenerationRequest(PROMPT, model=str(cascade), steps=STEPS, seed=1),
            progress=progress,
            cancel=cancel,
        )
    assert seen == ["stage 1/2"] * STEPS + ["stage 2/2"]


def test_lora_is_refused(engine, cascade, tmp_path):
    lora = tmp_path / "style.safetensors"
    lora.write_bytes(b"")
    with pytest.raises(RequestError, match="the if family does not support LoRA"):
        engine.run(
            GenerationRequest(PROMPT, model=str(cascade), steps=1, loras=(LoraSpec(str(lora)),))
        )


def test_inconsistent_cascade_is_refused(tmp_path, cascade3):
    broken = tmp_path / "if-broken"
    broken.mkdir()
    shutil.copytree(cascade3 / "stage_1", broken / "stage_1")
    shutil.copytree(cascade3 / "stage_3", broken / "stage_3")
    with pytest.raises(ModelFormatError, match="stage_2 as well"):
        Engine(device="cpu").load(str(broken))
    shutil.copytree(cascade3 / "stage_3", broken / "stage_2")  # the wrong pipeline in stage_2
    with pytest.raises(ModelFormatError, match="StableDiffusionUpscalePipeline"):
        Engine(device="cpu").load(str(broken))
