"""Stable Diffusion 3: detection, parity with diffusers (with and without T5), properties, errors.

Parity calls pass diffusers every value explicitly: SD3's inpaint pipeline defaults to strength
0.6 and its img2img resizes its input to the default size unless told the size.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import assert_same_image, center_mask, gradient_image, max_abs_diff, unmasked_diff
from toile.engine.engine import Engine
from toile.errors import RequestError
from toile.request import GenerationRequest, Outpaint

STEPS = 3
GUIDANCE = 7.0


@pytest.fixture(scope="module")
def sd3_path(tiny_models):
    return tiny_models("sd3")


@pytest.fixture(scope="module")
def no_t5_path(tiny_models):
    return tiny_models("sd3_no_t5")


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(device="cpu", cache_size=2)


def diffusers_pipe(cls, path, **components):
    pipe = cls.from_pretrained(str(path), **components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def seeded(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def test_detected_and_defaults(engine, sd3_path):
    cached = engine.load(str(sd3_path))
    assert cached.family.name == "sd3"
    assert cached.loaded.variant == cached.family.variant(sd3_path) == ""
    assert cached.loaded.supports_lora and cached.family.lora
    defaults = cached.loaded.defaults
    # 16 latents x VAE scale 2; diffusers' SD3 defaults; multiple = VAE scale 2 x patch 2.
    assert (defaults.width, defaults.height, defaults.steps, defaults.guidance) == (32, 32, 28, 7.0)
    assert defaults.size_multiple == 4


def test_txt2img_parity(engine, sd3_path):
    from diffusers import StableDiffusion3Pipeline

    ours = engine.run(GenerationRequest("a red cat", model=str(sd3_path), steps=STEPS, seed=7))
    pipe = diffusers_pipe(StableDiffusion3Pipeline, sd3_path)
    ref = pipe("a red cat", num_inference_steps=STEPS, guidance_scale=GUIDANCE,
               generator=seeded(7)).images[0]
    assert_same_image(ours.images[0], ref)
    record = ours.records[0]
    assert (record.family, record.mode, record.seed, record.steps, record.guidance) == (
        "sd3", "txt2img", 7, STEPS, GUIDANCE
    )
    assert (record.sampler, record.schedule) == ("Euler", "automatic")  # toile.samplers


def test_img2img_parity_keeps_input_size(engine, sd3_path):
    from diffusers import StableDiffusion3Img2ImgPipeline

    init = gradient_image(40, 32)  # not the default size: the output must stay 40x32
    ours = engine.run(GenerationRequest("a blue dog", negative_prompt="green", model=str(sd3_path),
                                        steps=STEPS, seed=3, image=init, strength=0.7))
    assert ours.images[0].size == (40, 32)
    pipe = diffusers_pipe(StableDiffusion3Img2ImgPipeline, sd3_path)
    ref = pipe("a blue dog", negative_prompt="green", image=init, strength=0.7, width=40,
               height=32, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
               generator=seeded(3)).images[0]
    assert_same_image(ours.images[0], ref)
    record = ours.records[0]
    assert (record.family, record.mode, record.seed, record.strength) == ("sd3", "img2img", 3, 0.7)


def test_inpaint_parity_and_keeps_unmasked(engine, sd3_path):
    from diffusers import StableDiffusion3InpaintPipeline

    init, mask = gradient_image(32, 32), center_mask(32, 32)
    ours = engine.run(GenerationRequest("a cat", model=str(sd3_path), steps=STEPS, seed=5,
                                        image=init, mask=mask))
    pipe = diffusers_pipe(StableDiffusion3InpaintPipeline, sd3_path)
    ref = pipe("a cat", image=init, mask_image=mask, strength=1.0, num_inference_steps=STEPS,
               guidance_scale=GUIDANCE, height=32, width=32, generator=seeded(5)).images[0]
    # toile keeps unmasked pixels exactly (mask overlay) and matches diffusers inside the mask.
    assert_same_image(ours.images[0], Image.composite(ref, init, mask))
    assert unmasked_diff(ours.images[0], init, mask) == 0.0
    record = ours.records[0]
    assert (record.family, record.mode, record.seed, record.strength) == ("sd3", "inpaint", 5, 1.0)


def test_same_seed_same_image_and_batch_equals_singles(engine, sd3_path):
    batch = engine.run(GenerationRequest("a cat", model=str(sd3_path), steps=STEPS, seed=11,
                                         num_images=2))
    assert [r.seed for r in batch.records] == [11, 12]
    for image, record in zip(batch.images, batch.records, strict=True):
        single = engine.run(GenerationRequest("a cat", model=str(sd3_path), steps=STEPS,
                                              seed=record.seed))
        assert_same_image(image, single.images[0])
    again = engine.run(GenerationRequest("a cat", model=str(sd3_path), steps=STEPS, seed=11))
    assert max_abs_diff(again.images[0], batch.images[0]) <= 2
    assert max_abs_diff(batch.images[0], batch.images[1]) > 2  # different seeds differ


def test_outpaint_keeps_original_exactly(engine, sd3_path):
    init = gradient_image(16, 24)
    result = engine.run(GenerationRequest("a cat", model=str(sd3_path), steps=STEPS, seed=1,
                                          image=init, outpaint=Outpaint(8, 0, 8, 8)))
    out = result.images[0]
    assert out.size == (32, 32)
    assert np.array_equal(np.asarray(out)[0:24, 8:24], np.asarray(init))
    assert (result.records[0].mode, result.records[0].outpaint) == ("outpaint", (8, 0, 8, 8))


def test_progress_with_previews(engine, sd3_path):
    """SD3 latents are 4D with a VAE shift factor; the preview decodes them like the pipeline."""
    events = []
    engine.run(GenerationRequest("a cat", model=str(sd3_path), steps=STEPS, seed=1),
               progress=events.append, preview_every=2)
    assert [e.step for e in events] == [1, 2, 3]
    assert all(e.total == STEPS for e in events)
    assert events[1].preview is not None and events[1].preview.size == (32, 32)


def test_size_errors(engine, sd3_path):
    # 30 is a multiple of the VAE scale (2) but not of VAE scale x patch size (4).
    with pytest.raises(RequestError, match="width: 30 must be a multiple of 4") as info:
        engine.run(GenerationRequest("x", model=str(sd3_path), width=30, steps=1))
    assert info.value.field == "width"
    init = gradient_image(30, 32)
    with pytest.raises(RequestError, match="width: 30 .*input image"):
        engine.run(GenerationRequest("x", model=str(sd3_path), image=init, steps=1))


def test_without_t5_parity(engine, no_t5_path):
    """T5 slot null in model_index: both toile and diffusers run with zeros in its place.

    diffusers refuses such a folder unless told ``text_encoder_3=None`` (its documented way of
    dropping T5); toile reads the null slot and does that itself.
    """
    from diffusers import StableDiffusion3Pipeline

    cached = engine.load(str(no_t5_path))
    assert cached.family.name == "sd3" and cached.loaded.variant == "no-t5"
    ours = engine.run(GenerationRequest("a red cat", model=str(no_t5_path), steps=STEPS, seed=2))
    pipe = diffusers_pipe(StableDiffusion3Pipeline, no_t5_path, text_encoder_3=None,
                          tokenizer_3=None)
    assert pipe.text_encoder_3 is None
    ref = pipe("a red cat", num_inference_steps=STEPS, guidance_scale=GUIDANCE,
               generator=seeded(2)).images[0]
    assert_same_image(ours.images[0], ref)
    record = ours.records[0]
    assert (record.family, record.variant, record.mode) == ("sd3", "no-t5", "txt2img")


def test_lora_parity_and_unloaded_after(engine, sd3_path, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    from fixtures.models_sdxl_sd3 import make_lora
    from toile.request import LoraSpec

    lora = make_lora(StableDiffusion3Pipeline, sd3_path, "transformer", tmp_path)
    request = GenerationRequest("a red cat", model=str(sd3_path), steps=STEPS, seed=1)
    plain = engine.run(request).images[0]
    with_lora = engine.run(request.with_changes(loras=(LoraSpec(str(lora), 0.8),)))
    assert max_abs_diff(plain, with_lora.images[0]) > 2
    pipe = diffusers_pipe(StableDiffusion3Pipeline, sd3_path)
    pipe.load_lora_weights(str(lora), adapter_name="lora")
    pipe.set_adapters(["lora"], adapter_weights=[0.8])
    ref = pipe("a red cat", num_inference_steps=STEPS, guidance_scale=GUIDANCE,
               generator=seeded(1)).images[0]
    assert_same_image(with_lora.images[0], ref)
    assert_same_image(engine.run(request).images[0], plain, tolerance=0)  # LoRA unloaded


def test_inpainting_checkpoint_runs_inpaint_only(tmp_path):
    from diffusers import StableDiffusion3InpaintPipeline

    from fixtures.models_sdxl_sd3 import make_sd3
    from toile.errors import UnsupportedModeError

    path = make_sd3(tmp_path / "sd3-inpaint", in_channels=33)
    engine = Engine(device="cpu")
    assert engine.load(str(path)).loaded.variant == "inpainting"
    with pytest.raises(UnsupportedModeError, match="txt2img is not supported"):
        engine.run(GenerationRequest("x", model=str(path), steps=1))
    init, mask = gradient_image(32, 32), center_mask(32, 32)
    ours = engine.run(GenerationRequest("a cat", model=str(path), steps=STEPS, seed=6, image=init,
                                        mask=mask))
    pipe = diffusers_pipe(StableDiffusion3InpaintPipeline, path)
    ref = pipe("a cat", image=init, mask_image=mask, strength=1.0, num_inference_steps=STEPS,
               guidance_scale=GUIDANCE, height=32, width=32, generator=seeded(6)).images[0]
    assert_same_image(ours.images[0], Image.composite(ref, init, mask))
    assert (ours.records[0].mode, ours.records[0].variant) == ("inpaint", "inpainting")


# --- single files (Stability's layout) --------------------------------------------------------


def test_single_file_matches_the_diffusers_folder(engine, tiny_models):
    """Transformer, VAE, both CLIPs and T5 in one file, configs beside it: the same images as
    diffusers on the folder holding the same weights, txt2img and img2img."""
    from diffusers import StableDiffusion3Img2ImgPipeline, StableDiffusion3Pipeline

    single = tiny_models("sd3_single_file")
    reference = single.parent / "diffusers"
    cached = engine.load(str(single))
    assert (cached.family.name, cached.loaded.variant) == ("sd3", "")
    assert (cached.loaded.defaults.width, cached.loaded.defaults.size_multiple) == (32, 4)
    ours = engine.run(GenerationRequest("a red cat", model=str(single), steps=STEPS, seed=7))
    ref = diffusers_pipe(StableDiffusion3Pipeline, reference)(
        "a red cat", num_inference_steps=STEPS, guidance_scale=GUIDANCE, generator=seeded(7)
    ).images[0]
    assert_same_image(ours.images[0], ref)
    init = gradient_image(32, 32)
    ours = engine.run(GenerationRequest("a red cat", model=str(single), steps=STEPS, seed=3,
                                        image=init, strength=0.7))
    ref = diffusers_pipe(StableDiffusion3Img2ImgPipeline, reference)(
        "a red cat", image=init, strength=0.7, num_inference_steps=STEPS,
        guidance_scale=GUIDANCE, generator=seeded(3), width=32, height=32,
    ).images[0]
    assert_same_image(ours.images[0], ref)


def test_single_file_without_t5_runs_without_t5(engine, tiny_models):
    """``sd3_medium_incl_clips``-style: no T5 in the file, none in the config folder: run as
    the no-T5 variant (as ComfyUI does), equal to diffusers with ``text_encoder_3=None``."""
    from diffusers import StableDiffusion3Pipeline

    clips = tiny_models("sd3_single_file").parent / "tiny-sd3-clips.safetensors"
    cached = engine.load(str(clips))
    assert (cached.family.name, cached.loaded.variant) == ("sd3", "no-t5")
    ours = engine.run(GenerationRequest("a red cat", model=str(clips), steps=STEPS, seed=2))
    pipe = diffusers_pipe(StableDiffusion3Pipeline, clips.parent / "diffusers",
                          text_encoder_3=None, tokenizer_3=None)
    ref = pipe("a red cat", num_inference_steps=STEPS, guidance_scale=GUIDANCE,
               generator=seeded(2)).images[0]
    assert_same_image(ours.images[0], ref)
    assert ours.records[0].variant == "no-t5"


def test_single_file_missing_text_encoders_is_a_clear_error(tmp_path, tiny_models):
    """A transformer+VAE file (``sd3_medium.safetensors``) needs the text encoders' weights in
    its folder; without them the error names the file, the folder and the component."""
    from safetensors.torch import load_file, save_file

    from toile.errors import ModelFormatError

    source = tiny_models("sd3_single_file")
    bare = {k: v for k, v in load_file(source).items() if not k.startswith("text_encoders.")}
    target = tmp_path / "sd3_medium.safetensors"
    save_file(bare, str(target))
    shutil.copytree(source.with_suffix(""), tmp_path / "sd3_medium")
    with pytest.raises(ModelFormatError, match=r"sd3_medium\.safetensors holds no text_encoder "):
        Engine(device="cpu").load(str(target))
    # With the encoders' weights in the folder, the components come from there.
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        shutil.copy(source.parent / "diffusers" / name / "model.safetensors",
                    tmp_path / "sd3_medium" / name / "model.safetensors")
    engine = Engine(device="cpu")
    assert (engine.load(str(target)).loaded.variant, engine.load(str(source)).loaded.variant) == (
        "", "")
    request = GenerationRequest("a red cat", steps=STEPS, seed=5)
    split = engine.run(request.with_changes(model=str(target))).images[0]
    whole = engine.run(request.with_changes(model=str(source))).images[0]
    assert_same_image(split, whole, tolerance=0)
